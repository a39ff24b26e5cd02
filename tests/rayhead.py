"""An existing Ray cluster for the tests that need one to die: ``ray start --head`` on 127.0.0.1 in a process
group of its own, so that killing that group (and only it) is the head node crashing.

Its addresses stay on the loopback interface (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, as
pipeline/core/raycluster.py does for its local cluster), token authentication is off (the tests' drivers
carry no token), and its workers import the checkout. A driver that connects needs LOOPBACK_ENV too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def _answers(address: str) -> bool:
    """The head's GCS accepts connections (ray.init then waits for the rest of the node by itself)."""
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


class Head:
    def __init__(self, proc: subprocess.Popen, address: str, temp_dir: str):
        self.proc, self.address, self.temp_dir = proc, address, temp_dir

    def kill(self) -> None:
        """SIGKILL to every process of the head's group: GCS, raylet, workers (and what they started)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, start_timeout: float = 90) -> Iterator[Head]:
    from tests.conftest import free_port

    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, **LOOPBACK_ENV, "PYTHONPATH": str(REPO)}
    ray = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp_dir}",
                             f"--ray-client-server-port={free_port()}"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    head = Head(proc, f"127.0.0.1:{port}", temp_dir)
    try:
        deadline = time.monotonic() + start_timeout
        while not _answers(head.address):
            assert proc.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, f"the Ray head did not answer within {start_timeout:g} s"
            time.sleep(0.5)
        yield head
    finally:
        head.kill()
