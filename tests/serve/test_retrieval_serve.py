"""A retrieval set's export and /search: documents found by their best passage, BM25 and the hybrid, the fusion
being the one eval chose on validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.contracts import prepared_data as P
from pipeline.search import ir
from tests.conftest import OFF, cli, run_stages


def test_export_serves_documents_dense_lexical_and_the_validation_chosen_hybrid(beir_project):
    from fastapi.testclient import TestClient

    from pipeline.serve.stage import create_app

    args = ("--config", str(beir_project), OFF)
    run_stages(*args)
    assert cli("export", *args, "--force", "export.quantize_int8=false") == 0
    run = "tinybeir-lora-r4-a8-s0"
    index = Path("exports") / run / "index"
    metrics = json.loads((Path("reports") / run / "metrics.json").read_text())
    hybrid = json.loads((index / "hybrid.json").read_text())
    assert (hybrid["k"], hybrid["dense_weight"]) == (metrics["hybrid"]["fusion"]["k"],
                                                     metrics["hybrid"]["fusion"]["dense_weight"])
    prepared = Path("data/processed/tinybeir")
    records = [json.loads(line) for line in (index / "records.jsonl").read_text().splitlines()]
    assert len(records) == len(P.load_passages(prepared))  # every passage of the whole corpus, no query
    corpus = P.load_corpus(prepared)
    query = P.load_retrieval_queries(prepared, "test")["text"].iloc[0]
    client = TestClient(create_app(Path("exports") / run, "onnx"))
    got = {mode: client.get("/search", params={"q": query, "k": 5, "mode": mode}).json() for mode in
           ("dense", "lexical", "hybrid")}
    assert client.get("/search", params={"q": query, "k": 5}).json()["mode"] == "hybrid"
    for mode, body in got.items():
        ids = [r["id"] for r in body["results"]]
        assert body["mode"] == mode and len(ids) == len(set(ids)) == 5 and set(ids) <= set(corpus["id"])
    bm25 = ir.BM25.fit((corpus["title"] + " " + corpus["text"]).str.strip().tolist())
    ids, _ = bm25.search([query], 5)
    assert [r["id"] for r in got["lexical"]["results"]] == [corpus["id"][i] for i in ids[0] if i >= 0]
    scores = [r["score"] for r in got["dense"]["results"]]
    assert scores == sorted(scores, reverse=True) and np.isfinite(scores).all()
    assert client.get("/search", params={"q": query, "mode": "nope"}).status_code == 422


def test_qdrant_ranks_documents_as_serve_does(beir_project):
    from pipeline.export import targets
    from pipeline.core.config import load_config

    args = ("--config", str(beir_project), OFF)
    run_stages(*args)
    assert cli("export", *args, "--force", "export.quantize_int8=false", "export.onnx=false") == 0
    cfg = load_config(beir_project, [OFF])
    report = targets.run(cfg, Path("exports/tinybeir-lora-r4-a8-s0"), ["qdrant"])
    q = report["qdrant"]
    assert q["count"] == q["documents"] == 48 and q["min_overlap"] == 1.0, q
