"""What a killed training process leaves behind, and how the next attempt settles it.

A process killed with SIGKILL (pre-emption, the OOM killer) runs no cleanup: its MLflow run stays
RUNNING and nothing says whether it is still alive. So each training attempt records itself in
``runs/<run>/attempt.json`` (pid, host, MLflow run) while it trains and removes the file when it ends.
The next attempt reads it: if that process still runs on this host, it refuses to train the same run
twice at once; otherwise the earlier MLflow run is either reopened (resume from its checkpoint) or,
when the new attempt starts another MLflow run, ended as FAILED so that no run is left RUNNING.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from pipeline.core.artifacts import pid_alive, read_json, write_json_atomic
from pipeline.core.errors import ArtifactError

log = logging.getLogger(__name__)
ATTEMPT = "attempt.json"


def _read(run_dir: Path) -> dict | None:
    path = Path(run_dir) / ATTEMPT
    try:
        return read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # half-written by a process killed mid-write: treat as abandoned
        return {}


def claim(run_dir: Path, run_name: str) -> dict | None:
    """Record this process as the one training ``run_dir``; return the abandoned attempt's record."""
    previous = _read(run_dir)
    if previous:
        pid, host = previous.get("pid"), previous.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
            raise ArtifactError(f"run '{run_name}' is being trained right now by process {pid} "
                                f"(since {previous.get('started')}); wait for it, or stop it and rerun to resume")
    write_json_atomic(Path(run_dir) / ATTEMPT, {
        "pid": os.getpid(), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "mlflow_run_id": None, "tracking_uri": None})
    return previous


def record_tracking(run_dir: Path, run_id: str | None, uri: str | None) -> None:
    path = Path(run_dir) / ATTEMPT
    record = _read(run_dir) or {}
    write_json_atomic(path, {**record, "mlflow_run_id": run_id, "tracking_uri": uri})


def settle_previous(previous: dict | None, current_run_id: str | None) -> None:
    """End the abandoned attempt's MLflow run as FAILED unless this attempt has reopened it."""
    if not previous or not previous.get("mlflow_run_id") or previous["mlflow_run_id"] == current_run_id:
        return
    from pipeline.core import tracking

    tracking.mark_abandoned(
        previous["tracking_uri"], previous["mlflow_run_id"],
        f"process {previous.get('pid')} on {previous.get('host')} was killed before finishing; "
        f"superseded by MLflow run {current_run_id or '(tracking off)'}")


def release(run_dir: Path) -> None:
    """Drop this attempt's record; a run folder that holds nothing else goes too (no empty leftovers)."""
    (Path(run_dir) / ATTEMPT).unlink(missing_ok=True)
    try:
        Path(run_dir).rmdir()
    except OSError:  # not empty (model, checkpoints, embeddings): keep it
        pass
