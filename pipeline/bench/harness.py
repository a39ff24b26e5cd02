"""bench: the project's training and encoding against the vanilla sentence-transformers path, side by side.

``make bench`` (``python -m pipeline bench``) reads the prepared data and writes
``reports/bench/<date>.json`` and ``<date>.md``:

- training: the project's step loop (tokenised once, length-grouped batches padded to their own
  longest pair, bf16 autocast where the CPU has it, masked in-batch loss) against
  ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss`` with the same model, LoRA settings,
  batch size, pairs, learning rate and number of steps; full fine-tuning once more for peak memory;
- encoding: the encoder form the embed stage selects (``embed.backend``, :mod:`pipeline.model.backends`) against
  ``SentenceTransformer.encode`` in fp32, at one batch size (``bench.encode_batch_size``) on the same texts;
- quality parity: both training paths on the same pairs, both scored with the project's metric code
  (same-product retrieval recall@1, logistic-regression macro-F1) with paired bootstrap CIs;
- FAISS: flat / IVF / HNSW build and query latency and recall against flat on synthetic vectors, with an
  index recommendation per corpus size, and the encode cost of 1M texts from the measured throughput;
- GPU (when CUDA is visible): the same training and encoding in bf16, against the GPU's matmul peak.

Every measurement runs in its own worker process (:mod:`pipeline.bench.workers`), one after the other,
so peak RSS is per path and nothing shares the CPU with it; each is repeated and the median reported.
Achieved GFLOP/s use the FLOP model in :mod:`pipeline.bench.workers` and are compared with a matmul
peak measured at the start of the same run. On a shared machine run it under a lock
(``flock /tmp/cpu-heavy.lock make bench``): timings taken while other work runs are meaningless.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.core.artifacts import (PROJECT_ROOT, Layout, git_commit, library_versions, require_manifest, write_json_atomic,
                                write_text_atomic)
from pipeline.core.config import Config
from pipeline.bench.common import DECODER_SHAPES, BenchError, random_encoder

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Matmul peaks and the machine


def matmul_gflops(m: int, k: int, n: int, *, dtype, device: str = "cpu", reps: int = 5) -> float:
    """Best-of-``reps`` torch matmul throughput for (m, k) @ (k, n), in GFLOP/s."""
    import torch

    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9


def measure_peaks(size: int, device: str, threads: int, hidden: int = 384) -> dict[str, float]:
    """Square-matmul peaks (fp32, bf16) plus one matmul shaped like the encoder's FFN (tokens x hidden)."""
    import torch

    torch.set_num_threads(threads)
    out = {"fp32_gflops": round(matmul_gflops(size, size, size, dtype=torch.float32, device=device), 1),
           "bf16_gflops": round(matmul_gflops(size, size, size, dtype=torch.bfloat16, device=device), 1),
           "matrix_size": size}
    # The encoder's matmuls are thin (K = 384 or 1536): how close can such shapes get to the peak?
    tokens = 4096
    out["ffn_shape"] = f"{tokens}x{hidden} @ {hidden}x{4 * hidden}"
    out["ffn_fp32_gflops"] = round(matmul_gflops(tokens, hidden, 4 * hidden, dtype=torch.float32, device=device), 1)
    out["ffn_bf16_gflops"] = round(matmul_gflops(tokens, hidden, 4 * hidden, dtype=torch.bfloat16, device=device), 1)
    return out


def machine_info() -> dict[str, Any]:
    import torch

    from pipeline.model.encoder import cpu_has_bf16

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": model or platform.processor(), "cpu_count": os.cpu_count(), "cpu_bf16": cpu_has_bf16(),
            "platform": platform.platform(), "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------------------------
# Workers


def run_worker(spec: dict, folder: Path) -> dict:
    """Run one measurement in a fresh interpreter; returns its JSON result or raises BenchError."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = folder / "spec.json", folder / "result.json", folder / "worker.log"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    env = dict(os.environ)
    # The worker must import this checkout's package whatever the working directory is.
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as fh:
        proc = subprocess.run([sys.executable, "-m", "pipeline.bench.workers", str(spec_path), str(out_path)],
                              stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
    if proc.returncode != 0 or not out_path.exists():
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        raise BenchError(f"bench worker '{folder.name}' failed (exit {proc.returncode}):\n" + "\n".join(tail))
    result = json.loads(out_path.read_text(encoding="utf-8"))
    result["worker_seconds"] = round(time.perf_counter() - started, 1)
    return result


def _median(windows: list[dict], key: str) -> float:
    return float(statistics.median(w[key] for w in windows))


def _sig(x: float, digits: int = 4) -> float:
    """Round to significant digits: GFLOP/s of a tiny test model must not round to zero."""
    return float(f"{x:.{digits}g}")


def summarise(name: str, result: dict, unit: str, peaks: dict, extra: dict) -> dict:
    """One table row: medians over the repeats, the spread of the main rate, the fraction of peak."""
    w = result["windows"]
    precision = result["precision"]
    peak = peaks.get(f"{precision}_gflops")
    useful = _median(w, "useful_gflops")
    row = {"name": name, **extra, "device": result["device"], "precision": precision,
           f"{unit}_per_s": round(_median(w, f"{unit}_per_s"), 2),
           f"{unit}_per_s_runs": [round(x[f"{unit}_per_s"], 2) for x in w],
           "real_tokens_per_s": round(_median(w, "real_tokens_per_s"), 1),
           "padded_tokens_per_s": round(_median(w, "padded_tokens_per_s"), 1),
           "padding_share": round(_median(w, "padding_share"), 4),
           "useful_gflops": _sig(useful), "executed_gflops": _sig(_median(w, "executed_gflops")),
           "peak_gflops": peak, "peak_fraction": _sig(useful / peak) if peak else None,
           "peak_rss_mb": result["peak_rss_mb"], "peak_gpu_mb": result.get("peak_gpu_mb"),
           "threads": result.get("threads"), "repeats": len(w), "worker_seconds": result.get("worker_seconds")}
    for key in ("trainable_params", "total_params", "steps_per_window", "cpu_levers", "rss_before_train_mb"):
        if key in result:
            row[key] = result[key]
    if "total_params" in result:
        # What the method itself keeps in memory, apart from activations and the runtime: fp32 weights, plus a
        # gradient and two AdamW moments per trainable weight. It is what LoRA saves, and it grows with the model.
        row["train_state_mb"] = round((4 * result["total_params"] + 12 * result["trainable_params"]) / 2**20, 1)
    if result.get("rss_before_train_mb") is not None:
        # Model, data and runtime are loaded by then: the rest of the peak is what the training steps add.
        row["train_added_rss_mb"] = round(result["peak_rss_mb"] - result["rss_before_train_mb"], 1)
    return row


def _task_config(cfg: Config, **train) -> dict:
    dump = cfg.model_dump(mode="json")
    dump["train"].update(train)
    return dump


# ---------------------------------------------------------------------------------------------------------------
# Parts


def bench_train(cfg: Config, work: Path, pairs_file: Path, peaks: dict, device: str) -> tuple[list[dict], dict]:
    b = cfg.bench
    common = {"task": "train", "pairs_file": str(pairs_file), "warmup": b.warmup_steps, "steps": b.steps,
              "repeats": b.repeats, "device": device}
    plan: list[tuple[str, dict]] = []
    if device == "cuda":
        plan = [("project lora bf16", {"path": "project", "method": "lora", "precision": "bf16"}),
                ("reference lora bf16", {"path": "reference", "method": "lora", "precision": "bf16"})]
    else:
        for p in b.project_precisions:
            plan.append((f"project lora {p}", {"path": "project", "method": "lora", "precision": p}))
        if b.lever_ablation:
            p = b.project_precisions[0]
            plan.append((f"project lora {p} levers off", {"path": "project", "method": "lora", "precision": p,
                                                         "levers": False}))
        for p in b.reference_precisions:
            plan.append((f"reference lora {p}", {"path": "reference", "method": "lora", "precision": p}))
        if b.full_finetune:
            plan.append(("project full auto", {"path": "project", "method": "full", "precision": "auto"}))
    rows, shapes = [], {}
    for name, task in plan:
        spec = {**common, **task, "config": _task_config(cfg, method=task["method"], precision=task["precision"],
                                                           device=device)}
        log.info("bench: training, %s ...", name)
        result = run_worker(spec, work / f"{device}-train-{name.replace(' ', '-')}")
        row = summarise(name, result, "pairs", peaks, {"path": task["path"], "method": task["method"],
                                                       "batch_size": cfg.train.batch_size})
        log.info("bench:   %.1f pairs/s, %.0f useful GFLOP/s, peak RSS %.0f MB", row["pairs_per_s"],
                 row["useful_gflops"], row["peak_rss_mb"])
        rows.append(row)
        shapes.setdefault("shape", result["shape"])
    return rows, shapes["shape"]


def bench_memory(cfg: Config, work: Path, pairs_file: Path, peaks: dict, device: str) -> list[dict]:
    """Peak memory of the project's LoRA and full fine-tuning steps on larger encoder shapes.

    At MiniLM's 22M weights the activations and the runtime dominate peak memory, so LoRA's saving
    (no gradients or AdamW moments for frozen weights, 16 bytes per weight) is small there; this shows
    how it grows with the model. Same pairs, batch, LoRA settings and precision as the training part.
    """
    b = cfg.bench
    rows = []
    for shape in b.memory_shapes:
        log.info("bench: memory, building a %s-shaped encoder with random weights ...", shape)
        model_dir = random_encoder(shape, cfg.model.base, work / f"random-{shape}")
        plans = [("lora", True), ("lora", False)] if shape in DECODER_SHAPES else [("lora", False), ("full", False)]
        for method, checkpointing in plans:
            name = f"{shape} {method}" + (" checkpointing" if checkpointing else "")
            config = _task_config(cfg, method=method, precision="auto", device=device)
            config["model"]["base"] = str(model_dir)
            config["train"]["gradient_checkpointing"] = checkpointing
            spec = {"task": "train", "pairs_file": str(pairs_file), "warmup": 1, "steps": b.memory_steps,
                    "repeats": 1, "device": device, "path": "project", "method": method, "precision": "auto",
                    "config": config}
            log.info("bench: memory, training %s for %d steps ...", name, b.memory_steps + 1)
            result = run_worker(spec, work / f"{device}-memory-{name.replace(' ', '-')}")
            row = summarise(name, result, "pairs", peaks, {"path": "project", "method": method, "shape": shape,
                                                           "batch_size": cfg.train.batch_size,
                                                           "gradient_checkpointing": checkpointing})
            log.info("bench:   peak RSS %.0f MB, %.0f MB added by training", row["peak_rss_mb"],
                     row.get("train_added_rss_mb") or float("nan"))
            rows.append(row)
    return rows


def bench_profile(cfg: Config, work: Path, pairs_file: Path, device: str) -> list[dict]:
    """Where a training step's CPU time goes, for the project path and the vanilla reference (LoRA)."""
    b = cfg.bench
    p = b.project_precisions[0]
    plan = [(f"project lora {p}", "project", p), ("reference lora fp32", "reference", "fp32")]
    out = []
    for name, path, precision in plan:
        spec = {"task": "profile", "pairs_file": str(pairs_file), "warmup": b.warmup_steps, "steps": b.profile_steps,
                "device": device, "path": path, "method": "lora", "precision": precision,
                "config": _task_config(cfg, method="lora", precision=precision, device=device)}
        log.info("bench: profiling, %s ...", name)
        out.append({"name": name, **run_worker(spec, work / f"{device}-profile-{name.replace(' ', '-')}")})
    return out


def bench_encode(cfg: Config, work: Path, texts_file: Path, peaks: dict, device: str) -> list[dict]:
    """The encoder form the embed stage selects (``embed.backend``, pipeline/model/backends.py) against
    ``SentenceTransformer.encode`` fp32, both at ``bench.encode_batch_size`` rows on the same texts; each
    project row carries the speed ratio and the per-row cosine to the reference."""
    b = cfg.bench
    batch = b.encode_batch_size
    common = {"task": "encode", "texts_file": str(texts_file), "repeats": b.repeats, "device": device}
    if device == "cuda":
        plan = [("project bf16", "project", "bf16", batch), ("reference fp32", "reference", "fp32", batch)]
    else:
        plan = [(f"project {p}", "project", p, batch) for p in b.project_precisions]
        if b.lever_ablation:
            p = b.project_precisions[0]
            plan.append((f"project {p} levers off", "project", p, batch))
        plan.append(("reference fp32", "reference", "fp32", batch))
    rows, embeddings = [], {}
    for name, path, precision, batch in plan:
        spec = {**common, "path": path, "precision": precision, "batch_size": batch,
                "levers": not name.endswith("levers off"),
                "config": _task_config(cfg, precision=precision, device=device)}
        log.info("bench: encoding, %s ...", name)
        result = run_worker(spec, work / f"{device}-encode-{name.replace(' ', '-')}")
        row = summarise(name, result, "texts", peaks, {"path": path, "batch_size": batch})
        if result.get("backend"):
            row["backend"] = result["backend"]["name"]
            row["backend_record"] = result["backend"]
        log.info("bench:   %.1f texts/s, peak RSS %.0f MB", row["texts_per_s"], row["peak_rss_mb"])
        embeddings[name] = np.load(result["embeddings"])
        rows.append(row)
    ref = next((n for n in embeddings if n.startswith("reference")), None)
    for row in rows:
        if ref and row["path"] == "project":
            cos = np.sum(embeddings[row["name"]] * embeddings[ref], axis=1)
            row["cosine_to_reference"] = {"mean": round(float(cos.mean()), 6), "min": round(float(cos.min()), 6)}
            row["speed_ratio_to_reference"] = round(row["texts_per_s"] / next(
                r["texts_per_s"] for r in rows if r["name"] == ref), 2)
    return rows


def seed_item_bootstrap_ci(stat: Callable[[int, np.ndarray], float], n_seeds: int, n_items: int, n: int,
                           seed: int) -> tuple[float, float]:
    """95% CI of ``mean over seeds of stat(seed index, item indices)`` with both the training runs and the
    test items resampled (:func:`pipeline.search.metrics.bootstrap_two_level`).

    With one training run this is the usual item bootstrap. With several it also carries the spread
    between training seeds, which a short parity run needs: one seed's item-level interval claims far more
    certainty than there is (the seeds' spread is in reports/examples/bench/, part "parity").
    """
    from pipeline.search.metrics import bootstrap_two_level, percentile_ci

    return percentile_ci(bootstrap_two_level(stat, n_seeds, n_items, n, seed))


def _parity_blocks(per_query: dict[str, list[np.ndarray]], preds: dict[str, list[np.ndarray]],
                   y_true: np.ndarray | None, n_boot: int, seed: int) -> tuple[dict, dict]:
    """Seed-mean recall@1 / macro-F1 of each model and of project - reference, each with its two-level CI.

    per_query[who]: one (n_queries,) recall@1 array per training seed; preds[who]: one (n_items,) array of
    predicted labels per training seed (empty dicts where the split has no groups / no labels).
    """
    from pipeline.search.metrics import macro_f1_from_codes

    scores: dict[str, dict] = {}
    comparison: dict[str, Any] = {}
    for who, runs in per_query.items():
        r = np.stack(runs)
        scores.setdefault(who, {})["recall@1"] = round(float(r.mean()), 5)
        ci = seed_item_bootstrap_ci(lambda k, idx: r[k, idx].mean(), len(r), r.shape[1], n_boot, seed)
        scores[who]["recall@1_ci"] = [round(x, 5) for x in ci]
    if "project" in per_query and "reference" in per_query:
        d = np.stack(per_query["project"]) - np.stack(per_query["reference"])
        comparison["recall@1_diff"] = round(float(d.mean()), 5)
        ci = seed_item_bootstrap_ci(lambda k, idx: d[k, idx].mean(), len(d), d.shape[1], n_boot, seed)
        comparison["recall@1_diff_ci"] = [round(x, 5) for x in ci]
        comparison["recall@1_diff_per_seed"] = [round(float(x), 5) for x in d.mean(axis=1)]
    if preds and y_true is not None:
        classes = np.unique(np.concatenate([y_true] + [p for runs in preds.values() for p in runs]))
        m, c = len(y_true), len(classes)
        t = np.searchsorted(classes, y_true)
        coded_preds = {w: [np.searchsorted(classes, p) for p in runs] for w, runs in preds.items()}

        def f1(w: str, k: int, idx: np.ndarray) -> float:
            return macro_f1_from_codes(t[idx], coded_preds[w][k][idx], c)

        everything = np.arange(m)
        for w in coded_preds:
            n_runs = len(coded_preds[w])
            scores.setdefault(w, {})["macro_f1"] = round(float(np.mean([f1(w, k, everything) for k in range(n_runs)])), 5)
            ci = seed_item_bootstrap_ci(lambda k, idx, w=w: f1(w, k, idx), n_runs, m, n_boot, seed)
            scores[w]["macro_f1_ci"] = [round(x, 5) for x in ci]
        if "project" in coded_preds and "reference" in coded_preds:
            n_runs = len(coded_preds["project"])
            diff = [f1("project", k, everything) - f1("reference", k, everything) for k in range(n_runs)]
            comparison["macro_f1_diff"] = round(float(np.mean(diff)), 5)
            ci = seed_item_bootstrap_ci(lambda k, idx: f1("project", k, idx) - f1("reference", k, idx), n_runs, m,
                                        n_boot, seed)
            comparison["macro_f1_diff_ci"] = [round(x, 5) for x in ci]
            comparison["macro_f1_diff_per_seed"] = [round(float(x), 5) for x in diff]
    return scores, comparison


@dataclass(frozen=True)
class ParityData:
    """What every seed of the parity part trains and scores on: the work folder, the sampled pairs and evaluation
    texts (files the workers read), the splits and the label names."""

    work: Path
    pairs_file: Path
    texts_file: Path
    splits: dict
    label_names: list[str]


@dataclass
class ParityScores:
    """Per model, one entry per seed: recall@1 per test query and the chosen head's test predictions."""

    per_query: dict = field(default_factory=dict)
    preds: dict = field(default_factory=dict)


def _parity_seed(cfg: Config, seed: int, with_base: bool, data: ParityData, out: ParityScores) -> dict:
    """Both training paths for one seed, each in a worker; their (and, once, the base's) test scores are
    appended to ``out``."""
    from pipeline.contracts.prepared_data import has_groups, has_labels
    from pipeline.evaluate.heads import classify
    from pipeline.search import metrics as M

    work, pairs_file, texts_file, splits, label_names = (data.work, data.pairs_file, data.texts_file, data.splits,
                                                         data.label_names)
    per_query, preds = out.per_query, out.preds
    b, test = cfg.bench, splits["test"]
    labelled, grouped = has_labels(test), has_groups(test)
    seed_cfg = cfg.model_copy(update={"seed": seed})
    run: dict[str, Any] = {"seed": seed, "training": {}}
    for path in ("project", "reference"):
        precision = cfg.train.precision if path == "project" else "fp32"
        spec = {"task": "parity", "path": path, "pairs_file": str(pairs_file), "eval_texts_file": str(texts_file),
                "epochs": b.parity_epochs, "precision": precision, "device": "cpu",
                "with_base": path == "project" and with_base,
                "config": _task_config(seed_cfg, method="lora", precision=precision, device="cpu")}
        log.info("bench: quality parity, seed %d, training the %s path ...", seed, path)
        result = run_worker(spec, work / f"parity-{path}-s{seed}")
        run["training"][path] = {k: result[k] for k in ("train_seconds", "steps", "pairs", "pairs_per_s",
                                                        "final_loss", "trainable_params", "peak_rss_mb")}
        run["training"][path]["precision"] = precision
        sets = {path: result["embeddings"], **({"base": result["base_embeddings"]}
                                               if "base_embeddings" in result else {})}
        for who, files in sets.items():
            emb = {s: np.load(f) for s, f in files.items()}
            if grouped:
                pq = M.group_retrieval(emb["test"], test["group"].to_numpy(), k=cfg.eval.retrieval_k)
                per_query.setdefault(who, []).append(pq["recall@1"])
            if labelled:
                preds.setdefault(who, []).append(classify(emb, splits, None, cfg, label_names).y_pred)
    return run


def bench_parity(cfg: Config, work: Path, layout: Layout) -> dict:
    """Train both paths on the same pairs, once per seed of ``bench.parity_seeds``; score every run with
    the project's metric code and judge parity on the seed-mean difference."""
    from pipeline.contracts.prepared_data import has_labels, load_labels, load_pairs, load_split

    b = cfg.bench
    seeds = list(b.parity_seeds)
    # The pairs and evaluation texts stay fixed (cfg.seed); only the training runs change with the seed.
    pairs = load_pairs(layout.processed)
    pairs = pairs.sample(n=min(b.parity_pairs, len(pairs)), random_state=cfg.seed).reset_index(drop=True)
    pairs_file = work / "parity-pairs.jsonl"
    pairs.to_json(pairs_file, orient="records", lines=True, force_ascii=False)
    splits = {s: load_split(layout.processed, s) for s in ("train", "val", "test")}
    for s in ("train", "val"):
        if len(splits[s]) > b.parity_classifier_texts:
            splits[s] = splits[s].sample(n=b.parity_classifier_texts, random_state=cfg.seed)
    splits = {s: df.reset_index(drop=True) for s, df in splits.items()}
    texts_file = work / "parity-texts.json"
    texts_file.write_text(json.dumps({s: df["text"].tolist() for s, df in splits.items()}), encoding="utf-8")
    label_names = load_labels(layout.processed)
    test = splits["test"]
    labelled = has_labels(test)
    n_boot = cfg.eval.bootstrap
    if n_boot <= 0:
        raise BenchError("the parity part needs bootstrap intervals: set eval.bootstrap to a positive count "
                         "(e.g. eval.bootstrap=1000), or leave the parity part out")

    data, scored = ParityData(work, pairs_file, texts_file, splits, label_names), ParityScores()
    per_query: dict[str, list[np.ndarray]] = scored.per_query
    preds: dict[str, list[np.ndarray]] = scored.preds
    runs: list[dict] = []
    for seed in seeds:
        run = _parity_seed(cfg, seed, seed == seeds[0], data, scored)
        k = len(runs)
        run["scores"], run["comparison"] = _parity_blocks(
            {w: [per_query[w][k]] for w in ("project", "reference") if w in per_query},
            {w: [preds[w][k]] for w in ("project", "reference") if w in preds},
            test["label"].to_numpy() if labelled else None, n_boot, cfg.seed)
        runs.append(run)
        log.info("bench:   seed %d: project - reference %s", seed, run["comparison"])

    y_true = test["label"].to_numpy() if labelled else None
    scores, comparison = _parity_blocks(per_query, preds, y_true, n_boot, cfg.seed)
    verdicts = [comparison[f"{m}_diff_ci"][1] >= 0 for m in ("recall@1", "macro_f1") if f"{m}_diff_ci" in comparison]
    for metric in ("recall@1", "macro_f1"):
        if metric in scores.get("reference", {}):
            lo, _ = scores["reference"][f"{metric}_ci"]
            comparison[f"project_{metric}_within_or_above_reference_ci"] = bool(scores["project"][metric] >= lo)
    training: dict[str, dict] = {}
    for path in ("project", "reference"):
        rows = [r["training"][path] for r in runs]
        training[path] = {**rows[0], "pairs_per_s": round(float(np.median([r["pairs_per_s"] for r in rows])), 2),
                          "train_seconds": round(float(np.median([r["train_seconds"] for r in rows])), 2),
                          "peak_rss_mb": max(r["peak_rss_mb"] for r in rows)}
    return {"pairs": len(pairs), "epochs": b.parity_epochs, "seeds": seeds,
            "classifier_train_texts": len(splits["train"]), "test_texts": len(test), "bootstrap": n_boot,
            "training": training, "scores": scores, "comparison": comparison, "runs": runs,
            "parity": bool(verdicts) and all(verdicts),
            "rule": "parity when the 95% CI of the seed-mean (project - reference), resampling training seeds and "
                    "test items, reaches 0 or above for every metric, i.e. the project path is not significantly "
                    "worse"}


def _value_ci(block: dict, metric: str) -> str:
    if metric not in block:
        return "-"
    lo, hi = block[f"{metric}_ci"]
    return f"{block[metric]:.4f} [{lo:.4f}, {hi:.4f}]"


def _diff_ci(comparison: dict, metric: str) -> str:
    if f"{metric}_diff" not in comparison:
        return "-"
    lo, hi = comparison[f"{metric}_diff_ci"]
    return f"{comparison[f'{metric}_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def recommend_indexes(results: list[dict], recall_target: float, flat_max_ms: float) -> list[dict]:
    """Per measured size: exact search while a single query stays under ``flat_max_ms``, else the fastest
    ANN setting that reaches ``recall_target``; plus the size up to which flat stays under the budget."""
    recs = []
    for res in sorted(results, key=lambda r: r["n"]):
        rows = res["rows"]
        flat = next(r for r in rows if r["index"] == "flat")
        exact_up_to = int(res["n"] * flat_max_ms / flat["single_query_ms"]) if flat["single_query_ms"] > 0 else None
        good = [r for r in rows if r["index"] != "flat" and r["recall_at_k"] >= recall_target]
        if flat["single_query_ms"] <= flat_max_ms:
            pick, why = flat, f"exact search answers one query in {flat['single_query_ms']:.2f} ms (<= {flat_max_ms} ms)"
        elif good:
            pick = min(good, key=lambda r: r["single_query_ms"])
            why = (f"flat takes {flat['single_query_ms']:.1f} ms per query; fastest setting with recall@{res['k']} >= "
                   f"{recall_target} ({pick['recall_at_k']:.3f}) at {pick['single_query_ms']:.2f} ms")
        else:
            best = max((r for r in rows if r["index"] != "flat"), key=lambda r: r["recall_at_k"], default=flat)
            pick = flat
            why = (f"no IVF/HNSW setting reached recall {recall_target} on these vectors (best "
                   f"{best['index']} {best['recall_at_k']:.3f}); keep flat or tune on real embeddings")
        if res.get("hnsw_skipped"):
            why += f"; HNSW was not built at this size ({res['hnsw_skipped']})"
        recs.append({"n": res["n"], "index": pick["index"], "params": pick["params"], "reason": why,
                     "flat_under_budget_up_to_n": exact_up_to})
    return recs


def bench_faiss(cfg: Config, work: Path) -> dict:
    b = cfg.bench
    results = []
    for n in b.faiss_sizes:
        spec = {"task": "faiss", "n": n, "dim": b.faiss_dim, "queries": b.faiss_queries, "k": b.faiss_k,
                "seed": cfg.seed, "threads": cfg.runtime.num_threads, "hnsw_m": b.hnsw_m, "hnsw_max_n": b.hnsw_max_n,
                "data": b.faiss_data, "cluster_size": b.faiss_cluster_size}
        log.info("bench: FAISS on %d %s vectors (dim %d) ...", n, b.faiss_data, b.faiss_dim)
        results.append(run_worker(spec, work / f"faiss-{n}"))
    built = [r for r in results if not r.get("hnsw_skipped")]
    for res in results:
        if res.get("hnsw_skipped") and built:
            # HNSW insertion costs about log(n) per vector: scale the largest measured build by n log n.
            ref = max(built, key=lambda r: r["n"])
            ref_build = next((r["build_s"] for r in ref["rows"] if r["index"] == "hnsw"), None)
            if ref_build:
                est = ref_build * res["n"] * math.log(res["n"]) / (ref["n"] * math.log(ref["n"]))
                res["hnsw_build_s_extrapolated"] = round(est, 1)
                res["hnsw_extrapolated_from_n"] = ref["n"]
    return {"results": results,
            "recommendation": recommend_indexes(results, b.faiss_recall_target, b.faiss_flat_max_ms),
            "recall_target": b.faiss_recall_target, "flat_max_ms": b.faiss_flat_max_ms,
            "data": b.faiss_data,
            "note": (f"synthetic clustered vectors ({b.faiss_cluster_size} items per topic, queries near an item); "
                     "ANN recall on a real corpus can differ, so check it on your own embeddings"
                     if b.faiss_data == "clustered" else
                     "isotropic random vectors have no structure: IVF/HNSW recall here is a worst case")}


def encode_cost(rows: list[dict], n: int = 1_000_000) -> list[dict]:
    out = []
    for r in rows:
        tps = r["texts_per_s"]
        out.append({"name": r["name"], "device": r["device"], "texts_per_s": tps,
                    "seconds_per_1m": round(n / tps, 1), "hours_per_1m": round(n / tps / 3600, 2),
                    "real_tokens_per_text": round(r["real_tokens_per_s"] / tps, 1)})
    return out


def ratios(train: list[dict], encode: list[dict]) -> dict:
    def find(rows, name):
        return next((r for r in rows if r["name"] == name), None)

    out = {}
    proj_train = next((r for r in train if r["path"] == "project" and r["method"] == "lora"), None)
    for r in train + encode:
        if r["name"].endswith(" levers off"):
            on = find(train if r in train else encode, r["name"][: -len(" levers off")])
            unit = "pairs_per_s" if r in train else "texts_per_s"
            if on:
                out[f"levers: {on['name']} on / off"] = round(on[unit] / r[unit], 2)
    for ref in (r for r in train if r["path"] == "reference"):
        if proj_train:
            out[f"train: {proj_train['name']} / {ref['name']}"] = round(proj_train["pairs_per_s"] / ref["pairs_per_s"], 2)
    ref_enc = find(encode, "reference fp32")
    for r in encode:
        if r["path"] == "project" and ref_enc and not r["name"].endswith(" levers off"):
            out[f"encode: {r['name']} / reference fp32"] = round(r["texts_per_s"] / ref_enc["texts_per_s"], 2)
    lora = next((r for r in train if r["path"] == "project" and r["method"] == "lora" and r["precision"] ==
                 (find(train, "project full auto") or {}).get("precision")), None)
    full = find(train, "project full auto")
    if lora and full:
        out["memory: full fine-tuning / LoRA peak RSS"] = round(full["peak_rss_mb"] / lora["peak_rss_mb"], 2)
        if lora.get("train_state_mb") and full.get("train_state_mb"):
            out["memory: full fine-tuning / LoRA weights+gradients+optimiser"] = round(
                full["train_state_mb"] / lora["train_state_mb"], 2)
        if lora.get("train_added_rss_mb") and full.get("train_added_rss_mb"):
            out["memory: full fine-tuning / LoRA RSS added by training"] = round(
                full["train_added_rss_mb"] / lora["train_added_rss_mb"], 2)
    return out


def memory_ratios(memory: list[dict]) -> dict:
    """full fine-tuning / LoRA for peak RSS and for what training adds to it, per encoder shape."""
    out = {}
    groups: dict[str, list[dict]] = {}
    for r in memory:
        groups.setdefault(r["shape"], []).append(r)
    for shape, rows in groups.items():
        lora = next((r for r in rows if r["method"] == "lora" and not r.get("gradient_checkpointing")), None)
        full = next((r for r in rows if r["method"] == "full"), None)
        ckpt = next((r for r in rows if r.get("gradient_checkpointing")), None)
        if lora and ckpt and lora.get("train_added_rss_mb") and ckpt.get("train_added_rss_mb"):
            out[f"memory at {shape}: LoRA / LoRA with gradient checkpointing RSS added by training"] = round(
                lora["train_added_rss_mb"] / ckpt["train_added_rss_mb"], 2)
        if not (lora and full):
            continue
        out[f"memory at {shape}: full fine-tuning / LoRA peak RSS"] = round(full["peak_rss_mb"] / lora["peak_rss_mb"], 2)
        if lora.get("train_added_rss_mb") and full.get("train_added_rss_mb"):
            out[f"memory at {shape}: full fine-tuning / LoRA RSS added by training"] = round(
                full["train_added_rss_mb"] / lora["train_added_rss_mb"], 2)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report


def _fmt(v, digits=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown(report: dict) -> str:
    """The bench report (reports/bench/<date>.md): one section per part that ran."""
    lines = [f"# Benchmark {report['date']}", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cpu_count']} CPUs "
             f"(bf16: {report['machine']['cpu_bf16']}); torch {report['versions'].get('torch')}, "
             f"sentence-transformers {report['versions'].get('sentence-transformers')}; commit {report['git_commit']}.",
             f"Medians of {report['config']['bench']['repeats']} repeats; each path in its own process.", ""]
    pk = report.get("peaks", {}).get("cpu")
    if pk:
        lines += [f"Matmul peak measured in this run ({pk['matrix_size']}^3): fp32 {pk['fp32_gflops']} GFLOP/s, "
                  f"bf16 {pk['bf16_gflops']} GFLOP/s; encoder-shaped {pk['ffn_shape']}: fp32 {pk['ffn_fp32_gflops']}, "
                  f"bf16 {pk['ffn_bf16_gflops']}.", ""]
    for section in (_md_train, _md_encode, _md_memory, _md_parity, _md_faiss, _md_gpu):
        lines += section(report)
    lines += ["FLOP model: " + report["flop_model"]["description"], ""]
    return "\n".join(lines)


def _md_train(report: dict) -> list[str]:
    lines: list[str] = []
    if report.get("train"):
        t = report["train"]
        lines += ["## Training", "",
                  f"{report['data']['train_pairs']} {report['dataset']} pairs, batch {t[0]['batch_size']}; each repeat "
                  f"times {t[0]['steps_per_window']} steps (the project path replays the same epoch-0 batches in "
                  f"every repeat) after {report['config']['bench']['warmup_steps']} warm-up steps.", "",
                  "| path | pairs/s (runs) | real tok/s | padding | useful GFLOP/s | % of peak | peak RSS MB | "
                  "weights+grads+AdamW MB | trainable |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in t:
            runs = "/".join(f"{x:.0f}" for x in r["pairs_per_s_runs"])
            lines.append(f"| {r['name']} | {r['pairs_per_s']:.1f} ({runs}) | {r['real_tokens_per_s']:,.0f} | "
                         f"{100 * r['padding_share']:.0f}% | {r['useful_gflops']:.3g} | "
                         f"{_fmt(100 * r['peak_fraction'] if r['peak_fraction'] else None)} | "
                         f"{r['peak_rss_mb']:,.0f} | {_fmt(r.get('train_state_mb'))} | {r.get('trainable_params', 0):,} |")
        lines.append("")
    for prof in report.get("profile", []):
        lines += [f"### Profile: {prof['name']}", "",
                  f"torch.profiler over {prof['steps']} steps (profiling slows them; rates are from the table above): "
                  f"{prof['self_ms_per_step_total']:,.0f} ms of self CPU time per step, top operators:", "",
                  "| operator | ms/step | share | calls/step |", "|---|---|---|---|"]
        lines += [f"| `{r['op']}` | {r['self_ms_per_step']:,.1f} | {100 * r['share']:.1f}% | {r['calls_per_step']:g} |"
                  for r in prof["top"]]
        lines.append("")
    return lines


def _md_encode(report: dict) -> list[str]:
    lines: list[str] = []
    if report.get("encode"):
        lines += ["## Encoding", "", f"{report['data']['encode_texts']} test-split texts.", "",
                  "| path | backend | batch | texts/s (runs) | real tok/s | padding | useful GFLOP/s | % of peak | "
                  "peak RSS MB | cos to reference |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["encode"]:
            runs = "/".join(f"{x:.0f}" for x in r["texts_per_s_runs"])
            cos = r.get("cosine_to_reference")
            cos_s = f"{cos['mean']:.5f} (min {cos['min']:.4f})" if cos else "-"
            lines.append(f"| {r['name']} | {r.get('backend', 'SentenceTransformer.encode')} | {r['batch_size']} | "
                         f"{r['texts_per_s']:.1f} ({runs}) | "
                         f"{r['real_tokens_per_s']:,.0f} | {100 * r['padding_share']:.0f}% | {r['useful_gflops']:.3g} | "
                         f"{_fmt(100 * r['peak_fraction'] if r['peak_fraction'] else None)} | "
                         f"{r['peak_rss_mb']:,.0f} | {cos_s} |")
        lines.append("")
    if report.get("ratios"):
        lines += ["## Ratios", ""] + [f"- {k}: **{v}x**" for k, v in report["ratios"].items()] + [""]
    if report.get("encode_cost_per_1m"):
        lines += ["Encode cost of 1M texts at the measured rate: " + "; ".join(
            f"{c['name']} {c['hours_per_1m']} h" for c in report["encode_cost_per_1m"]) +
            f" (about {report['encode_cost_per_1m'][0]['real_tokens_per_text']} real tokens per text).", ""]
    return lines


def _md_memory(report: dict) -> list[str]:
    lines: list[str] = []
    mem_rows = [r for r in report.get("train", []) if r["path"] == "project" and "rss_before_train_mb" in r
                and not r["name"].endswith(" levers off")] + report.get("memory", [])
    if report.get("memory"):
        lines += ["## Memory: LoRA vs full fine-tuning by model size", "",
                  f"Project path, same pairs and batch; the larger shapes are built with random weights "
                  f"({report['config']['bench']['memory_steps']} steps after one warm-up). \"Before training\" is "
                  "the resident memory with model, data and runtime loaded; the rest of the peak is what the steps "
                  "add (activations, gradients, AdamW moments).", "",
                  "| run | weights | trainable | weights+grads+AdamW MB | RSS before training MB | peak RSS MB | "
                  "added by training MB |", "|---|---|---|---|---|---|---|"]
        for r in mem_rows:
            lines.append(f"| {r['name']} | {r.get('total_params', 0):,} | {r.get('trainable_params', 0):,} | "
                         f"{_fmt(r.get('train_state_mb'))} | {_fmt(r.get('rss_before_train_mb'))} | "
                         f"{r['peak_rss_mb']:,.0f} | {_fmt(r.get('train_added_rss_mb'))} |")
        lines.append("")
    return lines


def _md_parity(report: dict) -> list[str]:
    par = report.get("parity")
    if not par:
        return []
    seeds = par.get("seeds", [])
    lines = ["## Quality parity", "",
             f"LoRA on the same {par['pairs']} pairs, {par['epochs']} epoch(s), trained once per seed "
             f"({', '.join(map(str, seeds))}); test split of {par['test_texts']} texts, classifier fitted on "
             f"{par['classifier_train_texts']} train texts. Scores are means over the seeds; their 95% CIs "
             f"resample seeds and test items ({par['bootstrap']} resamples).", "",
             "| model | recall@1 | macro-F1 | train pairs/s |", "|---|---|---|---|"]
    for who in ("project", "reference", "base"):
        s = par["scores"].get(who)
        if not s:
            continue
        lines.append(f"| {who} | {_value_ci(s, 'recall@1')} | {_value_ci(s, 'macro_f1')} | "
                     f"{_fmt(par['training'].get(who, {}).get('pairs_per_s'))} |")
    if len(par.get("runs", [])) > 1:
        lines += ["", "| seed | project recall@1 | reference recall@1 | recall@1 difference | macro-F1 difference |",
                  "|---|---|---|---|---|"]
        for run in par["runs"]:
            sc, c = run["scores"], run["comparison"]
            lines.append(f"| {run['seed']} | {sc.get('project', {}).get('recall@1', '-')} | "
                         f"{sc.get('reference', {}).get('recall@1', '-')} | {_diff_ci(c, 'recall@1')} | "
                         f"{_diff_ci(c, 'macro_f1')} |")
    c = par["comparison"]
    diffs = [f"{m} {_diff_ci(c, m)}" for m in ("recall@1", "macro_f1") if f"{m}_diff" in c]
    lines += ["", f"Project - reference, mean over {len(seeds) or 1} seed(s): {'; '.join(diffs)}. "
                  f"**Parity: {'yes' if par['parity'] else 'NO'}** ({par['rule']}).", ""]
    return lines


def _md_faiss(report: dict) -> list[str]:
    fa = report.get("faiss")
    if not fa:
        return []
    lines = [f"## FAISS ({fa.get('data', 'uniform')} synthetic unit vectors)", "",
             "| n | index | params | build s | ms/query (batch) | ms (single) | recall@k | memory MB |",
             "|---|---|---|---|---|---|---|---|"]
    for res in fa["results"]:
        for r in res["rows"]:
            params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
            lines.append(f"| {res['n']:,} | {r['index']} | {params} | {r['build_s']:.2f} | "
                         f"{r['batch_ms_per_query']:.3f} | {r['single_query_ms']:.2f} | {r['recall_at_k']:.3f} | "
                         f"{r['memory_mb']:,.0f} |")
        if res.get("hnsw_skipped"):
            est = res.get("hnsw_build_s_extrapolated")
            lines.append(f"| {res['n']:,} | hnsw | not built ({res['hnsw_skipped']}) | "
                         + (f"~{est:,.0f} (extrapolated n log n from {res['hnsw_extrapolated_from_n']:,})"
                            if est else "-") + " | - | - | - | - |")
    lines += ["", f"Recommendation (recall target {fa['recall_target']}, exact search while one query takes "
                  f"<= {fa['flat_max_ms']} ms; {fa['note']}):", ""]
    for rec in fa["recommendation"]:
        params = ", ".join(f"{k}={v}" for k, v in rec["params"].items())
        lines.append(f"- {rec['n']:,} vectors: **{rec['index']}** {params} — {rec['reason']}; flat stays under "
                     f"budget up to about {rec['flat_under_budget_up_to_n']:,} vectors.")
    lines.append("")
    return lines


def _md_gpu(report: dict) -> list[str]:
    gpu = report.get("gpu", {})
    lines = ["## GPU", ""]
    if gpu.get("skipped"):
        lines += [f"Skipped: {gpu['skipped']}.", ""]
    else:
        pk = gpu["peaks"]
        lines += [f"{report['machine'].get('gpu')}: matmul peak bf16 {pk['bf16_gflops']:,.0f} GFLOP/s, "
                  f"fp32 {pk['fp32_gflops']:,.0f} GFLOP/s.", "",
                  "| what | rate | useful GFLOP/s | MFU | peak GPU MB |", "|---|---|---|---|---|"]
        for r in gpu.get("train", []) + gpu.get("encode", []):
            rate = f"{r['pairs_per_s']:.1f} pairs/s" if "pairs_per_s" in r else f"{r['texts_per_s']:.1f} texts/s"
            lines.append(f"| {r['name']} | {rate} | {r['useful_gflops']:,.1f} | "
                         f"{_fmt(100 * r['peak_fraction'] if r['peak_fraction'] else None, 2)}% | {_fmt(r['peak_gpu_mb'])} |")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------------------------


FLOP_MODEL = ("forward = 2 x (encoder-layer matmul weights) x real tokens + 4 x hidden x layers x sum(len^2) "
              "(attention); embeddings and the pooler are not counted. Training: full fine-tuning 3x forward; LoRA 2x "
              "the frozen weights (forward + input gradients, no weight gradients) + 3x the LoRA matrices and attention. "
              "'useful' counts real tokens only (padding is waste); % of peak = useful GFLOP/s over the matmul peak of "
              "the run's precision measured above.")


def run(cfg: Config) -> Path:
    """Every part of ``bench.parts`` in its own worker process; writes reports/bench/<date>.json and .md."""
    from pipeline.contracts.prepared_data import load_pairs, load_split

    layout = Layout(cfg)
    prep = require_manifest(layout.processed, "prepared data", "run `make data` (python -m pipeline prepare) first")
    b = cfg.bench
    out_dir = Path(cfg.paths.reports) / "bench"
    cache = Path(cfg.paths.cache)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=cache))
    started = time.perf_counter()
    date = time.strftime("%Y-%m-%d")
    report: dict[str, Any] = {
        "date": date, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": git_commit(),
        "versions": library_versions(), "machine": machine_info(), "dataset": cfg.data.name,
        "prepared_data": prep["fingerprint"], "model": cfg.model.base,
        "config": {"bench": b.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
                   "eval_batch_size": cfg.eval.batch_size},
        "flop_model": {"description": FLOP_MODEL}}
    try:
        pairs = load_pairs(layout.processed)
        pairs = pairs.sample(n=min(b.train_pairs, len(pairs)), random_state=cfg.seed).reset_index(drop=True)
        pairs_file = work / "train-pairs.jsonl"
        pairs.to_json(pairs_file, orient="records", lines=True, force_ascii=False)
        test = load_split(layout.processed, "test")
        texts = test["text"].sample(n=min(b.encode_texts, len(test)), random_state=cfg.seed).tolist()
        texts_file = work / "encode-texts.json"
        texts_file.write_text(json.dumps(texts), encoding="utf-8")
        report["data"] = {"train_pairs": len(pairs), "encode_texts": len(texts)}
        _cpu_parts(cfg, report, work, pairs_file, texts_file, layout, texts)
        report["gpu"] = _gpu_part(cfg, work, pairs_file, texts_file)
        report["seconds"] = round(time.perf_counter() - started, 1)
        _write_report(out_dir, date, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("bench: wrote %s and %s (%.0fs)", out_dir / f"{date}.json", out_dir / f"{date}.md", report["seconds"])
    for k, v in report["ratios"].items():
        log.info("bench:   %s = %.2fx", k, v)
    return out_dir / f"{date}.json"


def _cpu_parts(cfg: Config, report: dict, work: Path, pairs_file: Path, texts_file: Path, layout: Layout,
               texts: list[str]) -> None:
    """The parts measured on the CPU, each into ``report`` under its name."""
    b = cfg.bench
    log.info("bench: measuring matmul peaks on the CPU ...")
    report["peaks"] = {"cpu": measure_peaks(b.matmul_size, "cpu", cfg.runtime.num_threads or os.cpu_count() or 1)}
    if "train" in b.parts:
        report["train"], shape = bench_train(cfg, work, pairs_file, report["peaks"]["cpu"], "cpu")
        report["flop_model"]["shape"] = shape
    if "profile" in b.parts:
        report["profile"] = bench_profile(cfg, work, pairs_file, "cpu")
    if "encode" in b.parts:
        report["encode"] = bench_encode(cfg, work, texts_file, report["peaks"]["cpu"], "cpu")
        report["encode_cost_per_1m"] = encode_cost(report["encode"])
    report["ratios"] = ratios(report.get("train", []), report.get("encode", []))
    if "memory" in b.parts and b.memory_shapes:
        report["memory"] = bench_memory(cfg, work, pairs_file, report["peaks"]["cpu"], "cpu")
    report["ratios"].update(memory_ratios(report.get("memory", [])))
    if "parity" in b.parts and b.parity_pairs > 0:
        report["parity"] = bench_parity(cfg, work, layout)
    if "faiss" in b.parts and b.faiss_sizes:
        report["faiss"] = bench_faiss(cfg, work)
    if b.scale:  # embed-corpus and its IVF index up to a million rows (pipeline/bench/scale.py)
        import pipeline.bench.scale as bench_scale
        from pipeline.contracts.prepared_data import SPLITS, load_split

        titles = [t for s in SPLITS for t in load_split(layout.processed, s)["text"].tolist()]
        report["scale"] = bench_scale.run(cfg, work, titles)
    if b.serve_adapter_counts:  # one base + many adapters vs merged models (pipeline/bench/serve.py)
        import pipeline.bench.serve as bench_serve

        report["serve"] = bench_serve.run(cfg, work, texts)


def _gpu_part(cfg: Config, work: Path, pairs_file: Path, texts_file: Path) -> dict:
    """Training and encoding on the GPU, where there is one; else why not."""
    import torch

    b = cfg.bench
    if "gpu" not in b.parts:
        return {"skipped": "bench.parts does not include gpu"}
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device visible (torch.cuda.is_available() is False)"}
    log.info("bench: CUDA found, measuring the GPU ...")
    peaks = measure_peaks(b.gpu_matmul_size, "cuda", cfg.runtime.num_threads or os.cpu_count() or 1)
    gpu = {"peaks": peaks}
    gpu["train"], _ = bench_train(cfg, work, pairs_file, peaks, "cuda")
    gpu["encode"] = bench_encode(cfg, work, texts_file, peaks, "cuda")
    gpu["encode_cost_per_1m"] = encode_cost(gpu["encode"])
    gpu["ratios"] = ratios(gpu["train"], gpu["encode"])
    return gpu


def _write_report(out_dir: Path, date: str, report: dict) -> None:
    from pipeline.bench.scale import markdown as scale_markdown
    from pipeline.bench.serve import markdown as serve_markdown

    write_json_atomic(out_dir / f"{date}.json", report)
    write_text_atomic(out_dir / f"{date}.md", markdown(report) + serve_markdown(report.get("serve"))
                      + scale_markdown(report.get("scale")))
