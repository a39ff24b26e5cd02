"""Metric functions on per-item results, and bootstrap confidence intervals.

Definitions (tested against hand-computed cases, field note 7):

- ``recall@k``: share of queries with at least one relevant item in the top k (success@k; what
  product-matching papers and the project's reference figures call recall@k: "is the same product
  among the first k results"). sentence-transformers calls this ``accuracy@k``.
- ``recall_all@k``: share of a query's relevant items found in its top k, averaged over queries
  (sentence-transformers' ``recall@k``); reported beside it so both readings are available.
- ``mrr@k``: 1 / rank of the first relevant item within the top k, else 0.
- ``ndcg@k``: binary-relevance DCG with 1/log2(rank+1) gains, divided by the ideal DCG of
  min(#relevant, k) hits.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.metrics import accuracy_score, f1_score


def retrieval_per_query(relevance: np.ndarray, n_relevant: np.ndarray, ks=(1, 10)) -> dict[str, np.ndarray]:
    """Per-query metrics from a ranked relevance matrix.

    relevance: (n_queries, depth) bool, True where the item at that rank is relevant.
    n_relevant: (n_queries,) number of relevant items each query has in the whole gallery (>= 1).
    """
    relevance = np.asarray(relevance, dtype=bool)
    n_relevant = np.asarray(n_relevant, dtype=float)
    if (n_relevant < 1).any():
        raise ValueError("every query needs at least one relevant item")
    out: dict[str, np.ndarray] = {}
    for k in ks:
        top = relevance[:, :k]
        out[f"recall@{k}"] = top.any(1).astype(float)
        out[f"recall_all@{k}"] = top.sum(1) / n_relevant
    depth = max(ks)
    top = relevance[:, :depth]
    first = np.where(top.any(1), top.argmax(1) + 1, 0)
    out[f"mrr@{depth}"] = np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)
    discounts = 1.0 / np.log2(np.arange(2, depth + 2))
    dcg = (top * discounts[: top.shape[1]]).sum(1)
    ideal_hits = np.minimum(n_relevant, depth).astype(int)
    idcg = np.array([discounts[:h].sum() for h in ideal_hits])
    out[f"ndcg@{depth}"] = dcg / idcg
    return out


def search(index_vectors: np.ndarray, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k with FAISS. Returns (scores, ids), each (n_queries, k)."""
    import faiss

    index = faiss.IndexFlatIP(index_vectors.shape[1])
    index.add(np.ascontiguousarray(index_vectors, dtype=np.float32))
    return index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k)


def sparse_search(index_vectors, query_vectors, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product for sparse (TF-IDF) rows, the sparse counterpart of :func:`search`.

    index_vectors: (n, features) CSR; query_vectors: (q, features) CSR. Returns (scores, ids), (q, k).
    """
    scores = (query_vectors @ index_vectors.T).toarray()
    top = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k]
    order = np.take_along_axis(scores, top, 1).argsort(1)[:, ::-1]
    ids = np.take_along_axis(top, order, 1)
    return np.take_along_axis(scores, ids, 1), ids


def group_retrieval(embeddings: np.ndarray, groups: np.ndarray, k: int = 10,
                    search_fn: Callable | None = None, query_embeddings: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Same-group retrieval inside one split: every item whose group has >= 2 members is a query,
    its relevant items are the other members, the gallery is every other item of the split.

    embeddings: (n, dim) L2-normalised; groups: (n,) group ids; query_embeddings: the same n items
    embedded as queries (a model with query prompts), default ``embeddings``. Returns per-query metric arrays.
    """
    groups = np.asarray(groups)
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    queries = np.flatnonzero(counts[inverse] >= 2)
    if len(queries) == 0:
        return {}
    search_fn = search_fn or search
    asked = embeddings if query_embeddings is None else query_embeddings
    _, ids = search_fn(embeddings, asked[queries], k + 1)
    ranked = np.full((len(queries), k), -1, dtype=np.int64)
    for row, (q, hits) in enumerate(zip(queries, ids)):
        hits = hits[hits != q][:k]  # the query itself is not in its own gallery
        ranked[row, : len(hits)] = hits
    relevance = (ranked >= 0) & (inverse[np.maximum(ranked, 0)] == inverse[queries][:, None])
    return retrieval_per_query(relevance, counts[inverse[queries]] - 1, ks=(1, k))


def classification_scores(y_true, y_pred) -> dict[str, float]:
    return {"macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(y_true, y_pred))}


def knn_predict(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray, k: int = 10,
                search_fn: Callable | None = None) -> np.ndarray:
    """Similarity-weighted vote of the k nearest train items (ties cannot stall on equal counts)."""
    search_fn = search_fn or search
    scores, ids = search_fn(train_emb, test_emb, k)
    classes, coded = np.unique(train_labels, return_inverse=True)
    votes = np.zeros((len(test_emb), len(classes)))
    rows = np.repeat(np.arange(len(test_emb)), ids.shape[1])
    np.add.at(votes, (rows, coded[ids.ravel()]), np.maximum(scores.ravel(), 0) + 1e-6)
    return classes[votes.argmax(1)]


def macro_f1_from_codes(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over the classes present in y_true or y_pred, as scikit-learn computes it."""
    cm = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(cm).astype(float)
    support = cm.sum(1)
    predicted = cm.sum(0)
    present = (support + predicted) > 0
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1[present].mean())


def bootstrap(stat: Callable[[np.ndarray], float], n_items: int, n: int, seed: int) -> np.ndarray:
    """``n`` replicates of ``stat(idx)``, ``idx`` being ``n_items`` item indices drawn with replacement.
    The one resampling loop of the project: every item-level CI and paired difference is built on it."""
    rng = np.random.default_rng(seed)
    return np.array([stat(rng.integers(0, n_items, n_items)) for _ in range(n)], dtype=float)


def bootstrap_two_level(stat: Callable[[int, np.ndarray], float], n_runs: int, n_items: int, n: int,
                        seed: int) -> np.ndarray:
    """``n`` replicates of ``mean over resampled runs r of stat(r, idx)``: training runs (seeds) and test
    items both resampled with replacement, so the spread between seeds is carried into the interval.
    (Written here: scikit-learn and scipy resample one level only.)"""
    rng = np.random.default_rng(seed)
    out = np.empty(n)
    for i in range(n):
        runs = rng.integers(0, n_runs, n_runs)
        idx = rng.integers(0, n_items, n_items)
        out[i] = np.mean([stat(int(r), idx) for r in runs])
    return out


def percentile_ci(replicates: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """The (alpha/2, 1 - alpha/2) percentile interval of bootstrap replicates; NaNs when there are none."""
    if len(replicates) == 0:
        return (float("nan"), float("nan"))
    return float(np.quantile(replicates, alpha / 2)), float(np.quantile(replicates, 1 - alpha / 2))


def bootstrap_mean_ci(values: np.ndarray, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over items."""
    values = np.asarray(values, dtype=float)
    if n == 0 or len(values) == 0:
        return (float("nan"), float("nan"))
    return percentile_ci(bootstrap(lambda idx: values[idx].mean(), len(values), n, seed), alpha)


def bootstrap_macro_f1_ci(y_true, y_pred, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of macro-F1 over items."""
    if n == 0:
        return (float("nan"), float("nan"))
    classes, coded = np.unique(np.concatenate([np.asarray(y_true), np.asarray(y_pred)]), return_inverse=True)
    t, p = coded[: len(y_true)], coded[len(y_true):]
    return percentile_ci(bootstrap(lambda idx: macro_f1_from_codes(t[idx], p[idx], len(classes)), len(t), n, seed),
                         alpha)


def headline_keys(retrieval_k: int = 10) -> list[str]:
    """The metrics a verdict is given on: macro-F1 where there are labels, recall@1 and nDCG@k where
    there is retrieval (k = eval.retrieval_k)."""
    return ["classification.macro_f1", "retrieval.recall@1", f"retrieval.ndcg@{retrieval_k}"]


def ci_position(value: float, ci: tuple[float, float]) -> str:
    """Where ``value`` lies relative to the closed interval ``ci``: "below", "within" or "above".

    The sweep's rule for "LoRA is within full fine-tuning's CI" is this position of LoRA's point
    estimate in full fine-tuning's 95% interval (bounds included).
    """
    lo, hi = ci
    if not (np.isfinite(value) and np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"cannot place {value} in [{lo}, {hi}]")
    if value < lo:
        return "below"
    if value > hi:
        return "above"
    return "within"


def seed_summary(values, cis=None) -> dict[str, float]:
    """Mean and spread of one metric over repeated seeds of one configuration.

    values: (n_seeds,) point estimates; cis: optional (n_seeds, 2) per-seed 95% bounds.
    Returns mean, sd (sample standard deviation, ddof=1; nan for a single seed), min, max, n and,
    given ``cis``, ci_low / ci_high: the per-seed bounds averaged, i.e. the typical test-sampling
    interval of one run of this configuration (it does not include the seed-to-seed spread).
    """
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError("seed_summary needs a non-empty 1-d array of values")
    out = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
           "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}
    if cis is not None:
        c = np.asarray(cis, dtype=float).reshape(len(v), 2)
        out["ci_low"], out["ci_high"] = float(c[:, 0].mean()), float(c[:, 1].mean())
    return out


# ------------------------------------------------------------------------------------- paired verdicts
#
# Two models scored on the same test items share most of their sampling noise (an easy item is easy for
# both), so comparing their separate CIs understates what the data can tell apart. The paired bootstrap
# resamples the items once per replicate and recomputes the metric for both models on the same indices;
# the 95% interval of the difference decides the verdict.

BETTER, SAME, WORSE = "better", "no measurable difference", "worse"
NOT_MEASURED = "not measured (eval.bootstrap=0)"


def verdict_of(ci: tuple[float, float]) -> str:
    """``better`` when the whole 95% CI of (model - reference) is above 0, ``worse`` when below, else
    ``no measurable difference``; ``not measured`` when there is no interval (no bootstrap)."""
    lo, hi = ci
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return NOT_MEASURED
    if lo > 0:
        return BETTER
    if hi < 0:
        return WORSE
    return SAME


def _paired_result(delta: float, replicates: np.ndarray, alpha: float) -> dict:
    ci = percentile_ci(replicates, alpha)
    return {"delta": float(delta), "ci": [ci[0], ci[1]], "verdict": verdict_of(ci)}


def paired_bootstrap_mean(a, b, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """mean(a) - mean(b) of per-item scores of two models on the same items, with a paired bootstrap CI.

    a, b: (n_items,) per-item values (e.g. per-query recall@1) in the same item order. Returns
    ``{"delta", "ci": [lo, hi], "verdict"}``.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired scores need two non-empty 1-d arrays of one length, got {a.shape} and {b.shape}")
    diff = a - b
    return _paired_result(diff.mean(), bootstrap(lambda idx: diff[idx].mean(), len(diff), n, seed), alpha)


def paired_bootstrap_macro_f1(y_true, pred_a, pred_b, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """macro-F1(pred_a) - macro-F1(pred_b) against the same labels, with a paired bootstrap CI: every
    replicate recomputes both macro-F1s on one resampled set of items. Returns as
    :func:`paired_bootstrap_mean`."""
    y_true, pred_a, pred_b = (np.asarray(x).astype(str) for x in (y_true, pred_a, pred_b))
    if not (len(y_true) == len(pred_a) == len(pred_b)) or len(y_true) == 0:
        raise ValueError(f"paired macro-F1 needs labels and two predictions of one non-zero length, got "
                         f"{len(y_true)}, {len(pred_a)}, {len(pred_b)}")
    classes, coded = np.unique(np.concatenate([y_true, pred_a, pred_b]), return_inverse=True)
    m = len(y_true)
    t, pa, pb = coded[:m], coded[m:2 * m], coded[2 * m:]
    k = len(classes)
    reps = bootstrap(lambda idx: macro_f1_from_codes(t[idx], pa[idx], k) - macro_f1_from_codes(t[idx], pb[idx], k),
                     m, n, seed)
    return _paired_result(macro_f1_from_codes(t, pa, k) - macro_f1_from_codes(t, pb, k), reps, alpha)
