"""targets: load a finished export's index into the search engines users run, and check it against FAISS.

``targets.engines`` names the engines; the rest of ``targets`` says where they are. Each load reads
``exports/<run>/index/`` (the FAISS vectors and ``records.jsonl``), so every engine holds exactly the
vectors the export's gate checked, and writes what it did to ``exports/<run>/targets/targets.json``.

- ``qdrant``: a collection of ``dim`` vectors, cosine distance, payload text/label/group/split/record_id.
  Local mode (``QdrantClient(path=...)``) under ``exports/<run>/targets/qdrant`` unless
  ``targets.qdrant_url`` names a server (API key from ``QDRANT_API_KEY``).
- ``lancedb``: an embedded LanceDB table (``vector`` a fixed-size list of float32) searched with the
  cosine metric; under ``exports/<run>/targets/lancedb`` unless ``targets.lancedb_uri`` is set.
- ``opensearch`` / ``elasticsearch``: no engine runs here, so the load is the files a user posts: an index
  body (``mapping.json``: knn_vector/cosinesimil, or dense_vector/cosine) and ``bulk-NNNNN.ndjson`` files
  for ``POST /_bulk``; the agreement check runs on the vectors as read back from those files.

A Qdrant server is checked before the load (pipeline/core/services.py): a wrong URL is one line within
``services.timeout_s``. A server that fails during the load (gone, timing out, answering 5xx) is one line
too; the points it stored stay, and rerunning the same command finishes the load.

Re-running is idempotent: point and document ids are derived from the record ids, so an upsert
replaces rather than duplicates, and rows left from an earlier export (another fingerprint) are deleted
after the load. A collection of another dimension is refused, never silently recreated. After each load
the engine answers the export's sample queries and its top-k must agree with FAISS flat
(``targets.min_overlap``); otherwise ``ExportError``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from pipeline.contracts.document_index import is_document_index
from pipeline.core import services
from pipeline.core.artifacts import read_json, require_manifest, write_json_atomic
from pipeline.core.config import Config
from pipeline.core.errors import ExportError, ServiceError

log = logging.getLogger(__name__)
PAYLOAD_FIELDS = ("text", "label", "group", "split")
# uuid5 namespace of this project's point ids: the same record id gives the same point id on every run.
ID_NAMESPACE = uuid.UUID("6f1c3a52-8d0e-4b7a-9c11-2d5e7a4b9f30")
TARGETS_FILE = "targets.json"


# ---------------------------------------------------------------------------------------------- the data

class ExportedIndex:
    """The vectors and records of an export's ``index/`` folder, plus what identifies the export."""

    def __init__(self, export_dir: Path):
        from pipeline.contracts.export_folder import SearchIndex

        self.export_dir = Path(export_dir)
        manifest = require_manifest(self.export_dir, "export", "run `make export` first")
        self.run_name = manifest["run_name"]
        self.fingerprint = manifest["fingerprint"]
        self.search_index = SearchIndex(self.export_dir / "index")
        self.records = self.search_index.records
        self.vectors = index_vectors(self.search_index.index)
        self.dim = int(self.vectors.shape[1])

    def point_id(self, row: int) -> str:
        rec = self.records[row]
        key = rec.get("id") if rec.get("id") is not None else f"row-{row}"
        return str(uuid.uuid5(ID_NAMESPACE, str(key)))

    def payload(self, row: int) -> dict:
        rec = self.records[row]
        return {**{k: rec.get(k) for k in PAYLOAD_FIELDS}, "record_id": rec.get("id"), "run": self.run_name,
                "export_fingerprint": self.fingerprint}

    def batches(self, size: int, desc: str) -> Iterator[range]:
        from tqdm import tqdm

        with tqdm(total=len(self.records), desc=desc, unit="vec", leave=False) as bar:
            for start in range(0, len(self.records), size):
                rows = range(start, min(start + size, len(self.records)))
                yield rows
                bar.update(len(rows))


def index_vectors(index) -> np.ndarray:
    """All vectors of a FAISS index (flat, HNSW over flat storage, or IVF via its direct map)."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index: its storage reconstructs directly
        ivf = None
    if ivf is not None:
        ivf.make_direct_map()
    return np.asarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)


def sample_query_rows(data: ExportedIndex, cfg: Config) -> list[int]:
    """Rows of the export's neighbour queries (the gate's seeded corpus sample), as index rows."""
    from pipeline.contracts.export_folder import EDGE_TEXTS, fixed_sample

    texts = [r["text"] for r in data.records]
    sample = fixed_sample(texts, cfg.export.sample_texts, cfg.seed)
    n = min(cfg.export.neighbour_queries, max(1, len(sample) - len(EDGE_TEXTS) - 4))
    first_row = {}
    for i, t in enumerate(texts):
        first_row.setdefault(t, i)
    return [first_row[t] for t in sample[:n] if t in first_row]


def agreement(data: ExportedIndex, rows: Sequence[int], search: Callable[[np.ndarray, int], list[list[tuple[str, float]]]],
              k: int) -> dict:
    """Top-k overlap of an engine with FAISS flat (exact) for the query vectors of ``rows``.

    ``search(vectors, k)`` returns, per query, (point id, cosine) pairs. A hit missing from FAISS's top k
    still agrees when its cosine ties FAISS's k-th score: identical texts have identical vectors, and
    which of them fills the last place is arbitrary in every engine.
    """
    queries = data.vectors[list(rows)]
    k = min(k, len(data.records))
    exact = queries @ data.vectors.T
    got = search(queries, k)
    overlaps = []
    for q, hits in enumerate(got):
        top = np.argsort(-exact[q], kind="stable")[:k]
        want = {data.point_id(int(i)) for i in top}
        kth = float(exact[q, top[-1]])
        ok = sum(1 for pid, score in hits[:k] if pid in want or score >= kth - 1e-5)
        overlaps.append(ok / k)
    return {"queries": len(rows), "k": k, f"overlap@{k}": float(np.mean(overlaps)),
            "min_overlap": float(np.min(overlaps))}


# ------------------------------------------------------------------------------------------------ Qdrant

def _qdrant_client(cfg: Config, folder: Path):
    from qdrant_client import QdrantClient

    server = services.qdrant_service(cfg)
    if server is not None:
        services.check(server, cfg.services.timeout_s)
        # the request timeout is the same bound: a server silent that long mid-load is one line, not a hang
        client = QdrantClient(url=server.address, api_key=os.environ.get("QDRANT_API_KEY"),
                              timeout=math.ceil(cfg.services.timeout_s))
        return client, server.address
    folder.mkdir(parents=True, exist_ok=True)
    return QdrantClient(path=str(folder)), str(folder)


@contextlib.contextmanager
def _qdrant_answers(cfg: Config, name: str, sent: list[int] | None = None, total: int = 0) -> Iterator[None]:
    """A Qdrant server that fails mid-load (connection lost, no answer, 5xx) or refuses the API key is
    the user's service, not a bug: one ServiceError line. ``sent[0]`` counts the vectors upserted so far."""
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    server = services.qdrant_service(cfg)
    try:
        yield
    except ResponseHandlingException as exc:
        if server is None:
            raise
        cause = exc.source
        problem = f"{type(cause).__name__}: {' '.join(str(cause).split()) or 'no detail'}"
    except UnexpectedResponse as exc:
        if server is None or exc.status_code is None or (exc.status_code < 500 and exc.status_code not in (401, 403)):
            raise
        if exc.status_code in (401, 403):
            raise ServiceError(f"{server.named}: the Qdrant server refused the request (HTTP {exc.status_code}); "
                               "set QDRANT_API_KEY to a key it accepts") from None
        problem = f"HTTP {exc.status_code} {exc.reason_phrase}"
    else:
        return
    progress = f"{sent[0]} of {total} vectors sent; " if sent is not None else ""
    raise ServiceError(f"{server.named}: the Qdrant server failed during the load of '{name}' ({progress}{problem}); "
                       "the points it stored are kept: rerun the same command to finish the load (it is idempotent)"
                       ) from None


def _qdrant_collection(client, name: str, dim: int) -> None:
    from qdrant_client import models

    if client.collection_exists(name):
        params = client.get_collection(name).config.params.vectors
        if getattr(params, "size", None) != dim or params.distance != models.Distance.COSINE:
            raise ExportError(f"Qdrant collection '{name}' holds {getattr(params, 'size', '?')}-dim "
                              f"{getattr(params, 'distance', '?')} vectors, this export {dim}-dim cosine; delete it "
                              "or set targets.name to another collection")
        return
    client.create_collection(name, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE))


def load_qdrant(data: ExportedIndex, cfg: Config, name: str, rows: Sequence[int]) -> dict:
    from qdrant_client import models

    client, where = _qdrant_client(cfg, data.export_dir / "targets" / "qdrant")
    sent = [0]
    try:
        with _qdrant_answers(cfg, name, sent, len(data.records)):
            _qdrant_collection(client, name, data.dim)
            for batch in data.batches(cfg.targets.batch_size, f"qdrant {name}"):
                client.upsert(name, wait=True, points=[
                    models.PointStruct(id=data.point_id(i), vector=data.vectors[i].tolist(), payload=data.payload(i))
                    for i in batch])
                sent[0] += len(batch)
            stale = models.Filter(must_not=[models.FieldCondition(
                key="export_fingerprint", match=models.MatchValue(value=data.fingerprint))])
            client.delete(name, points_selector=models.FilterSelector(filter=stale), wait=True)

            def search(vectors: np.ndarray, k: int):
                return [[(str(p.id), float(p.score)) for p in
                         client.query_points(name, query=v.tolist(), limit=k, with_payload=False).points]
                        for v in vectors]

            check = agreement(data, rows, search, cfg.export.neighbour_k)
            count = int(client.count(name, exact=True).count)
    finally:
        client.close()
    return {"engine": "qdrant", "where": where, "collection": name, "dim": data.dim, "metric": "cosine",
            "count": count, **check}


def load_qdrant_documents(data: ExportedIndex, cfg: Config, name: str) -> dict:
    """A retrieval set's export: one point per document with its passages and BM25 weights, queried as serve's
    hybrid (pipeline/export/qdrant_documents.py)."""
    from pipeline.export import qdrant_documents

    client, where = _qdrant_client(cfg, data.export_dir / "targets" / "qdrant")
    try:
        with _qdrant_answers(cfg, name):
            result = qdrant_documents.load(client, data, cfg, name, ID_NAMESPACE)
            count = int(client.count(name, exact=True).count)
    finally:
        client.close()
    return {"engine": "qdrant", "where": where, "collection": name, "dim": data.dim, "metric": "cosine",
            "count": count, **result}


# ----------------------------------------------------------------------------------------------- LanceDB

def _lance_batch(data: ExportedIndex, rows: range):
    import pyarrow as pa

    flat = pa.array(data.vectors[rows.start:rows.stop].ravel(), type=pa.float32())
    cols = {"id": [data.point_id(i) for i in rows],
            "vector": pa.FixedSizeListArray.from_arrays(flat, data.dim)}
    payloads = [data.payload(i) for i in rows]
    for key in (*PAYLOAD_FIELDS, "record_id", "run", "export_fingerprint"):
        cols[key] = pa.array([p[key] for p in payloads], type=pa.string())
    return pa.table(cols)


def load_lancedb(data: ExportedIndex, cfg: Config, name: str, rows: Sequence[int]) -> dict:
    import lancedb

    uri = cfg.targets.lancedb_uri or str(data.export_dir / "targets" / "lancedb")
    db = lancedb.connect(uri)
    try:
        table = db.open_table(name)
    except ValueError:  # LanceDB's "Table ... was not found"
        table = None
    if table is not None:
        field = table.schema.field("vector") if "vector" in table.schema.names else None
        size = getattr(field.type, "list_size", None) if field is not None else None
        if size != data.dim:
            raise ExportError(f"LanceDB table '{name}' in {uri} holds {size}-dim vectors, this export {data.dim}; "
                              "drop it or set targets.name to another table")
    else:
        table = db.create_table(name, schema=_lance_batch(data, range(0, 1)).schema)
    for batch in data.batches(cfg.targets.batch_size, f"lancedb {name}"):
        (table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
         .execute(_lance_batch(data, batch)))
    table.delete(f"export_fingerprint != '{data.fingerprint}'")

    def search(vectors: np.ndarray, k: int):
        out = []
        for v in vectors:
            hits = table.search(v, vector_column_name="vector").metric("cosine").limit(k).select(["id"]).to_list()
            out.append([(h["id"], 1.0 - float(h["_distance"])) for h in hits])  # cosine distance -> cosine
        return out

    check = agreement(data, rows, search, cfg.export.neighbour_k)
    return {"engine": "lancedb", "where": uri, "table": name, "dim": data.dim, "metric": "cosine",
            "count": int(table.count_rows()), **check}


# ----------------------------------------------------------------------------- OpenSearch / Elasticsearch

def search_mapping(engine: str, dim: int) -> dict:
    """The index body for ``PUT /<index>``: the vector field with its dimension and cosine similarity."""
    keyword = {"type": "keyword"}
    props = {"text": {"type": "text"}, "label": keyword, "group": keyword, "split": keyword, "record_id": keyword,
             "run": keyword, "export_fingerprint": keyword}
    if engine == "opensearch":
        props["vector"] = {"type": "knn_vector", "dimension": dim,
                           "method": {"name": "hnsw", "space_type": "cosinesimil", "engine": "lucene"}}
        return {"settings": {"index": {"knn": True}}, "mappings": {"properties": props}}
    props["vector"] = {"type": "dense_vector", "dims": dim, "index": True, "similarity": "cosine"}
    return {"mappings": {"properties": props}}


def write_bulk(data: ExportedIndex, cfg: Config, engine: str, name: str, rows: Sequence[int]) -> dict:
    """mapping.json and bulk NDJSON files (``index`` actions with fixed ``_id``: a re-post overwrites)."""
    folder = data.export_dir / "targets" / engine
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("bulk-*.ndjson"):
        old.unlink()
    write_json_atomic(folder / "mapping.json", search_mapping(engine, data.dim))
    per_file, files = cfg.targets.bulk_docs_per_file, []
    for n, batch in enumerate(data.batches(per_file, f"{engine} {name}")):
        path = folder / f"bulk-{n:05d}.ndjson"
        with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as fh:
            for i in batch:
                fh.write(json.dumps({"index": {"_index": name, "_id": data.point_id(i)}}) + "\n")
                fh.write(json.dumps({**data.payload(i), "vector": data.vectors[i].tolist()}, ensure_ascii=False) + "\n")
        path.with_suffix(".tmp").replace(path)
        files.append(path.name)
    ids, vectors = read_bulk(folder)
    pos = {pid: j for j, pid in enumerate(ids)}
    if len(pos) != len(ids):
        raise ExportError(f"{folder}: duplicate _id in the bulk files")

    def search(queries: np.ndarray, k: int):  # exact cosine over the vectors as a user would post them
        scores = queries @ vectors.T
        return [[(ids[j], float(s[j])) for j in np.argsort(-s, kind="stable")[:k]] for s in scores]

    check = agreement(data, rows, search, cfg.export.neighbour_k)
    post = " ".join(f"--data-binary @{f}" for f in files[:1])
    return {"engine": engine, "where": str(folder), "index": name, "dim": data.dim, "metric": "cosine",
            "count": len(ids), "files": ["mapping.json", *files],
            "how": f"curl -XPUT $URL/{name} -H 'Content-Type: application/json' -d @mapping.json; then per file: "
                   f"curl -XPOST $URL/_bulk -H 'Content-Type: application/x-ndjson' {post}",
            "checked_on": "the vectors read back from the bulk files (exact cosine); no engine runs here", **check}


def read_bulk(folder: Path) -> tuple[list[str], np.ndarray]:
    """(document ids, vectors) of every bulk file in ``folder``, in file order."""
    ids, vectors = [], []
    for path in sorted(Path(folder).glob("bulk-*.ndjson")):
        with open(path, encoding="utf-8") as fh:
            for action, doc in zip(fh, fh):
                ids.append(json.loads(action)["index"]["_id"])
                vectors.append(json.loads(doc)["vector"])
    return ids, np.asarray(vectors, dtype=np.float32)


# --------------------------------------------------------------------------------------------------- run

def run(cfg: Config, export_dir: Path, targets: Sequence[str] | None = None) -> dict:
    """Load the export into each target, check it against FAISS, and record the outcome."""
    targets = list(targets if targets is not None else cfg.targets.engines)
    if not targets:
        return {}
    data = ExportedIndex(export_dir)
    name = cfg.targets.name or data.run_name
    rows = sample_query_rows(data, cfg)
    report_path = Path(export_dir) / "targets" / TARGETS_FILE
    report = read_json(report_path) if report_path.exists() else {}
    for target in targets:
        if target == "qdrant" and is_document_index(Path(export_dir) / "index"):
            result = load_qdrant_documents(data, cfg, name)  # a retrieval set: documents, BM25 and the hybrid
        elif target == "qdrant":
            result = load_qdrant(data, cfg, name, rows)
        elif target == "lancedb":
            result = load_lancedb(data, cfg, name, rows)
        else:
            result = write_bulk(data, cfg, target, name, rows)
        k = result["k"]
        log.info("targets: %s %s: %d vectors, top-%d overlap with FAISS %.3f", target, result["where"],
                 result["count"], k, result[f"overlap@{k}"])
        if result["count"] != result.get("documents", len(data.records)):
            raise ExportError(f"{target} holds {result['count']} vectors after the load, the export "
                              f"{len(data.records)}: another writer shares '{name}'? Set targets.name")
        if result[f"overlap@{k}"] < cfg.targets.min_overlap:
            raise ExportError(f"{target} search disagrees with FAISS: top-{k} overlap {result[f'overlap@{k}']:.3f} "
                              f"< targets.min_overlap={cfg.targets.min_overlap}")
        report[target] = {**result, "export_fingerprint": data.fingerprint}
        report_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(report_path, report)
    return report
