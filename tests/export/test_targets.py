"""targets: the export's index loaded into Qdrant (local mode) and LanceDB (embedded), and written as
OpenSearch/Elasticsearch bulk files; each engine's search agrees with FAISS flat; reruns add nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import RUN, cli, split_texts, trained

ALL = "targets.engines=[qdrant,lancedb,opensearch,elasticsearch]"


def _queries() -> list[str]:
    return split_texts()[:6] + ["samsung tv", "intel cpu black", "bosch fridge 2 year warranty"]


def _faiss_top(out: Path, vectors: np.ndarray, k: int) -> tuple[list[set[str]], np.ndarray]:
    from pipeline.contracts.export_folder import SearchIndex

    index = SearchIndex(out / "index")
    scores, rows = index.search_ids(vectors, k)
    return [{index.records[i]["id"] for i in r} for r in rows], scores


def _overlap(engine: list[list[tuple[str, float]]], want: list[set[str]], kth: np.ndarray) -> float:
    """Share of an engine's top-k (record id, cosine) in FAISS's top-k, a tie at the k-th score counting."""
    hits = [sum(1 for rid, s in got if rid in w or s >= kth_q - 1e-5) / len(w) for got, w, kth_q in zip(engine, want, kth)]
    return float(np.mean(hits))


@pytest.fixture
def loaded(project, trained_cache):  # noqa: F811
    cfg = trained(project, trained_cache)
    cfg = [*cfg, "export.onnx=false"]  # the index is embedded with merged/ then; ONNX adds nothing here
    assert cli("export", *cfg, ALL) == 0
    return cfg, Path("exports") / RUN


def test_qdrant_and_lancedb_loads_agree_with_faiss_and_carry_the_payload(loaded):
    from qdrant_client import QdrantClient

    import lancedb

    from pipeline.contracts.export_folder import load_form

    _, out = loaded
    n = sum(1 for _ in open(out / "index" / "records.jsonl"))
    report = json.loads((out / "targets" / "targets.json").read_text())
    assert set(report) == {"qdrant", "lancedb", "opensearch", "elasticsearch"}
    for result in report.values():
        assert result["count"] == n and result["dim"] == 32 and result["overlap@10"] >= 0.99

    # independently of the load's own check: fresh query texts, embedded here, against each engine
    k = 10
    vectors = load_form(out, "merged").encode(_queries(), "document")
    want, scores = _faiss_top(out, vectors, k)
    kth = scores[:, -1]

    client = QdrantClient(path=str(out / "targets" / "qdrant"))
    try:
        info = client.get_collection(RUN).config.params.vectors
        assert info.size == 32 and info.distance.value == "Cosine"
        assert client.count(RUN, exact=True).count == n
        got = [[(p.payload["record_id"], p.score) for p in client.query_points(RUN, query=v.tolist(), limit=k).points]
               for v in vectors]
        first = client.query_points(RUN, query=vectors[0].tolist(), limit=1).points[0].payload
    finally:
        client.close()
    assert _overlap(got, want, kth) >= 0.99
    assert first["text"] == _queries()[0] and first["split"] == "test" and {"label", "group"} <= set(first)

    table = lancedb.connect(str(out / "targets" / "lancedb")).open_table(RUN)
    assert table.count_rows() == n and table.schema.field("vector").type.list_size == 32
    got = [[(h["record_id"], 1 - h["_distance"]) for h in table.search(v).metric("cosine").limit(k).to_list()]
           for v in vectors]
    assert _overlap(got, want, kth) >= 0.99
    assert table.search(vectors[0]).metric("cosine").limit(1).to_list()[0]["text"] == _queries()[0]


def test_opensearch_and_elasticsearch_bulk_files_hold_every_vector_once_with_a_cosine_mapping(loaded):
    from pipeline.contracts.export_folder import SearchIndex
    from pipeline.export.targets import read_bulk

    _, out = loaded
    index = SearchIndex(out / "index")
    os_map = json.loads((out / "targets" / "opensearch" / "mapping.json").read_text())
    vec = os_map["mappings"]["properties"]["vector"]
    assert os_map["settings"]["index"]["knn"] is True
    assert vec["type"] == "knn_vector" and vec["dimension"] == 32 and vec["method"]["space_type"] == "cosinesimil"
    es_vec = json.loads((out / "targets" / "elasticsearch" / "mapping.json").read_text())["mappings"]["properties"]["vector"]
    assert es_vec == {"type": "dense_vector", "dims": 32, "index": True, "similarity": "cosine"}

    ids, vectors = read_bulk(out / "targets" / "opensearch")
    assert len(ids) == len(set(ids)) == index.index.ntotal
    assert np.allclose(vectors, index.index.reconstruct_n(0, index.index.ntotal), atol=1e-6)
    lines = (out / "targets" / "opensearch" / "bulk-00000.ndjson").read_text().splitlines()
    action, doc = json.loads(lines[0]), json.loads(lines[1])
    assert action["index"]["_index"] == RUN and doc["record_id"] == index.records[0]["id"]
    assert {"text", "label", "group", "split", "vector"} <= set(doc)


def test_rerun_adds_no_duplicates_and_removes_rows_of_an_older_export(loaded):
    from qdrant_client import QdrantClient, models

    import lancedb

    cfg, out = loaded
    n = sum(1 for _ in open(out / "index" / "records.jsonl"))
    # a point left by an earlier export of another corpus: the rerun must remove it, and keep the rest
    client = QdrantClient(path=str(out / "targets" / "qdrant"))
    client.upsert(RUN, points=[models.PointStruct(id=1, vector=[1.0] + [0.0] * 31,
                                                  payload={"export_fingerprint": "older"})])
    assert client.count(RUN, exact=True).count == n + 1
    client.close()

    assert cli("targets", *cfg, ALL, "targets.batch_size=7", "targets.bulk_docs_per_file=10") == 0
    client = QdrantClient(path=str(out / "targets" / "qdrant"))
    try:
        assert client.count(RUN, exact=True).count == n
    finally:
        client.close()
    assert lancedb.connect(str(out / "targets" / "lancedb")).open_table(RUN).count_rows() == n
    bulk = sorted((out / "targets" / "opensearch").glob("bulk-*.ndjson"))
    assert len(bulk) == -(-n // 10)  # old files replaced, not added to
    assert sum(len(p.read_text().splitlines()) for p in bulk) == 2 * n


def test_a_collection_of_another_dimension_is_refused_with_a_clear_message(loaded, capsys):
    from qdrant_client import QdrantClient, models

    cfg, out = loaded
    client = QdrantClient(path=str(out / "targets" / "qdrant"))
    client.create_collection("other", vectors_config=models.VectorParams(size=8, distance=models.Distance.COSINE))
    client.close()
    capsys.readouterr()
    assert cli("targets", *cfg, "targets.engines=[qdrant]", "targets.name=other") == 2
    err = capsys.readouterr().err
    assert "Qdrant collection 'other' holds 8-dim" in err and "this export 32-dim" in err
    assert cli("targets", *cfg) == 2
    assert "targets.engines is empty" in capsys.readouterr().err


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_vectors_are_read_back_from_every_index_type(index_type):
    from pipeline.core.config import ExportConfig
    from pipeline.contracts.export_folder import build_index
    from pipeline.export.targets import index_vectors

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index, _ = build_index(x, ExportConfig(index_type=index_type, hnsw_m=8))
    assert np.allclose(index_vectors(index), x, atol=1e-6)
