"""The one FAISS index builder. The export's index, embed-corpus's IVF index and the bench's indexes are each
described by a FAISS ``index_factory`` string over inner product (cosine on L2-normalised vectors), built
here, and an IVF index's list count follows one rule, :func:`nlist_for`.

Factory strings: ``Flat`` (exact), ``IVF<nlist>,Flat`` / ``IVF<nlist>,PQ<m>x<nbits>np`` /
``IVF<nlist>,SQ8`` (``SQ4``, ``SQfp16``) (inverted lists, raw or compressed codes), ``HNSW<M>,Flat`` (graph).
``np``: no polysemous training, which the factory otherwise adds to IVF-PQ; it only serves Hamming-filtered
search, which nothing here uses, and it multiplies the training time.
"""

from __future__ import annotations

import math

import numpy as np

FLAT = "Flat"
# FAISS's k-means asks for at least 39 training points per centroid (it warns below that).
MIN_TRAIN_PER_LIST = 39
# embed-corpus's candidate names (corpus.index.candidates) -> FAISS's code names; pq<m> is PQ<m>x<nbits>np.
SQ_CODES = {"sq8": "SQ8", "sq4": "SQ4", "fp16": "SQfp16"}


def nlist_for(rows: int, train_rows: int | None = None) -> int:
    """Inverted lists for ``rows`` vectors whose quantiser trains on ``train_rows`` (default: all of them).

    About sqrt(rows), fewer than FAISS's usual advice of 4 to 16 * sqrt(rows): at a given nprobe fewer lists
    reach a higher recall, which is what the export delivers (it searches at a fixed nprobe, unmeasured),
    and they train faster, the costly part of embed-corpus's index (whose tuner then picks nprobe); more
    lists would make each query scan less. The measurement and the reasons: reports/examples/index-nlist/.
    Capped so that every list has MIN_TRAIN_PER_LIST training rows, and at least 1.
    """
    train = rows if train_rows is None else train_rows
    return max(1, min(int(math.sqrt(rows)), train // MIN_TRAIN_PER_LIST, rows))


def ivf(nlist: int, code: str = "Flat") -> str:
    """``IVF<nlist>,<code>``; ``code`` is a FAISS code (``Flat``, ``PQ48x8np``, ``SQ8``; :func:`ivf_code` turns
    embed-corpus's candidate names into these)."""
    return f"IVF{nlist},{code}"


def ivf_code(spec: str, nbits: int) -> str:
    """embed-corpus's candidate ``spec`` as a FAISS code: ``pq48`` -> ``PQ48x8np`` (nbits 8), ``sq8`` -> ``SQ8``."""
    if spec.startswith("pq") and spec[2:].isdigit() and int(spec[2:]) > 0:
        return f"PQ{int(spec[2:])}x{nbits}np"
    if spec in SQ_CODES:
        return SQ_CODES[spec]
    raise ValueError(f"'{spec}' is not pq<m>, sq8, sq4 or fp16")


def hnsw(m: int) -> str:
    return f"HNSW{m},Flat"


def new(dim: int, factory: str, *, centroids: np.ndarray | None = None):
    """An empty inner-product index of ``dim`` dimensions from a factory string. ``centroids`` (nlist, dim):
    an IVF's coarse centroids trained elsewhere (embed-corpus shares one k-means between its candidates);
    ``train`` then trains only the codes, since FAISS keeps a quantiser that already holds nlist centroids."""
    import faiss

    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if centroids is not None:
        inner = faiss.extract_index_ivf(index)
        if centroids.shape != (inner.nlist, dim):
            raise ValueError(f"{factory}: centroids of shape {centroids.shape}, expected ({inner.nlist}, {dim})")
        inner.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def build(vectors: np.ndarray, factory: str, *, train: np.ndarray | None = None):
    """``new`` + ``train`` (on ``train``, default the vectors themselves) + ``add`` the vectors."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    index = new(x.shape[1], factory)
    if not index.is_trained:
        index.train(x if train is None else np.ascontiguousarray(train, dtype=np.float32))
    index.add(x)
    return index


def set_search(index, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Search-time parameters: ``nprobe`` lists of an IVF index, ``efSearch`` of an HNSW graph."""
    import faiss

    space = faiss.ParameterSpace()
    if nprobe is not None:
        space.set_index_parameter(index, "nprobe", nprobe)
    if ef_search is not None:
        space.set_index_parameter(index, "efSearch", ef_search)
