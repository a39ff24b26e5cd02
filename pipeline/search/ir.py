"""Search over a document corpus: dense search with passages (a document scored by its best passage), BM25,
their fusion, and trec_eval's measures with graded judgments.

- **Measures** come from pytrec_eval (trec_eval's C code), as BEIR and MTEB compute them (field note 19: a
  hand-written nDCG differs on ties and graded gains): ``ndcg@10`` (graded gains), ``map@100``,
  ``recall_all@100`` (share of the relevant documents in the top 100: BEIR's recall@100), ``mrr@10``, and the
  project's ``recall@1`` / ``recall@10`` (success@k: a relevant document in the top k).
- **Dense** search is exact inner product (FAISS flat) over passage vectors, searched in query blocks and
  deepened until each query has k distinct documents, so no query x corpus matrix is ever held whole and a
  document's score is exactly its best passage's (its first hit in the passage ranking).
- **BM25** is bm25s's Lucene variant (k1 1.2, b 0.75, Elasticsearch's defaults, which BEIR's BM25 figures
  used) over ``title + " " + text``, English stop words and PyStemmer's Snowball stemmer.
- **Fusion** is weighted reciprocal rank fusion exactly as Qdrant computes it (``qdrant_client.hybrid.fusion``):
  ``sum_s 1 / (rank_s / w_s + k - 1)`` over the lists that hold the document (rank from 1), so eval, serve and a
  Qdrant collection with dense + sparse named vectors rank the same way. ``k`` and the dense weight are chosen
  on the validation queries (:func:`choose_fusion`).

A run is ``(ids, scores)``: (n_queries, depth) document rows (-1 where none) and their scores, best first.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)
# A sentence ends at . ! or ? followed by space and a capital, digit, quote or bracket: good enough for abstracts
# and articles (the corpus objective's inverse cloze and TSDAE's sentences), no downloaded tokenizer data needed.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


def sentences(text: str) -> list[str]:
    """The sentences of a document text, in order (one element when it has no sentence end)."""
    return SENTENCE_END.split(str(text))


MEASURES = {"ndcg_cut.10": "ndcg@10", "map_cut.100": "map@100", "recall.100": "recall_all@100",
            "success.1,10": None}
DEPTH = 100  # documents kept per query: the deepest cut a measure reads (recall@100, MAP@100)
FUSION_DEPTH = 1000  # documents of each list that fusion sees (a document missing from a list gets nothing from it)


# ------------------------------------------------------------------------------------------------ measures

def per_query(qrels: dict[str, dict[str, int]], query_ids: Sequence[str], doc_ids: Sequence[str], ids: np.ndarray,
              scores: np.ndarray) -> dict[str, np.ndarray]:
    """trec_eval measures per query, as ``{metric: (n_queries,) array}`` in ``query_ids`` order.

    qrels: ``{query id: {document id: grade}}``; ids/scores: the run, rows in ``query_ids`` order. A query with
    nothing retrieved scores 0 (pytrec_eval leaves it out, which would inflate the mean).
    """
    import pytrec_eval

    run = {}
    for q, row, srow in zip(query_ids, ids, scores):
        keep = row >= 0
        run[q] = {doc_ids[i]: float(s) for i, s in zip(row[keep], srow[keep])}
    judged = {q: qrels[q] for q in query_ids}
    full = pytrec_eval.RelevanceEvaluator(judged, set(MEASURES)).evaluate(run)
    top10 = {q: dict(sorted(r.items(), key=lambda kv: (-kv[1], _neg(kv[0])))[:10]) for q, r in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(top10)
    names = {"ndcg_cut_10": "ndcg@10", "map_cut_100": "map@100", "recall_100": "recall_all@100",
             "success_1": "recall@1", "success_10": "recall@10"}
    out = {ours: np.array([full.get(q, {}).get(theirs, 0.0) for q in query_ids]) for theirs, ours in names.items()}
    out["mrr@10"] = np.array([rr.get(q, {}).get("recip_rank", 0.0) for q in query_ids])
    return out


def _neg(doc_id: str) -> tuple:
    """trec_eval breaks score ties by document id, descending; sorting ascending on this does the same."""
    return tuple(-ord(c) for c in doc_id)


# ------------------------------------------------------------------------------------------------- dense

def dense_search(passages: np.ndarray | None, doc_of: np.ndarray, queries: np.ndarray, k: int, *,
                 block: int = 256, index=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k documents per query, a document scored by its best passage. Exact over the index's answers.

    passages: (n_passages, dim) normalised (an exact flat index is built over them), or None with ``index``: a
    FAISS index already holding them (an export's flat, IVF or HNSW index); doc_of: (n_passages,) document row of
    each passage; queries: (n_queries, dim). Returns (ids, scores), (n_queries, k) each, ids -1 past the number
    of documents.
    """
    import faiss

    if index is None:
        index = faiss.IndexFlatIP(passages.shape[1])
        index.add(np.ascontiguousarray(passages, dtype=np.float32))
    doc_of = np.asarray(doc_of)
    n_docs = int(doc_of.max()) + 1 if len(doc_of) else 0
    k_docs = min(k, n_docs)
    ratio = len(doc_of) / max(1, n_docs)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for start in range(0, len(queries), block):
        q = np.ascontiguousarray(queries[start:start + block], dtype=np.float32)
        depth = min(len(doc_of), int(k_docs * ratio * 1.5) + 8)
        while True:
            s, p = index.search(q, depth)
            done = _first_hits(s, p, doc_of, k_docs, ids[start:start + len(q)], scores[start:start + len(q)])
            if done or depth >= len(doc_of):
                break
            depth = min(len(doc_of), depth * 2)
    return ids, scores


def _first_hits(s: np.ndarray, p: np.ndarray, doc_of: np.ndarray, k: int, ids: np.ndarray, scores: np.ndarray) -> bool:
    """Fill ``ids``/``scores`` with each query's first ``k`` distinct documents; True when every query got k."""
    complete = True
    for r in range(len(p)):
        hits = p[r][p[r] >= 0]
        docs = doc_of[hits]
        _, first = np.unique(docs, return_index=True)
        first = np.sort(first)[:k]
        ids[r, : len(first)], scores[r, : len(first)] = docs[first], s[r][: len(hits)][first]
        complete &= len(first) >= k
    return complete


# -------------------------------------------------------------------------------------------------- BM25

@dataclass(frozen=True)
class BM25Settings:
    k1: float = 1.2
    b: float = 0.75
    method: str = "lucene"
    stopwords: str = "en"
    stemmer: str = "english"


class BM25:
    """bm25s over document texts; :meth:`search` returns a run. ``save``/``load`` keep the index and the
    tokenizer's vocabulary, so serve tokenises a query exactly as eval did."""

    def __init__(self, retriever, tokenizer, settings: BM25Settings, n_docs: int):
        self.retriever, self.tokenizer, self.settings, self.n_docs = retriever, tokenizer, settings, n_docs

    @classmethod
    def fit(cls, texts: Sequence[str], settings: BM25Settings = BM25Settings()) -> "BM25":
        import bm25s
        import Stemmer

        tokenizer = bm25s.tokenization.Tokenizer(stemmer=Stemmer.Stemmer(settings.stemmer),
                                                 stopwords=settings.stopwords)
        ids = tokenizer.tokenize(list(texts), return_as="ids", show_progress=False)
        retriever = bm25s.BM25(k1=settings.k1, b=settings.b, method=settings.method)
        retriever.index(ids, show_progress=False)
        return cls(retriever, tokenizer, settings, len(texts))

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), (n_queries, k); a query none of whose words is in the corpus retrieves nothing (-1)."""
        k_docs = min(k, self.n_docs)
        tokens = self.tokenizer.tokenize(list(queries), return_as="ids", update_vocab=False, show_progress=False)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        asked = [i for i, t in enumerate(tokens) if len(t)]
        if asked:
            found, s = self.retriever.retrieve([tokens[i] for i in asked], k=k_docs, show_progress=False,
                                               n_threads=1)
            # a document sharing no word with the query scores 0: it was not found, whatever its position
            ids[asked, :k_docs], scores[asked, :k_docs] = np.where(s > 0, found, -1), s
        return ids, scores

    def save(self, folder: Path) -> None:
        import json

        folder = Path(folder)
        self.retriever.save(str(folder))
        self.tokenizer.save_vocab(str(folder))
        self.tokenizer.save_stopwords(str(folder))
        (folder / "bm25_settings.json").write_text(json.dumps({**asdict(self.settings), "n_docs": self.n_docs}))

    @classmethod
    def load(cls, folder: Path) -> "BM25":
        import json

        import bm25s
        import Stemmer

        folder = Path(folder)
        meta = json.loads((folder / "bm25_settings.json").read_text())
        n_docs = meta.pop("n_docs")
        settings = BM25Settings(**meta)
        tokenizer = bm25s.tokenization.Tokenizer(stemmer=Stemmer.Stemmer(settings.stemmer),
                                                 stopwords=settings.stopwords)
        tokenizer.load_vocab(str(folder))
        tokenizer.load_stopwords(str(folder))
        return cls(bm25s.BM25.load(str(folder)), tokenizer, settings, n_docs)


# ------------------------------------------------------------------------------------------------ fusion

@dataclass(frozen=True)
class Fusion:
    """Weighted reciprocal rank fusion of a dense and a lexical list, Qdrant's formula."""

    k: int = 2
    dense_weight: float = 1.0
    lexical_weight: float = 1.0

    def record(self) -> dict:
        return {"method": "weighted_rrf", **asdict(self),
                "formula": "sum over lists of 1 / (rank / weight + k - 1), rank from 1 (Qdrant's RRF)"}


def fuse(runs: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float], k: int,
         depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Fuse runs (each (ids, scores), best first) into one of ``depth`` documents per query; ties by document row."""
    n = len(runs[0][0])
    ids = np.full((n, depth), -1, dtype=np.int64)
    scores = np.zeros((n, depth), dtype=np.float32)
    parts = [(r_ids, 1.0 / ((np.arange(r_ids.shape[1]) + 1.0) / w + k - 1.0)) for (r_ids, _), w in zip(runs, weights)
             if w > 0]
    for q in range(n):
        docs = np.concatenate([r[q] for r, _ in parts])
        gain = np.concatenate([g for _, g in parts])
        keep = docs >= 0
        found, inverse = np.unique(docs[keep], return_inverse=True)
        total = np.bincount(inverse, weights=gain[keep], minlength=len(found))
        order = np.lexsort((found, -total))[:depth]
        ids[q, : len(order)], scores[q, : len(order)] = found[order], total[order]
    return ids, scores


FUSION_GRID_K = (1, 2, 5, 10, 20, 60)
FUSION_GRID_WEIGHT = (0.5, 1.0, 2.0, 3.0)


def choose_fusion(dense, lexical, qrels, query_ids, doc_ids, metric: str = "ndcg@10") -> tuple[Fusion, dict]:
    """The (k, dense weight) of the grid with the best mean ``metric`` on these (validation) queries; returns it
    and every candidate's value."""
    tried = {}
    best = None
    for k in FUSION_GRID_K:
        for w in FUSION_GRID_WEIGHT:
            ids, scores = fuse([dense, lexical], [w, 1.0], k, DEPTH)
            value = float(per_query(qrels, query_ids, doc_ids, ids, scores)[metric].mean())
            tried[f"k={k},w={w:g}"] = round(value, 5)
            if best is None or value > best[0] + 1e-12:
                best = (value, Fusion(k=k, dense_weight=w))
    return best[1], tried
