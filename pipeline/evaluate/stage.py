"""eval: classification and retrieval metrics for the trained encoder, the base model and TF-IDF, on
the same test split, with bootstrap 95% confidence intervals and paired verdicts.

Reads the embed stage's outputs and the prepared data (:mod:`pipeline.contracts.prepared_data`); writes
``reports/<run>/metrics.json`` (the contract's schema plus ``ci``, ``verdict``, ``validation`` and
``recall_all@k`` keys), ``report.md`` (with the per-class table where there are labels),
``confusion.png`` and ``curve.png``, copies them to ``reports/latest/``, and logs all of it to the run's
MLflow run. Labelled and pair corpora share the payload, the report, ``latest/`` and the MLflow code;
only their scoring differs: labelled corpora in :mod:`pipeline.evaluate.scores` (classifier heads in
:mod:`pipeline.evaluate.heads`), pair corpora in :mod:`pipeline.evaluate.pairs`. Verdicts:
:mod:`pipeline.evaluate.verdicts`. Which texts carry the query prompt and which the document prompt of
models that have them is stated once, in pipeline/model/prompts.py.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline.contracts import label_head as head_contract
from pipeline.contracts.prepared_data import SPLITS, is_pairs, is_retrieval, load_labels, load_split
from pipeline.core import tracking
from pipeline.core.artifacts import Layout, atomic_dir, clean_stale, require_manifest, write_json_atomic
from pipeline.core.config import Config
from pipeline.evaluate import pairs, report, retrieval
from pipeline.evaluate.scores import Scored, Scores, cached_base_scores, cached_lexical, evaluate_embeddings
from pipeline.evaluate.verdicts import (kept_base_verdict, log_verdict, train_curve, validation_figures,
                                       verdict_block)
from pipeline.model.encoder import check_base_matches, read_model_info
from pipeline.model.families import lora_block

log = logging.getLogger(__name__)


def _ci_lists(ci: dict) -> dict:
    return {block: {k: [round(v[0], 5), round(v[1], 5)] for k, v in vals.items()} for block, vals in ci.items()}


def _rounded(block: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in block.items()}


def _rounded_tree(tree: dict) -> dict:
    return {k: (_rounded_tree(v) if isinstance(v, dict) else round(v, 5) if isinstance(v, float) else v)
            for k, v in tree.items()}


def write_curve(curve: dict | None, folder: Path, title: str) -> bool:
    """curve.png in ``folder`` from the train manifest's validation curve; False when there is none."""
    if curve is None:
        return False
    report.curve_png(curve, folder / "curve.png", title)
    return True


def run(cfg: Config) -> Path:
    """Score the run's embeddings, the base model's and TF-IDF on the test split; write the report."""
    layout = Layout(cfg)
    prep = require_manifest(layout.processed, "prepared data", "run `make data` first")
    emb_manifest = require_manifest(layout.embeddings(), f"embeddings for run '{cfg.resolved_run_name}'",
                                    "run `python -m pipeline embed` (make eval does both)")
    train_manifest = require_manifest(layout.model_dir(), "trained model", "run `make train` first")
    info = read_model_info(layout.model_dir())
    check_base_matches(layout.model_dir(), info, cfg.model.base)
    clean_stale(layout.report().parent, Path(cfg.paths.cache) / "lexical", Path(cfg.paths.cache) / "base-scores")
    cfg = tracking.preflight(cfg)  # fail (or fall back) before scoring, not after the report is written
    score = retrieval.score if is_retrieval(prep) else pairs.score if is_pairs(prep) else _score_labelled
    scored = score(cfg, layout, prep, emb_manifest, train_manifest, info)
    payload = {**_common_payload(cfg, info, prep, emb_manifest, train_manifest), "verified": True, **scored.payload}
    if info.get("kept_base"):  # training kept the untrained base: say so in the verdict (pipeline/train/selection.py)
        payload["verdict"]["validation"] = kept_base_verdict(train_curve(train_manifest))
        payload["kept"] = "base"
    out = _write_outputs(cfg, layout, payload, scored, train_manifest)
    _log_to_mlflow(cfg, train_manifest, payload, out)
    log.info("eval: wrote %s", out / "metrics.json")
    return out


def _common_payload(cfg: Config, info: dict, prep: dict, emb_manifest: dict, train_manifest: dict) -> dict:
    """The part of metrics.json that does not depend on the kind of corpus."""
    t = train_manifest.get("train", {})
    return {
        "run_name": cfg.resolved_run_name,
        "dataset": cfg.data.name,
        "mlflow_run_id": train_manifest.get("mlflow_run_id") or "",
        "model": {"base": info["base"], "method": info["method"], "lora": lora_block(info.get("lora")),
                  "trainable_params": info["trainable_params"], "total_params": info["total_params"]},
        # pairs_per_second and real_tokens_per_second: the optimiser steps alone; validation is timed apart
        "train": {"seconds": t.get("seconds", 0.0), "pairs_per_second": t.get("pairs_per_second"),
                  "step_seconds": t.get("step_seconds"), "validation_seconds": t.get("validation_seconds"),
                  "peak_rss_mb": t.get("peak_rss_mb"), "rss_before_train_mb": t.get("rss_before_train_mb"),
                  "real_tokens_per_second": t.get("real_tokens_per_second"), "steps": t.get("steps"),
                  "device": t.get("device"), "precision": t.get("precision")},
        "embed": emb_manifest.get("timing", {}),
        "backend": emb_manifest.get("backend"),  # the encoder form embed chose (pipeline/model/backends.py)
        "objective": _objective(prep, t),  # the objective the training pairs were built for, as training used it
        "seed": cfg.seed,
        # the splits' identity for labelled corpora (pairs settings do not change what is scored)
        "data_fingerprint": prep.get("splits_fingerprint", prep["fingerprint"]),
        "model_fingerprint": train_manifest["fingerprint"],  # ties these metrics to the model they score
    }


def _objective(prep: dict, train_stats: dict) -> dict | None:
    """The prepared data's objective with the losses and mask the training run actually used (an explicit
    train setting wins over the objective's choice)."""
    objective = prep.get("objective")
    if objective is None:
        return None
    used = {k: train_stats[k] for k in ("mask_same_label", "label_loss_weight", "pair_loss_weight") if k in train_stats}
    return {**objective, **used}


def _score_labelled(cfg: Config, layout: Layout, prep: dict, emb_manifest: dict, train_manifest: dict,
                    info: dict) -> Scored:
    """Classification and same-group retrieval on the three splits: the payload's scores, plus what the
    report adds (the per-class table and the confusion matrix)."""
    splits = {s: load_split(layout.processed, s) for s in SPLITS}
    label_names = load_labels(layout.processed)
    log.info("eval: scoring %s and the base model on %d test items", cfg.resolved_run_name, len(splits["test"]))
    trained_head = head_contract.load(layout.model_dir())  # None unless the run trained a label head
    adapted = evaluate_embeddings(Path(emb_manifest["adapted_dir"]), splits, cfg, label_names, trained_head)
    base = cached_base_scores(cfg, Path(emb_manifest["base_dir"]), splits, label_names)
    lexical = (cached_lexical(cfg, layout, prep.get("splits_fingerprint", prep["fingerprint"]), splits)
               if cfg.eval.lexical else None)
    y_test = splits["test"]["label"].to_numpy()
    classified = adapted.y_pred is not None
    payload = {
        "classification": _rounded(adapted.classification),
        "retrieval": _rounded(adapted.retrieval),
        "baseline": _block(base),
        "lexical": _block(lexical) if lexical else {"classification": {}, "retrieval": {}},
        "ci": _ci_lists(adapted.ci),
        "test_items": int(len(splits["test"])),
        "retrieval_queries": adapted.retrieval_queries,
        "classifier": {"head": adapted.head, "base_head": base.head, "label_head_trained": trained_head is not None},
        # every candidate head of both models: validation macro-F1 (what chose) and test macro-F1 (reported only)
        "heads": {"adapted": _rounded_tree(adapted.heads), "base": _rounded_tree(base.heads)} if classified else {},
        # Model selection happens on these validation figures, never on test.
        "validation": {"adapted": _rounded_tree(adapted.validation), "base": _rounded_tree(base.validation)},
        "verdict": verdict_block(cfg, info["method"], {"adapted": adapted, "base": base, "lexical": lexical},
                                 y_test if classified else None, validation_figures(adapted, base),
                                 train_curve(train_manifest)),
    }
    if not classified:
        return Scored(payload)
    return Scored(payload, confusion=(y_test, adapted.y_pred, label_names),
                  per_class=report.per_class_table(y_test, adapted.y_pred, base.y_pred, label_names))


def _block(scores: Scores) -> dict:
    """A reference model's figures in metrics.json (``baseline`` or ``lexical``): both blocks and the CIs."""
    return {"classification": _rounded(scores.classification), "retrieval": _rounded(scores.retrieval),
            "ci": _ci_lists(scores.ci)}


def _write_outputs(cfg: Config, layout: Layout, payload: dict, scored: Scored, train_manifest: dict) -> Path:
    """metrics.json, report.md and the plots in ``reports/<run>/``, then the same in ``reports/latest/``."""
    out = layout.report()
    with atomic_dir(out) as tmp:
        write_json_atomic(tmp / "metrics.json", payload)
        curve = write_curve(train_curve(train_manifest), tmp, f"{cfg.resolved_run_name}: validation during training")
        if scored.confusion is not None:
            y_true, y_pred, label_names = scored.confusion
            report.confusion_png(y_true, y_pred, label_names, tmp / "confusion.png",
                                 title=f"{cfg.resolved_run_name} (test)")
        others = report.other_runs(Path(cfg.paths.reports), payload)
        md = report.markdown(payload, scored.per_class, others, curve=curve) + scored.report_tail
        (tmp / "report.md").write_text(md, encoding="utf-8")
    with atomic_dir(layout.latest_report) as tmp:
        for f in out.iterdir():
            shutil.copy2(f, tmp / f.name)
    return out


def _log_to_mlflow(cfg: Config, train_manifest: dict, payload: dict, out: Path) -> None:
    """Every headline figure of the three models, the CIs, the paired changes and the verdict, on the
    training run's MLflow run; the report files as its artefacts."""
    with tracking.run(cfg, run_name=cfg.resolved_run_name, run_id=train_manifest.get("mlflow_run_id")) as tracker:
        flat = {}
        for prefix, block in (("", payload), ("base.", payload["baseline"]), ("lexical.", payload["lexical"]),
                              ("hybrid.", payload.get("hybrid", {}))):
            for kind in ("classification", "retrieval"):
                for k, v in block.get(kind, {}).items():
                    if isinstance(v, (int, float)) and not k.endswith("_C"):
                        flat[f"{prefix}{k}"] = v
        for kind, vals in payload["ci"].items():
            for k, (lo, hi) in vals.items():
                flat[f"{k}.ci_low"], flat[f"{k}.ci_high"] = lo, hi
        for kind, deltas in payload.get("delta_vs_base", {}).items():
            flat.update({f"delta.{k}": d["delta"] for k, d in deltas.items()})
        tracker.log_metrics(flat)
        tags = {"evaluated": "true", "verified": "yes" if payload.get("verified", True) else "no (no judged queries)"}
        if payload.get("kept"):
            tags["kept"] = payload["kept"]
        if not payload["classification"] and payload.get("notes", {}).get("classification"):
            tags["classification"] = "absent (pair dataset)"
        tracker.set_tags(tags)
        log_verdict(tracker, payload["verdict"])
        for f in ("metrics.json", "report.md", "confusion.png", "curve.png"):
            tracker.log_artifact(out / f, "report")
