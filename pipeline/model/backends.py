"""Encoder backends: one loaded sentence-transformers model, encoded the fastest way that is proven equal.

Every stage that embeds texts (embed, and through its manifest eval; the corpus job) turns its loaded
``SentenceTransformer`` (base, full or LoRA-merged) into an encoder here::

    encoder, record = backends.select(cfg, st_model, probe_texts)
    vectors = encoder.encode(texts)     # float32 (len(texts), dim), rows L2-normalised, input order

``encoder.name`` says which form runs: ``torch-fp32`` (the reference), ``torch-bf16`` (a bf16 copy of the
weights, where the device computes bf16 natively) or ``onnx-fp32`` (the model traced to ONNX, transformer
fusions applied, run by onnxruntime). ``embed.backend`` chooses among them: ``torch`` or ``onnx`` limit
the candidates to that runtime, ``auto`` tries all. Each candidate encodes ``probe_texts`` and must match
``torch-fp32`` row by row (cosine >= ``embed.gate_min_cos``); the fastest one that passes is chosen.
``record`` (a JSON-able dict) keeps the gate's result and each candidate's speed, for manifests and
metrics.json. Callers apply prompts themselves (``encode`` takes the texts as the model should see them).

The traced ONNX model is cached under ``<paths.cache>/onnx/<weights fingerprint>/`` so a run does not
trace it again. The ONNX export code of the export stage lives here too (``export_onnx``,
``quantize_int8``, ``OnnxEncoder``), so both use one trace.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import time
import warnings
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import pandas as pd

from pipeline.model import tokens as encoding
from pipeline.model import prompts
from pipeline.core.artifacts import atomic_dir, read_json, write_json_atomic
from pipeline.core.errors import ConfigError, ExportError
from pipeline.model.encoder import cpu_has_bf16, inner_model

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model_qint8.onnx"
ONNX_FUSED_FILE = "model_fused.onnx"
ONNX_META = "onnx_config.json"
ONNX_OPSET = 17
# Bump when the cached ONNX build changes (trace, fusion), so an old cache entry is not reused.
ONNX_CACHE_VERSION = 2
# Architectures whose graph onnxruntime's transformer optimizer fuses (attention, layer norm, GELU);
# anything else runs the traced graph with onnxruntime's generic optimisations only.
FUSABLE = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "mpnet": "bert",
           "electra": "bert"}


class Encoder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (len(texts), dim), rows L2-normalised, in input order."""


def onnx_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session with every graph optimisation on; ``threads`` intra-op threads (None: ORT's
    default, one per physical core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------ ONNX (export too)

class OnnxEncoder:
    """The exported ONNX graph with its tokenizer: needs onnxruntime, tokenizers and numpy only.

    The ``tokenizers`` library is used directly (not transformers) so a search service over the ONNX
    form does not pull in torch; truncation, padding side and pad id come from ``onnx_config.json``,
    which records the base tokenizer's settings, and the gate checks the result against PyTorch.
    """

    def __init__(self, folder: Path, file: str = ONNX_FILE, *, batch_size: int = 64, threads: int | None = None):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.meta = read_json(folder / ONNX_META)
        self.session = onnx_session(folder / file, threads)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.meta["max_seq_length"], direction=self.meta.get("truncation_side", "right"))
        self.inputs = list(self.meta["inputs"])
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return int(self.meta["embedding_dim"])

    def _feed(self, encs) -> dict[str, np.ndarray]:
        longest = max(len(e.ids) for e in encs)
        pad, left = self.meta["pad_token_id"], self.meta.get("padding_side", "right") == "left"
        arrays = {"input_ids": np.full((len(encs), longest), pad, dtype=np.int64),
                  "attention_mask": np.zeros((len(encs), longest), dtype=np.int64),
                  "token_type_ids": np.zeros((len(encs), longest), dtype=np.int64)}
        for i, e in enumerate(encs):
            n = len(e.ids)
            cols = slice(longest - n, longest) if left else slice(0, n)
            arrays["input_ids"][i, cols] = e.ids
            arrays["attention_mask"][i, cols] = 1
            arrays["token_type_ids"][i, cols] = e.type_ids
        return {k: arrays[k] for k in self.inputs}

    def encode(self, texts: Sequence[str], role: prompts.Role = "document") -> np.ndarray:
        """L2-normalised float32 embeddings, shape (len(texts), dim); longest texts batched first. The
        prompts recorded in ``onnx_config.json`` are prepended as the PyTorch forms do."""
        encs = self.tokenizer.encode_batch(prompts.of_record(self.meta.get("prompts")).apply(texts, role))
        out = np.zeros((len(encs), self.dim), dtype=np.float32)
        order = np.argsort([-len(e.ids) for e in encs], kind="stable")
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            emb = self.session.run(["sentence_embedding"], self._feed([encs[i] for i in idx]))[0]
            out[idx] = emb
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def export_onnx(st_model, folder: Path, max_seq_length: int, sample: Sequence[str],
                used: prompts.Prompts | None = None) -> dict:
    """Trace the whole sentence-transformers pipeline into ``folder/model.onnx`` and save the tokenizer.

    Why not Optimum (the sentence-transformers ONNX backend): its only release (optimum-onnx 0.1.0)
    requires transformers < 4.58, and this project pins transformers 5. The TorchScript exporter is
    used because the dynamo exporter needs onnxscript, one more dependency for the same graph. The
    trace example must contain padding: a batch without it could let the attention mask be traced away.
    """
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    tok = st_model[0].tokenizer
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tok.model_input_names]
    texts = [max(sample, key=len), min(sample, key=len)]
    dummy = tok(texts, padding=True, truncation=True, max_length=max_seq_length, return_tensors="pt")
    if bool(dummy["attention_mask"].all()):
        raise ExportError("cannot build an ONNX trace example with padding (all sample texts tokenise to one length)")

    class SentenceGraph(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            out = self.model(dict(zip(names, inputs)))
            return out["token_embeddings"], out["sentence_embedding"]

    graph = SentenceGraph(st_model).eval()
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes.update({"last_hidden_state": {0: "batch", 1: "sequence"}, "sentence_embedding": {0: "batch"}})
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # tracer warnings on shape-constant branches (always true here)
        torch.onnx.export(graph, tuple(dummy[n] for n in names), str(folder / ONNX_FILE), dynamo=False,
                          input_names=names, output_names=["last_hidden_state", "sentence_embedding"],
                          dynamic_axes=axes, opset_version=ONNX_OPSET, do_constant_folding=True)
    import onnx

    # The tracer drops an input the model never reads (token_type_ids of a BERT tokenizer on DistilBERT,
    # MPNet or T5): the graph's own inputs are what a caller must feed.
    graph_inputs = [i.name for i in onnx.load(str(folder / ONNX_FILE), load_external_data=False).graph.input]
    tok.save_pretrained(str(folder))
    inner_model(st_model).config.save_pretrained(str(folder))
    meta = {"inputs": graph_inputs, "outputs": ["last_hidden_state", "sentence_embedding"],
            "max_seq_length": max_seq_length, "embedding_dim": int(st_model.get_embedding_dimension()),
            "padding_side": getattr(tok, "padding_side", "right") or "right",
            "truncation_side": getattr(tok, "truncation_side", "right") or "right",
            "pad_token_id": int(tok.pad_token_id if tok.pad_token_id is not None else 0),
            "pooling": "in graph (the sentence-transformers modules after the transformer)",
            "pooling_mode": next((m.pooling_mode for m in st_model if hasattr(m, "pooling_mode")), None),
            "prompts": (used or prompts.Prompts()).record(),
            "normalized_in_graph": any(type(m).__name__ == "Normalize" for m in st_model), "opset": ONNX_OPSET}
    write_json_atomic(folder / ONNX_META, meta)
    return meta


def quantize_int8(folder: Path) -> None:
    """Dynamic int8 quantisation of the MatMul weights, per output channel.

    Per-channel MatMul-only quantisation keeps MiniLM embeddings at about 0.99 cosine to fp32;
    the default per-tensor scheme over all ops measured about 0.92-0.97 on product titles.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def hush(record: logging.LogRecord) -> bool:
        # onnxruntime's quantiser logs generic hints per tensor straight on the root logger
        return "onnxruntime" not in record.pathname

    root = logging.getLogger()
    root.addFilter(hush)
    try:
        quantize_dynamic(str(folder / ONNX_FILE), str(folder / ONNX_INT8_FILE), weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=["MatMul"])
    finally:
        root.removeFilter(hush)


# ------------------------------------------------------------------------------------------------ backends

def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` (n, d) with the same row of ``b`` (n, d); shape (n,)."""
    return np.sum(_normalised(a) * _normalised(b), axis=1)


class TorchBackend:
    """The project's PyTorch encoder (tokenised once, longest first, per-batch padding, CPU token budget)
    on ``model``: the caller's model (``torch-fp32``) or a bf16 copy of it (``torch-bf16``)."""

    def __init__(self, name: str, model, *, max_seq_length: int, batch_size: int, device):
        self.name, self.model = name, model
        self.max_seq_length, self.batch_size, self.device = max_seq_length, batch_size, device

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return encoding.encode_texts(self.model, list(texts), max_seq_length=self.max_seq_length,
                                     batch_size=self.batch_size, device=self.device, dtype=None)


class OnnxBackend:
    """An onnxruntime session over the traced model, fed the token ids of the model's own (Hugging Face)
    tokenizer, so ids, truncation and padding side are those of the PyTorch path.

    Texts run longest first in batches of at most ``batch_size`` rows and ``token_budget`` padded tokens.
    ``observer``, when set, is called with each batch's attention mask (rows, width): the bench counts
    tokens with it.
    """

    def __init__(self, name: str, session, st_model, meta: dict, *, max_seq_length: int, batch_size: int,
                 token_budget: int | None):
        self.name, self.session, self.st_model, self.meta = name, session, st_model, meta
        self.max_seq_length, self.batch_size, self.token_budget = max_seq_length, batch_size, token_budget
        self.inputs = list(meta["inputs"])
        self.observer: Callable[[np.ndarray], None] | None = None

    def _feed(self, ids: list[list[int]]) -> dict[str, np.ndarray]:
        pad, side = encoding.pad_info(self.st_model)
        longest = max(len(x) for x in ids)
        feed = {"input_ids": np.full((len(ids), longest), pad, dtype=np.int64),
                "attention_mask": np.zeros((len(ids), longest), dtype=np.int64)}
        for i, row in enumerate(ids):
            cols = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
            feed["input_ids"][i, cols] = row
            feed["attention_mask"][i, cols] = 1
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        return {k: feed[k] for k in self.inputs}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        ids = encoding.tokenize(self.st_model, list(texts), self.max_seq_length)
        out = np.zeros((len(ids), int(self.meta["embedding_dim"])), dtype=np.float32)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        for start, stop in encoding.batch_bounds([len(ids[i]) for i in order], self.batch_size, self.token_budget):
            idx = order[start:stop]
            feed = self._feed([ids[i] for i in idx])
            if self.observer is not None:
                self.observer(feed["attention_mask"])
            out[idx] = self.session.run(["sentence_embedding"], feed)[0]
        return _normalised(out)


def weights_fingerprint(st_model) -> str:
    """sha256 over every weight tensor (name, dtype, bytes) and the module stack's description: what a
    traced graph depends on."""
    import torch

    h = hashlib.sha256(f"{ONNX_CACHE_VERSION}|{ONNX_OPSET}|{torch.__version__}|{st_model!r}".encode())
    for name, tensor in st_model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def fuse_transformer(folder: Path, st_model) -> bool:
    """Write ``ONNX_FUSED_FILE`` with onnxruntime's transformer fusions when the architecture has them;
    returns whether it did. The equivalence gate checks the fused graph like any other form."""
    from onnxruntime.transformers.optimizer import optimize_model

    config = inner_model(st_model).config
    kind = FUSABLE.get(getattr(config, "model_type", ""))
    if kind is None:
        return False
    optimized = optimize_model(str(folder / ONNX_FILE), model_type=kind, num_heads=int(config.num_attention_heads),
                               hidden_size=int(config.hidden_size), opt_level=1, use_gpu=False)
    optimized.save_model_to_file(str(folder / ONNX_FUSED_FILE))
    return True


@contextlib.contextmanager
def _eager_attention(st_model, on: bool):
    """Trace the plain (eager) attention: the fuser recognises its MatMul/Softmax pattern, not the graph of
    PyTorch's fused scaled_dot_product_attention. Same maths; the gate checks the result."""
    inner = inner_model(st_model)
    before = getattr(inner.config, "_attn_implementation", None)
    if not on or before in (None, "eager") or not hasattr(inner, "set_attn_implementation"):
        yield
        return
    inner.set_attn_implementation("eager")
    try:
        yield
    finally:
        inner.set_attn_implementation(before)


def cached_onnx(st_model, cache_root: Path, max_seq_length: int, fuse: bool = True) -> tuple[Path, dict]:
    """The traced (and, where possible, fused) ONNX model of ``st_model``, built once per weights
    fingerprint under ``cache_root/onnx/``; returns (graph file, onnx_config.json contents)."""
    folder = Path(cache_root) / "onnx" / f"{weights_fingerprint(st_model)}-{'fused' if fuse else 'plain'}"
    if not (folder / ONNX_META).exists():
        model = st_model if st_model.device.type == "cpu" else copy.deepcopy(st_model).to("cpu")
        fusable = fuse and FUSABLE.get(getattr(inner_model(model).config, "model_type", "")) is not None
        # Trace example with padding: two texts of clearly different token lengths.
        sample = ["a", " ".join(["padding example"] * 8)]
        with atomic_dir(folder) as tmp, _eager_attention(model, fusable):
            meta = export_onnx(model, tmp, max_seq_length, sample)
            meta["fused"] = fusable and fuse_transformer(tmp, model)
            if meta["fused"]:
                (tmp / ONNX_FILE).unlink()  # only the fused graph runs; one model-sized file per weights is enough
            write_json_atomic(tmp / ONNX_META, meta)
        log.info("backends: traced the model to ONNX in %s (fused: %s)", folder, meta["fused"])
    meta = read_json(folder / ONNX_META)
    return folder / (ONNX_FUSED_FILE if meta.get("fused") else ONNX_FILE), meta


def candidates(cfg, st_model, device, max_seq_length: int, batch_size: int) -> list[tuple[str, Callable[[], Encoder]]]:
    """(name, build) of every form ``embed.backend`` allows on this device, ``torch-fp32`` first."""
    import torch

    device = torch.device(device)
    kw = {"max_seq_length": max_seq_length, "batch_size": batch_size, "device": device}
    want = cfg.embed.backend
    out: list[tuple[str, Callable[[], Encoder]]] = [("torch-fp32", lambda: TorchBackend("torch-fp32", st_model, **kw))]
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    if want in ("auto", "torch") and bf16 and cfg.train.precision != "fp32":
        out.append(("torch-bf16", lambda: TorchBackend("torch-bf16", copy.deepcopy(st_model).to(torch.bfloat16), **kw)))
    if want == "onnx" or (want == "auto" and device.type == "cpu"):  # onnxruntime here runs on the CPU only
        def build_onnx() -> Encoder:
            path, meta = cached_onnx(st_model, Path(cfg.paths.cache), max_seq_length, cfg.embed.onnx_fusion)
            return OnnxBackend("onnx-fp32", onnx_session(path, cfg.train.num_threads), st_model, meta,
                               max_seq_length=max_seq_length, batch_size=batch_size,
                               token_budget=cfg.embed.onnx_token_budget)
        out.append(("onnx-fp32", build_onnx))
    return out


def _texts_per_second(encoder: Encoder, texts: Sequence[str], repeats: int) -> float:
    """Best of ``repeats`` timed passes over ``texts`` (after the gate's pass warmed it up)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        encoder.encode(texts)
        best = min(best, time.perf_counter() - t0)
    return len(texts) / best if best > 0 else float("inf")


def select(cfg, st_model, probe_texts: Sequence[str], *, device="cpu", max_seq_length: int | None = None,
           batch_size: int | None = None) -> tuple[Encoder, dict]:
    """The fastest form of ``st_model`` that ``embed.backend`` allows and that matches ``torch-fp32`` on
    ``probe_texts`` (per row cosine >= ``embed.gate_min_cos``); returns (encoder, record).

    ``record``: {requested, name, gate_min_cos, probe_texts, device, candidates: {name: {min_cos, passed,
    texts_per_s} or {passed: false, error}}}. ``torch-fp32`` is the reference and always qualifies. Under
    ``auto`` a form that cannot be built (an architecture the ONNX trace does not cover) is recorded with its
    error and logged; with ``embed.backend: onnx`` that error, or a failed gate, stops here instead of
    quietly running PyTorch.
    """
    e = cfg.embed
    probe = [t for t in dict.fromkeys(probe_texts) if t][: e.probe_texts]
    if not probe:
        raise ConfigError("backends.select: no probe texts to check the encoder forms on")
    max_seq_length = int(max_seq_length or st_model.max_seq_length)
    batch_size = int(batch_size or cfg.eval.batch_size)
    found = candidates(cfg, st_model, device, max_seq_length, batch_size)
    record: dict = {"requested": e.backend, "gate_min_cos": e.gate_min_cos, "probe_texts": len(probe),
                    "device": str(device), "candidates": {}}
    reference = None
    built: dict[str, Encoder] = {}
    for name, build in found:  # torch-fp32, the reference, first
        try:
            encoder = build()
            vectors = encoder.encode(probe)
        except Exception as exc:  # noqa: BLE001  recorded and logged; fatal unless another form may run
            if e.backend != "auto" or reference is None:
                raise
            log.warning("backends: %s cannot run (%s: %s); left out", name, type(exc).__name__, exc)
            record["candidates"][name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        reference = vectors if reference is None else reference
        cos = row_cosines(vectors, reference)
        entry = {"min_cos": round(float(cos.min()), 6), "passed": bool(cos.min() >= e.gate_min_cos)}
        if entry["passed"]:
            built[name] = encoder
            if len(found) > 1:
                entry["texts_per_s"] = round(_texts_per_second(encoder, probe, e.probe_repeats), 1)
        record["candidates"][name] = entry
    chosen = _choose(record, built, e.backend)
    record["name"] = chosen
    log.info("backends: %s (requested %s; %s)", chosen, e.backend, ", ".join(
        f"{n} min cos {c.get('min_cos', float('nan')):.6f}{'' if c['passed'] else ' FAILED'}"
        + (f" {c['texts_per_s']:.0f} texts/s" if 'texts_per_s' in c else "") for n, c in record["candidates"].items()))
    return built[chosen], record


def _choose(record: dict, built: dict, requested: str) -> str:
    passed = {n: c for n, c in record["candidates"].items() if c["passed"]}
    if requested != "auto":
        # torch-fp32 is in an onnx run only as the reference; a failed ONNX form must not hide behind it
        own = {n: c for n, c in passed.items() if n.startswith(requested)}
        if not own:
            failed = {n: c.get("min_cos") for n, c in record["candidates"].items() if n.startswith(requested)}
            raise ConfigError(f"embed.backend={requested}: no {requested} form matches torch-fp32 on the probe "
                              f"(min cosine {failed} < embed.gate_min_cos={record['gate_min_cos']}); "
                              "use embed.backend=auto or torch")
        passed = own
    if len(passed) == 1:
        return next(iter(passed))
    return max(passed, key=lambda n: passed[n].get("texts_per_s", 0.0))


# --------------------------------------------------------------------- prepared files, as embed writes them

def select_for_files(cfg, st_model, processed: Path, files: list[str], device, max_seq_length: int,
                     used: prompts.Prompts) -> tuple[Encoder, dict]:
    """(encoder, record) from pipeline/model/backends.py, gated on a seeded sample of the first text file."""
    texts = pd.read_json(processed / files[0], lines=True, dtype={"text": str})["text"]
    probe = texts.sample(min(len(texts), cfg.embed.probe_texts), random_state=cfg.seed).tolist()
    return select(cfg, st_model, used.apply(probe, "document"), device=device,
                  max_seq_length=max_seq_length, batch_size=cfg.eval.batch_size)


CHUNKED_FILES = {"passages.jsonl"}  # a retrieval set's documents (pipeline/contracts/prepared_data.py)
CORPUS_CHUNK = 2048  # texts per chunk of the progress bar


def embed_files(encoder: Encoder, processed: Path, files: list[str], label_texts: list[str], out: Path,
                used: prompts.Prompts, who: str) -> dict:
    """Embed each prepared text file into ``out/<stem>.npy`` (float32 (n, dim), normalised, file order) in its
    role (pipeline/model/prompts.py); val/test also as queries when the two forms differ; the label texts into
    ``labels.npy``. Used by the embed stage and the probe, so both write the same files. Returns timings."""
    timings = {}
    n_total, started = 0, time.perf_counter()

    def encode(texts, role, what):
        log.info("%s %s: %d texts (%s)", who, what, len(texts), encoder.name)
        texts = used.apply(texts, role)
        if what not in CHUNKED_FILES:
            return encoder.encode(texts)
        # a document corpus can be large: encoded in chunks under a progress bar (the rows are the same)
        from tqdm.auto import tqdm

        starts = range(0, len(texts), CORPUS_CHUNK)
        return np.vstack([encoder.encode(texts[i:i + CORPUS_CHUNK]) for i in tqdm(starts, desc=f"{who} {what}",
                                                                                unit="chunk", leave=False)])

    for name in files:
        texts = pd.read_json(processed / name, lines=True, dtype={"text": str})["text"].tolist()
        np.save(out / f"{Path(name).stem}.npy", encode(texts, prompts.role_of_file(name), name))
        n_total += len(texts)
        copy = prompts.query_copy_name(name)
        if copy and used.differ:
            np.save(out / copy, encode(texts, "query", f"{name} as queries"))
            n_total += len(texts)
    if label_texts:
        np.save(out / "labels.npy", encoder.encode(used.apply(label_texts, "document")))
    seconds = time.perf_counter() - started
    timings.update({"texts": n_total, "seconds": round(seconds, 2),
                    "texts_per_second": round(n_total / seconds, 1) if seconds else None})
    return timings
