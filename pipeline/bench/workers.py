"""One benchmark measurement per process: ``python -m pipeline.bench.workers SPEC.json OUT.json``.

`pipeline.bench` starts one of these per path (project training, the sentence-transformers reference,
encoding, quality parity, a FAISS size), one after the other, so each peak RSS belongs to one path and
no two measurements share the CPU. A worker writes its result as JSON; a failure is a non-zero exit
with the traceback on stderr, which the parent reports.

FLOP model (what "achieved GFLOP/s" counts). For a sequence of L tokens through an encoder with
``dense`` matmul weights per layer stack (every Linear in the encoder layers; embedding lookups and the
CLS pooler are not matmul work), hidden size h and n layers, one forward costs
``2*dense*L + 4*h*n*L**2`` FLOPs (weights, plus QK^T and attention x V). Training multiplies the
weight term by 3 for full fine-tuning (forward, input gradients, weight gradients) and by 2 for LoRA
(the frozen weights still pass gradients to their inputs but need no weight gradients); the LoRA
matrices themselves (2*r*(d_in+d_out) per adapted layer and token) and attention count 3x. "Useful"
FLOPs count real tokens only; "executed" FLOPs count every padded position the kernels really ran.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.train import speed
from pipeline.core.memory import current_rss_mb, peak_rss_mb


# ---------------------------------------------------------------------------------------------------------------
# FLOP accounting


def encoder_shape(st_model) -> dict[str, int]:
    """Matmul weight counts of the encoder stack: {dense, lora, hidden, layers}."""
    from pipeline.model.encoder import inner_model

    inner = inner_model(st_model)
    dense = lora = 0
    for name, module in inner.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if "lora_" in name:
            lora += module.in_features * module.out_features
        elif "embeddings" in name or "pooler" in name:
            continue
        else:
            dense += module.in_features * module.out_features
    config = inner.config
    return {"dense": dense, "lora": lora, "hidden": int(config.hidden_size), "layers": int(config.num_hidden_layers)}


def flops(shape: dict[str, int], tokens: float, sum_sq: float, *, train: str | None = None) -> float:
    """FLOPs for ``tokens`` positions whose per-sequence squared lengths sum to ``sum_sq``.

    ``train``: None (forward only), "lora" or "full" (forward + backward, multipliers in the module doc).
    """
    dense = 2.0 * shape["dense"] * tokens
    lora = 2.0 * shape["lora"] * tokens
    attn = 4.0 * shape["hidden"] * shape["layers"] * sum_sq
    if train is None:
        return dense + lora + attn
    return (3.0 if train == "full" else 2.0) * dense + 3.0 * lora + 3.0 * attn


class TokenCounter:
    """Counts real and padded tokens of every forward through the transformer module of a model.

    A forward pre-hook sees the same features dict whoever calls the model (our loop, the
    sentence-transformers trainer, ``encode``), so both paths are measured the same way. Per-row lengths
    are kept as tensors and summed only at a snapshot, so a GPU run is not synchronised per forward.
    """

    def __init__(self, st_model):
        self._pending: list[torch.Tensor] = []
        self.real = self.real_sq = self.padded = self.padded_sq = 0.0
        self.handle = st_model[0].register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count(args[0]["attention_mask"])

    def count(self, mask) -> None:
        """Count one batch's attention mask (rows, width): a tensor, or an array from an onnxruntime feed."""
        mask = torch.as_tensor(mask)
        self._pending.append(mask.detach().sum(1))
        rows, width = mask.shape
        self.padded += rows * width
        self.padded_sq += rows * width * width

    def snapshot(self) -> dict[str, float]:
        for lens in self._pending:
            lens = lens.double().cpu()
            self.real += float(lens.sum())
            self.real_sq += float((lens * lens).sum())
        self._pending.clear()
        return {"real": self.real, "real_sq": self.real_sq, "padded": self.padded, "padded_sq": self.padded_sq}

    def close(self) -> None:
        self.handle.remove()


def window_stats(stamps: list[dict], warmup: int, steps: int, repeats: int, shape: dict, train: str | None,
                 unit: str) -> list[dict[str, float]]:
    """Rates over ``repeats`` consecutive windows of ``steps`` steps after ``warmup`` steps.

    ``stamps[i]`` is the state after i steps (stamps[0] before the first): {time, items, counter}.
    """
    out = []
    for r in range(repeats):
        a, b = stamps[warmup + r * steps], stamps[warmup + (r + 1) * steps]
        sec = b["time"] - a["time"]
        d = {k: b["counter"][k] - a["counter"][k] for k in a["counter"]}
        useful = flops(shape, d["real"], d["real_sq"], train=train)
        executed = flops(shape, d["padded"], d["padded_sq"], train=train)
        out.append({"seconds": sec, f"{unit}_per_s": (b["items"] - a["items"]) / sec,
                    "real_tokens_per_s": d["real"] / sec, "padded_tokens_per_s": d["padded"] / sec,
                    "padding_share": 1 - d["real"] / d["padded"] if d["padded"] else 0.0,
                    "useful_gflops": useful / sec / 1e9, "executed_gflops": executed / sec / 1e9})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Shared setup


def _config(spec):
    from pipeline.core.config import Config

    return Config.model_validate(spec["config"])


def _setup_torch(cfg, device_pref: str, precision: str):
    from pipeline.model.encoder import pick_device, pick_dtype

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(cfg.runtime.num_threads or os.cpu_count() or 1)
    device = pick_device(device_pref)
    return device, pick_dtype(precision, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _gpu_peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None


def _read_pairs(path: str):
    import pandas as pd

    return pd.read_json(path, lines=True, dtype={"anchor": str, "positive": str, "group": str, "label": str,
                                                  "kind": str})


def _load(cfg, device):
    from pipeline.model.encoder import load_base

    return load_base(cfg.model, device=device, max_seq_length=cfg.train.max_seq_length)


@dataclass(frozen=True)
class LoopSetup:
    """What the project's loop trains: the model, its pair tensors, the config (train settings and seed), and where."""

    st_model: Any
    data: Any
    cfg: Any
    device: Any
    dtype: Any = None


@dataclass(frozen=True)
class Replay:
    """After ``after`` warm-up steps, every window of ``window`` steps replays the first ``window`` batches of
    epoch 0, so each timed window sees exactly the same batches (length-grouped batches differ a lot in length,
    and other batches would measure other texts)."""

    after: int
    window: int | None = None


def project_loop(setup: LoopSetup, total_steps: int, on_step: Callable[[int, int, float], None],
                 replay: Replay | None = None) -> None:
    """The train stage's loop (same batches, optimiser, schedule and step), without its bookkeeping."""
    from pipeline.train.loop import Batches, Stepper, make_optimizer, make_scheduler, run_steps

    st_model, data, t, seed, device, dtype = (setup.st_model, setup.data, setup.cfg.train, setup.cfg.seed,
                                              setup.device, setup.dtype)
    replay_after, replay_window = (replay.after, replay.window) if replay else (None, None)
    optimizer = make_optimizer(st_model, t)
    stepper = Stepper(st_model, data, t, optimizer, make_scheduler(optimizer, t, total_steps), device, dtype)
    batches = Batches(data.lengths, t, seed)

    def batch_of(step: int):
        if replay_after is None:
            return batches(step)
        window = min(replay_window or batches.steps_per_epoch, batches.steps_per_epoch)
        return batches.at(0, step if step < replay_after else (step - replay_after) % window)

    for step, idx, loss in run_steps(stepper, range(total_steps), batch_of):
        on_step(step, len(idx), loss)


@dataclass(frozen=True)
class RefRun:
    """How the reference trainer runs: precision and device, and its schedule (max_steps -1: by epochs)."""

    precision: str
    device: Any
    max_steps: int
    epochs: float
    drop_last: bool


def reference_trainer(st_model, pairs, cfg, run: RefRun, out_dir: Path, callbacks=()):
    """sentence-transformers' own trainer + MultipleNegativesRankingLoss, its defaults except what must match."""
    precision, device, max_steps, epochs, drop_last = run.precision, run.device, run.max_steps, run.epochs, run.drop_last
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    t = cfg.train
    dataset = Dataset.from_dict({"anchor": pairs["anchor"].tolist(), "positive": pairs["positive"].tolist()})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=t.batch_size, max_steps=max_steps,
        num_train_epochs=epochs, learning_rate=t.lr, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.grad_clip, bf16=precision == "bf16", use_cpu=device.type == "cpu", report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_drop_last=drop_last,
        seed=cfg.seed)
    loss = MultipleNegativesRankingLoss(st_model, scale=t.scale)
    optimizers = (None, None)
    if t.method == "lora" and t.lora.loraplus_lr_ratio:
        # Same optimiser groups as the project path; the trainer builds its schedule around them.
        from pipeline.train.loop import make_optimizer

        optimizers = (make_optimizer(st_model, t), None)
    return SentenceTransformerTrainer(model=st_model, args=args, train_dataset=dataset, loss=loss,
                                      callbacks=list(callbacks), optimizers=optimizers)


def add_reference_lora(st_model, lora) -> None:
    """LoRA the way a sentence-transformers user adds it: ``model.add_adapter`` with a PEFT config."""
    from peft import LoraConfig

    from pipeline.model.families import resolve
    from pipeline.model.encoder import inner_model

    modules = resolve(inner_model(st_model), lora.target_modules).modules  # the same names as the project path
    st_model.add_adapter(LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                    target_modules=modules, use_rslora=lora.use_rslora,
                                    use_dora=lora.use_dora, bias="none", task_type="FEATURE_EXTRACTION"))


def _trainable(st_model) -> int:
    return sum(p.numel() for p in st_model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# Tasks


def task_train(spec: dict, out_dir: Path, after_step: Callable[[], None] | None = None) -> dict:
    """Timed training windows for one path; returns per-window rates and the process's peak memory.

    ``after_step`` is called after every optimiser step (the profile task advances its profiler there).
    """
    cfg = _config(spec)
    t = cfg.train
    device, dtype = _setup_torch(cfg, spec["device"], spec["precision"])
    pairs = _read_pairs(spec["pairs_file"])
    st_model = _load(cfg, device)
    warmup, repeats = spec["warmup"], spec["repeats"]
    steps = spec["steps"] or max(1, len(pairs) // t.batch_size)  # default: one pass over the pairs
    total = warmup + steps * repeats
    stamps: list[dict] = []
    levers: dict = {}

    if spec["path"] == "project":
        from pipeline.model.encoder import apply_lora, enable_gradient_checkpointing
        from pipeline.train.loop import PairTensors

        data = PairTensors(pairs, st_model, t.max_seq_length)
        if t.method == "lora":
            apply_lora(st_model, t.lora)
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(st_model)
        st_model.to(device)
        if spec.get("levers", True):
            levers = speed.for_training(st_model, device, t.max_seq_length)
        counter = TokenCounter(st_model)
        shape = encoder_shape(st_model)
        done = {"items": 0}

        def on_step(step, n, loss):
            done["items"] += n
            _sync(device)
            stamps.append({"time": time.perf_counter(), "items": done["items"], "counter": counter.snapshot()})
            if after_step:
                after_step()

        rss_before = current_rss_mb()
        stamps.append({"time": time.perf_counter(), "items": 0, "counter": counter.snapshot()})
        project_loop(LoopSetup(st_model, data, cfg, device, dtype), total, on_step, Replay(warmup, steps))
    else:
        from transformers import TrainerCallback

        if t.method == "lora":
            add_reference_lora(st_model, t.lora)
        st_model.to(device)
        counter = TokenCounter(st_model)
        shape = encoder_shape(st_model)

        class Stamp(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                stamps.append({"time": time.perf_counter(), "items": 0, "counter": counter.snapshot()})

            def on_step_end(self, args, state, control, **kw):
                _sync(device)
                stamps.append({"time": time.perf_counter(), "items": state.global_step * t.batch_size,
                                "counter": counter.snapshot()})
                if after_step:
                    after_step()

        trainer = reference_trainer(st_model, pairs, cfg, RefRun(spec["precision"], device, max_steps=total, epochs=1,
                                                                 drop_last=True),
                                    out_dir / "hf-trainer", callbacks=[Stamp()])
        rss_before = current_rss_mb()
        trainer.train()
    if len(stamps) != total + 1:
        raise RuntimeError(f"expected {total} timed steps, saw {len(stamps) - 1}")
    windows = window_stats(stamps, warmup, steps, repeats, shape, t.method, "pairs")
    return {"windows": windows, "peak_rss_mb": round(peak_rss_mb(), 1), "peak_gpu_mb": _gpu_peak_mb(device),
            "rss_before_train_mb": round(rss_before, 1) if rss_before is not None else None,
            "trainable_params": _trainable(st_model), "total_params": sum(p.numel() for p in st_model.parameters()), "shape": shape, "device": device.type,
            "precision": "bf16" if dtype is not None or spec["precision"] == "bf16" else "fp32",
            "threads": torch.get_num_threads(), "cpu_levers": levers, "steps_per_window": steps}


def task_encode(spec: dict, out_dir: Path) -> dict:
    """Embed the same texts ``repeats`` times with one path; saves the last embeddings for an agreement check.

    The project path is the encoder form the embed stage would choose (pipeline/model/backends.py, ``embed.backend``),
    gated and timed on the first ``embed.probe_texts`` texts; the reference is ``SentenceTransformer.encode``.
    """
    from pipeline.model import backends
    from pipeline.model import tokens as encoding

    cfg = _config(spec)
    if not spec.get("levers", True):
        encoding.CPU_TOKEN_BUDGET = None  # the ablation: fixed-size batches, as before the lever
        cfg = cfg.model_copy(update={"embed": cfg.embed.model_copy(update={"onnx_token_budget": None})})
    device, dtype = _setup_torch(cfg, spec["device"], spec["precision"])
    texts = json.loads(Path(spec["texts_file"]).read_text(encoding="utf-8"))
    st_model = _load(cfg, device)
    st_model.eval()
    batch_size = spec["batch_size"]
    encoder = backend = None
    if spec["path"] == "project":
        # No prompts on either path (the reference is SentenceTransformer.encode without a prompt name), and no
        # text count: the bench times the form a large job would get, so every form is tried.
        encoder, backend = backends.select(cfg, st_model, texts, max_seq_length=cfg.train.max_seq_length,
                                           batch_size=batch_size)

        def embed(items):
            return encoder.encode(items, "document")

        dtype = torch.bfloat16 if "bf16" in encoder.name else None
    else:
        def embed(items):
            return st_model.encode(items, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    embed(texts[:batch_size])  # warm-up: first-call allocations and kernel selection
    counter = TokenCounter(getattr(encoder, "model", st_model))  # a torch form's own model (a bf16 copy, say)
    if isinstance(encoder, backends.OnnxEncoder):  # onnxruntime: no torch forward to hook
        encoder.observer = counter.count
    shape = encoder_shape(st_model)
    stamps = [{"time": time.perf_counter(), "items": 0, "counter": counter.snapshot()}]
    emb = None
    for r in range(spec["repeats"]):
        emb = embed(texts)
        _sync(device)
        stamps.append({"time": time.perf_counter(), "items": (r + 1) * len(texts), "counter": counter.snapshot()})
    np.save(out_dir / "embeddings.npy", np.asarray(emb, dtype=np.float32))
    windows = window_stats(stamps, 0, 1, spec["repeats"], shape, None, "texts")
    return {"windows": windows, "peak_rss_mb": round(peak_rss_mb(), 1), "peak_gpu_mb": _gpu_peak_mb(device),
            "embeddings": str(out_dir / "embeddings.npy"), "shape": shape, "device": device.type,
            "precision": "bf16" if dtype is not None else "fp32", "threads": torch.get_num_threads(),
            "backend": backend}


def task_parity(spec: dict, out_dir: Path) -> dict:
    """Train one path on the parity pairs, then embed the evaluation texts with the project's encoder."""
    from pipeline.model import tokens as encoding

    cfg = _config(spec)
    t = cfg.train
    device, dtype = _setup_torch(cfg, spec["device"], spec["precision"])
    pairs = _read_pairs(spec["pairs_file"])
    eval_texts: dict[str, list[str]] = json.loads(Path(spec["eval_texts_file"]).read_text(encoding="utf-8"))
    st_model = _load(cfg, device)

    def embed_all(prefix: str) -> dict[str, str]:
        st_model.eval()
        files = {}
        for split, texts in eval_texts.items():
            path = out_dir / f"{prefix}{split}.npy"
            np.save(path, encoding.encode_texts(st_model, texts, max_seq_length=t.max_seq_length,
                                                batch_size=cfg.eval.batch_size, device=device, dtype=dtype))
            files[split] = str(path)
        return files

    result: dict[str, Any] = {}
    if spec.get("with_base"):
        result["base_embeddings"] = embed_all("base_")
    losses: list[float] = []
    started = time.perf_counter()
    if spec["path"] == "project":
        from pipeline.train.batching import epoch_batches
        from pipeline.model.encoder import apply_lora
        from pipeline.train.loop import PairTensors

        data = PairTensors(pairs, st_model, t.max_seq_length)
        apply_lora(st_model, t.lora)
        st_model.to(device)
        speed.for_training(st_model, device, t.max_seq_length)
        steps = max(1, math.ceil(spec["epochs"] * len(epoch_batches(data.lengths, t.batch_size, cfg.seed, 0,
                                                                      t.length_grouping))))
        started = time.perf_counter()
        project_loop(LoopSetup(st_model, data, cfg, device, dtype), steps, lambda s, n, loss: losses.append(loss))
    else:
        add_reference_lora(st_model, t.lora)
        st_model.to(device)
        trainer = reference_trainer(st_model, pairs, cfg, RefRun(spec["precision"], device, max_steps=-1,
                                                                 epochs=spec["epochs"], drop_last=False),
                                    out_dir / "hf-trainer")
        started = time.perf_counter()
        out = trainer.train()
        steps = int(out.global_step)
    seconds = time.perf_counter() - started
    result.update({"embeddings": embed_all(""), "train_seconds": round(seconds, 2), "steps": steps,
                   "pairs": len(pairs), "pairs_per_s": round(len(pairs) * spec["epochs"] / seconds, 2),
                   "final_loss": round(float(np.mean(losses[-10:])), 5) if losses else None,
                   "trainable_params": _trainable(st_model), "peak_rss_mb": round(peak_rss_mb(), 1)})
    return result


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def synthetic_vectors(rng, n: int, nq: int, dim: int, kind: str, cluster_size: int = 100,
                      chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) database and (nq, dim) query unit vectors, float32.

    ``uniform``: isotropic Gaussian directions. In 384 dimensions every pair is nearly orthogonal and a
    query's ten nearest neighbours are barely nearer than the rest, which no ANN index can find cheaply:
    it measures the worst case, not a corpus.
    ``clustered``: like sentence embeddings, items gather around topics. Centres are random directions
    (one per ``cluster_size`` items); an item is its centre plus isotropic noise of the same norm (cosine
    to its centre about 0.7, about 0.5 between two items of one cluster, about 0 across clusters); a query
    is a database item plus noise of half that norm (its nearest item at cosine about 0.9, like a
    paraphrase of an indexed title). Built in chunks so 1M vectors need no temporary copies.
    """
    if kind == "uniform":
        return (_unit_rows(rng.standard_normal((n, dim), dtype=np.float32)),
                _unit_rows(rng.standard_normal((nq, dim), dtype=np.float32)))
    if kind != "clustered":
        raise ValueError(f"unknown synthetic vector kind {kind!r}")
    centres = _unit_rows(rng.standard_normal((max(1, n // cluster_size), dim), dtype=np.float32))
    xb = np.empty((n, dim), dtype=np.float32)
    scale = np.float32(1 / math.sqrt(dim))  # a standard normal vector of dim d has norm about sqrt(d)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * scale
        xb[start:stop] = _unit_rows(centres[rng.integers(0, len(centres), stop - start)] + noise)
    xq = xb[rng.choice(n, nq, replace=False)] + rng.standard_normal((nq, dim), dtype=np.float32) * (scale / 2)
    return xb, _unit_rows(xq)


def task_faiss(spec: dict, out_dir: Path) -> dict:
    """Build and query flat, IVF and HNSW indexes over ``n`` synthetic unit vectors; recall against flat.

    ``spec["data"]``: ``clustered`` (see :func:`synthetic_vectors`) or ``uniform`` (isotropic Gaussian).
    """
    import faiss

    from pipeline.search import index as faiss_index

    n, dim, nq, k = spec["n"], spec["dim"], spec["queries"], spec["k"]
    faiss.omp_set_num_threads(spec.get("threads") or os.cpu_count() or 1)
    rng = np.random.default_rng(spec.get("seed", 0))
    xb, xq = synthetic_vectors(rng, n, nq, dim, spec.get("data", "clustered"), spec.get("cluster_size", 100))
    singles = min(spec.get("single_queries", 100), nq)

    def query(index) -> tuple[np.ndarray, float, float]:
        t0 = time.perf_counter()
        _, ids = index.search(xq, k)
        batch_ms = (time.perf_counter() - t0) * 1000 / nq
        lat = []
        for i in range(singles):
            t0 = time.perf_counter()
            index.search(xq[i:i + 1], k)
            lat.append((time.perf_counter() - t0) * 1000)
        return ids, batch_ms, float(np.median(lat))

    def recall(ids: np.ndarray) -> float:
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth)]))

    rows = []
    t0 = time.perf_counter()
    flat = faiss_index.build(xb, faiss_index.FLAT)
    build = time.perf_counter() - t0
    truth, batch_ms, single_ms = query(flat)
    rows.append({"index": "flat", "params": {}, "build_s": round(build, 3), "batch_ms_per_query": batch_ms,
                 "single_query_ms": single_ms, "recall_at_k": recall(truth), "memory_mb": n * dim * 4 / 2**20})
    del flat

    nlist = spec.get("nlist") or faiss_index.nlist_for(n)
    t0 = time.perf_counter()
    train_n = min(n, spec.get("ivf_train_per_list", 40) * nlist)
    ivf = faiss_index.build(xb, faiss_index.ivf(nlist), train=xb[rng.choice(n, train_n, replace=False)])
    build = time.perf_counter() - t0
    for nprobe in spec.get("nprobes", [1, 8, 32, 128]):
        if nprobe > nlist:
            continue
        ivf.nprobe = nprobe
        ids, batch_ms, single_ms = query(ivf)
        rows.append({"index": "ivf", "params": {"nlist": nlist, "nprobe": nprobe}, "build_s": round(build, 3),
                     "batch_ms_per_query": batch_ms, "single_query_ms": single_ms, "recall_at_k": recall(ids),
                     "memory_mb": (n * (dim * 4 + 8) + nlist * dim * 4) / 2**20})
    del ivf

    m = spec.get("hnsw_m", 32)
    if spec.get("hnsw_max_n") and n > spec["hnsw_max_n"]:
        # An HNSW build over 1M vectors takes many minutes on a small CPU: the parent extrapolates it.
        return {"n": n, "dim": dim, "queries": nq, "k": k, "rows": rows, "peak_rss_mb": round(peak_rss_mb(), 1),
                "threads": faiss.omp_get_max_threads(), "hnsw_skipped": f"n > bench.hnsw_max_n={spec['hnsw_max_n']}"}
    t0 = time.perf_counter()
    hnsw = faiss_index.new(dim, faiss_index.hnsw(m))
    hnsw.hnsw.efConstruction = spec.get("hnsw_ef_construction", 40)
    hnsw.add(xb)
    build = time.perf_counter() - t0
    for ef in spec.get("ef_search", [16, 64, 256]):
        hnsw.hnsw.efSearch = ef
        ids, batch_ms, single_ms = query(hnsw)
        rows.append({"index": "hnsw", "params": {"M": m, "efConstruction": hnsw.hnsw.efConstruction, "efSearch": ef},
                     "build_s": round(build, 3), "batch_ms_per_query": batch_ms, "single_query_ms": single_ms,
                     "recall_at_k": recall(ids), "memory_mb": n * (dim * 4 + 2 * m * 4) / 2**20})
    return {"n": n, "dim": dim, "queries": nq, "k": k, "rows": rows, "peak_rss_mb": round(peak_rss_mb(), 1),
            "threads": faiss.omp_get_max_threads()}


def task_profile(spec: dict, out_dir: Path) -> dict:
    """torch.profiler over ``spec["steps"]`` training steps of one path after its warm-up steps.

    Returns the operators with the most self CPU time, per step, so the report can say where a step goes.
    The profiled steps are slower than unprofiled ones; rates come from the train task, not from here.
    """
    from torch.profiler import ProfilerActivity, profile, schedule

    warmup, steps = spec["warmup"], spec["steps"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec["device"] == "cuda" else [])
    traces: list = []  # the schedule hands over the recorded window here, when its last step ends
    with profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1),
                 on_trace_ready=lambda p: traces.append(p.key_averages())) as prof:
        task_train({**spec, "repeats": 1}, out_dir, after_step=prof.step)
    if not traces:
        raise RuntimeError(f"the profiler recorded no window ({warmup} warm-up + {steps} steps expected)")
    events = [e for e in traces[-1] if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 2),
            "share": round(e.self_cpu_time_total / total_us, 4), "calls_per_step": round(e.count / steps, 1)}
           for e in events[:spec.get("top", 12)]]
    return {"steps": steps, "self_ms_per_step_total": round(total_us / 1000 / steps, 1), "top": top}


TASKS = {"train": task_train, "profile": task_profile, "encode": task_encode, "parity": task_parity, "faiss": task_faiss}


def main(argv: list[str]) -> int:
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    out_dir = out_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    result = TASKS[spec["task"]](spec, out_dir)
    out_path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
