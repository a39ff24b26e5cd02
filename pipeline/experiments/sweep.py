"""sweep: LoRA rank x alpha (x target-module preset) against full fine-tuning and the untrained base,
as one comparison in MLflow, with bootstrap 95% CIs on every headline metric.

Each grid point is an ordinary run (``runs/<run>/``, ``reports/<run>/``) built from the sweep's config
with a few keys changed (method, r, alpha, target modules, lr, seed, run name) and driven through the
public stages: train, embed, eval. So the prepared data is prepared once and shared, the base model's
embeddings come from embed's cache (``cache/embeddings/``), and a child can be rerun alone with
``python -m pipeline.experiments.sweep child reports/sweep/<name>/children/<run>.yaml``.

Outputs under ``reports/sweep/<name>/``: ``sweep.json`` (the MLflow parent run id), ``children/``
(each child's config and, once it finished, a record with its fingerprint), ``logs/`` (each child's
output), ``summary.md``, ``summary.json``, ``summary.csv`` and ``pareto.png``. In MLflow the sweep is
one parent run; every child is nested under it (``mlflow.parentRunId``) and tagged ``sweep``, ``sweep.config`` (the
configuration without the seed: group by it to pool seeds), ``sweep.method``, ``sweep.r``,
``sweep.alpha``, ``sweep.targets`` and ``sweep.seed``.

Resume: a child is finished when its record's fingerprint matches (train settings, seed, prepared data,
eval settings) and its ``metrics.json`` belongs to its trained model; finished children are skipped,
an interrupted one resumes from its training checkpoint. ``--overwrite`` starts the sweep over.

Seeds repeat the training (LoRA init, batch order, dropout) on the same prepared data and test split,
which the sweep's own ``seed`` fixes: the spread over seeds is training noise, the CI is test-sampling
noise. The base model has no training randomness and runs once.

Why one process per child (``sweep.isolate``, default on): peak memory comes from ``ru_maxrss``, the
high-water mark of the whole process, so in one long process every child after the largest would
report the largest child's peak. A fresh process costs the imports once more per child and buys an
honest per-child figure (and a child that crashes cannot take the sweep down).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.search import metrics as M
from pipeline import stages
from pipeline.core import tracking
from pipeline.core.artifacts import (Layout, digest, read_json, read_manifest, require_manifest, write_json_atomic,
                                write_text_atomic)
from pipeline.core.config import Config, config_to_yaml, load_config
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.model.families import PRESETS
from pipeline.experiments.runs import METRIC_LABELS, NAME_OK, child_fingerprint, finished_record, outputs_match

log = logging.getLogger(__name__)

HEADLINE = ("classification.macro_f1", "retrieval.recall@1", "retrieval.ndcg@10")


class SweepError(PipelineError):
    """Some children of the sweep failed; the others finished and are in the summary."""


# ---------------------------------------------------------------------------------------------------
# The grid


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Point:
    """One child of the sweep: a configuration at one seed."""

    method: str  # lora | full | base
    seed: int
    r: int | None = None
    alpha: float | None = None
    preset: str | None = None
    modules: tuple[str, ...] = field(default_factory=tuple)

    @property
    def config_id(self) -> str:
        if self.method != "lora":
            return self.method
        return f"lora-r{self.r}-a{_num(self.alpha)}-{self.preset}"


SHORT = {"query": "q", "key": "k", "value": "v", "attention.output.dense": "o"}


def presets(cfg: Config) -> dict[str, list[str]]:
    """Target-module presets; without any, the config's own ``train.lora.target_modules``, named by
    their initials when they are attention projections (``qkv``), else ``targets-<hash>``."""
    if cfg.sweep.target_presets:
        bad = [k for k in cfg.sweep.target_presets if not NAME_OK.match(k)]
        if bad:
            raise ConfigError(f"sweep.target_presets names {bad} must be letters, digits, '.', '_' or '-'")
        return {k: list(v) for k, v in cfg.sweep.target_presets.items()}
    if isinstance(cfg.train.lora.target_modules, str):  # a preset (pipeline/model/families.py), resolved per base
        return {cfg.train.lora.target_modules.replace("+", "_"): [cfg.train.lora.target_modules]}
    modules = list(cfg.train.lora.target_modules)
    if all(m in SHORT for m in modules):
        return {"".join(SHORT[m] for m in modules): modules}
    return {"targets-" + digest(",".join(modules), 6): modules}


def grid(cfg: Config) -> list[Point]:
    """Children in run order: base, then for each seed every LoRA point (small ranks first) and full.

    Seeds are the outer loop so that an interrupted sweep already holds one complete comparison.
    """
    s = cfg.sweep
    if not s.seeds:
        raise ConfigError("sweep.seeds is empty; give at least one seed")
    points: list[Point] = []
    if s.include_base:
        points.append(Point("base", s.seeds[0]))
    for seed in s.seeds:
        for name, modules in presets(cfg).items():
            for r in sorted(s.ranks):
                for mult in sorted(s.alpha_multipliers):
                    points.append(Point("lora", seed, r, float(r * mult), name, tuple(modules)))
        if s.include_full:
            points.append(Point("full", seed))
    ids = [(p.config_id, p.seed) for p in points]
    if len(set(ids)) != len(ids):
        raise ConfigError("sweep grid has duplicate points (repeated ranks, alpha multipliers or seeds)")
    return points


def run_name(cfg: Config, point: Point) -> str:
    return f"sweep-{cfg.sweep.name}-{point.config_id}-s{point.seed}"


def child_config(cfg: Config, point: Point, *, parent_run_id: str | None = None,
                 tracking_uri: str | None = None) -> Config:
    """The sweep's config with this point's method, LoRA settings, lr, seed and run name."""
    tree = cfg.model_dump(mode="json")
    tree["run_name"] = run_name(cfg, point)
    tree["seed"] = point.seed
    tree["train"]["method"] = point.method
    if point.method == "lora":
        # a one-entry list naming a preset is that preset
        targets = point.modules[0] if len(point.modules) == 1 and point.modules[0] in PRESETS else list(point.modules)
        tree["train"]["lora"].update(r=point.r, alpha=point.alpha, target_modules=targets)
    elif point.method == "full" and cfg.sweep.full_lr is not None:
        tree["train"]["lr"] = cfg.sweep.full_lr
    tree["tracking"]["parent_run_id"] = parent_run_id
    if tracking_uri:
        tree["tracking"]["uri"] = tracking_uri
    return Config.model_validate(tree)


# ---------------------------------------------------------------------------------------------------
# Children


def sweep_dir(cfg: Config) -> Path:
    return Path(cfg.paths.reports) / "sweep" / cfg.sweep.name


@dataclass(frozen=True)
class ChildJob:
    """One child of this invocation: its config and the files it writes under the sweep's folder."""

    point: Point
    child: Config
    tag: str  # how the log names it
    record_path: Path
    config_path: Path
    log_path: Path

    @property
    def name(self) -> str:
        return self.child.resolved_run_name


def child_job(cfg: Config, point: Point, tag: str, *, parent_run_id: str | None, tracking_uri: str | None) -> ChildJob:
    child = child_config(cfg, point, parent_run_id=parent_run_id, tracking_uri=tracking_uri)
    name, out = child.resolved_run_name, sweep_dir(cfg)
    return ChildJob(point, child, tag, out / "children" / f"{name}.json", out / "children" / f"{name}.yaml",
                    out / "logs" / f"{name}.log")


def run_children(cfg: Config, jobs: list[ChildJob], prep_fp: str, overwrite: bool):
    """Yield (job, record, failure) per child in grid order: finished children from their record, the
    others run here one after another (``sweep.executor: local``) or as Ray Tune trials (``ray``)."""
    records = {job.name: finished_record(job.child, prep_fp, job.record_path) for job in jobs}
    todo = [job for job in jobs if records[job.name] is None]
    ran: dict[str, tuple[dict | None, dict | None]] = {}
    if cfg.sweep.executor == "ray" and todo:
        from pipeline.experiments import sweep_ray

        run_one = functools.partial(run_child, prep_fp=prep_fp, overwrite=overwrite)
        ran = sweep_ray.run_children(cfg.sweep, todo, run_one, sweep_dir(cfg), timeout_s=cfg.services.timeout_s)
    for job in jobs:
        if records[job.name] is not None:
            log.info("%s: finished before, skipped", job.tag)
            yield job, records[job.name], None
        else:
            yield job, *(ran[job.name] if job.name in ran else run_child(job, prep_fp=prep_fp, overwrite=overwrite))


def run_child(job: ChildJob, *, prep_fp: str, overwrite: bool) -> tuple[dict | None, dict | None]:
    """Run one unfinished child: (its record, written beside its config, None) or (None, why it failed)."""
    s, child, point = job.child.sweep, job.child, job.point
    name = child.resolved_run_name
    write_text_atomic(job.config_path, config_to_yaml(child))
    log.info("%s: running (log: %s)", job.tag, job.log_path)
    t0 = time.perf_counter()
    reason = None
    if s.isolate:
        rc = _run_child_process(job.config_path, job.log_path, overwrite)
        if rc in (130, -2):
            raise KeyboardInterrupt
        if rc != 0:
            reason = _tail(job.log_path) or f"exit code {rc}"
    else:
        try:
            stages.train_embed_eval(child, overwrite=overwrite)
        except PipelineError as exc:
            reason = str(exc)
    wall = time.perf_counter() - t0
    expected, train_fp = child_fingerprint(child, prep_fp)
    if reason is None and not outputs_match(child, prep_fp, train_fp):
        reason = "the child exited cleanly but its metrics.json does not match its trained model"
    if reason is not None:
        log.error("%s: failed after %.0f s: %s", job.tag, wall, reason)
        return None, {"run": name, "config_id": point.config_id, "method": point.method, "seed": point.seed,
                      "reason": reason, "log": str(job.log_path) if s.isolate else None}
    record = {"run": name, "fingerprint": expected, "train_fingerprint": train_fp,
              "wall_seconds": round(wall, 1), "isolated": s.isolate,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(job.record_path, record)
    return record, None


def _run_child_process(config_path: Path, log_path: Path, overwrite: bool) -> int:
    """Run one child in a fresh interpreter, its output in ``log_path``; returns the exit code."""
    import pipeline

    env = dict(os.environ)
    # The child must import this very checkout, whatever the working directory or installed copy.
    root = str(Path(pipeline.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, "-m", "pipeline.experiments.sweep", "child", str(config_path)] + (["--overwrite"] if overwrite else [])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        fh.flush()
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [l.strip() for l in path.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    errors = [l for l in lines if l.startswith("error:")]
    return " | ".join((errors or lines)[-n:])[:500]


def _weights_on_disk(model_dir: Path) -> tuple[int, int]:
    """(bytes of the .safetensors the train stage wrote, number of LoRA-adapted modules)."""
    files = sorted(Path(model_dir).rglob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    adapted = 0
    adapter = Path(model_dir) / "adapter" / "adapter_model.safetensors"
    if adapter.exists():
        from safetensors import safe_open

        with safe_open(str(adapter), framework="np") as fh:
            adapted = sum(1 for k in fh.keys() if ".lora_A." in k)
    return size, adapted


def collect_child(child: Config, point: Point, record: dict | None) -> dict:
    """One row per child from its artefacts on disk: settings, costs and every metric with its CI."""
    layout = Layout(child)
    m = read_json(layout.report() / "metrics.json")
    tm = require_manifest(layout.model_dir(), "trained model", "rerun the sweep")
    stats = tm.get("train", {})
    info = tm.get("model", {})
    trainable, total = int(info.get("trainable_params", 0)), int(info.get("total_params", 0))
    base_params = total - trainable if point.method == "lora" else total
    size, adapted = _weights_on_disk(layout.model_dir())
    return {
        "run": child.resolved_run_name, "config_id": point.config_id, "method": point.method, "seed": point.seed,
        "r": point.r, "alpha": point.alpha, "preset": point.preset, "target_modules": list(point.modules),
        "lr": child.train.lr if point.method != "base" else None,
        "mlflow_run_id": m.get("mlflow_run_id") or None,
        "trainable_params": trainable, "total_params": total, "base_params": base_params,
        "trainable_pct": 100.0 * trainable / base_params if base_params else 0.0,
        "adapter_bytes": size, "adapted_modules": adapted,
        "train_seconds": float(stats.get("seconds") or 0.0), "steps": stats.get("steps"),
        "pairs_per_second": stats.get("pairs_per_second"), "peak_rss_mb": stats.get("peak_rss_mb"),
        "peak_gpu_mb": stats.get("peak_gpu_mb"), "device": stats.get("device"),
        "child_wall_seconds": (record or {}).get("wall_seconds"),
        "metrics": _block_values(m),  # metrics.json's top level has the same shape as its baseline block
        "baseline": _block_values(m.get("baseline", {})),
        "lexical": _block_values(m.get("lexical", {})),
        "test_items": m.get("test_items"), "retrieval_queries": m.get("retrieval_queries"),
        "data_fingerprint": m.get("data_fingerprint"),
        "embeddings_dir": (read_manifest(layout.embeddings()) or {}).get("adapted_dir"),
    }


def _block_values(block: dict) -> dict:
    out = {}
    for kind in ("classification", "retrieval"):
        for k, v in block.get(kind, {}).items():
            ci = block.get("ci", {}).get(kind, {}).get(k)
            if isinstance(v, (int, float)) and ci is not None:
                out[f"{kind}.{k}"] = [float(v), float(ci[0]), float(ci[1])]
    return out


def _log_child_to_mlflow(uri: str | None, parent_run_id: str | None, row: dict, sweep_name: str) -> None:
    """Sweep-level facts on the child's own run: tags to group by, sizes and costs as metrics."""
    if not uri or not row.get("mlflow_run_id"):
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    tags = {"sweep": sweep_name, "sweep.role": "child", "sweep.config": row["config_id"],
            "sweep.method": row["method"], "sweep.r": row["r"] if row["r"] is not None else "-",
            "sweep.alpha": _num(row["alpha"]) if row["alpha"] is not None else "-",
            "sweep.targets": row["preset"] or "-",
            "sweep.target_modules": ",".join(row["target_modules"]) or "-", "sweep.seed": row["seed"]}
    if parent_run_id:
        # Also re-parents a child finished under an earlier parent whose record was lost.
        tags["mlflow.parentRunId"] = parent_run_id
    metrics = {"trainable_params": row["trainable_params"], "trainable_pct": row["trainable_pct"],
               "adapter_size_mb": row["adapter_bytes"] / 2**20, "adapted_modules": row["adapted_modules"],
               "train_seconds": row["train_seconds"], "peak_rss_mb": row["peak_rss_mb"],
               "peak_gpu_mb": row["peak_gpu_mb"]}
    client.log_batch(row["mlflow_run_id"],
                     metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])


# ---------------------------------------------------------------------------------------------------
# Summary


def aggregate(rows: list[dict], quality: str) -> list[dict]:
    """One entry per configuration (seeds pooled), with the LoRA-vs-full verdict on every metric."""
    by_config: dict[str, list[dict]] = {}
    for r in rows:
        by_config.setdefault(r["config_id"], []).append(r)
    configs = []
    for cid, rs in by_config.items():
        first = rs[0]
        keys = sorted(set.intersection(*(set(r["metrics"]) for r in rs)))
        stats = {k: M.seed_summary([r["metrics"][k][0] for r in rs], [r["metrics"][k][1:] for r in rs]) for k in keys}
        peaks = [r["peak_rss_mb"] for r in rs if r["peak_rss_mb"] is not None]
        gpu = [r["peak_gpu_mb"] for r in rs if r["peak_gpu_mb"] is not None]
        configs.append({
            "config_id": cid, "method": first["method"], "r": first["r"], "alpha": first["alpha"],
            "preset": first["preset"], "target_modules": first["target_modules"], "lr": first["lr"],
            "seeds": [r["seed"] for r in rs], "runs": [r["run"] for r in rs],
            "trainable_params": first["trainable_params"], "trainable_pct": first["trainable_pct"],
            "adapter_bytes": first["adapter_bytes"], "adapted_modules": first["adapted_modules"],
            "train_seconds": float(np.mean([r["train_seconds"] for r in rs])),
            "peak_rss_mb": max(peaks) if peaks else None, "peak_gpu_mb": max(gpu) if gpu else None,
            "metrics": stats,
        })
    full = next((c for c in configs if c["method"] == "full"), None)
    for c in configs:
        c["vs_full"] = {}
        if full is None or c["method"] != "lora":
            continue
        for k, s in c["metrics"].items():
            f = full["metrics"].get(k)
            if f is not None and all(np.isfinite([s["mean"], f["ci_low"], f["ci_high"]])):
                c["vs_full"][k] = M.ci_position(s["mean"], (f["ci_low"], f["ci_high"]))
    order = {"base": 0, "lora": 1, "full": 2}
    configs.sort(key=lambda c: (order[c["method"]], c["preset"] or "", c["r"] or 0, c["alpha"] or 0))
    return configs


def pareto_front(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """(n,) bool: True where no other point costs no more and scores no less, one of them strictly.

    cost, quality: (n,) arrays; lower cost and higher quality are better.
    """
    cost, quality = np.asarray(cost, float), np.asarray(quality, float)
    keep = np.ones(len(cost), dtype=bool)
    for i in range(len(cost)):
        dominated = (cost <= cost[i]) & (quality >= quality[i]) & ((cost < cost[i]) | (quality > quality[i]))
        keep[i] = not dominated.any()
    return keep


def paired_retrieval_deltas(cfg: Config, configs: list[dict], rows: list[dict]) -> None:
    """Add ``paired`` to each LoRA configuration: retrieval metric minus full fine-tuning's, with a paired
    bootstrap 95% CI over the test queries.

    Why on top of the marginal rule: every configuration is scored on the same queries, so most of the
    sampling noise in two scores is shared; resampling the per-query differences removes it, and the
    interval says whether the gap is real. Per-query results are recomputed from the test embeddings on
    disk with the eval stage's own retrieval function (and must reproduce metrics.json); classification
    is left out because eval does not keep its per-item predictions. With several seeds the per-query
    scores are averaged over seeds first.
    """
    from pipeline.contracts.prepared_data import load_split

    full = next((c for c in configs if c["method"] == "full"), None)
    loras = [c for c in configs if c["method"] == "lora"]
    if full is None or not loras:
        return
    groups = load_split(Layout(cfg).processed, "test")["group"].to_numpy()
    by_run = {r["run"]: r for r in rows}

    def per_query(config: dict) -> dict[str, np.ndarray] | None:
        runs = []
        for name in config["runs"]:
            row = by_run[name]
            path = Path(row.get("embeddings_dir") or "") / "test.npy"
            if not path.is_file():
                return None
            pq = M.group_retrieval(np.load(path), groups, k=cfg.eval.retrieval_k)
            for k, v in pq.items():
                stored = row["metrics"].get(f"retrieval.{k}")
                if stored is not None and abs(float(v.mean()) - stored[0]) > 1e-4:
                    log.warning("sweep: recomputed retrieval %s of %s is %.5f, metrics.json says %.5f; "
                                "skipping the paired comparison", k, name, float(v.mean()), stored[0])
                    return None
            runs.append(pq)
        return {k: np.mean([pq[k] for pq in runs], axis=0) for k in runs[0]} if runs else None

    reference = per_query(full)
    if reference is None:
        return
    for c in loras:
        mine = per_query(c)
        if mine is None:
            continue
        c["paired"] = {}
        for k in mine:
            delta = mine[k] - reference[k]
            lo, hi = M.bootstrap_mean_ci(delta, cfg.eval.bootstrap, cfg.seed)
            c["paired"][f"retrieval.{k}"] = {"delta": float(delta.mean()), "ci_low": lo, "ci_high": hi}


def _fmt_metric(s: dict | None, seeds: int) -> str:
    if s is None:
        return "–"
    text = f"{s['mean']:.3f}"
    if seeds > 1:
        text += f" ± {s['sd']:.3f}"
    if np.isfinite(s.get("ci_low", np.nan)):
        text += f" [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
    return text


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e3 else str(n))


def _reference(rows: list[dict], key: str) -> dict | None:
    """The base model's or TF-IDF's metrics as stored in a child's metrics.json (same test split)."""
    for r in rows:
        if r.get(key):
            return {k: {"mean": v[0], "ci_low": v[1], "ci_high": v[2], "n": 1} for k, v in r[key].items()}
    return None


def summary_markdown(cfg: Config, configs: list[dict], rows: list[dict], failed: list[dict], meta: dict) -> str:
    """summary.md: the question and its answer, every configuration, LoRA against full fine-tuning,
    how to read the columns and the children."""
    q = cfg.sweep.quality_metric
    present = set().union(*(c["metrics"].keys() for c in configs)) if configs else set()
    keys = [k for k in dict.fromkeys([q, *HEADLINE]) if k in present]
    full = next((c for c in configs if c["method"] == "full"), None)
    loras = [c for c in configs if c["method"] == "lora"]
    lines = _summary_intro(cfg, configs, rows, meta)
    lines += _summary_answer(full, loras, q)
    lines += _summary_table(configs, rows, failed, keys, full, q)
    if full is not None and loras:
        lines += _summary_vs_full(full, loras, keys)
    lines += _summary_reading_notes(meta.get("isolate", True))
    for r in rows:
        wall = r.get("child_wall_seconds")
        lines.append(f"| `{r['run']}` | {r['seed']} | `{r['mlflow_run_id'] or '–'}` | "
                     f"{f'{wall:.0f}' if wall is not None else '–'} |")
    return "\n".join(lines) + "\n"


def _summary_intro(cfg: Config, configs: list[dict], rows: list[dict], meta: dict) -> list[str]:
    s = cfg.sweep
    qlabel = METRIC_LABELS.get(s.quality_metric, s.quality_metric)
    n_seeds = max((len(c["seeds"]) for c in configs), default=1)
    loras = [c for c in configs if c["method"] == "lora"]
    first = rows[0] if rows else {}
    varied = [what for what, n in (("rank", len({c.get("r") for c in loras})), ("alpha", len({c.get("alpha") for c in loras})),
                                   ("target modules", len({c.get("preset") for c in loras}))) if n > 1]
    lines = [f"# Sweep `{s.name}`: LoRA {' × '.join(varied) or 'configurations'} against full fine-tuning", "",
             f"Dataset **{cfg.data.name}** (prepared data `{meta.get('data_fingerprint')}`), base "
             f"`{cfg.model.base}`; test split {first.get('test_items') or 0:,} items, "
             f"{first.get('retrieval_queries') or 0:,} retrieval queries; {meta.get('pairs') or 0:,} training pairs, "
             f"{cfg.train.epochs:g} epoch(s), batch {cfg.train.batch_size}, LoRA lr {cfg.train.lr:g}"
             + (f", full fine-tuning lr {s.full_lr if s.full_lr is not None else cfg.train.lr:g}" if s.include_full
                else "") + f"; seeds {list(s.seeds)}."
             + (f" MLflow parent run `{meta['parent_run_id']}` (experiment `{cfg.tracking.experiment}`)."
                if meta.get("parent_run_id") else ""), "",
             f"Quality metric: **{qlabel}**. Brackets: 95% percentile bootstrap CI over test items "
             f"(classification) or test queries (retrieval), {cfg.eval.bootstrap} resamples"
             + ("; ± is the sample standard deviation over seeds (training noise) and the brackets are the "
                "per-seed bounds averaged (test-sampling noise of one run)." if n_seeds > 1 else "."), "",
             "**Rule.** A LoRA configuration is *within* full fine-tuning's CI on a metric when its point estimate "
             "(mean over seeds) lies inside full fine-tuning's 95% bootstrap CI on that metric, bounds included; "
             "*above* or *below* when it lies outside. This places LoRA within the test-sampling uncertainty of "
             "full fine-tuning's score; it is not a paired significance test of the difference.", ""]
    return lines


def _summary_answer(full: dict | None, loras: list[dict], q: str) -> list[str]:
    """The one-paragraph answer: which LoRA configurations reach full fine-tuning, and the cheapest."""
    if full is None or not loras or q not in full["metrics"]:
        return []
    qlabel = METRIC_LABELS.get(q, q)
    lines = []
    ok = [c for c in loras if c["vs_full"].get(q) in ("within", "above")]
    f = full["metrics"][q]
    if ok:
        cheapest = min(ok, key=lambda c: (c["trainable_params"], c["train_seconds"]))
        lines.append(f"**Answer.** {len(ok)} of {len(loras)} LoRA configurations are within (or above) full "
                     f"fine-tuning's CI on {qlabel} ({f['mean']:.3f} [{f['ci_low']:.3f}, {f['ci_high']:.3f}]). "
                     f"The cheapest is `{cheapest['config_id']}`: {qlabel} "
                     f"{cheapest['metrics'][q]['mean']:.3f}, {cheapest['trainable_pct']:.2f}% of the parameters "
                     f"trained, {cheapest['train_seconds']:.0f} s of training against "
                     f"{full['train_seconds']:.0f} s for full fine-tuning.")
    else:
        best = max(loras, key=lambda c: c["metrics"].get(q, {}).get("mean", -np.inf))
        lines.append(f"**Answer.** No LoRA configuration is within full fine-tuning's CI on {qlabel} "
                     f"({f['mean']:.3f} [{f['ci_low']:.3f}, {f['ci_high']:.3f}]); the best is "
                     f"`{best['config_id']}` at {best['metrics'][q]['mean']:.3f}.")
    return lines + [""]


def _summary_table(configs: list[dict], rows: list[dict], failed: list[dict], keys: list[str], full: dict | None,
                   q: str) -> list[str]:
    """"All configurations": one row per configuration, the references, then the failed children."""
    qlabel = METRIC_LABELS.get(q, q)
    head = ["configuration", "method", "r", "alpha", "targets", "seeds", "trainable", "trainable %",
            "weights MB", "train s", "peak RSS MB"] + [METRIC_LABELS.get(k, k) for k in keys]
    if full is not None:
        head.append(f"vs full ({qlabel})")
    lines = ["## All configurations", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for c in configs:
        cells = [f"`{c['config_id']}`", c["method"], str(c["r"] or "–"),
                 _num(c["alpha"]) if c["alpha"] is not None else "–", c["preset"] or "–", str(len(c["seeds"])),
                 _fmt_params(c["trainable_params"]), f"{c['trainable_pct']:.2f}",
                 f"{c['adapter_bytes'] / 2**20:.3g}", f"{c['train_seconds']:.0f}",
                 f"{c['peak_rss_mb']:.0f}" if c["peak_rss_mb"] is not None else "–"]
        cells += [_fmt_metric(c["metrics"].get(k), len(c["seeds"])) for k in keys]
        if full is not None:
            cells.append(c["vs_full"].get(q, "reference" if c["method"] == "full" else "–"))
        lines.append("| " + " | ".join(cells) + " |")
    references = [("TF-IDF (reference)", "lexical", _reference(rows, "lexical"))]
    if not any(c["method"] == "base" for c in configs):
        references.insert(0, ("base (eval's baseline block)", "base", _reference(rows, "baseline")))
    for label, kind, ref in references:
        if ref:
            cells = [label, kind] + ["–"] * 9 + [_fmt_metric(ref.get(k), 1) for k in keys]
            if full is not None:
                cells.append("–")
            lines.append("| " + " | ".join(cells) + " |")
    for f in failed:
        where = f" (log: `{f['log']}`)" if f.get("log") else ""
        cells = [f"`{f['config_id']}` (seed {f['seed']})", f["method"]] + ["–"] * (len(head) - 3) + \
                [f"**failed**: {f['reason'].replace('|', '/')}{where}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _summary_vs_full(full: dict, loras: list[dict], keys: list[str]) -> list[str]:
    """Each LoRA configuration against full fine-tuning on every headline metric, then the paired test."""
    lines = ["", "## LoRA against full fine-tuning on every headline metric", "",
             "Full fine-tuning: " + "; ".join(
                 f"{METRIC_LABELS.get(k, k)} {full['metrics'][k]['mean']:.3f} "
                 f"[{full['metrics'][k]['ci_low']:.3f}, {full['metrics'][k]['ci_high']:.3f}]"
                 for k in keys if k in full["metrics"]) + ".", "",
             "| configuration | " + " | ".join(METRIC_LABELS.get(k, k) for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for c in loras:
        cells = [f"{c['vs_full'][k]} ({c['metrics'][k]['mean']:.3f})" if k in c["vs_full"] else "–" for k in keys]
        lines.append(f"| `{c['config_id']}` | " + " | ".join(cells) + " |")
    counts = {k: sum(c["vs_full"].get(k) in ("within", "above") for c in loras) for k in keys}
    lines += ["", "Within or above: " + ", ".join(f"{METRIC_LABELS.get(k, k)} {n} of {len(loras)}"
                                                 for k, n in counts.items()) + "."]
    pkeys = [k for k in keys if any(k in c.get("paired", {}) for c in loras)]
    if pkeys:
        lines += ["", "### Paired difference to full fine-tuning (retrieval)", "",
                  "LoRA minus full fine-tuning, query by query on the same test queries, with a paired bootstrap "
                  "95% CI of the mean difference. An interval that contains 0 means this test set cannot tell "
                  "the two apart; one entirely below 0 means LoRA is measurably worse. This is the stricter "
                  "test: shared query difficulty cancels, so it can separate configurations that the rule "
                  "above calls *within*.", "",
                  "| configuration | " + " | ".join(f"Δ {METRIC_LABELS.get(k, k)}" for k in pkeys) + " |",
                  "|---" * (len(pkeys) + 1) + "|"]
        for c in loras:
            cells = []
            for k in pkeys:
                d = c.get("paired", {}).get(k)
                cells.append("–" if d is None else
                             f"{d['delta']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
                             + (" (worse)" if d["ci_high"] < 0 else " (better)" if d["ci_low"] > 0 else ""))
            lines.append(f"| `{c['config_id']}` | " + " | ".join(cells) + " |")
    return lines


def _summary_reading_notes(isolate: bool) -> list[str]:
    return [
        "", "![Pareto plot: quality against trainable parameters and against training time](pareto.png)", "",
        "## How to read the columns", "",
        "- *trainable %*: trainable parameters as a share of the base model's parameters.",
        "- *weights MB*: bytes of the `.safetensors` files the train stage wrote: the adapter for LoRA, "
        "the whole model for full fine-tuning, nothing for the base model.",
        "- *train s*: optimisation wall time (mean over seeds), without model loading and tokenisation.",
        "- *peak RSS MB*: the training process's resident-memory high-water mark at the end of training "
        "(Python, libraries, model, tokenised data, optimiser state), the largest over seeds; "
        + ("one process per child, so the figure is the child's own." if isolate else
           "**the children ran in one process (sweep.isolate=false), so each figure is the high-water "
           "mark of every child run before it, not the child's own.**"),
        "- *targets*: target-module preset; the adapted module count per configuration is in "
        "`summary.json` (`adapted_modules`).",
        "", "## Children", "",
        "| run | seed | MLflow run | child wall s |", "|---|---|---|---|"]


def pareto_png(configs: list[dict], rows: list[dict], quality: str, path: Path, title: str) -> None:
    """Quality against trainable parameters (log) and against training seconds, with CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qlabel = METRIC_LABELS.get(quality, quality)
    trained = [c for c in configs if c["method"] != "base" and quality in c["metrics"]]
    base = next((c for c in configs if c["method"] == "base" and quality in c["metrics"]), None)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    preset_names = sorted({c["preset"] for c in trained if c["preset"]})
    colours = dict(zip(preset_names, plt.cm.tab10.colors))
    for ax, xkey, xlabel in ((axes[0], "trainable_params", "trainable parameters (log scale)"),
                             (axes[1], "train_seconds", "training time, s (log scale)")):
        if base is not None:
            b = base["metrics"][quality]
            ax.axhline(b["mean"], color="grey", ls="--", lw=1, label="base (untrained), 95% CI shaded")
            if np.isfinite(b.get("ci_low", np.nan)):
                ax.axhspan(b["ci_low"], b["ci_high"], color="grey", alpha=0.12)
        xs = np.array([max(c[xkey], 1e-9) for c in trained], dtype=float)
        ys = np.array([c["metrics"][quality]["mean"] for c in trained])
        for c, x, y in zip(trained, xs, ys):
            s = c["metrics"][quality]
            err = [[y - s["ci_low"]], [s["ci_high"] - y]] if np.isfinite(s.get("ci_low", np.nan)) else None
            if c["method"] == "full":
                ax.errorbar(x, y, yerr=err, fmt="*", ms=13, color="crimson", capsize=3, label="full fine-tuning")
                label = "full"
            else:
                ax.errorbar(x, y, yerr=err, fmt="o" if (c["alpha"] or 0) <= (c["r"] or 0) else "s", ms=6,
                            color=colours.get(c["preset"], "C0"), capsize=3, alpha=0.9,
                            label=f"LoRA {c['preset']}, alpha = r" if (c["alpha"] or 0) <= (c["r"] or 0)
                            else f"LoRA {c['preset']}, alpha > r")
                label = f"r{c['r']}/a{_num(c['alpha'])}"
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        if len(trained) > 1:
            front = pareto_front(xs, ys)
            order = np.argsort(xs[front])
            ax.step(xs[front][order], ys[front][order], where="post", color="black", lw=0.8, alpha=0.6,
                    label="Pareto front")
        if len(xs) and xs.min() > 0:
            ax.set_xscale("log")
            if xkey == "train_seconds":  # seconds read better as plain numbers than as 3 x 10^1
                from matplotlib.ticker import FormatStrFormatter

                ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
                ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{qlabel} (test), 95% CI")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(cfg: Config, rows: list[dict], failed: list[dict], meta: dict) -> tuple[Path, list[dict]]:
    out = sweep_dir(cfg)
    quality = cfg.sweep.quality_metric
    configs = aggregate(rows, quality)
    if rows and not any(quality in c["metrics"] for c in configs):
        available = sorted(set().union(*(c["metrics"].keys() for c in configs)))
        raise ConfigError(f"sweep.quality_metric '{quality}' is not among this dataset's metrics: {available}")
    paired_retrieval_deltas(cfg, configs, rows)
    pareto_png(configs, rows, quality, out / ".pareto.png.tmp.png",
               f"sweep '{cfg.sweep.name}' on {cfg.data.name}: {METRIC_LABELS.get(quality, quality)} vs cost")
    os.replace(out / ".pareto.png.tmp.png", out / "pareto.png")
    write_text_atomic(out / "summary.md", summary_markdown(cfg, configs, rows, failed, meta))
    write_json_atomic(out / "summary.json", {"sweep": cfg.sweep.model_dump(mode="json"), **meta,
                                             "configurations": configs, "children": rows, "failed": failed})
    # A file of our own rather than MlflowClient.log_table, which appends to the table of an earlier
    # invocation and would list every configuration twice after a resume.
    summary_table(configs, quality).to_csv(out / ".summary.csv.tmp", index=False)
    os.replace(out / ".summary.csv.tmp", out / "summary.csv")
    return out, configs


# ---------------------------------------------------------------------------------------------------
# The sweep


def _check_conflicts(children: list[tuple[Point, Config]], prep_fp: str) -> None:
    clashes = []
    for _, child in children:
        tm = read_manifest(Layout(child).model_dir())
        if tm is not None and tm.get("fingerprint") != child_fingerprint(child, prep_fp)[1]:
            clashes.append(child.resolved_run_name)
    if clashes:
        raise ConfigError(f"sweep '{children[0][1].sweep.name}': {len(clashes)} children were trained before with "
                          f"other settings or data ({', '.join(clashes[:4])}{', ...' if len(clashes) > 4 else ''}); "
                          "pass --overwrite to start the sweep over, or choose another sweep.name=...")


def run(cfg: Config, *, overwrite: bool = False) -> Path:
    s = cfg.sweep
    if not NAME_OK.match(s.name):
        raise ConfigError(f"sweep.name '{s.name}' must be letters, digits, '.', '_' or '-' (it names folders and runs)")
    if "." not in s.quality_metric or s.quality_metric.split(".", 1)[0] not in ("classification", "retrieval"):
        raise ConfigError(f"sweep.quality_metric '{s.quality_metric}' must be classification.<metric> or "
                          "retrieval.<metric>, e.g. retrieval.ndcg@10")
    points = grid(cfg)
    if not points:
        raise ConfigError("the sweep grid is empty (no ranks or alpha multipliers, no full, no base)")
    stages.prepare(cfg)
    prep = require_manifest(Layout(cfg).processed, "prepared data", "run `make data` first")
    prep_fp = prep["fingerprint"]
    out = sweep_dir(cfg)
    (out / "children").mkdir(parents=True, exist_ok=True)
    state_path = out / "sweep.json"
    previous = read_json(state_path) if state_path.exists() else {}
    state = {} if overwrite else dict(previous)
    if overwrite:
        for f in (out / "children").glob("*.json"):
            f.unlink()
    uri = tracking.resolve_uri(cfg) if cfg.tracking.enabled else None
    if uri and state.get("tracking_uri") not in (None, uri):
        state.pop("parent_run_id", None)  # that parent lives in another store
    probe = [(p, child_config(cfg, p)) for p in points]
    if not overwrite:
        _check_conflicts(probe, prep_fp)

    started = time.perf_counter()
    tags = {"sweep": s.name, "sweep.role": "parent", "dataset": cfg.data.name, "stage": "sweep",
            "sweep.quality_metric": s.quality_metric, "sweep.ranks": ",".join(map(str, s.ranks)),
            "sweep.alpha_multipliers": ",".join(_num(a) for a in s.alpha_multipliers),
            "sweep.targets": ",".join(presets(cfg)), "sweep.seeds": ",".join(map(str, s.seeds)),
            "sweep.include_full": s.include_full, "sweep.include_base": s.include_base}
    rows: list[dict] = []
    failed: list[dict] = []
    with tracking.run(cfg, run_name=f"sweep-{s.name}", run_id=state.get("parent_run_id"), tags=tags) as parent:
        write_json_atomic(state_path, {"name": s.name, "parent_run_id": parent.run_id, "tracking_uri": uri,
                                       "experiment": cfg.tracking.experiment, "data_fingerprint": prep_fp,
                                       "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        parent.log_artifact(_write_sweep_config(cfg, out))
        if overwrite and uri and previous.get("parent_run_id") and previous.get("tracking_uri") == uri:
            _supersede(uri, previous["parent_run_id"], parent.run_id)
        jobs = [child_job(cfg, point, f"sweep {s.name} [{i}/{len(points)}] {point.config_id} seed {point.seed}",
                          parent_run_id=parent.run_id, tracking_uri=uri) for i, point in enumerate(points, 1)]
        for job, record, failure in run_children(cfg, jobs, prep_fp, overwrite):
            point, child, tag = job.point, job.child, job.tag
            if failure is not None:
                failed.append(failure)
                continue
            row = collect_child(child, point, record)
            rows.append(row)
            _log_child_to_mlflow(uri, parent.run_id, row, s.name)
            q = row["metrics"].get(s.quality_metric)
            log.info("%s: done%s", tag, f", {METRIC_LABELS.get(s.quality_metric, s.quality_metric)} "
                                        f"{q[0]:.3f} [{q[1]:.3f}, {q[2]:.3f}]" if q else "")

        meta = {"parent_run_id": parent.run_id, "data_fingerprint": prep_fp,
                "pairs": prep.get("pairs", {}).get("total", 0), "isolate": s.isolate,
                "sweep_seconds_this_invocation": round(time.perf_counter() - started, 1)}
        out, configs = write_summary(cfg, rows, failed, meta)
        for f in ("summary.md", "summary.json", "summary.csv", "pareto.png"):
            parent.log_artifact(out / f)
        _log_parent_metrics(uri, parent.run_id, configs, s.quality_metric)
        parent.log_metrics({"children_finished": len(rows), "children_failed": len(failed)})
        parent.set_tags({"sweep.state": "failed children" if failed else "complete"})
    log.info("sweep %s: %d children finished, %d failed; summary %s", s.name, len(rows), len(failed),
             out / "summary.md")
    if failed:
        names = ", ".join(f["run"] for f in failed)
        raise SweepError(f"{len(failed)} of {len(points)} sweep children failed ({names}): "
                         f"{failed[0]['reason']}; the others are summarised in {out / 'summary.md'}"
                         + (f"; logs in {out / 'logs'}" if s.isolate else ""))
    return out


def _supersede(uri: str, old_run_id: str, new_run_id: str) -> None:
    """Mark the parent of a sweep that --overwrite started over, so one parent per sweep is current."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        client.set_tag(old_run_id, "sweep.role", "superseded")
        client.set_tag(old_run_id, "sweep.state", f"superseded by {new_run_id} (--overwrite)")
    except MlflowException as exc:  # deleted by hand, say: nothing left to mark
        log.warning("sweep: could not mark the earlier parent run %s as superseded: %s", old_run_id, exc)


def _write_sweep_config(cfg: Config, out: Path) -> Path:
    path = out / "sweep_config.yaml"
    write_text_atomic(path, config_to_yaml(cfg))
    return path


def summary_table(configs: list[dict], quality: str):
    """The summary as a flat table (one row per configuration) for the CSV and the parent run."""
    import pandas as pd

    records = []
    for c in configs:
        rec = {k: c[k] for k in ("config_id", "method", "r", "alpha", "preset", "trainable_params", "trainable_pct",
                                 "adapter_bytes", "adapted_modules", "train_seconds", "peak_rss_mb")}
        rec["seeds"] = len(c["seeds"])
        for k, st in c["metrics"].items():
            rec[k], rec[f"{k}.sd"] = st["mean"], st["sd"]
            rec[f"{k}.ci_low"], rec[f"{k}.ci_high"] = st.get("ci_low"), st.get("ci_high")
        rec["vs_full"] = c["vs_full"].get(quality, "")
        records.append(rec)
    return pd.DataFrame(records)


def _log_parent_metrics(uri: str | None, run_id: str | None, configs: list[dict], quality: str) -> None:
    """Each configuration's quality as a metric of the parent run, for the parent's own chart view."""
    if not uri or not run_id:
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    for c in configs:
        st = c["metrics"].get(quality)
        if st is not None:
            key = re.sub(r"[^A-Za-z0-9_./ -]", "_", f"{c['config_id']}.{quality}".replace("@", "_at_"))
            client.log_metric(run_id, key, st["mean"], timestamp=now)


# ---------------------------------------------------------------------------------------------------
# ``python -m pipeline.experiments.sweep child <config.yaml> [--overwrite]``: one child in this process.


def _child_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.experiments.sweep",
                                description="Run one sweep child (train, embed, eval) from its config file.")
    p.add_argument("what", choices=["child"])
    p.add_argument("config")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "sentence_transformers", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        stages.train_embed_eval(load_config(args.config), overwrite=args.overwrite)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main())
