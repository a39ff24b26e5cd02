"""Encoder backends: one loaded sentence-transformers model, encoded the fastest way that is proven equal.

Every stage that embeds texts (embed, and through its manifest eval; the corpus job) turns its loaded
``SentenceTransformer`` (base, full or LoRA-merged) into an encoder here (the interface of
pipeline/model/interface.py)::

    encoder, record = backends.select(cfg, st_model, probe_texts, used=prompts, n_texts=len(texts))
    vectors = encoder.encode(texts, "document")   # float32 (len(texts), dim), rows L2-normalised, input order

``encoder.name`` says which form runs: ``torch-fp32`` (the reference), ``torch-bf16`` (a bf16 copy of the
weights, where the device computes bf16 natively) or ``onnx-fp32`` (the model traced to ONNX, transformer
fusions applied, run by onnxruntime). ``embed.backend`` chooses among them: ``torch`` or ``onnx`` limit
the candidates to that runtime, ``auto`` tries those that can pay for themselves on ``n_texts`` texts (a
trace of a 110M model is not worth it for a few hundred texts). Each candidate encodes ``probe_texts`` and
must match ``torch-fp32`` row by row (cosine >= ``embed.gate_min_cos``); the fastest one that passes is
chosen. ``record`` (a JSON-able dict) keeps the gate's result, each candidate's speed and why a candidate was
skipped, for manifests and metrics.json.

The traced ONNX model is cached under ``<paths.cache>/onnx/<weights fingerprint>/`` so a run does not
trace it again; the cache holds at most ``embed.onnx_cache_mb`` (least recently used entries go first) and
``make clean`` removes it. The ONNX export code of the export stage lives here too (``export_onnx``,
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
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from pipeline.model import tokens as encoding
from pipeline.model import prompts
from pipeline.core.artifacts import atomic_dir, read_json, write_json_atomic
from pipeline.core.errors import ConfigError, ExportError
from pipeline.model.encoder import cpu_has_bf16, inner_model
from pipeline.model.interface import Encoder

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

def onnx_feed(ids: Sequence[Sequence[int]], pad_id: int, padding_side: str, inputs: Sequence[str]
              ) -> dict[str, np.ndarray]:
    """One padded batch for an ONNX graph: the rows padded to their own longest on the tokenizer's side;
    ``token_type_ids`` zero, as the PyTorch path leaves them (one text per row). Only the graph's own
    ``inputs`` are fed (the tracer drops an input the model never reads)."""
    longest = max(len(x) for x in ids)
    feed = {"input_ids": np.full((len(ids), longest), pad_id, dtype=np.int64),
            "attention_mask": np.zeros((len(ids), longest), dtype=np.int64)}
    for i, row in enumerate(ids):
        cols = slice(longest - len(row), longest) if padding_side == "left" else slice(0, len(row))
        feed["input_ids"][i, cols] = row
        feed["attention_mask"][i, cols] = 1
    feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    return {k: feed[k] for k in inputs}


class OnnxEncoder:
    """An onnxruntime session over a traced sentence-transformers graph (pooling and normalisation inside).

    Two ways to tokenise, one way to run: :meth:`from_folder` (an export's ``onnx/``) uses the ``tokenizers``
    library directly, not transformers, so a search service over the ONNX form does not pull in torch, with
    truncation, padding side and pad id from ``onnx_config.json``; embed's ``onnx-fp32`` form (:func:`candidates`)
    uses the loaded model's own Hugging Face tokenizer, so ids are those of the PyTorch path. Texts run
    longest first in batches of at most ``batch_size`` rows and ``token_budget`` padded tokens; the prompts
    recorded for the model are prepended per role. ``observer``, when set, is called with each batch's
    attention mask (rows, width): the bench counts tokens with it.
    """

    def __init__(self, name: str, session, tokenize: Callable[[list[str]], list[list[int]]], meta: dict, *,
                 used: prompts.Prompts, batch_size: int = 64, token_budget: int | None = None):
        self.name, self.session, self.tokenize, self.meta = name, session, tokenize, meta
        # the tokenizer's own pad id and side, recorded in onnx_config.json when the graph was traced
        self.pad_id, self.padding_side = int(meta["pad_token_id"]), meta.get("padding_side", "right")
        self.prompts, self.batch_size, self.token_budget = used, batch_size, token_budget
        self.inputs = list(meta["inputs"])
        self.observer: Callable[[np.ndarray], None] | None = None

    @classmethod
    def from_folder(cls, folder: Path, file: str = ONNX_FILE, *, batch_size: int = 64,
                    threads: int | None = None, name: str | None = None) -> "OnnxEncoder":
        from tokenizers import Tokenizer

        folder = Path(folder)
        meta = read_json(folder / ONNX_META)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(meta["max_seq_length"], direction=meta.get("truncation_side", "right"))

        def tokenize(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in tokenizer.encode_batch(texts)]

        return cls(name or ("onnx-int8" if file == ONNX_INT8_FILE else "onnx-fp32"),
                   onnx_session(folder / file, threads), tokenize, meta,
                   used=prompts.of_record(meta.get("prompts")), batch_size=batch_size)

    @property
    def dim(self) -> int:
        return int(self.meta["embedding_dim"])

    def encode(self, texts: Sequence[str], role: prompts.Role) -> np.ndarray:
        ids = self.tokenize(self.prompts.apply(texts, role))
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        for start, stop in encoding.batch_bounds([len(ids[i]) for i in order], self.batch_size, self.token_budget):
            idx = order[start:stop]
            feed = onnx_feed([ids[i] for i in idx], self.pad_id, self.padding_side, self.inputs)
            if self.observer is not None:
                self.observer(feed["attention_mask"])
            out[idx] = self.session.run(["sentence_embedding"], feed)[0]
        return _normalised(out)


def export_onnx(st_model, folder: Path, max_seq_length: int, sample: Sequence[str],
                used: prompts.Prompts | None = None, *, dynamo: bool = False) -> dict:
    """Trace the whole sentence-transformers pipeline into ``folder/model.onnx`` and save the tokenizer.

    Why not Optimum (the sentence-transformers ONNX backend): its only release (optimum-onnx 0.1.0)
    requires transformers < 4.58, and this project pins transformers 5. The TorchScript exporter runs
    first (the graph onnxruntime's fuser knows); ``dynamo=True`` uses the torch.export-based exporter
    (onnxscript), for architectures whose code the TorchScript tracer cannot follow (vmap-built attention
    masks, as in Gemma3). The trace example must contain padding: a batch without it could let the
    attention mask be traced away.
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

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            out = self.model({n: given[n] for n in names})
            return out["token_embeddings"], out["sentence_embedding"]

    graph = SentenceGraph(st_model).eval()
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes.update({"last_hidden_state": {0: "batch", 1: "sequence"}, "sentence_embedding": {0: "batch"}})
    with warnings.catch_warnings(), torch.inference_mode(mode=not dynamo):
        warnings.simplefilter("ignore")  # tracer warnings on shape-constant branches (always true here)
        if dynamo:
            _export_dynamo(graph, tuple(dummy[n] for n in names), folder / ONNX_FILE, names)
        else:
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
            "normalized_in_graph": any(type(m).__name__ == "Normalize" for m in st_model), "opset": ONNX_OPSET,
            "exporter": "dynamo" if dynamo else "torchscript"}
    write_json_atomic(folder / ONNX_META, meta)
    return meta


def _export_dynamo(graph, args: tuple, path: Path, names: list[str]) -> None:
    """torch.export-based ONNX export with batch and sequence dynamic (the opset is the exporter's own)."""
    import logging as _logging

    import torch

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {n: {0: batch, 1: seq} for n in names}
    quiet = [_logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(_logging.ERROR)
    try:
        program = torch.onnx.export(graph, args, dynamo=True, input_names=names,
                                    output_names=["last_hidden_state", "sentence_embedding"],
                                    dynamic_shapes=shapes, optimize=True, verbose=False)
        program.save(str(path))
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


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


class TorchEncoder:
    """The project's PyTorch encoder (tokenised once, longest first, per-batch padding, CPU token budget) on a
    sentence-transformers model: the caller's model (``torch-fp32``; a base, full, merged or adapter model) or
    a bf16 copy of it (``torch-bf16``), with the run's prompts per role."""

    def __init__(self, model, *, max_seq_length: int, batch_size: int = 64, device="cpu",
                 used: prompts.Prompts | None = None, name: str = "torch-fp32"):
        self.name, self.model, self.prompts = name, model, used or prompts.Prompts()
        self.max_seq_length, self.batch_size, self.device = max_seq_length, batch_size, device

    def encode(self, texts: Sequence[str], role: prompts.Role) -> np.ndarray:
        return encoding.encode_texts(self.model, self.prompts.apply(texts, role), max_seq_length=self.max_seq_length,
                                     batch_size=self.batch_size, device=self.device, dtype=None)


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


def onnx_cache_folder(st_model, cache_root: Path, fuse: bool = True) -> Path:
    return Path(cache_root) / "onnx" / f"{weights_fingerprint(st_model)}-{'fused' if fuse else 'plain'}"


def cached_onnx(st_model, cache_root: Path, max_seq_length: int, fuse: bool = True,
                limit_mb: float | None = None) -> tuple[Path, dict]:
    """The traced (and, where possible, fused) ONNX model of ``st_model``, built once per weights
    fingerprint under ``cache_root/onnx/``; returns (graph file, onnx_config.json contents). A new entry
    makes room for itself: the least recently used entries go until the cache holds at most ``limit_mb``."""
    folder = onnx_cache_folder(st_model, cache_root, fuse)
    if not (folder / ONNX_META).exists():
        started = time.perf_counter()
        model = st_model if st_model.device.type == "cpu" else copy.deepcopy(st_model).to("cpu")
        fusable = fuse and FUSABLE.get(getattr(inner_model(model).config, "model_type", "")) is not None
        # Trace example with padding: two texts of clearly different token lengths.
        sample = ["a", " ".join(["padding example"] * 8)]
        with atomic_dir(folder) as tmp, _eager_attention(model, fusable):
            meta = export_onnx(model, tmp, max_seq_length, sample)
            meta["fused"] = fusable and fuse_transformer(tmp, model)
            if meta["fused"]:
                (tmp / ONNX_FILE).unlink()  # only the fused graph runs; one model-sized file per weights is enough
            # what this build cost on this machine: the next decision whether to trace reads it
            meta["build"] = {"seconds": round(time.perf_counter() - started, 2), "params": _params(model)}
            write_json_atomic(tmp / ONNX_META, meta)
        log.info("backends: traced the model to ONNX in %s (fused: %s, %.0fs)", folder, meta["fused"],
                 meta["build"]["seconds"])
        if limit_mb is not None:
            prune_onnx_cache(Path(cache_root) / "onnx", limit_mb, keep=folder)
    (folder / ONNX_META).touch()  # last use, for the cache's eviction order
    meta = read_json(folder / ONNX_META)
    return folder / (ONNX_FUSED_FILE if meta.get("fused") else ONNX_FILE), meta


def _params(st_model) -> int:
    return int(sum(p.numel() for p in st_model.parameters()))


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def prune_onnx_cache(root: Path, limit_mb: float, keep: Path | None = None) -> list[str]:
    """Delete the least recently used entries of the ONNX cache ``root`` until it holds at most ``limit_mb``
    (``keep``, the entry just built, always stays); returns the names deleted."""
    import shutil

    entries = [(p, (p / ONNX_META).stat().st_mtime if (p / ONNX_META).exists() else 0.0, _folder_mb(p))
               for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")]
    total = sum(mb for _, _, mb in entries)
    removed = []
    for path, _, mb in sorted(entries, key=lambda e: e[1]):  # oldest use first
        if total <= limit_mb:
            break
        if keep is not None and path.resolve() == Path(keep).resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        total -= mb
        removed.append(path.name)
    if removed:
        log.info("backends: ONNX cache over %.0f MB; removed %d least recently used entries", limit_mb, len(removed))
    return removed


# A traced graph costs about this many seconds per million parameters before this machine has built one
# (trace, fusion, writing the file); afterwards the cost recorded in the cache's own entries is used.
TRACE_SECONDS_PER_MPARAM = 0.5


def estimated_trace_seconds(st_model, cache_root: Path) -> float:
    """What tracing ``st_model`` would cost here: its parameter count at the rate the cache's entries took."""
    rates = []
    for meta_path in (Path(cache_root) / "onnx").glob(f"*/{ONNX_META}"):
        build = read_json(meta_path).get("build") or {}
        if build.get("seconds") and build.get("params"):
            rates.append(build["seconds"] / (build["params"] / 1e6))
    rate = float(np.median(rates)) if rates else TRACE_SECONDS_PER_MPARAM
    return rate * _params(st_model) / 1e6


@dataclass
class Candidate:
    """One form ``embed.backend`` allows: how to build it and what building it costs before its first text."""

    name: str
    build: Callable[[], Encoder]
    build_seconds: float = 0.0  # estimated one-off cost (an ONNX trace not yet in the cache); 0: next to nothing


def candidates(cfg, st_model, device, max_seq_length: int, batch_size: int,
               used: prompts.Prompts | None = None) -> list[Candidate]:
    """Every form ``embed.backend`` allows on this device, ``torch-fp32`` (the reference) first."""
    import torch

    device = torch.device(device)
    kw = {"max_seq_length": max_seq_length, "batch_size": batch_size, "device": device, "used": used}
    want = cfg.embed.backend
    out = [Candidate("torch-fp32", lambda: TorchEncoder(st_model, name="torch-fp32", **kw))]
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    if want in ("auto", "torch") and bf16 and cfg.train.precision != "fp32":
        out.append(Candidate("torch-bf16", lambda: TorchEncoder(copy.deepcopy(st_model).to(torch.bfloat16),
                                                                name="torch-bf16", **kw)))
    if want == "onnx" or (want == "auto" and device.type == "cpu"):  # onnxruntime here runs on the CPU only
        cache = Path(cfg.paths.cache)

        def build_onnx() -> Encoder:
            path, meta = cached_onnx(st_model, cache, max_seq_length, cfg.embed.onnx_fusion, cfg.embed.onnx_cache_mb)
            return OnnxEncoder("onnx-fp32", onnx_session(path, cfg.runtime.num_threads),
                               lambda texts: encoding.tokenize(st_model, texts, max_seq_length), meta,
                               used=used or prompts.Prompts(), batch_size=batch_size,
                               token_budget=cfg.embed.onnx_token_budget)
        cached = (onnx_cache_folder(st_model, cache, cfg.embed.onnx_fusion) / ONNX_META).exists()
        out.append(Candidate("onnx-fp32", build_onnx, 0.0 if cached else estimated_trace_seconds(st_model, cache)))
    return out


def _texts_per_second(encoder: Encoder, texts: Sequence[str], repeats: int) -> float:
    """Best of ``repeats`` timed passes over ``texts`` (after the gate's pass warmed it up)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        encoder.encode(texts, "document")
        best = min(best, time.perf_counter() - t0)
    return len(texts) / best if best > 0 else float("inf")


def worth_trying(c: Candidate, n_texts: int | None, reference_seconds_per_text: float, probe: int, e) -> dict | None:
    """Why ``auto`` leaves candidate ``c`` out for a job of ``n_texts`` texts, or None to try it.

    Trying a form costs its build (an ONNX trace) and the probe passes it brings (the gate's pass of the form
    and of the reference, then ``embed.probe_repeats`` timed passes of each; counted at the reference's
    speed); the most it can give back is the share of the job's time a form ``embed.max_speedup`` times
    faster than ``torch-fp32`` would save. A form whose cost exceeds that best case cannot pay for itself,
    so a few hundred texts on a large base are encoded without tracing anything."""
    if n_texts is None:
        return None
    best_case = n_texts * reference_seconds_per_text * (1 - 1 / e.max_speedup)
    cost = c.build_seconds + 2 * (1 + e.probe_repeats) * probe * reference_seconds_per_text
    if cost <= best_case:
        return None
    return {"passed": False, "skipped": f"costs ~{cost:.0f}s to build and probe, more than it could save on "
                                        f"{n_texts} texts (at most ~{best_case:.0f}s)",
            "estimated_build_s": round(c.build_seconds, 1), "best_case_saving_s": round(best_case, 1)}


def select(cfg, st_model, probe_texts: Sequence[str], *, used: prompts.Prompts | None = None,
           n_texts: int | None = None, max_seq_length: int | None = None,
           batch_size: int | None = None) -> tuple[Encoder, dict]:
    """The fastest form of ``st_model`` that ``embed.backend`` allows and that matches ``torch-fp32`` on
    ``probe_texts`` (as documents; per row cosine >= ``embed.gate_min_cos``); returns (encoder, record).

    ``record``: {requested, name, gate_min_cos, probe_texts, n_texts, device, candidates: {name: {min_cos,
    passed, texts_per_s} or {passed: false, error} or {passed: false, skipped, ...}}}. ``torch-fp32`` is the
    reference and always qualifies. Under ``auto`` a form that cannot pay for its build on ``n_texts`` texts
    (None: unknown, every form is tried) is skipped with the reason (:func:`worth_trying`), and a form that
    cannot be built (an architecture the ONNX trace does not cover) is recorded with its error and logged;
    with ``embed.backend: onnx`` that error, or a failed gate, stops here instead of quietly running PyTorch.
    """
    e, device = cfg.embed, st_model.device  # every form runs where the caller put the model
    probe = [t for t in dict.fromkeys(probe_texts) if t][: e.probe_texts]
    if not probe:
        raise ConfigError("backends.select: no probe texts to check the encoder forms on")
    max_seq_length = int(max_seq_length or st_model.max_seq_length)
    batch_size = int(batch_size or cfg.eval.batch_size)
    found = candidates(cfg, st_model, device, max_seq_length, batch_size, used)
    record: dict = {"requested": e.backend, "gate_min_cos": e.gate_min_cos, "probe_texts": len(probe),
                    "n_texts": n_texts, "device": str(device), "candidates": {}}
    reference = found[0].build()  # torch-fp32
    others = _worth_trying_all(found[1:], reference, probe, n_texts, e, record)
    built: dict[str, Encoder] = {reference.name: reference}
    record["candidates"][reference.name] = {"min_cos": 1.0, "passed": True}
    if others:
        ref_vectors = reference.encode(probe, "document")
        for c in others:
            _gate(c, ref_vectors, probe, e, record, built)
    if len(built) > 1:  # the speed race, between forms that passed the gate only
        for name, encoder in built.items():
            record["candidates"][name]["texts_per_s"] = round(_texts_per_second(encoder, probe, e.probe_repeats), 1)
    chosen = _choose(record, built, e.backend)
    record["name"] = chosen
    log.info("backends: %s (requested %s; %s)", chosen, e.backend, ", ".join(
        f"{n} " + (f"min cos {c['min_cos']:.6f}{'' if c['passed'] else ' FAILED'}" if "min_cos" in c
                   else "skipped" if "skipped" in c else "error")
        + (f" {c['texts_per_s']:.0f} texts/s" if 'texts_per_s' in c else "") for n, c in record["candidates"].items()))
    return built[chosen], record


# Texts the reference encodes to estimate its speed before anything else is built or probed.
SPEED_SAMPLE = 32


def _worth_trying_all(others: list[Candidate], reference: Encoder, probe: list[str], n_texts: int | None, e,
                      record: dict) -> list[Candidate]:
    """The candidates to build and gate; under ``auto`` those that cannot pay for themselves on ``n_texts``
    texts are recorded as skipped, judged on the reference's speed over a small sample (so a small job
    spends no more than that sample on deciding)."""
    if e.backend != "auto" or n_texts is None or not others:
        return others
    sample = probe[:SPEED_SAMPLE]
    t0 = time.perf_counter()
    reference.encode(sample, "document")  # a first call: slower than steady state, so savings look larger
    per_text = (time.perf_counter() - t0) / len(sample)
    kept = []
    for c in others:
        skip = worth_trying(c, n_texts, per_text, len(probe), e)
        if skip is None:
            kept.append(c)
        else:
            log.info("backends: %s not tried: %s", c.name, skip["skipped"])
            record["candidates"][c.name] = skip
    return kept


def _gate(c: Candidate, ref_vectors: np.ndarray, probe: list[str], e, record: dict, built: dict) -> None:
    """Build candidate ``c`` and compare it with the reference on the probe; under ``auto`` a form that
    cannot be built is recorded with its error, otherwise the error stops the caller."""
    try:
        encoder = c.build()
        vectors = encoder.encode(probe, "document")
    except Exception as exc:  # noqa: BLE001  recorded and logged; fatal unless another form may run
        if e.backend != "auto":
            raise
        log.warning("backends: %s cannot run (%s: %s); left out", c.name, type(exc).__name__, exc)
        record["candidates"][c.name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        return
    cos = row_cosines(vectors, ref_vectors)
    record["candidates"][c.name] = {"min_cos": round(float(cos.min()), 6), "passed": bool(cos.min() >= e.gate_min_cos)}
    if record["candidates"][c.name]["passed"]:
        built[c.name] = encoder


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

def _file_texts(processed: Path, name: str) -> list[str]:
    return pd.read_json(processed / name, lines=True, dtype={"text": str})["text"].tolist()


def texts_to_embed(processed: Path, files: list[str], label_texts: list[str], used: prompts.Prompts) -> int:
    """How many texts :func:`embed_files` will encode (the query copies included): what ``auto`` weighs."""
    n = len(label_texts)
    for name in files:
        k = len(_file_texts(processed, name))
        n += k * (2 if prompts.query_copy_name(name) and used.differ else 1)
    return n


def select_for_files(cfg, st_model, processed: Path, files: list[str], max_seq_length: int,
                     used: prompts.Prompts, n_texts: int | None = None) -> tuple[Encoder, dict]:
    """(encoder, record) from :func:`select`, gated on a seeded sample of the first text file."""
    texts = pd.Series(_file_texts(processed, files[0]), dtype=object)
    probe = texts.sample(min(len(texts), cfg.embed.probe_texts), random_state=cfg.seed).tolist()
    return select(cfg, st_model, probe, used=used, n_texts=n_texts, max_seq_length=max_seq_length,
                  batch_size=cfg.eval.batch_size)


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
        if what not in CHUNKED_FILES:
            return encoder.encode(texts, role)
        # a document corpus can be large: encoded in chunks under a progress bar (the rows are the same)
        from tqdm.auto import tqdm

        starts = range(0, len(texts), CORPUS_CHUNK)
        return np.vstack([encoder.encode(texts[i:i + CORPUS_CHUNK], role)
                          for i in tqdm(starts, desc=f"{who} {what}", unit="chunk", leave=False)])

    for name in files:
        texts = _file_texts(processed, name)
        np.save(out / f"{Path(name).stem}.npy", encode(texts, prompts.role_of_file(name), name))
        n_total += len(texts)
        copy = prompts.query_copy_name(name)
        if copy and used.differ:
            np.save(out / copy, encode(texts, "query", f"{name} as queries"))
            n_total += len(texts)
    if label_texts:
        np.save(out / "labels.npy", encoder.encode(label_texts, "document"))
    seconds = time.perf_counter() - started
    timings.update({"texts": n_total, "seconds": round(seconds, 2),
                    "texts_per_second": round(n_total / seconds, 1) if seconds else None})
    return timings
