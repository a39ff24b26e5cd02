"""Resume after a real kill: ``python -m pipeline train`` in a subprocess on the tiny model, SIGTERM'd and then
SIGKILL'd mid-training, rerun with the same command; it must resume and end exactly where an uninterrupted
run ends, and no MLflow run may be left RUNNING."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, cli, mlflow_client

STEPS = ["train.max_steps=200", "train.checkpoint_every=10", "runtime.num_threads=1"]


def _command(config: Path, run_name: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--config", str(config), f"run_name={run_name}", *STEPS]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _start_and_stop_after_checkpoint(cmd, state: Path, sig: int, after_step: int = 0, timeout: float = 240) -> int:
    """Start ``cmd``, wait until a checkpoint later than ``after_step`` exists, send ``sig``; return its step."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    step = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                step = json.loads(state.read_text())["step"]
            except (OSError, ValueError, KeyError):
                step = None
            if step is not None and step > after_step:
                proc.send_signal(sig)
                break
            time.sleep(0.005)
        else:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"no checkpoint after step {after_step} appeared before the run ended:\n{err[-2000:]}")
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -sig or proc.returncode == 128 + sig, (proc.returncode, err[-2000:])
    return json.loads(state.read_text())["step"]  # the last complete checkpoint, which may be later than seen


def _mlflow():

    return mlflow_client()


@pytest.mark.slow
def test_killed_training_resumes_and_matches_an_uninterrupted_run(project):
    assert cli("prepare", "--config", str(project)) == 0
    crashed, ckpt_state = Path("runs/crashed"), Path("runs/crashed/checkpoints/state.json")
    cmd = _command(project, "crashed")

    # 1. pre-emption: SIGTERM ends the process cleanly, its MLflow run is marked FAILED, the checkpoint stays
    first = _start_and_stop_after_checkpoint(cmd, ckpt_state, signal.SIGTERM)
    run_id = json.loads(ckpt_state.read_text())["mlflow_run_id"]
    assert _mlflow().get_run(run_id).info.status == "FAILED"
    assert not (crashed / "attempt.json").exists() and not (crashed / "model").exists()

    # 2. kill -9 after a later checkpoint: no cleanup at all, the run stays RUNNING for now
    second = _start_and_stop_after_checkpoint(cmd, ckpt_state, signal.SIGKILL, after_step=first)
    assert second > first > 0
    assert json.loads(ckpt_state.read_text())["mlflow_run_id"] == run_id  # attempt 2 resumed the same run
    assert (crashed / "attempt.json").exists()

    # 3. the same command again: resumes from the last checkpoint and finishes
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming crashed from step {second} of 200" in done.stderr
    manifest = json.loads((crashed / "model" / "manifest.json").read_text())
    assert manifest["train"]["resumed_from_step"] == second
    assert manifest["mlflow_run_id"] == run_id
    assert not (crashed / "checkpoints").exists() and not (crashed / "attempt.json").exists()
    client = _mlflow()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["pipeline.resumed_from_step"] == str(second)
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id]) if r.info.status == "RUNNING"] == []

    # an uninterrupted run of the same config, in this process
    assert cli("train", "--config", str(project), "run_name=clean", *STEPS) == 0
    from safetensors.torch import load_file

    resumed = load_file(crashed / "model/adapter/adapter_model.safetensors")
    clean = load_file(Path("runs/clean/model/adapter/adapter_model.safetensors"))
    assert resumed.keys() == clean.keys()
    # bit for bit: batch order depends only on (seed, epoch) and the dropout RNG is restored
    assert all((resumed[k] == clean[k]).all() for k in clean), "resumed weights differ from the uninterrupted run"

    metrics = {}
    for name in ("crashed", "clean"):
        args = ["--config", str(project), f"run_name={name}", *STEPS, "eval.lexical=false"]
        assert cli("embed", *args) == 0 and cli("eval", *args) == 0
        metrics[name] = json.loads(Path(f"reports/{name}/metrics.json").read_text())
    for block in ("classification", "retrieval"):
        a, b = metrics["crashed"][block], metrics["clean"][block]
        assert a.keys() == b.keys() and a
        assert all(abs(a[k] - b[k]) <= 0.005 for k in a), (a, b)
        assert a == b


def test_run_abandoned_before_its_first_checkpoint_is_marked_failed(project):
    """SIGKILL before any checkpoint leaves a RUNNING MLflow run and no checkpoint to resume: the next
    attempt starts a new MLflow run and ends the abandoned one as FAILED, saying why."""
    assert cli("prepare", "--config", str(project)) == 0
    client = _mlflow()
    exp = client.get_experiment(client.create_experiment(
        "tests", artifact_location=(Path.cwd() / "mlartifacts").resolve().as_uri()))
    orphan = client.create_run(exp.experiment_id, run_name="synthetic-lora-r4-a8-s0").info.run_id
    assert client.get_run(orphan).info.status == "RUNNING"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = Path("runs/synthetic-lora-r4-a8-s0")
    run_dir.mkdir(parents=True)
    (run_dir / "attempt.json").write_text(json.dumps({
        "pid": dead.pid, "host": __import__("socket").gethostname(), "started": "2026-01-01T00:00:00Z",
        "mlflow_run_id": orphan, "tracking_uri": client.tracking_uri}))
    assert cli("train", "--config", str(project)) == 0
    old = client.get_run(orphan)
    new_id = json.loads((run_dir / "model" / "manifest.json").read_text())["mlflow_run_id"]
    assert new_id != orphan and client.get_run(new_id).info.status == "FINISHED"
    assert old.info.status == "FAILED"
    assert old.data.tags["pipeline.outcome"] == (f"process {dead.pid} on {__import__('socket').gethostname()} was "
                                                 f"killed before finishing; superseded by MLflow run {new_id}")
    assert not (run_dir / "attempt.json").exists()
