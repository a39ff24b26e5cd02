"""Services that are not there, never answer, or go away mid-run (issue 26): one line naming the setting, the
address and what was tried; exit 2; nothing written. Everything listens on 127.0.0.1 and every wait is bounded.

The Ray cases run the CLI in a subprocess with a deadline: without the check, ``ray.init`` on a wrong port
retries for minutes. The subprocess keeps Ray's addresses on the loopback interface
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, as pipeline/core/raycluster.py does for its local cluster); otherwise Ray
turns 127.0.0.1 into this machine's network address.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, make_corpus
from tests.export.qdrant_standin import silent_port

LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
DEADLINE = 60  # the subprocess is killed after this: today's code would still be retrying


def _cli(cwd: Path, *args: str, env: dict | None = None) -> tuple[int, list[str], float]:
    """Run ``python -m pipeline`` in ``cwd``: (exit code, non-empty stderr lines, seconds)."""
    environ = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **LOOPBACK_ONLY, **(env or {})}
    environ.pop("MLFLOW_TRACKING_URI", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=DEADLINE)
    return proc.returncode, [l for l in proc.stderr.splitlines() if l.strip()], time.monotonic() - started


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def folder(tmp_path) -> Path:
    """A project folder with a corpus and a config, and nothing else."""
    make_corpus().to_csv(tmp_path / "corpus.csv", index=False)
    (tmp_path / "c.yaml").write_text("data: {name: synthetic, format: table, path: corpus.csv, text_column: title,"
                                     " label_column: category, group_column: cluster}\n"
                                     "tracking: {enabled: false}\n")
    return tmp_path


def test_sweep_on_a_refused_ray_address_is_one_line_and_writes_nothing(folder):
    port = free_port()
    before = _files(folder)
    rc, lines, seconds = _cli(folder, "sweep", "--config", "c.yaml", "sweep.executor=ray",
                              f"sweep.ray_address=127.0.0.1:{port}")
    assert rc == 2 and seconds < 15, lines
    assert lines == [f"error: sweep.ray_address=127.0.0.1:{port}: cannot reach the Ray cluster: TCP connect to "
                     f"127.0.0.1:{port} refused (services.timeout_s=5); check the head's address and GCS port (6379 "
                     "unless `ray start --port` said otherwise), or leave sweep.ray_address unset to start a local "
                     "cluster"]
    assert _files(folder) == before


def test_embed_corpus_on_a_ray_port_that_never_answers_is_one_line_and_writes_nothing(folder):
    sock, port = silent_port()
    before = _files(folder)
    try:
        rc, lines, seconds = _cli(folder, "embed-corpus", "--config", "c.yaml", "corpus.input=corpus.csv",
                                  "corpus.text_column=title", "corpus.encoder=base", "corpus.executor=ray",
                                  f"corpus.ray_address=127.0.0.1:{port}", "services.timeout_s=2")
    finally:
        sock.close()
    assert rc == 2 and seconds < 15, lines
    assert lines == [f"error: corpus.ray_address=127.0.0.1:{port}: cannot reach the Ray cluster: 127.0.0.1:{port} "
                     "accepted the TCP connection but gave no gRPC answer within 2 s (services.timeout_s=2); check the "
                     "head's address and GCS port (6379 unless `ray start --port` said otherwise), or leave "
                     "corpus.ray_address unset to start a local cluster"]
    assert _files(folder) == before


def test_a_ray_client_address_that_is_refused_is_one_line(folder):
    port = free_port()
    rc, lines, seconds = _cli(folder, "sweep", "--config", "c.yaml", "sweep.executor=ray",
                              f"sweep.ray_address=ray://127.0.0.1:{port}")
    assert rc == 2 and seconds < 15, lines
    assert len(lines) == 1 and lines[0].startswith(f"error: sweep.ray_address=ray://127.0.0.1:{port}: cannot reach")


# ------------------------------------------------------------------------------------------------ the probes

class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


def _http_server(status: int = 200) -> http.server.HTTPServer:
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _http(port: int):
    from pipeline.core.services import Service

    return Service("x.url", f"http://127.0.0.1:{port}", "test server", "http", f"http://127.0.0.1:{port}/health")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_probe_says_what_was_tried(protocol):
    from pipeline.core.services import Service, probe

    def service(port):
        if protocol == "grpc":
            return Service("x.address", f"127.0.0.1:{port}", "Ray cluster", "grpc", f"127.0.0.1:{port}")
        return _http(port)

    port = free_port()
    assert probe(service(port), 1.0) == f"TCP connect to 127.0.0.1:{port} refused"
    sock, port = silent_port()
    try:
        problem = probe(service(port), 0.5)
    finally:
        sock.close()
    assert problem in (f"127.0.0.1:{port} accepted the TCP connection but gave no gRPC answer within 0.5 s",
                       f"no answer to GET http://127.0.0.1:{port}/health within 0.5 s",
                       f"GET http://127.0.0.1:{port}/health: the server accepted the connection but sent no answer "
                       "within 0.5 s")
    assert (protocol == "grpc") == ("gRPC" in problem)


def test_an_http_server_answering_5xx_is_down_and_4xx_is_up():
    from pipeline.core.services import probe

    for status, answered in ((200, True), (404, True), (401, True), (503, False)):
        server = _http_server(status)
        try:
            problem = probe(_http(server.server_port), 2.0)
        finally:
            server.shutdown()
            server.server_close()
        assert (problem is None) is answered, (status, problem)
        if not answered:
            assert problem == f"GET http://127.0.0.1:{server.server_port}/health answered HTTP 503"


def test_a_grpc_server_answering_http_is_not_a_ray_cluster():
    from pipeline.core.services import Service, probe

    server = _http_server()
    try:
        port = server.server_port
        problem = probe(Service("x", f"127.0.0.1:{port}", "Ray cluster", "grpc", f"127.0.0.1:{port}"), 2.0)
    finally:
        server.shutdown()
        server.server_close()
    assert problem is not None and problem.startswith(f"no gRPC answer from 127.0.0.1:{port}")


# --------------------------------------------------------------------------------------------------- mid-run

def test_a_service_lost_inside_a_watched_block_ends_it_with_one_service_error():
    from pipeline.core.errors import ServiceError
    from pipeline.core.services import Watch

    server = _http_server()
    service = _http(server.server_port)
    started = time.monotonic()
    with pytest.raises(ServiceError) as caught:
        with Watch(service, 1.0, "what was done is kept"):
            server.shutdown()
            server.server_close()
            while time.monotonic() - started < 15:  # the work: interrupted by the watch
                time.sleep(0.05)
    assert time.monotonic() - started < 15
    assert str(caught.value) == (f"x.url=http://127.0.0.1:{server.server_port}: the test server stopped answering "
                                 f"mid-run (TCP connect to 127.0.0.1:{server.server_port} refused; nothing for 1 s, "
                                 "services.timeout_s); what was done is kept")


def test_a_watched_block_that_finishes_is_left_alone():
    from pipeline.core.services import Watch

    server = _http_server()
    try:
        with Watch(_http(server.server_port), 1.0, "kept") as watch:
            time.sleep(1.5)  # a probe or two answer meanwhile
        assert not watch.lost
    finally:
        server.shutdown()
        server.server_close()


def test_a_main_thread_that_cannot_be_interrupted_is_ended_by_the_watch(tmp_path):
    """Ray can block the main thread in C++ once its GCS is gone: the watch then prints the line and exits 2."""
    script = textwrap.dedent(f"""
        import http.server, signal, sys, threading, time
        sys.path.insert(0, {str(REPO)!r})
        from pipeline.core.services import Service, Watch
        server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
        port = server.server_port
        service = Service("x.url", "http://127.0.0.1:%d" % port, "test server", "http", "http://127.0.0.1:%d/" % port)
        with Watch(service, 1.0, "kept"):
            server.server_close()
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])  # the interruption never arrives
            time.sleep(30)
        print("the block ran to its end")
    """)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=DEADLINE)
    assert proc.returncode == 2 and time.monotonic() - started < 15, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: x.url=http://127.0.0.1:")
    assert "the test server stopped answering mid-run (TCP connect to 127.0.0.1:" in lines[0]
    assert lines[0].endswith(" refused; nothing for 1 s, services.timeout_s); kept")
