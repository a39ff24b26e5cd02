"""adapters_serve: two adapters trained on different data share one base in one service; each serves the
vectors of its own merged export under interleaved requests; adapters are listed, added at run time, and
one recorded on another base is refused."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import QUIET, RUN, cli, run_stages, serve_in_thread, trained

RUN_B = "synthetic-lora-r4-a8-s1"


@pytest.fixture
def two_exports(project, trained_cache):  # noqa: F811
    """Exports of two LoRA runs on the tiny base: seed 0, and seed 1 (another split, so other training
    data) with a larger step so its adapter moves as far as the first."""
    saved = trained_cache["root"] / "two-adapters"
    if saved.exists():
        for part in ("data", "runs", "exports"):
            shutil.copytree(saved / part, part, dirs_exist_ok=True)
    else:
        cfg_a = trained(project, trained_cache)
        assert cli("export", *cfg_a, "export.onnx=false") == 0
        cfg_b = ["--config", str(project), *QUIET, "seed=1", "train.lr=5e-3", "train.epochs=2"]
        run_stages(*cfg_b, stages=("prepare", "train"))
        assert cli("export", *cfg_b, "export.onnx=false") == 0
        for part in ("data", "runs", "exports"):
            shutil.copytree(part, saved / part)
    return Path("exports") / RUN, Path("exports") / RUN_B


def _texts_b() -> list[str]:
    return [json.loads(line)["text"] for line in open("data/processed/synthetic/test.jsonl")]


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.sum(a * b, axis=1).min())




def test_served_adapters_equal_their_merged_exports_under_interleaved_requests(two_exports):
    import httpx

    from pipeline.serve.adapters import create_app
    from pipeline.contracts.export_folder import load_form

    out_a, out_b = two_exports
    texts = _texts_b()[:12] + ["samsung tv", "a", "Ünïcödé café – 4K"]
    want = {RUN: load_form(out_a, "merged").encode(texts, "document"), RUN_B: load_form(out_b, "merged").encode(texts, "document")}
    assert _min_cos(want[RUN], want[RUN_B]) < 0.9999  # the two adapters really differ: equality below means something

    # a wide window so the concurrent requests below fall into one or two windows
    app = create_app([out_a, out_b], window_ms=300)
    server, thread, url = serve_in_thread(app)
    got: dict[tuple[str, int], np.ndarray] = {}
    errors: list[str] = []

    def client(i: int) -> None:
        name = (RUN, RUN_B)[i % 2]
        chunk = texts[(i // 2) * 5:(i // 2) * 5 + 5]
        try:
            with httpx.Client(base_url=url, timeout=60) as http:
                r = http.post("/embed", json={"texts": chunk, "adapter": name})
                assert r.status_code == 200 and r.json()["adapter"] == name, r.text
                got[(name, i // 2)] = np.asarray(r.json()["embeddings"], dtype=np.float32)
        except Exception as exc:  # reported by the main thread
            errors.append(repr(exc))

    try:
        workers = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
        assert not errors, errors
        for name in (RUN, RUN_B):
            served = np.vstack([got[(name, j)] for j in range(3)])
            assert _min_cos(served, want[name]) >= 0.9999, name

        windows = list(app.state.batcher.windows)
        assert sum(req for w in windows for _, req, _ in w) == 6
        assert any(req > 1 for w in windows for _, req, _ in w)  # requests of one adapter grouped in a window
        assert all(len({a for a, _, _ in w}) == len(w) for w in windows)  # one group per adapter per window

        with httpx.Client(base_url=url, timeout=60) as http:
            for name in (RUN, RUN_B):
                q = _texts_b()[0] if name == RUN_B else json.loads(
                    open(out_a / "index" / "records.jsonl").readline())["text"]
                hits = http.get("/search", params={"q": q, "k": 3, "adapter": name}).json()["results"]
                assert hits[0]["text"] == q and hits[0]["score"] > 0.999
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_adapters_are_listed_added_at_run_time_and_a_foreign_base_is_refused(two_exports):
    from fastapi.testclient import TestClient

    from pipeline.serve.adapters import create_app
    from pipeline.contracts.export_folder import load_form

    out_a, out_b = two_exports
    foreign = Path("exports") / "foreign"
    shutil.copytree(out_b, foreign)
    meta_path = foreign / "adapter" / "base_model.json"
    meta = json.loads(meta_path.read_text())
    meta["base_fingerprint"] = "0123456789abcdef"  # as recorded by an adapter trained on other weights
    meta_path.write_text(json.dumps(meta))

    with TestClient(create_app([out_a], window_ms=0)) as client:
        listed = client.get("/adapters").json()
        base_fp = json.loads((out_a / "adapter" / "base_model.json").read_text())["base_fingerprint"]
        assert listed["base_fingerprint"] == base_fp and [a["name"] for a in listed["adapters"]] == [RUN]
        assert listed["adapters"][0]["gate"]["merged_vs_reference_min_cos"] >= 0.9999

        r = client.post("/adapters", json={"export": RUN_B})
        assert r.status_code == 201 and r.json()["name"] == RUN_B and r.json()["load_seconds"] >= 0
        assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == [RUN, RUN_B]
        texts = _texts_b()[:4]
        vec = np.asarray(client.post("/embed", json={"texts": texts, "adapter": RUN_B}).json()["embeddings"])
        assert _min_cos(vec, load_form(out_b, "merged").encode(texts, "document")) >= 0.9999
        vec = np.asarray(client.post("/embed", json={"texts": texts}).json()["embeddings"])  # the default: first
        assert _min_cos(vec, load_form(out_a, "merged").encode(texts, "document")) >= 0.9999

        r = client.post("/adapters", json={"export": "foreign", "name": "foreign"})
        assert r.status_code == 409
        assert "trained on base" in r.json()["detail"] and "0123456789abcdef" in r.json()["detail"]
        assert base_fp in r.json()["detail"]
        assert len(client.get("/adapters").json()["adapters"]) == 2
        assert client.post("/adapters", json={"export": RUN_B}).status_code == 400  # already served
        assert client.post("/adapters", json={"export": "nope"}).status_code == 400
        assert client.post("/embed", json={"texts": ["x"], "adapter": "nope"}).status_code == 404
        assert client.get("/health").json()["adapters"] == 2


def test_serve_adapters_all_discovers_same_base_exports_and_names_are_checked(two_exports, project):
    from pipeline.serve.adapters import discover
    from pipeline.core.config import load_config
    from pipeline.core.errors import ArtifactError

    out_a, out_b = two_exports
    shutil.copytree(out_a, Path("exports") / "foreign")
    meta_path = Path("exports") / "foreign" / "adapter" / "base_model.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "base_fingerprint": "0123456789abcdef"}))

    cfg = load_config(project, [*QUIET, "seed=1", "serve.adapters=[all]"])
    assert discover(cfg) == [out_b, out_a]  # the served run's own export first; the foreign one skipped
    cfg = load_config(project, [*QUIET, f"serve.adapters=[{RUN_B}]"])
    assert discover(cfg) == [out_b]
    with pytest.raises(ArtifactError, match="no finished export"):
        discover(load_config(project, [*QUIET, "serve.adapters=[missing-run]"]))


def test_cli_serve_with_serve_adapters_starts_the_multi_adapter_service_on_loopback(two_exports, project, monkeypatch,
                                                                                    capsys):
    import uvicorn
    from fastapi.testclient import TestClient

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    assert cli("serve", "--config", str(project), *QUIET, "serve.adapters=[all]", "serve.port=8123") == 0
    assert started["host"] == "127.0.0.1" and started["port"] == 8123
    with TestClient(started["app"]) as client:
        assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == [RUN, RUN_B]
    capsys.readouterr()
    assert cli("serve", "--config", str(project), *QUIET, "serve.adapters=[missing-run]") == 2
    assert "no finished export at exports/missing-run" in capsys.readouterr().err
