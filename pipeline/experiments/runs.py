"""Orchestrated runs (sweep children, suite corpora): when a child counts as finished, shared by the
orchestrators so that neither reaches into the other.

A child is finished when its record's fingerprint matches its settings (train settings, seed, prepared
data, eval settings) and its ``metrics.json`` belongs to the model it trained.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.core.artifacts import Layout, digest, read_json, read_manifest
from pipeline.core.config import Config
from pipeline.contracts.identity import run_fingerprint

NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # sweep and suite names become folder and run names
METRIC_LABELS = {"classification.macro_f1": "macro-F1", "classification.accuracy": "accuracy",
                 "classification.knn_macro_f1": "kNN macro-F1", "classification.zero_shot_macro_f1": "zero-shot F1",
                 "retrieval.recall@1": "recall@1", "retrieval.recall@10": "recall@10",
                 "retrieval.ndcg@10": "nDCG@10", "retrieval.mrr@10": "MRR@10"}


def child_fingerprint(child: Config, prep_fp: str) -> tuple[str, str]:
    """(fingerprint of the finished child, fingerprint its train manifest must carry)."""
    train_fp = run_fingerprint(child, prep_fp)
    full = digest([train_fp, child.section_hash("eval")])
    return full, train_fp


def finished_record(child: Config, prep_fp: str, record_path: Path) -> dict | None:
    """The child's record if it finished with these settings and its metrics belong to its model."""
    if not record_path.exists():
        return None
    record = read_json(record_path)
    expected, train_fp = child_fingerprint(child, prep_fp)
    if record.get("fingerprint") != expected:
        return None
    return record if outputs_match(child, prep_fp, train_fp) else None


def outputs_match(child: Config, prep_fp: str, train_fp: str) -> bool:
    layout = Layout(child)
    tm = read_manifest(layout.model_dir())
    metrics_path = layout.report() / "metrics.json"
    if tm is None or tm.get("fingerprint") != train_fp or not metrics_path.exists():
        return False
    m = read_json(metrics_path)
    return m.get("mlflow_run_id") == (tm.get("mlflow_run_id") or "") and m.get("model_fingerprint") == train_fp
