"""What one model scores on a labelled corpus's test split, and the caches that spare recomputing it.

Three models are scored per run on the same split: the adapted encoder, the untrained base (cached, since
every run on the same splits shares it) and TF-IDF (cached per prepared data). Each result is a
:class:`Scores`: the headline figures with their bootstrap CIs, plus the per-item results that the paired
verdicts need (the chosen head's test predictions, per-query retrieval values) and the validation figures
that the model choice saw.

Retrieval: every test item whose group has >= 2 test items is a query, the other members are relevant, the
gallery is every other test item (FAISS exact inner product on normalised embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.contracts.prepared_data import has_groups, has_labels
from pipeline.core.artifacts import Layout, digest, read_json, sha256_file, write_json_atomic
from pipeline.contracts.label_head import LabelHead
from pipeline.core.config import Config
from pipeline.evaluate.heads import Classification, classify, classify_tfidf
from pipeline.search import metrics as M
from pipeline.search import scoring

# Bump when a baseline, a classifier head, a metric definition or what the cache keeps changes, so cached
# scores are recomputed. 4: results are stored as Scores (typed) rather than dicts with private keys;
# 5: every candidate head's test macro-F1 (test_macro_f1) and the label_head candidate.
SCORES_VERSION = 5


@dataclass
class Scores:
    """One model's scores on the test split (absent blocks stay empty: a metric is never invented)."""

    classification: dict[str, float] = field(default_factory=dict)
    retrieval: dict[str, float] = field(default_factory=dict)
    ci: dict[str, dict[str, tuple[float, float]]] = field(
        default_factory=lambda: {"classification": {}, "retrieval": {}})
    y_pred: np.ndarray | None = None  # the chosen head's test predictions
    head: str | None = None
    validation_macro_f1: dict[str, float] = field(default_factory=dict)  # per candidate head, on val
    test_macro_f1: dict[str, float] = field(default_factory=dict)  # per candidate head, on test (reported only)
    per_query: dict[str, np.ndarray] = field(default_factory=dict)  # retrieval metric -> per-query test values
    val_retrieval: dict[str, float] | None = None  # retrieval on the val split (None: not scored)
    retrieval_queries: int = 0

    @property
    def validation(self) -> dict:
        """What model selection saw on the validation split, as metrics.json records it."""
        out: dict = {}
        if self.val_retrieval is not None:
            out["retrieval"] = self.val_retrieval
        if self.head is not None:
            out["classification"] = self.validation_macro_f1
        return out

    def add_classification(self, c: Classification) -> None:
        self.classification, self.ci["classification"] = c.figures, c.ci
        self.y_pred, self.head, self.validation_macro_f1 = c.y_pred, c.head, c.validation_macro_f1
        self.test_macro_f1 = c.test_macro_f1

    @property
    def heads(self) -> dict[str, dict[str, float]]:
        """Every candidate head: its validation macro-F1 (what the choice saw) and its test macro-F1."""
        return {h: {"val_macro_f1": v, "test_macro_f1": self.test_macro_f1.get(h)}
                for h, v in self.validation_macro_f1.items()}

    def to_json(self) -> dict:
        return {"classification": self.classification, "retrieval": self.retrieval,
                "ci": {k: {m: list(v) for m, v in d.items()} for k, d in self.ci.items()},
                "y_pred": None if self.y_pred is None else [str(x) for x in self.y_pred],
                "head": self.head, "validation_macro_f1": self.validation_macro_f1,
                "test_macro_f1": self.test_macro_f1,
                "per_query": {k: np.asarray(v, dtype=float).tolist() for k, v in self.per_query.items()},
                "val_retrieval": self.val_retrieval, "retrieval_queries": self.retrieval_queries}

    @classmethod
    def from_json(cls, d: dict) -> "Scores":
        return cls(classification=d["classification"], retrieval=d["retrieval"],
                   ci={k: {m: tuple(v) for m, v in block.items()} for k, block in d["ci"].items()},
                   y_pred=None if d["y_pred"] is None else np.asarray(d["y_pred"], dtype=object),
                   head=d["head"], validation_macro_f1=d["validation_macro_f1"], test_macro_f1=d["test_macro_f1"],
                   per_query={k: np.asarray(v, dtype=float) for k, v in d["per_query"].items()},
                   val_retrieval=d["val_retrieval"], retrieval_queries=d["retrieval_queries"])


@dataclass
class Scored:
    """A run's scoring, ready to write: the metrics.json body and what only the report shows."""

    payload: dict  # metrics.json's scores, CIs, verdicts and validation figures
    confusion: tuple | None = None  # (y_true, y_pred, label names) of the adapted model, for confusion.png
    per_class: list[dict] | None = None  # the per-class table of report.md
    report_tail: str = ""  # what a kind of corpus appends to report.md


def retrieval_block(test_emb: np.ndarray, groups: np.ndarray, cfg: Config, search_fn=None,
                    query_emb: np.ndarray | None = None) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """(means, CIs, per-query arrays) of same-group retrieval; the arrays feed the paired verdicts."""
    per_query = M.group_retrieval(test_emb, groups, k=cfg.eval.retrieval_k, search_fn=search_fn,
                                  query_embeddings=query_emb)
    if not per_query:
        return {}, {}, {}
    out = {k: float(v.mean()) for k, v in per_query.items()}
    ci = {k: M.bootstrap_mean_ci(v, cfg.eval.bootstrap, cfg.seed) for k, v in per_query.items()}
    return out, ci, per_query


def _load_embeddings(emb_dir: Path, splits) -> tuple[dict, dict, np.ndarray | None]:
    """Each split's document form, its query form (where embed wrote one: a model with query prompts; else
    the document form) and the label names' embeddings."""
    emb_dir = Path(emb_dir)
    emb = {s: np.load(emb_dir / f"{s}.npy") for s in splits}
    query_emb = {s: np.load(emb_dir / f"{s}.query.npy") if (emb_dir / f"{s}.query.npy").exists() else emb[s]
                 for s in splits}
    label_emb = np.load(emb_dir / "labels.npy") if (emb_dir / "labels.npy").exists() else None
    return emb, query_emb, label_emb


def evaluate_embeddings(emb_dir: Path, splits: dict[str, pd.DataFrame], cfg: Config,
                        label_names: list[str], label_head: LabelHead | None = None) -> Scores:
    """One model's scores from its embeddings; ``label_head``: the head the run trained with the encoder."""
    emb, query_emb, label_emb = _load_embeddings(emb_dir, splits)
    scores = Scores()
    if has_labels(splits["test"]):
        scores.add_classification(classify(emb, splits, label_emb, cfg, label_names, query_emb, label_head))
    if has_groups(splits["test"]):
        ret, ci, per_query = retrieval_block(emb["test"], splits["test"]["group"].to_numpy(), cfg,
                                             query_emb=query_emb["test"])
        scores.retrieval, scores.ci["retrieval"], scores.per_query = ret, ci, per_query
        scores.retrieval_queries = len(next(iter(per_query.values()), []))
        no_bootstrap = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"bootstrap": 0})})
        scores.val_retrieval, _, _ = retrieval_block(emb["val"], splits["val"]["group"].to_numpy(), no_bootstrap,
                                                     query_emb=query_emb["val"])
    return scores


def lexical_baseline(splits: dict[str, pd.DataFrame], cfg: Config) -> Scores:
    """TF-IDF word 1-2 grams + char_wb 2-5 grams; linear SVM (C on val); cosine retrieval."""
    vec = scoring.tfidf(splits["train"]["text"])
    x = {s: vec(splits[s]["text"]) for s in splits}
    scores, test = Scores(), splits["test"]
    if has_labels(test):
        c = classify_tfidf(x, splits, cfg)
        scores.classification, scores.ci["classification"], scores.y_pred = c.figures, c.ci, c.y_pred
    if has_groups(test):
        ret, ci, per_query = retrieval_block(x["test"], test["group"].to_numpy(), cfg, search_fn=M.sparse_search)
        scores.retrieval, scores.ci["retrieval"], scores.per_query = ret, ci, per_query
    return scores


def _cached(path: Path, compute) -> Scores:
    if path.exists():
        return Scores.from_json(read_json(path))
    result = compute()
    write_json_atomic(path, result.to_json())
    return result


def cached_lexical(cfg: Config, layout: Layout, prep_fp: str, splits) -> Scores:
    key = digest([SCORES_VERSION, prep_fp, cfg.eval.model_dump(mode="json"), cfg.seed])
    return _cached(Path(cfg.paths.cache) / "lexical" / f"{key}.json", lambda: lexical_baseline(splits, cfg))


def _embeddings_digest(emb_dir: Path, names) -> str:
    return digest([[name, sha256_file(Path(emb_dir) / name) if (Path(emb_dir) / name).exists() else "-"]
                   for name in names], 64)


def cached_base_scores(cfg: Config, emb_dir: Path, splits: dict[str, pd.DataFrame], label_names: list[str]) -> Scores:
    """The untrained model's scores, shared by every run on the same splits and eval settings.

    They depend only on the base embeddings (themselves cached by embed), the splits and the eval
    settings, yet fitting the classifier heads and bootstrapping take a minute or more per run; a sweep
    would otherwise repeat that once per child. The key hashes the embedding files themselves, so a
    rebuilt base cache can never be scored from stale results.
    """
    names = [f"{s}.npy" for s in splits] + ["labels.npy"]
    names += [f"{s}.query.npy" for s in splits if (Path(emb_dir) / f"{s}.query.npy").exists()]
    splits_digest = digest({s: [df["text"].tolist(), df["label"].astype(str).tolist(),
                                df["group"].astype(str).tolist()] for s, df in splits.items()}, 64)
    key = digest([SCORES_VERSION, _embeddings_digest(emb_dir, names), splits_digest, label_names,
                  cfg.eval.model_dump(mode="json"), cfg.seed])
    return _cached(Path(cfg.paths.cache) / "base-scores" / f"{key}.json",
                   lambda: evaluate_embeddings(emb_dir, splits, cfg, label_names))
