"""The export contract of a retrieval set's index: documents found by their best passage, BM25, and the hybrid.

An export of a run trained on a retrieval set (``kind: retrieval``) holds, in ``index/``:

- ``index.faiss`` + ``records.jsonl``: one vector per passage (record: passage ``id``, ``doc``, ``text``);
- ``documents.jsonl``: the corpus (``id``, ``title``, ``text``), line i is document row i;
- ``bm25/``: the BM25 index of the documents and its tokenizer (pipeline/search/ir.py's ``BM25.save``);
- ``hybrid.json``: the fusion eval chose on the validation queries (``k``, weights; Qdrant's RRF formula).

:class:`DocumentSearch` answers a query the way eval scored the test queries: ``dense`` (best passage per
document, exact over the FAISS index's answers), ``lexical`` (BM25) or ``hybrid`` (the fusion of both lists).
Serve's ``/search`` uses it for such exports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import read_json, write_json_atomic
from pipeline.search import ir

DOCUMENTS, BM25_DIR, HYBRID = "documents.jsonl", "bm25", "hybrid.json"
MODES = ("hybrid", "dense", "lexical")


def is_document_index(index_dir: Path) -> bool:
    return (Path(index_dir) / DOCUMENTS).exists()


def write_document_index(index_dir: Path, documents: list[dict], fusion: dict | None) -> dict:
    """documents.jsonl, the BM25 index and hybrid.json beside an export's passage index; returns what was written."""
    index_dir = Path(index_dir)
    with open(index_dir / DOCUMENTS, "w", encoding="utf-8") as fh:
        for d in documents:
            fh.write(json.dumps({"id": d["id"], "title": d.get("title") or "", "text": d["text"]}, ensure_ascii=False)
                     + "\n")
    bm25 = ir.BM25.fit([f"{d.get('title') or ''} {d['text']}".strip() for d in documents])
    bm25.save(index_dir / BM25_DIR)
    record = fusion or {**ir.Fusion().record(), "chosen_on": "none (the run's eval chose no fusion)"}
    write_json_atomic(index_dir / HYBRID, record)
    return {"documents": len(documents), "bm25": BM25_DIR, "hybrid": record}


class DocumentSearch:
    """Documents by their best passage, BM25 and the hybrid over an export's ``index/`` (see the module doc)."""

    def __init__(self, index_dir: Path, passages):
        index_dir = Path(index_dir)
        self.passages = passages  # an export_folder.SearchIndex over the passage vectors
        with open(index_dir / DOCUMENTS, encoding="utf-8") as fh:
            self.documents = [json.loads(line) for line in fh]
        row = {d["id"]: i for i, d in enumerate(self.documents)}
        self.doc_of = np.array([row[r["doc"]] for r in passages.records], dtype=np.int64)
        self.bm25 = ir.BM25.load(index_dir / BM25_DIR)
        f = read_json(index_dir / HYBRID)
        self.fusion = ir.Fusion(k=int(f["k"]), dense_weight=float(f["dense_weight"]),
                                lexical_weight=float(f.get("lexical_weight", 1.0)))

    def _dense(self, vectors: np.ndarray, k: int):
        return ir.dense_search(None, self.doc_of, vectors, k, index=self.passages.index)

    def search(self, vectors: np.ndarray, texts: list[str], k: int, mode: str = "hybrid") -> list[list[dict]]:
        """Per query, the top-k documents (id, title, text, score, rank) by ``mode``."""
        if mode == "dense":
            ids, scores = self._dense(vectors, k)
        elif mode == "lexical":
            ids, scores = self.bm25.search(texts, k)
        else:
            depth = max(k, ir.FUSION_DEPTH)
            ids, scores = ir.fuse([self._dense(vectors, depth), self.bm25.search(texts, depth)],
                                  [self.fusion.dense_weight, self.fusion.lexical_weight], self.fusion.k, k)
        return [[{"rank": r + 1, "score": float(s), **self.documents[i]} for r, (i, s) in enumerate(zip(row, srow))
                 if i >= 0] for row, srow in zip(ids, scores)]
