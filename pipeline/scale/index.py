"""An IVF index over an embedded corpus's shards, built with bounded memory and tuned for a recall target.

- The coarse quantiser and the codebooks train on a seeded sample of ``corpus.index.train_rows`` rows, read
  shard by shard; vectors are then added one shard at a time, so memory is the sample, one shard and the
  compressed codes (never the float vectors of the whole corpus).
- Exact top-k for the recall check is computed shard by shard as well (a running top-k merge), which is
  also the "flat" reference: its time per query and the size a flat index would have (rows x dim x 4 bytes).
- Candidates (``corpus.index.candidates``: IVF-PQ ``pq<m>`` or scalar quantisation ``sq8``/``sq4``/``fp16``)
  are tried from the smallest code up; for each, nprobe grows until recall@k reaches ``recall_target``.
  The first candidate that reaches it is written to ``<corpus>/index/index.faiss``; ``manifest.json`` beside
  it records the settings, the measured recall, query time and size next to flat's, and every trial.

FAISS ids are the corpus row numbers; the shard table in the corpus manifest maps them back to ids.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import MANIFEST, atomic_dir, make_manifest, require_manifest, write_json_atomic
from pipeline.core.config import Config
from pipeline.core.errors import ConfigError

log = logging.getLogger(__name__)
INDEX_FILE = "index.faiss"


def sample_rows(folder: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers, vectors) of ``n`` rows drawn without replacement, reading one shard at a time."""
    from pipeline.contracts.shards import iter_corpus

    manifest = require_manifest(folder, "embedded corpus", "run `make embed-corpus` first")
    total = manifest["rows"]
    rows = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    parts = []
    for info, _, vectors in iter_corpus(folder):
        lo, hi = info["first_row"], info["first_row"] + info["rows"]
        sel = rows[(rows >= lo) & (rows < hi)]
        if len(sel):
            parts.append(vectors[sel - lo])
    return rows, np.concatenate(parts).astype(np.float32)


def exact_topk(folder: Path, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact inner-product top-k row numbers (nq, k), shard by shard; and the seconds the search took."""
    from pipeline.contracts.shards import iter_corpus

    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    busy = 0.0
    for info, _, vectors in iter_corpus(folder):
        started = time.perf_counter()
        scores = queries @ vectors.T
        kk = min(k, scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        s = np.concatenate([best_s, np.take_along_axis(scores, top, axis=1)], axis=1)
        i = np.concatenate([best_i, top + info["first_row"]], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)
        busy += time.perf_counter() - started
    return best_i, busy


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / k for f, t in zip(found, truth)]))


def new_index(spec: str, centroids: np.ndarray, nbits: int):
    """An empty IVF index of candidate ``spec`` (pq<m>, sq8, sq4, fp16) over the shared coarse ``centroids``,
    from the search library's builder (pipeline/search/index.py)."""
    from pipeline.search import index as faiss_index

    nlist, dim = centroids.shape
    new_index_check(spec)
    if spec.startswith("pq") and dim % int(spec[2:]):
        raise ConfigError(f"corpus.index.candidates: {spec} needs m dividing the dimension {dim}")
    return faiss_index.new(dim, factory(spec, nlist, nbits), centroids=centroids)


def factory(spec: str, nlist: int, nbits: int) -> str:
    """The FAISS factory string of candidate ``spec``, e.g. ``IVF1000,SQ8`` or ``IVF1000,PQ48x8np``."""
    from pipeline.search import index as faiss_index

    return faiss_index.ivf(nlist, faiss_index.ivf_code(spec, nbits))


def usable_candidates(specs: list[str], dim: int, nbits: int, train_rows: int | None = None) -> list[str]:
    """The candidates this dimension allows (PQ's m must divide it, and PQ needs 2**nbits training rows),
    smallest code first."""
    for spec in specs:
        new_index_check(spec)
    usable = [s for s in specs if not (s.startswith("pq") and (dim % int(s[2:]) or
                                                              (train_rows is not None and train_rows < 2 ** nbits)))]
    if not usable:
        raise ConfigError(f"corpus.index.candidates: none of {specs} fits dimension {dim} with {train_rows} "
                          f"training rows (PQ's m must divide the dimension; PQ needs {2 ** nbits} rows); add sq8")
    if len(usable) < len(specs):
        log.warning("embed-corpus: index candidates %s skipped: PQ's m does not divide dimension %d, or fewer "
                    "than %d training rows", sorted(set(specs) - set(usable)), dim, 2 ** nbits)
    return sorted(usable, key=lambda s: code_bytes(s, dim, nbits))


def new_index_check(spec: str) -> None:
    if not ((spec.startswith("pq") and spec[2:].isdigit() and int(spec[2:]) > 0) or spec in ("sq8", "sq4", "fp16")):
        raise ConfigError(f"corpus.index.candidates: '{spec}' is not pq<m>, sq8, sq4 or fp16")


def code_bytes(spec: str, dim: int, nbits: int) -> float:
    if spec.startswith("pq"):
        return int(spec[2:]) * nbits / 8
    return {"sq8": dim, "sq4": dim / 2, "fp16": 2 * dim}.get(spec, 4 * dim)


def fill(index, folder: Path) -> float:
    """Add every shard in row order (FAISS ids = row numbers); returns the seconds it took."""
    from pipeline.contracts.shards import iter_corpus

    started = time.perf_counter()
    for info, _, vectors in iter_corpus(folder):
        index.add_with_ids(vectors, np.arange(info["first_row"], info["first_row"] + info["rows"], dtype=np.int64))
    return time.perf_counter() - started


def try_candidate(spec: str, centroids: np.ndarray, train: np.ndarray, folder: Path, queries: np.ndarray,
                  truth: np.ndarray, ix) -> tuple[object, dict]:
    """Train, fill and search one candidate; nprobe grows until the target is met (or the list ends)."""
    nlist = len(centroids)
    index = new_index(spec, centroids, ix.nbits)
    started = time.perf_counter()
    index.train(train)
    row = {"spec": spec, "nlist": nlist, "train_s": round(time.perf_counter() - started, 2)}
    row["add_s"] = round(fill(index, folder), 2)
    row["trials"] = []
    for nprobe in sorted({min(p, nlist) for p in ix.nprobes}):  # nprobe = nlist is exhaustive IVF
        index.nprobe = nprobe
        t0 = time.perf_counter()
        _, found = index.search(queries, ix.k)
        ms = (time.perf_counter() - t0) * 1000 / len(queries)
        row["trials"].append({"nprobe": nprobe, "recall": round(recall_at_k(found, truth), 4),
                              "query_ms": round(ms, 4)})
        if row["trials"][-1]["recall"] >= ix.recall_target:
            break
    row["best"] = row["trials"][-1] if row["trials"] else None
    row["reached"] = bool(row["best"] and row["best"]["recall"] >= ix.recall_target)
    return index, row


def train_centroids(train: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """The coarse k-means (spherical: the vectors are normalised), trained once and shared by every candidate
    (it is the costly part)."""
    import faiss

    km = faiss.Kmeans(train.shape[1], nlist, niter=20, seed=seed, spherical=True, verbose=False)
    km.train(train)
    return km.centroids


def tune(cfg: Config, folder: Path, queries: np.ndarray, out: Path, *, query_note: str) -> dict:
    """Pick the smallest candidate reaching the target, write it and its manifest into ``out``."""
    import faiss

    from pipeline.search import index as faiss_index

    ix = cfg.corpus.index
    faiss.omp_set_num_threads(cfg.runtime.num_threads or os.cpu_count() or 1)
    corpus = require_manifest(folder, "embedded corpus", "run `make embed-corpus` first")
    rows, dim = corpus["rows"], corpus["dim"]
    _, train = sample_rows(folder, ix.train_rows, ix.seed)
    nlist = min(ix.nlist or faiss_index.nlist_for(rows, len(train)), len(train))
    truth, flat_s = exact_topk(folder, queries, ix.k)
    t0 = time.perf_counter()
    centroids = train_centroids(train, nlist, ix.seed)
    quantizer_s = time.perf_counter() - t0
    tried, chosen = [], None
    for spec in usable_candidates(ix.candidates, dim, ix.nbits, len(train)):
        log.info("embed-corpus: index candidate IVF%d,%s on %d rows ...", nlist, spec, rows)
        index, row = try_candidate(spec, centroids, train, folder, queries, truth, ix)
        tried.append(row)
        if row["reached"]:
            chosen = (index, row)
            break
    if chosen is None:  # nothing reached the target: keep the best recall and say so in the manifest
        best = max(tried, key=lambda r: r["best"]["recall"] if r["best"] else -1)
        chosen = (try_candidate(best["spec"], centroids, train, folder, queries, truth, ix)[0], best)
        log.warning("embed-corpus: no index candidate reached recall@%d %.3f; kept %s (recall %.4f)", ix.k,
                    ix.recall_target, best["spec"], best["best"]["recall"])
    index, row = chosen
    index.nprobe = row["best"]["nprobe"]
    with atomic_dir(out) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        size = (tmp / INDEX_FILE).stat().st_size
        record = {
            "rows": rows, "dim": dim, "k": ix.k, "recall_target": ix.recall_target, "reached": row["reached"],
            "chosen": {"factory": factory(row["spec"], nlist, ix.nbits),
                       "spec": row["spec"], "nlist": nlist, "nbits": ix.nbits if row["spec"].startswith("pq") else None,
                       "nprobe": row["best"]["nprobe"], "recall": row["best"]["recall"],
                       "query_ms": row["best"]["query_ms"], "index_bytes": size},
            "flat": {"query_ms": round(flat_s * 1000 / len(queries), 4), "index_bytes": rows * dim * 4,
                     "how": "exact inner product, shard by shard (numpy); bytes = rows x dim x 4, IndexFlatIP's size"},
            "quantizer_train_s": round(quantizer_s, 2), "train_rows": len(train), "queries": len(queries),
            "query_note": query_note, "candidates": tried, "threads": faiss.omp_get_max_threads()}
        write_json_atomic(tmp / MANIFEST, make_manifest("corpus-index", cfg, fingerprint=corpus["fingerprint"],
                                                        inputs={"corpus": corpus["fingerprint"]}, extra=record))
    log.info("embed-corpus: index %s nprobe=%d recall@%d=%.4f, %.3f ms/query, %.1f MiB (flat %.3f ms, %.1f MiB)",
             record["chosen"]["factory"], record["chosen"]["nprobe"], ix.k, record["chosen"]["recall"],
             record["chosen"]["query_ms"], size / 2**20, record["flat"]["query_ms"], rows * dim * 4 / 2**20)
    return record


def build(cfg: Config, folder: Path) -> Path:
    """The index of a finished corpus folder, with recall measured on sampled corpus rows as queries."""
    ix = cfg.corpus.index
    _, queries = sample_rows(folder, ix.queries, ix.seed + 1)
    out = Path(folder) / "index"
    tune(cfg, Path(folder), queries, out,
         query_note="queries are sampled corpus rows (each finds itself in both exact and IVF results)")
    return out


def search(folder: Path, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row numbers) from the written index with its chosen nprobe."""
    import faiss

    from pipeline.core.artifacts import read_json

    index = faiss.read_index(str(Path(folder) / "index" / INDEX_FILE))
    index.nprobe = read_json(Path(folder) / "index" / MANIFEST)["chosen"]["nprobe"]
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
