"""serve: the HTTP service answers real requests on loopback, over the ONNX and the merged form."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import RUN, cli, free_port, trained


@pytest.fixture
def exported(project, trained_cache):
    cfg = trained(project, trained_cache)
    assert cli("export", *cfg, "export.quantize_int8=false") == 0
    return Path("exports") / RUN


def test_service_answers_http_on_loopback(exported):
    import httpx
    import uvicorn

    from pipeline.serve.stage import HOST, create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(exported, "onnx"), host=HOST, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start within 30 s"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=10) as http:
            health = http.get("/health").json()
            assert health["status"] == "ok" and health["form"] == "onnx" and health["run"] == RUN
            assert health["index"]["items"] > 0 and health["gate"]["onnx_vs_torch_min_cos"] >= 0.999

            test = [json.loads(line) for line in open("data/processed/synthetic/test.jsonl")]
            r = http.post("/embed", json={"texts": [test[0]["text"], "samsung tv"]})
            assert r.status_code == 200
            body = r.json()
            assert body["dim"] == health["dim"] and len(body["embeddings"]) == 2
            assert abs(sum(v * v for v in body["embeddings"][0]) - 1) < 1e-4

            r = http.get("/search", params={"q": test[0]["text"], "k": 3})
            assert r.status_code == 200
            hits = r.json()["results"]
            assert [h["rank"] for h in hits] == [1, 2, 3]
            assert hits[0]["id"] == test[0]["id"] and hits[0]["score"] > 0.999
            assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
            assert {"text", "label", "group", "split"} <= set(hits[0])

            assert http.get("/search", params={"q": "tv", "k": 0}).status_code == 422
            assert http.get("/search", params={"q": ""}).status_code == 422
            assert http.post("/embed", json={"texts": []}).status_code == 422
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_serving_the_merged_form_and_falling_back_when_onnx_is_absent(project, trained_cache):  # noqa: F811
    from fastapi.testclient import TestClient

    from pipeline.serve.stage import create_app

    cfg = trained(project, trained_cache)
    assert cli("export", *cfg, "export.onnx=false") == 0
    app = create_app(Path("exports") / RUN, "onnx")
    with TestClient(app) as client:
        assert client.get("/health").json()["form"] == "merged"
        hits = client.get("/search", params={"q": "intel cpu", "k": 2}).json()["results"]
        assert len(hits) == 2 and hits[0]["score"] >= hits[1]["score"]
