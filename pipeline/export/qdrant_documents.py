"""targets, a retrieval set's export into Qdrant: one point per document, so Qdrant ranks documents as serve does.

Why this shape: serve scores a document by its best passage and fuses that list with BM25's by Qdrant's weighted
RRF (pipeline/search/ir.py). Qdrant does all three natively on one point per document:

- ``dense``: a multivector of the document's passage vectors compared with ``MAX_SIM`` (for one query vector,
  the best passage's cosine: the document's dense score);
- ``bm25``: a sparse vector of the document's BM25 weights as bm25s computed them (IDF included), so a query's
  sparse vector of word counts scores exactly BM25;
- a hybrid query: two prefetches (dense and bm25, ``ir.FUSION_DEPTH`` deep) fused by ``RrfQuery`` with the
  export's ``hybrid.json`` (``k`` and the weights chosen on validation).

After the load, the collection answers the export's sample queries in hybrid mode and its top-k must agree with
serve's :class:`~pipeline.contracts.document_index.DocumentSearch` (``targets.min_overlap``).
"""

from __future__ import annotations

import uuid
from collections import Counter

import numpy as np

from pipeline.contracts.document_index import DocumentSearch
from pipeline.core.config import Config
from pipeline.core.errors import ExportError
from pipeline.search import ir

DENSE, SPARSE = "dense", "bm25"


def _sparse_rows(bm25: ir.BM25):
    """Each document's (column indices, BM25 weights) from bm25s's precomputed score matrix."""
    from scipy.sparse import csc_matrix

    s = bm25.retriever.scores
    n_terms = len(s["indptr"]) - 1
    return csc_matrix((s["data"], s["indices"], s["indptr"]), shape=(s["num_docs"], n_terms)).tocsr()


def query_sparse(bm25: ir.BM25, text: str):
    """The query's sparse vector: each word's count (bm25s adds a repeated word's score once per repeat)."""
    from qdrant_client import models

    ids = bm25.tokenizer.tokenize([text], return_as="ids", update_vocab=False, show_progress=False)[0]
    # token id -> column of bm25s's score matrix (a reloaded index keys it by the id's string)
    column = {int(k): int(v) for k, v in bm25.retriever.vocab_dict.items()}
    counts = Counter(column[t] for t in ids if t in column)
    return models.SparseVector(indices=list(counts), values=[float(v) for v in counts.values()])


def _create(client, name: str, dim: int) -> None:
    from qdrant_client import models

    if client.collection_exists(name):
        vectors = client.get_collection(name).config.params.vectors
        dense = vectors.get(DENSE) if isinstance(vectors, dict) else None
        if dense is None or dense.size != dim or dense.multivector_config is None:
            raise ExportError(f"Qdrant collection '{name}' is not a document collection of {dim}-dim passage "
                              "multivectors; delete it or set targets.name to another collection")
        return
    client.create_collection(
        name, vectors_config={DENSE: models.VectorParams(size=dim, distance=models.Distance.COSINE,
                                                         multivector_config=models.MultiVectorConfig(
                                                             comparator=models.MultiVectorComparator.MAX_SIM))},
        sparse_vectors_config={SPARSE: models.SparseVectorParams()})


def hybrid_query(client, name: str, search: DocumentSearch, vector: np.ndarray, text: str, k: int):
    from qdrant_client import models

    f = search.fusion
    prefetch = [models.Prefetch(query=[vector.tolist()], using=DENSE, limit=ir.FUSION_DEPTH),
                models.Prefetch(query=query_sparse(search.bm25, text), using=SPARSE, limit=ir.FUSION_DEPTH)]
    rrf = models.RrfQuery(rrf=models.Rrf(k=f.k, weights=[f.dense_weight, f.lexical_weight]))
    return client.query_points(name, prefetch=prefetch, query=rrf, limit=k, with_payload=["doc_id"]).points


def load(client, data, cfg: Config, name: str, namespace: uuid.UUID) -> dict:
    """Upsert one point per document (passage multivector, BM25 sparse vector, payload), drop stale points,
    and check the hybrid ranking against serve's on the export's sample texts as queries."""
    from qdrant_client import models

    search = DocumentSearch(data.export_dir / "index", data.search_index)
    _create(client, name, data.dim)
    sparse = _sparse_rows(search.bm25)
    passages_of: dict[int, list[int]] = {}
    for row, doc in enumerate(search.doc_of):
        passages_of.setdefault(int(doc), []).append(row)
    size = cfg.targets.batch_size
    for start in range(0, len(search.documents), size):
        points = []
        for i in range(start, min(start + size, len(search.documents))):
            d, row = search.documents[i], sparse.getrow(i)
            points.append(models.PointStruct(
                id=str(uuid.uuid5(namespace, f"doc:{d['id']}")),
                vector={DENSE: data.vectors[passages_of[i]].tolist(),
                        SPARSE: models.SparseVector(indices=row.indices.tolist(), values=row.data.tolist())},
                payload={"doc_id": d["id"], "title": d.get("title"), "text": d["text"], "run": data.run_name,
                         "export_fingerprint": data.fingerprint}))
        client.upsert(name, points=points, wait=True)
    stale = models.Filter(must_not=[models.FieldCondition(key="export_fingerprint",
                                                          match=models.MatchValue(value=data.fingerprint))])
    client.delete(name, points_selector=models.FilterSelector(filter=stale), wait=True)
    return {"documents": len(search.documents), **_agreement(client, name, search, data, cfg)}


def _agreement(client, name: str, search: DocumentSearch, data, cfg: Config) -> dict:
    """Top-k overlap of Qdrant's hybrid answer with serve's for sample passages used as queries."""
    k = min(cfg.export.neighbour_k, len(search.documents))
    rows = np.linspace(0, len(data.records) - 1, num=min(cfg.export.neighbour_queries, len(data.records))).astype(int)
    overlaps = []
    for r in rows:
        text, vector = data.records[int(r)]["text"], data.vectors[int(r)]
        want = [h["id"] for h in search.search(vector[None, :], [text], k, "hybrid")[0]]
        got = [p.payload["doc_id"] for p in hybrid_query(client, name, search, vector, text, k)]
        overlaps.append(len(set(want) & set(got)) / max(1, len(want)))
    return {"queries": len(rows), "k": k, f"overlap@{k}": float(np.mean(overlaps)),
            "min_overlap": float(np.min(overlaps)), "mode": "hybrid (dense MAX_SIM multivector + BM25 sparse, RRF)"}
