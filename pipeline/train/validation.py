"""Scoring the validation split while training: a cheap form of the run's headline metric.

The train stage calls :func:`load` once and :meth:`ValidationSet.score` at every evaluation; the model it
keeps is the best one on this score, and it stops when the score stops improving (train.validation).
What is scored depends on the corpus's shape:

- groups (same-entity texts): ``recall@1`` of same-group retrieval inside the val split, as eval scores
  the test split;
- labels without groups: ``macro_f1`` of a 10-NN vote of val texts over a stratified sample of train
  texts (eval also fits logistic regression, which is too slow to repeat every epoch); a run that trains a
  label head takes the better of that vote and the head's own macro-F1 (pipeline/train/stage.py);
- query -> positive pairs: ``recall@1`` of the val queries against their relevant items plus a seeded
  sample of the gallery;
- retrieval sets: graded ``ndcg@10`` of val queries over their judged documents plus a sample of the corpus
  (pipeline/train/retrieval.py).

Each evaluation embeds at most ``train.validation.max_texts`` texts (seeded samples), so it costs seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pipeline.contracts.prepared_data import has_groups
from pipeline.search import metrics as M

KNN_K = 10


@dataclass
class ValidationSet:
    """Texts one evaluation embeds and how their embeddings are scored.

    queries: texts embedded as queries; documents: texts embedded as documents (None: the queries are
    their own gallery). ``scorer(q_emb, d_emb)`` maps (n_queries, dim) and (n_documents, dim) L2-normalised
    embeddings to the metric (higher is better).
    """

    metric: str
    queries: list[str]
    documents: list[str] | None
    scorer: Callable[[np.ndarray, np.ndarray], float] = field(repr=False)
    description: str = ""
    labels: np.ndarray | None = field(default=None, repr=False)  # the queries' labels, where known (label head)

    def score(self, q_emb: np.ndarray, d_emb: np.ndarray | None = None) -> float:
        return float(self.scorer(q_emb, q_emb if d_emb is None else d_emb))


def _read_jsonl(path: Path) -> pd.DataFrame:
    return pd.read_json(path, lines=True, dtype={"id": str, "text": str, "label": str, "group": str})


def _sample_groups(df: pd.DataFrame, cap: int, rng: np.random.Generator) -> pd.DataFrame:
    """Whole groups in a seeded order until ``cap`` texts, so no query loses its relevant items."""
    if len(df) <= cap:
        return df
    groups = df["group"].unique()
    sizes = df.groupby("group").size()
    keep, total = set(), 0
    for g in groups[rng.permutation(len(groups))]:
        if total + int(sizes[g]) > cap:
            continue
        keep.add(g)
        total += int(sizes[g])
    return df[df["group"].isin(keep)]


def _stratified(df: pd.DataFrame, cap: int, rng: np.random.Generator) -> pd.DataFrame:
    """About ``cap`` rows with every label's share kept (at least one row per label)."""
    if len(df) <= cap:
        return df
    frac = cap / len(df)
    parts = [g.iloc[rng.permutation(len(g))[: max(1, int(round(frac * len(g))))]] for _, g in df.groupby("label")]
    return pd.concat(parts)


def _group_set(val: pd.DataFrame, cap: int, rng) -> ValidationSet | None:
    val = _sample_groups(val, cap, rng)
    groups = val["group"].to_numpy()
    if not (pd.Series(groups).value_counts() >= 2).any():
        return None

    def score(q, _d):
        return float(M.group_retrieval(q, groups, k=1)["recall@1"].mean())

    labels = val["label"].to_numpy() if val["label"].notna().all() else None
    return ValidationSet("recall@1", val["text"].tolist(), None, score,
                         f"same-group retrieval in {len(val):,} val texts", labels)


def _label_set(train: pd.DataFrame, val: pd.DataFrame, cap: int, rng) -> ValidationSet | None:
    train, val = train[train["label"].notna()], val[val["label"].notna()]
    if train["label"].nunique() < 2 or len(val) == 0:
        return None
    val = _stratified(val, cap // 2, rng)
    gallery = _stratified(train, cap - len(val), rng)
    g_labels, v_labels = gallery["label"].to_numpy(), val["label"].to_numpy()

    def score(q, d):
        pred = M.knn_predict(d, g_labels, q, k=min(KNN_K, len(g_labels)))
        return M.classification_scores(v_labels, pred)["macro_f1"]

    return ValidationSet("macro_f1", val["text"].tolist(), gallery["text"].tolist(), score,
                         f"{KNN_K}-NN macro-F1 of {len(val):,} val texts over {len(gallery):,} train texts", v_labels)


def _pairs_set(folder: Path, cap: int, rng) -> ValidationSet | None:
    path = folder / "val_queries.jsonl"
    if not path.exists() or path.stat().st_size == 0:
        return None
    queries = pd.read_json(path, lines=True, dtype={"id": str, "text": str})
    if len(queries) == 0:
        return None
    gallery = _read_jsonl(folder / "gallery.jsonl")
    queries = queries.iloc[rng.permutation(len(queries))[: cap // 4]]
    relevant_ids = {str(i) for rel in queries["relevant"] for i in rel}
    is_rel = gallery["id"].isin(relevant_ids).to_numpy()
    others = np.flatnonzero(~is_rel)
    room = max(0, cap - len(queries) - int(is_rel.sum()))
    keep = np.sort(np.concatenate([np.flatnonzero(is_rel), rng.permutation(others)[:room]]))
    gallery = gallery.iloc[keep].reset_index(drop=True)
    where = {g: i for i, g in enumerate(gallery["id"])}
    relevant = [np.array([where[str(r)] for r in rel if str(r) in where]) for rel in queries["relevant"]]

    def score(q, d):
        _, ids = M.search(d, q, 1)
        return float(np.mean([np.isin(ids[i, 0], rel) for i, rel in enumerate(relevant)]))

    return ValidationSet("recall@1", queries["text"].tolist(), gallery["text"].tolist(), score,
                         f"recall@1 of {len(queries):,} val queries over {len(gallery):,} gallery texts")


def load(processed: Path, prep_manifest: dict, *, max_texts: int, seed: int) -> ValidationSet | None:
    """The validation set of a prepared folder, or None when it has nothing to score (e.g. a pairs
    corpus without val queries); training then keeps its last step, and says so."""
    processed = Path(processed)
    rng = np.random.default_rng(seed + 7)
    if prep_manifest.get("kind") == "pairs":
        return _pairs_set(processed, max_texts, rng)
    if prep_manifest.get("kind") == "retrieval":
        from pipeline.train import retrieval

        return retrieval.validation_set(processed, prep_manifest, max_texts, rng)
    val = _read_jsonl(processed / "val.jsonl")
    objective = (prep_manifest.get("objective") or {}).get("name")
    if has_groups(val) and objective != "label":
        found = _group_set(val, max_texts, rng)
        if found is not None:
            return found
    return _label_set(_read_jsonl(processed / "train.jsonl"), val, max_texts, rng)
