"""suite: the default settings on every staged corpus, in one table.

``make suite`` (``python -m pipeline suite``) runs each config of ``suite.configs`` (PriceRunner,
Walmart-Amazon and CLINC150 by default) with its own settings, plus ``suite.overrides`` for quick runs,
through prepare, train, embed and eval as an ordinary run named ``suite-<suite.name>-<config stem>``.
It writes ``reports/suite/<suite.name>/summary.md`` and ``summary.json``: per corpus the base model,
TF-IDF and the adapted encoder on each headline metric with 95% CIs, the paired difference to the base
(eval's verdict block), the validation rule, training time and the objective the run trained with.

MLflow: one parent run ``suite-<suite.name>``; each corpus run is nested under it and tagged ``suite``,
``suite.role=child``, ``suite.corpus``. Resume works as in the sweep (pipeline/experiments/sweep.py): a corpus whose
record matches its settings and whose metrics belong to its trained model is skipped; an interrupted
one resumes from its training checkpoint; ``--overwrite`` starts every corpus over.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline import stages
from pipeline.core import tracking
from pipeline.experiments.runs import METRIC_LABELS, NAME_OK, child_fingerprint, finished_record
from pipeline.core.artifacts import Layout, read_json, read_manifest, require_manifest, write_json_atomic, write_text_atomic
from pipeline.core.config import Config, load_config
from pipeline.core.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

MODELS = (("base", "base model"), ("lexical", "TF-IDF"), ("adapted", "adapted"), ("hybrid", "hybrid (BM25 + adapted)"))


class SuiteError(PipelineError):
    """Some corpora of the suite failed; the others finished and are in the summary."""


def suite_dir(cfg: Config) -> Path:
    return Path(cfg.paths.reports) / "suite" / cfg.suite.name


def corpus_config(cfg: Config, path: str, *, parent_run_id: str | None = None,
                  tracking_uri: str | None = None) -> Config:
    """The corpus's own config with the suite's overrides, named for the suite and nested under its run."""
    if not Path(path).is_file():
        raise ConfigError(f"suite.configs: {path} does not exist")
    tree = load_config(path, cfg.suite.overrides).model_dump(mode="json")
    tree["run_name"] = f"suite-{cfg.suite.name}-{Path(path).stem}"
    tree["tracking"].update(parent_run_id=parent_run_id, experiment=cfg.tracking.experiment,
                            enabled=cfg.tracking.enabled)
    if tracking_uri:
        tree["tracking"]["uri"] = tracking_uri
    return Config.model_validate(tree)


def run_corpus(child: Config, record_path: Path, *, overwrite: bool) -> tuple[dict, bool]:
    """prepare -> train -> embed -> eval unless finished before; returns (record, skipped)."""
    stages.prepare(child)
    prep_fp = require_manifest(Layout(child).processed, "prepared data", "rerun the suite")["fingerprint"]
    record = None if overwrite else finished_record(child, prep_fp, record_path)
    if record is not None:
        return record, True
    started = time.perf_counter()
    stages.train_embed_eval(child, overwrite=overwrite)
    expected, train_fp = child_fingerprint(child, prep_fp)
    record = {"run": child.resolved_run_name, "fingerprint": expected, "train_fingerprint": train_fp,
              "wall_seconds": round(time.perf_counter() - started, 1),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(record_path, record)
    return record, False


def _objective(prep: dict) -> str:
    value = prep.get("objective")
    if isinstance(value, dict):
        value = value.get("name") or ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value) if value else "-"


def corpus_row(child: Config, config_path: str, record: dict) -> dict:
    """One corpus of the summary, read from its metrics.json and prepare manifest."""
    from pipeline.search.metrics import headline_keys

    layout = Layout(child)
    m = read_json(layout.report() / "metrics.json")
    prep = read_manifest(layout.processed) or {}
    blocks = {"base": m.get("baseline", {}), "lexical": m.get("lexical", {}), "adapted": m, "hybrid": m.get("hybrid", {})}
    models = {}
    for name, block in blocks.items():
        models[name] = {}
        for key in headline_keys(child.eval.retrieval_k):
            kind, metric = key.split(".", 1)
            value, ci = block.get(kind, {}).get(metric), block.get("ci", {}).get(kind, {}).get(metric)
            if value is not None:
                models[name][key] = {"value": value, "ci": list(ci) if ci else None}
    verdict = m.get("verdict", {})
    return {"corpus": Path(config_path).stem, "config": config_path, "dataset": child.data.name,
            "run": child.resolved_run_name, "mlflow_run_id": m.get("mlflow_run_id") or None,
            "method": m["model"]["method"], "objective": _objective(prep),
            "train_seconds": float(m.get("train", {}).get("seconds") or 0.0),
            "test_items": m.get("test_items"), "retrieval_queries": m.get("retrieval_queries"),
            "models": models, "vs_base": verdict.get("test", {}).get("vs_base", {}),
            "vs_lexical": verdict.get("test", {}).get("vs_lexical", {}), "validation": verdict.get("validation"),
            "lexical_name": "BM25" if str(m.get("lexical", {}).get("method", "")).startswith("bm25") else "TF-IDF",
            "wall_seconds": record.get("wall_seconds")}


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "–"
    if entry.get("ci"):
        return f"{entry['value']:.3f} [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}]"
    return f"{entry['value']:.3f}"


def _delta_cell(d: dict | None) -> str:
    if d is None:
        return "–"
    lo, hi = d["ci"]
    interval = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else ""
    return f"{d['delta']:+.3f}{interval} {d['verdict']}"


def _validation_cell(v: dict | None) -> str:
    if v and v.get("kept") == "base":  # the corpus objective kept the untrained base (pipeline/train/selection.py)
        return f"kept the base ({v['metric']} best trained step {v['adapted']:.3f} vs base {v['base']:.3f})"
    if v and str(v.get("note", "")).startswith("no judged queries"):
        return "**unverified** (no judged queries)"
    if not v or v.get("better") is None:
        return "not measured"
    word = "better" if v["better"] else "**NOT better**"
    return f"{word} ({v['metric']} {v['adapted']:.3f} vs {v['base']:.3f})"


def summary_markdown(cfg: Config, rows: list[dict], failed: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for m in r["models"].values() for k in m))
    labels = {k: METRIC_LABELS.get(k, k.split(".", 1)[1]) for k in keys}
    lines = [f"# Suite `{cfg.suite.name}`: the default settings on every corpus", "",
             "Each corpus runs with its own config (`suite.configs`"
             + (f", plus `{' '.join(cfg.suite.overrides)}`" if cfg.suite.overrides else "") + "). Brackets: 95% "
             "bootstrap CI over the test items / queries. *adapted − base*: the paired difference on the same "
             "test items with its 95% CI and verdict (eval's verdict block, `reports/<run>/metrics.json`). "
             "*validation*: whether the adapted model beat the base on the validation split (export refuses it "
             "otherwise).", "",
             "| " + " | ".join(["corpus", "model", *(labels[k] for k in keys), "train s", "objective",
                                "validation"]) + " |",
             "|---" * (len(keys) + 5) + "|"]
    for r in rows:
        first = f"{r['corpus']} ({r['dataset']})"
        for name, title in MODELS:
            if not r["models"].get(name):
                continue
            title = r.get("lexical_name", title) if name == "lexical" else title
            cells = [first, title, *(_cell(r["models"][name].get(k)) for k in keys), "", "", ""]
            if name == "adapted":
                cells[1] = f"{title} ({r['method']})"
                cells[-3:] = [f"{r['train_seconds']:.0f}", r["objective"], _validation_cell(r["validation"])]
            lines.append("| " + " | ".join(cells) + " |")
            first = ""
        cells = ["", "adapted − base", *(_delta_cell(r["vs_base"].get(k)) for k in keys), "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    if failed:
        lines += ["", "## Failed", ""] + [f"- `{f['config']}`: {f['reason']}" for f in failed]
    return "\n".join(lines) + "\n"


def _tag_child(uri: str | None, parent_run_id: str, row: dict, name: str) -> None:
    """Suite tags on the corpus's own run; also re-parents a run finished under an earlier parent."""
    if not uri or not row.get("mlflow_run_id"):
        return
    from mlflow import MlflowClient

    tags = {"suite": name, "suite.role": "child", "suite.corpus": row["corpus"], "mlflow.parentRunId": parent_run_id}
    client = MlflowClient(tracking_uri=uri)
    for k, v in tags.items():
        client.set_tag(row["mlflow_run_id"], k, v)


def _write_summary(cfg: Config, rows: list[dict], failed: list[dict], meta: dict) -> Path:
    out = suite_dir(cfg)
    write_text_atomic(out / "summary.md", summary_markdown(cfg, rows, failed))
    write_json_atomic(out / "summary.json", {"suite": cfg.suite.model_dump(mode="json"), **meta,
                                             "corpora": rows, "failed": failed})
    return out


def run(cfg: Config, *, overwrite: bool = False) -> Path:
    if not NAME_OK.match(cfg.suite.name):
        raise ConfigError(f"suite.name '{cfg.suite.name}' must be letters, digits, '.', '_' or '-'")
    out = suite_dir(cfg)
    (out / "corpora").mkdir(parents=True, exist_ok=True)
    state_path = out / "suite.json"
    state = read_json(state_path) if state_path.exists() and not overwrite else {}
    uri = tracking.resolve_uri(cfg) if cfg.tracking.enabled else None
    parent_id = state.get("parent_run_id") if state.get("tracking_uri") == uri else None
    rows, failed = [], []
    tags = {"suite": cfg.suite.name, "suite.role": "parent", "stage": "suite"}
    with tracking.run(cfg, run_name=f"suite-{cfg.suite.name}", run_id=parent_id, tags=tags) as parent:
        write_json_atomic(state_path, {"name": cfg.suite.name, "parent_run_id": parent.run_id, "tracking_uri": uri})
        for i, path in enumerate(cfg.suite.configs, 1):
            tag = f"suite {cfg.suite.name} [{i}/{len(cfg.suite.configs)}] {path}"
            try:
                child = corpus_config(cfg, path, parent_run_id=parent.run_id, tracking_uri=uri)
                log.info("%s: run %s", tag, child.resolved_run_name)
                record, skipped = run_corpus(child, out / "corpora" / f"{child.resolved_run_name}.json",
                                             overwrite=overwrite)
            except PipelineError as exc:
                log.error("%s: failed: %s", tag, exc)
                failed.append({"config": path, "reason": str(exc)})
                continue
            log.info("%s: %s", tag, "finished before, skipped" if skipped else "done")
            rows.append(corpus_row(child, path, record))
            _tag_child(uri, parent.run_id, rows[-1], cfg.suite.name)
        _write_summary(cfg, rows, failed, {"parent_run_id": parent.run_id})
        for f in ("summary.md", "summary.json"):
            parent.log_artifact(out / f)
        parent.log_metrics({f"{r['corpus']}.{k}.delta_vs_base": d["delta"]
                            for r in rows for k, d in r["vs_base"].items()})
        parent.set_tags({"suite.state": "failed corpora" if failed else "complete"})
    log.info("suite %s: %d corpora finished, %d failed; summary %s", cfg.suite.name, len(rows), len(failed),
             out / "summary.md")
    if failed:
        raise SuiteError(f"{len(failed)} of {len(cfg.suite.configs)} suite corpora failed "
                         f"({', '.join(f['config'] for f in failed)}): {failed[0]['reason']}; the others are "
                         f"summarised in {out / 'summary.md'}")
    return out
