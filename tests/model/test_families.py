"""Every model family through the pipeline: Q/K/V presets resolved per architecture, prompts applied the
same way everywhere, pooling and padding kept through training, the merge, ONNX and serving."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import cli, make_corpus
from tests.families import FAMILIES, build

QUIET = ["tracking.enabled=false"]


@pytest.fixture(scope="session")
def family_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


def family_project(tmp_path: Path, base: Path, **overrides) -> Path:
    """A project folder with a few hundred synthetic offers and a short training run on ``base``."""
    make_corpus(n_clusters_per_brand=4).to_csv(tmp_path / "corpus.csv", index=False)
    cfg = {
        "seed": 0, "run_name": "fam",
        "model": {"base": str(base)},
        "data": {"name": "synthetic", "format": "table", "path": "corpus.csv", "text_column": "title",
                 "label_column": "category", "group_column": "cluster",
                 "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
        "train": {"method": "lora", "batch_size": 16, "max_steps": 4, "lr": 5e-3, "max_seq_length": 32,
                  "lora": {"r": 4, "alpha": 8}},
        "runtime": {"num_threads": 1},
        "eval": {"bootstrap": 20, "classifier_c": [1.0], "knn_candidates": [5], "batch_size": 64},
        "export": {"quantize_int8": False, "mlflow_model": False, "sample_texts": 24},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "family.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# The q/k/v names each family's qkv preset resolves to (two layers each).
EXPECTED_QKV = {
    "bert": ["query", "key", "value"], "xlm-roberta": ["query", "key", "value"],
    "distilbert": ["q_lin", "k_lin", "v_lin"], "mpnet": ["attn.q", "attn.k", "attn.v"], "modernbert": ["Wqkv"],
    "nomic_bert": ["q_proj", "k_proj", "v_proj"], "t5": ["SelfAttention.q", "SelfAttention.k", "SelfAttention.v"],
    "qwen3": ["q_proj", "k_proj", "v_proj"],
}
LAYER_LINEAR = re.compile(r"(^|\.)(layer|layers|block)\.\d+\.")


def _inner(folder: Path):
    from sentence_transformers import SentenceTransformer

    from pipeline.model.encoder import inner_model

    return inner_model(SentenceTransformer(str(folder), device="cpu"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_presets_resolve_to_each_familys_own_modules(family, family_root):
    import torch

    from pipeline.model.families import resolve

    inner = _inner(build(family, family_root))
    qkv = resolve(inner, "qkv")
    assert qkv.modules == EXPECTED_QKV[family] and qkv.preset == "qkv" and qkv.mapped_by == "table"
    fused = family == "modernbert"
    assert qkv.fused_qkv == fused
    assert qkv.adapted_modules == (2 if fused else 6)  # one fused or three projections in each of two layers
    n = {p: resolve(inner, p).adapted_modules for p in ("qv", "qkv", "qkvo", "qkv+ffn", "all-linear")}
    assert n["qv"] == (n["qkv"] if fused else 4)  # a fused projection cannot be split: qv adapts all of Wqkv
    assert n["qkv"] < n["qkvo"] < n["all-linear"] and n["qkv"] < n["qkv+ffn"] < n["all-linear"]
    # all-linear: every linear layer inside the transformer layers, and nothing outside them (BERT's pooler)
    linear = {name for name, m in inner.named_modules() if isinstance(m, torch.nn.Linear)}
    from pipeline.model.families import _matches

    matched = {name for name in linear if any(_matches(name, t) for t in resolve(inner, "all-linear").modules)}
    assert matched == {name for name in linear if LAYER_LINEAR.search(name)}


def test_the_default_preset_is_query_key_value_on_minilm_and_keeps_the_run_identity():
    from pipeline.contracts.identity import run_fingerprint
    from pipeline.core.config import load_config
    from pipeline.model.families import resolve
    from pipeline.model.encoder import load_encoder
    from tests.conftest import REPO

    minilm = load_encoder("sentence-transformers/all-MiniLM-L6-v2")
    from pipeline.model.encoder import inner_model

    assert resolve(inner_model(minilm), "qkv").modules == ["query", "key", "value"]
    default = load_config(REPO / "configs" / "default.yaml")
    explicit = load_config(REPO / "configs" / "default.yaml", ["train.lora.target_modules=[query,key,value]"])
    assert default.train.lora.target_modules == "qkv"
    # the default run's identity (checkpoints, skip-if-done, sweeps) is what it was with the explicit list
    assert run_fingerprint(default, "data") == run_fingerprint(explicit, "data")
    assert run_fingerprint(default, "data") != run_fingerprint(
        load_config(REPO / "configs" / "default.yaml", ["train.lora.target_modules=qv"]), "data")


def test_an_unmapped_architecture_is_mapped_by_names_or_stops_with_a_clear_error(family_root):
    import torch

    from pipeline.core.errors import ConfigError
    from pipeline.model.families import resolve

    clone = _inner(build("bert", family_root))
    clone.config.model_type = "my-bert"  # a BERT clone under its own name: found by its module names
    targets = resolve(clone, "qkv")
    assert targets.modules == ["query", "key", "value"] and targets.mapped_by == "module names"

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "odd"})()
            self.mix, self.out = torch.nn.Linear(4, 12), torch.nn.Linear(4, 4)

    with pytest.raises(ConfigError, match=r"preset 'qkv' has no mapping for architecture 'odd'.*\['mix', 'out'\]"):
        resolve(Odd(), "qkv")
    with pytest.raises(ConfigError, match=r"\['query'\] not found in the base model \(odd\)"):
        resolve(Odd(), ["query"])
    assert resolve(Odd(), ["mix"]).adapted_modules == 1  # explicit names still work


def _run_stages(config: Path, *extra: str, stages=("prepare", "train", "embed", "eval", "export"),
                tracked: bool = False) -> None:
    for stage in stages:
        # a few steps of a random tiny model rarely beat it on validation, and export refuses such a run;
        # that refusal has its own test (tests/export/test_export.py), here the gate is what is checked
        force = ("--force",) if stage == "export" else ()
        assert cli(stage, "--config", str(config), *([] if tracked else QUIET), *extra, *force) == 0, stage


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_evaluates_and_exports_through_the_gate(family, family_root, tmp_path, monkeypatch):
    """No target-module setting: the default qkv preset finds each family's projections; pooling and
    padding side survive into the merged folder and the ONNX graph (whose gate compares them)."""
    from sentence_transformers import SentenceTransformer

    base = build(family, family_root)
    monkeypatch.chdir(tmp_path)
    tracked = family == "distilbert"  # one family also checks the MLflow params (the store costs seconds)
    if tracked:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _run_stages(family_project(tmp_path, base), tracked=tracked)
    info = json.loads(Path("runs/fam/model/model_info.json").read_text())
    assert info["lora"]["target_modules"] == EXPECTED_QKV[family]
    # the run trains exactly what it saves, and reloads as the model it validated (issue 22)
    from pipeline.model.encoder import saved_parameters

    train = json.loads(Path("runs/fam/model/manifest.json").read_text())["train"]
    assert info["trainable_params"] == saved_parameters(Path("runs/fam/model/adapter")) == train["saved_params"]
    assert train["reload_min_cos"] >= 0.9999
    if tracked:
        import mlflow

        run_id = json.loads(Path("runs/fam/model/manifest.json").read_text())["mlflow_run_id"]
        run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
        params = run.data.params
        # the prepared data the run read, as MLflow dataset inputs (the UI's Dataset column)
        inputs = {d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
                  for d in run.inputs.dataset_inputs}
        from pipeline.core.artifacts import sha256_file

        assert inputs == {f"synthetic-{s}": (sha256_file(f"data/processed/synthetic/{s}.jsonl")[:16], s)
                          for s in ("train", "val", "test", "pairs")}
        assert params["resolved_target_modules"] == "q_lin,k_lin,v_lin" and params["adapted_modules"] == "6"
        assert params["train.lora.target_modules"] == "qkv" and params["architecture"] == "distilbert"
    lora = json.loads(Path("reports/fam/metrics.json").read_text())["model"]["lora"]
    assert lora["target_modules"] == EXPECTED_QKV[family] and lora["preset"] == "qkv"
    assert lora["adapted_modules"] == (2 if family == "modernbert" else 6)
    adapter = json.loads(Path("runs/fam/model/adapter/adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(EXPECTED_QKV[family])
    manifest = json.loads(Path("exports/fam/manifest.json").read_text())
    assert manifest["gate"]["passed"] and manifest["gate"]["onnx_vs_torch_min_cos"] >= 0.999
    assert manifest["gate"]["changed_outside_adapted"] == []  # the merge touched only the adapted modules
    _, _, _, pooling, side = FAMILIES[family]
    onnx_meta = json.loads(Path("exports/fam/onnx/onnx_config.json").read_text())
    assert (onnx_meta["pooling_mode"], onnx_meta["padding_side"]) == (pooling, side)
    merged = SentenceTransformer("exports/fam/merged", device="cpu")
    assert merged[0].tokenizer.padding_side == side and merged[1].pooling_mode == pooling


PROMPTS = {"query": "Instruct: find the same product\nQuery: ", "passage": "passage: "}  # E5 names the document side


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_pipeline_vectors_equal_sentence_transformers_with_prompt_name(family, family_root):
    from pipeline.model import tokens as encoding
    from pipeline.model import prompts
    from pipeline.model.encoder import load_encoder

    st = load_encoder(str(build(family, family_root, prompts=PROMPTS)), max_seq_length=32)
    used = prompts.of_model(st)
    assert used == prompts.Prompts(PROMPTS["query"], PROMPTS["passage"])
    texts = ["apple iphone a123 black", "x", "new lg oled tv b456 2 year warranty " * 4]
    for role, name in (("query", "query"), ("document", "passage")):
        ours = encoding.encode_texts(st, used.apply(texts, role), max_seq_length=32)
        ref = st.encode(texts, prompt_name=name, normalize_embeddings=True, convert_to_numpy=True)
        np.testing.assert_allclose(ours, ref, atol=1e-5)
    # and model.prompts wins over the model's own ("" switches one off)
    override = prompts.from_saved(st.prompts, type("P", (), {"query": "", "document": None})())
    assert override == prompts.Prompts("", PROMPTS["passage"])


def test_removing_the_prompts_changes_the_embeddings(family_root, tmp_path, monkeypatch):
    base = build("bert", family_root, prompts=PROMPTS)
    monkeypatch.chdir(tmp_path)
    config = family_project(tmp_path, base, **{"train.method": "base"})
    _run_stages(config, stages=("prepare", "train", "embed"))
    with_prompts = Path(json.loads(Path("runs/fam/embeddings/manifest.json").read_text())["base_dir"])
    _run_stages(config, "model.prompts.query=\"\"", "model.prompts.document=\"\"", "run_name=plain",
                stages=("train", "embed"))
    without = Path(json.loads(Path("runs/plain/embeddings/manifest.json").read_text())["base_dir"])
    assert with_prompts != without  # the base-embedding cache is keyed on the prompts
    for name in ("test.npy", "labels.npy"):
        assert not np.allclose(np.load(with_prompts / name), np.load(without / name), atol=1e-4), name
    assert (with_prompts / "test.query.npy").exists() and not (without / "test.query.npy").exists()
    assert not np.allclose(np.load(with_prompts / "test.query.npy"), np.load(with_prompts / "test.npy"), atol=1e-4)


PEFT_FREE = """
import json, sys
import numpy as np
sys.modules["peft"] = None  # as if peft were not installed
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], device="cpu")
texts = json.loads(sys.argv[2])
out = {"query": model.encode_query(texts, normalize_embeddings=True).tolist(),
       "document": model.encode_document(texts, normalize_embeddings=True).tolist()}
print(json.dumps(out))
"""


def test_a_model_that_ships_prompts_is_trained_evaluated_exported_and_served_with_them(family_root, tmp_path,
                                                                                         monkeypatch):
    """Qwen3 shape (last-token pooling, left padding) with Qwen3-Embedding-style prompts, and gradient
    checkpointing on: every stage applies the prompts, and the merged folder, loaded by plain
    sentence-transformers without peft, gives the ONNX and the adapter forms' vectors for both roles."""
    import subprocess
    import sys

    from fastapi.testclient import TestClient

    from pipeline.model import prompts
    from pipeline.contracts.export_folder import load_form
    from pipeline.serve.stage import create_app
    from pipeline.train.loop import PairTensors

    base = build("qwen3", family_root, prompts=PROMPTS)
    monkeypatch.chdir(tmp_path)
    _run_stages(family_project(tmp_path, base, **{"train.gradient_checkpointing": True}))
    used = prompts.Prompts(PROMPTS["query"], PROMPTS["passage"])
    info = json.loads(Path("runs/fam/model/model_info.json").read_text())
    assert prompts.of_record(info["prompts"]) == used
    emb = json.loads(Path("runs/fam/embeddings/manifest.json").read_text())
    assert all((Path(d) / "test.query.npy").exists() for d in (emb["adapted_dir"], emb["base_dir"]))
    saved = json.loads(Path("exports/fam/merged/config_sentence_transformers.json").read_text())["prompts"]
    assert saved["query"] == used.query and saved["document"] == used.document
    assert prompts.of_record(json.loads(Path("exports/fam/onnx/onnx_config.json").read_text())["prompts"]) == used
    gate = json.loads(Path("exports/fam/manifest.json").read_text())["gate"]
    assert gate["roles"] == ["document", "query"] and gate["passed"]

    texts = ["apple iphone a123 black", "sony bravia tv 2 year warranty", "x"]
    proc = subprocess.run([sys.executable, "-c", PEFT_FREE, "exports/fam/merged", json.dumps(texts)],
                          capture_output=True, text=True, timeout=300, check=True)
    plain = {k: np.asarray(v, dtype=np.float32) for k, v in json.loads(proc.stdout.splitlines()[-1]).items()}
    assert not np.allclose(plain["query"], plain["document"], atol=1e-4)
    for form in ("onnx", "adapter"):
        enc = load_form(Path("exports/fam"), form)
        for role in ("query", "document"):
            np.testing.assert_allclose(enc.encode(texts, role), plain[role], atol=2e-4, err_msg=f"{form} {role}")

    client = TestClient(create_app(Path("exports/fam"), "onnx"))
    got = client.post("/embed", json={"texts": texts, "role": "query"}).json()
    np.testing.assert_allclose(np.asarray(got["embeddings"]), plain["query"], atol=2e-4)
    got = client.post("/embed", json={"texts": texts}).json()
    np.testing.assert_allclose(np.asarray(got["embeddings"]), plain["document"], atol=2e-4)
    hits = client.get("/search", params={"q": texts[0], "k": 3}).json()["results"]
    index = load_form(Path("exports/fam"), "onnx")
    from pipeline.contracts.export_folder import SearchIndex

    expected = SearchIndex(Path("exports/fam/index")).search(index.encode([texts[0]], "query"), 3)[0]
    assert [h["row"] for h in hits] == [h["row"] for h in expected]

    # training tokenised anchors as queries and positives as documents
    import pandas as pd

    from pipeline.model.encoder import load_encoder

    st = load_encoder(str(base), max_seq_length=32)
    pairs = pd.DataFrame({"anchor": ["a b"], "positive": ["a b"], "kind": ["group"], "group": ["g"], "label": [None]})
    data = PairTensors(pairs, st, 32, used)
    tok = st[0].tokenizer
    assert data.ids[data.anchor[0]] == tok(used.query + "a b", truncation=True, max_length=32)["input_ids"]
    assert data.ids[data.positive[0]] == tok(used.document + "a b", truncation=True, max_length=32)["input_ids"]


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_gradient_checkpointing_gives_the_lora_weights_their_gradients(family, family_root):
    """Field note 4: with reentrant checkpointing and frozen embeddings LoRA gets no gradient. Ours must
    get one, equal to the gradient without checkpointing."""
    import torch

    from pipeline.model import tokens as encoding
    from pipeline.core.config import LoraSettings
    from pipeline.model.encoder import apply_lora, enable_gradient_checkpointing, inner_model, load_encoder

    def lora_grads(checkpointing: bool) -> dict:
        st = load_encoder(str(build(family, family_root)), max_seq_length=32)
        torch.manual_seed(1)
        apply_lora(st, LoraSettings(r=4, alpha=8, dropout=0.0))
        for name, p in st.named_parameters():  # lora_B starts at zero: give it values so lora_A gets a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        if checkpointing:
            enable_gradient_checkpointing(st)
            assert any(getattr(m, "gradient_checkpointing", False) is True for m in inner_model(st).modules())
        st.train()
        ids = encoding.tokenize(st, ["apple iphone a123", "lg oled tv b456 black", "x"], 32)
        pad, side = encoding.pad_info(st)
        emb = encoding.forward(st, encoding.collate(ids, pad, side))
        (emb @ emb.T).sum().backward()
        return {n: p.grad.clone() for n, p in st.named_parameters() if p.requires_grad}

    plain, checkpointed = lora_grads(False), lora_grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        assert checkpointed[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("setting, needs", [("train.quantization=4bit", "bitsandbytes package"),
                                            ("train.weights_dtype=bf16", "CUDA GPU")])
def test_qlora_and_bf16_weights_stop_with_what_they_need_without_cuda(setting, needs, project, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this checks the message on a machine without CUDA")
    assert cli("prepare", "--config", str(project), *QUIET) == 0
    assert cli("train", "--config", str(project), *QUIET, setting, "train.device=cpu") == 2
    err = capsys.readouterr().err
    assert f"{setting.split('=')[0]}" in err and "needs a CUDA GPU" in err and needs in err


def test_within_split_retrieval_asks_with_the_query_form():
    from pipeline.search.metrics import group_retrieval

    # items 0,1 share a group; as documents 0 is nearest to 2, as a query 0 is nearest to 1
    docs = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    queries = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    groups = np.array(["a", "a", "b", "c"])
    assert group_retrieval(docs, groups, k=1)["recall@1"][0] == 0.0
    assert group_retrieval(docs, groups, k=1, query_embeddings=queries)["recall@1"][0] == 1.0


def test_mining_embeds_anchors_as_queries(family_root, tmp_path):
    from pipeline.model import tokens as encoding
    from pipeline.prepare import hard_negatives
    from pipeline.core.config import Config
    from pipeline.model.encoder import load_encoder

    base = build("bert", family_root, prompts=PROMPTS)
    cfg = Config.model_validate({"model": {"base": str(base)}, "train": {"max_seq_length": 32, "device": "cpu",
                                                                          "precision": "fp32"}})
    docs, anchors = hard_negatives._embed(cfg, ["lg oled tv"], ["apple iphone"])
    st = load_encoder(str(base), max_seq_length=32)
    np.testing.assert_allclose(anchors, encoding.encode_texts(st, [PROMPTS["query"] + "apple iphone"],
                                                              max_seq_length=32), atol=1e-5)
    np.testing.assert_allclose(docs, encoding.encode_texts(st, [PROMPTS["passage"] + "lg oled tv"],
                                                           max_seq_length=32), atol=1e-5)
    plain = cfg.model_copy(update={"model": cfg.model.model_copy(update={"prompts": type(cfg.model.prompts)(
        query="", document="")})})
    assert hard_negatives._embed(plain, ["lg oled tv"], ["apple iphone"])[1] is None  # one form: embedded once


def test_a_sweep_entry_naming_a_preset_resolves_per_model():
    from pipeline.experiments import sweep
    from pipeline.core.config import load_config
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "sweep.yaml", ["sweep.target_presets={qv: [qv], names: [query, value]}",
                                                         "sweep.ranks=[4]", "sweep.alpha_multipliers=[2]"])
    children = {p.preset: sweep.child_config(cfg, p) for p in sweep.grid(cfg) if p.method == "lora"}
    assert children["qv"].train.lora.target_modules == "qv"
    assert children["names"].train.lora.target_modules == ["query", "value"]
    # on MiniLM both train the same modules, so both are the same run identity
    from pipeline.contracts.identity import run_fingerprint as fingerprint

    assert fingerprint(children["qv"], "d") == fingerprint(
        children["names"].model_copy(update={"run_name": children["qv"].run_name}), "d")


@pytest.mark.slow
def test_bench_memory_part_runs_a_decoder_shape_with_and_without_checkpointing(tmp_path):
    import pandas as pd

    from pipeline.bench import harness as bench
    from pipeline.core.config import Config

    pairs = pd.DataFrame({"anchor": [f"apple iphone {i}" for i in range(8)], "positive": [f"iphone {i} black"
                                                                                       for i in range(8)],
                          "kind": "group", "group": [str(i) for i in range(8)], "label": None})
    pairs.to_json(tmp_path / "pairs.jsonl", orient="records", lines=True)
    cfg = Config.model_validate({"train": {"batch_size": 4, "max_seq_length": 16}, "runtime": {"num_threads": 1},
                                 "bench": {"memory_shapes": ["qwen3-tiny"], "memory_steps": 1}})
    rows = bench.bench_memory(cfg, tmp_path / "work", tmp_path / "pairs.jsonl", {}, "cpu")
    assert [r["name"] for r in rows] == ["qwen3-tiny lora checkpointing", "qwen3-tiny lora"]
    assert [r["gradient_checkpointing"] for r in rows] == [True, False]
    assert all(0 < r["trainable_params"] < r["total_params"] / 10 for r in rows)
    key = "memory at qwen3-tiny: LoRA / LoRA with gradient checkpointing RSS added by training"
    assert (key in bench.memory_ratios(rows)) == all(r.get("train_added_rss_mb") for r in rows)


def test_probe_embeds_with_the_models_prompts(family_root, tmp_path, monkeypatch):
    from pipeline.model import tokens as encoding
    from pipeline.model.encoder import load_encoder
    from pipeline.contracts.prepared_data import load_split
    from tests.conftest import walmart_config

    base = build("bert", family_root, prompts=PROMPTS)
    monkeypatch.chdir(tmp_path)
    labelled = family_project(tmp_path, base, **{"train.method": "base"})
    pairs = ["--config", str(walmart_config(tmp_path)), f"model.base={base}", "train.method=base",
             "train.precision=fp32", *QUIET]  # fp32: compared with fp32 encodings below
    assert cli("prepare", *pairs) == 0 and cli("train", *pairs) == 0
    assert cli("probe", *pairs, f"eval.probe_config={labelled}") == 0
    found = sorted(Path("cache").rglob("test.query.npy"))
    assert len(found) == 1  # the base model's probe embeddings, with the query copy of the test split
    texts = load_split(Path("data/processed/synthetic"), "test")["text"].tolist()
    st = load_encoder(str(base), max_seq_length=32)
    for name, prefix in (("test.query.npy", PROMPTS["query"]), ("test.npy", PROMPTS["passage"])):
        expected = encoding.encode_texts(st, [prefix + t for t in texts], max_seq_length=32)
        np.testing.assert_allclose(np.load(found[0].parent / name), expected, atol=1e-4)
