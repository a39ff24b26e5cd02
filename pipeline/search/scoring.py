"""Scoring shared by eval and probe: retrieval of pair-corpus queries against their gallery, summaries
with bootstrap CIs and paired differences, and the TF-IDF features of the lexical baseline.

Shapes: query embeddings (n_queries, dim) and gallery embeddings (n_gallery, dim), float32 and
L2-normalised (or TF-IDF rows as L2-normalised CSR matrices with ``metrics.sparse_search``); per-query
results are ``{metric: (n_queries,) float array}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from pipeline.search import metrics as M
from pipeline.core.config import Config
from pipeline.core.errors import DataError


def tfidf(fit_texts: Sequence[str]) -> Callable[[Sequence[str]], "object"]:
    """TF-IDF word 1-2 grams + char_wb 2-5 grams fit on ``fit_texts``; returns texts -> L2-normalised CSR rows.
    The one definition of the lexical baseline's features, for labelled and pair corpora alike."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    word = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=1,
                           token_pattern=r"(?u)\b\w[\w.\-/]*\b").fit(fit_texts)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2).fit(fit_texts)
    return lambda texts: normalize(hstack([word.transform(texts), char.transform(texts)]).tocsr())


def relevance_rows(queries: pd.DataFrame, gallery: pd.DataFrame) -> list[np.ndarray]:
    """Gallery row indices of each query's relevant items."""
    where = {g: i for i, g in enumerate(gallery["id"])}
    return [np.array([where[str(r)] for r in rel if str(r) in where], dtype=np.int64) for rel in queries["relevant"]]


def retrieval_scores(q_emb, g_emb, relevant: list[np.ndarray], k: int, search_fn=None) -> dict[str, np.ndarray]:
    """Per-query recall@1/@k (success), recall_all@k, nDCG@k, MRR@k of queries against the whole gallery.

    relevant: per query, the gallery rows that count as hits (>= 1 each).
    """
    _, ids = (search_fn or M.search)(g_emb, q_emb, k)
    hits = np.zeros(ids.shape, dtype=bool)
    for row, (found, rel) in enumerate(zip(ids, relevant)):
        hits[row] = np.isin(found, rel)
    return M.retrieval_per_query(hits, np.array([len(r) for r in relevant]), ks=(1, k))


def score_embeddings(emb_dir: Path, queries: pd.DataFrame, gallery: pd.DataFrame, relevant, cfg: Config,
                     query_file: str = "queries.npy") -> dict[str, np.ndarray]:
    """Per-query retrieval of the embeddings embed wrote in ``emb_dir``."""
    q = np.load(Path(emb_dir) / query_file)
    g = np.load(Path(emb_dir) / "gallery.npy")
    if len(q) != len(queries) or len(g) != len(gallery):
        raise DataError(f"embeddings in {emb_dir} do not match the prepared queries/gallery; rerun embed --force")
    return retrieval_scores(q, g, relevant, cfg.eval.retrieval_k)


def lexical_retrieval(queries: pd.DataFrame, gallery: pd.DataFrame, relevant, cfg: Config) -> dict[str, np.ndarray]:
    """TF-IDF retrieval (features of :func:`tfidf`, fit on the gallery texts)."""
    vec = tfidf(gallery["text"])
    return retrieval_scores(vec(queries["text"]), vec(gallery["text"]), relevant, cfg.eval.retrieval_k,
                            search_fn=M.sparse_search)


def summarize(per_query: dict[str, np.ndarray], cfg: Config) -> tuple[dict, dict]:
    """(means, bootstrap 95% CIs) of each per-query metric, rounded for metrics.json."""
    means = {k: round(float(v.mean()), 5) for k, v in per_query.items()}
    ci = {k: [round(x, 5) for x in M.bootstrap_mean_ci(v, cfg.eval.bootstrap, cfg.seed)] for k, v in per_query.items()}
    return means, ci


def paired_deltas(adapted: dict[str, np.ndarray], base: dict[str, np.ndarray], cfg: Config) -> dict:
    """Mean per-query difference adapted - base with a paired bootstrap 95% CI (same queries resampled)
    and its verdict, for every metric."""
    out = {}
    for k in adapted:
        r = M.paired_bootstrap_mean(adapted[k], base[k], cfg.eval.bootstrap, cfg.seed)
        out[k] = {"delta": round(r["delta"], 5), "ci": [round(x, 5) for x in r["ci"]], "verdict": r["verdict"]}
    return out


JUDGED_SIZES = (25, 50, 100, 200, 300)


def judged_budget(adapted: np.ndarray, base: np.ndarray, *, sizes=JUDGED_SIZES, repeats: int = 100, n_boot: int = 1000,
                  seed: int = 0) -> list[dict]:
    """How many judged queries give what CI width, measured on these queries' per-query values (e.g. nDCG@10):
    for each size n, ``repeats`` random subsets of n queries (without replacement), each with the 95% percentile
    bootstrap CI of the adapted mean and of the paired difference adapted - base; the medians of their widths and
    the share of subsets whose difference CI lies above zero (how often n queries would call the run better).
    The last row is every query once. Vectorised over replicates (the project's ``metrics.bootstrap`` loops)."""
    adapted, base = np.asarray(adapted, dtype=float), np.asarray(base, dtype=float)
    rng = np.random.default_rng(seed)
    rows = []
    for n in [s for s in sizes if s < len(adapted)] + [len(adapted)]:
        reps = repeats if n < len(adapted) else 1
        widths, delta_widths, above = [], [], 0
        for _ in range(reps):
            pick = rng.choice(len(adapted), n, replace=False) if n < len(adapted) else np.arange(n)
            idx = rng.integers(0, n, (n_boot, n))
            a, d = adapted[pick][idx].mean(1), (adapted[pick] - base[pick])[idx].mean(1)
            lo, hi = np.quantile(a, [0.025, 0.975])
            dlo, dhi = np.quantile(d, [0.025, 0.975])
            widths.append(hi - lo)
            delta_widths.append(dhi - dlo)
            above += int(dlo > 0)
        rows.append({"queries": int(n), "subsets": reps, "ci_width": round(float(np.median(widths)), 4),
                     "delta_ci_width": round(float(np.median(delta_widths)), 4),
                     "delta_better_share": round(above / reps, 3)})
    return rows
