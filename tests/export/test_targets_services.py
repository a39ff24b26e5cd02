"""targets against a Qdrant server that is not there, never answers, or dies mid-load (issue 26): one line and
exit 2, nothing written before the load, what was loaded kept, and the rerun finishes the load.

The export here is written through the export contract from random vectors (no training): the load reads
only the manifest and ``index/``. Every server is a stand-in on 127.0.0.1 (tests/export/qdrant_standin.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import cli, free_port
from tests.export.qdrant_standin import StandIn, Store, silent_port

RUN = "standin-run"
ROWS = 300
BATCH = 50  # vectors per upsert: six upserts per load


@pytest.fixture
def export(tmp_path, monkeypatch) -> list[str]:
    """A project folder (cwd) with one export of ROWS random 16-dim vectors; returns the CLI's arguments."""
    from pipeline.contracts.export_folder import write_index
    from pipeline.core.artifacts import write_json_atomic
    from pipeline.core.config import ExportConfig

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((ROWS, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = [{"id": f"doc-{i}", "text": f"text {i}", "label": f"l{i % 5}", "group": None, "split": "test"}
               for i in range(ROWS)]
    out = tmp_path / "exports" / RUN
    write_index(out / "index", records, vectors, ExportConfig(), {})
    write_json_atomic(out / "manifest.json", {"stage": "export", "run_name": RUN, "fingerprint": "f" * 16})
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "targets.yaml"
    config.write_text(yaml.safe_dump({"run_name": RUN, "tracking": {"enabled": False},
                                      "targets": {"batch_size": BATCH}}))
    return ["--config", str(config)]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") and "a bug" not in lines[-1], err
    return lines[-1]


def _qdrant(url: str, *extra: str) -> list[str]:
    return ["targets.engines=[qdrant]", f"targets.qdrant_url={url}", *extra]


def test_refused_qdrant_url_is_one_line_before_anything_is_written(export, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert cli("targets", *export, *_qdrant(url)) == 2
    assert time.monotonic() - started < 15
    line = _error_line(capsys)
    assert line.startswith(f"error: targets.qdrant_url={url}: cannot reach the Qdrant server: ")
    assert "refused" in line and "services.timeout_s=5" in line
    assert not (Path("exports") / RUN / "targets").exists()


def test_a_qdrant_port_that_never_answers_is_one_line_within_the_timeout(export, capsys):
    sock, port = silent_port()
    try:
        started = time.monotonic()
        assert cli("targets", *export, *_qdrant(f"http://127.0.0.1:{port}", "services.timeout_s=1")) == 2
        assert time.monotonic() - started < 15
    finally:
        sock.close()
    line = _error_line(capsys)
    assert f"qdrant_url=http://127.0.0.1:{port}: cannot reach the Qdrant server:" in line
    assert "no answer" in line and "within 1 s" in line
    assert not (Path("exports") / RUN / "targets").exists()


def test_a_server_dying_mid_load_keeps_what_was_loaded_and_the_rerun_finishes(export, capsys):
    store = Store()
    server = StandIn(store, die_at=3)  # answers two upserts (100 vectors), drops the third and goes away
    # lancedb loads first and finishes: its record must survive qdrant's failure
    args = [*export, "targets.engines=[lancedb,qdrant]", f"targets.qdrant_url={server.url}"]
    started = time.monotonic()
    assert cli("targets", *args) == 2
    assert time.monotonic() - started < 15
    line = _error_line(capsys)
    assert line.startswith(f"error: targets.qdrant_url={server.url}: the Qdrant server failed "
                           f"during the load of '{RUN}' (100 of {ROWS} vectors sent; ")
    assert line.endswith("the points it stored are kept: rerun the same command to finish the load (it is idempotent)")
    assert store.client.count(RUN, exact=True).count == 100  # the two answered batches stayed in the server
    report_path = Path("exports") / RUN / "targets" / "targets.json"
    assert set(json.loads(report_path.read_text())) == {"lancedb"}

    assert server.stopped.wait(10)
    restarted = StandIn(store, port=server.port)  # the same server back, its storage intact
    try:
        assert cli("targets", *args) == 0
    finally:
        restarted.stop()
    report = json.loads(report_path.read_text())
    assert report["qdrant"]["count"] == ROWS and report["qdrant"]["overlap@10"] >= 0.99
    points, _ = store.client.scroll(RUN, limit=2 * ROWS, with_payload=True)
    assert len(points) == ROWS and len({p.payload["record_id"] for p in points}) == ROWS  # no duplicates


def test_a_server_hanging_mid_load_is_one_line_after_the_timeout(export, capsys):
    store = Store()
    server = StandIn(store, hang_at=2)
    try:
        started = time.monotonic()
        assert cli("targets", *export, *_qdrant(server.url, "services.timeout_s=1")) == 2
        assert time.monotonic() - started < 15
    finally:
        server.release()
        server.stop()
    line = _error_line(capsys)
    assert f"the Qdrant server failed during the load of '{RUN}' (50 of {ROWS} vectors sent; " in line
    assert "Timeout" in line
