"""A Ray head that dies mid-run (issue 26): embed-corpus and the sweep end with one line and exit 2 within
15 s of the kill, keep what was finished, and the rerun resumes from it.

The cluster is an existing one (``ray start --head`` on 127.0.0.1, tests/rayhead.py) reached through
``corpus.ray_address`` / ``sweep.ray_address``; the CLI runs in a subprocess, as a user runs it. Without
the watch, the driver waits on the dead GCS for a minute and then Ray ends the process (exit 1, no line).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, make_corpus
from tests.rayhead import LOOPBACK_ENV, ray_head

pytestmark = pytest.mark.slow
DEADLINE = 600


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, **LOOPBACK_ENV, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _kill_when(head, proc: subprocess.Popen, finished) -> tuple[int, list[str], float, list[Path]]:
    """Kill the head once ``finished()`` lists something; (exit code, output lines, seconds after the kill,
    what was finished at the kill)."""
    deadline = time.monotonic() + DEADLINE
    while not finished():
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "nothing finished in time"
        time.sleep(0.1)
    done = finished()
    head.kill()
    killed = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, [l for l in out.splitlines() if l.strip()], time.monotonic() - killed, done


def _ended_in_one_line(rc: int, lines: list[str], after_kill: float, setting: str, kept: str) -> None:
    """Exit 2 within 15 s of the kill, no traceback, and the last line is the one error line naming the setting."""
    assert rc == 2 and after_kill < 15, lines[-20:]
    assert not any("Traceback" in l for l in lines), lines[-20:]
    assert lines[-1].startswith(f"error: {setting}: the Ray cluster stopped answering mid-run ("), lines[-5:]
    assert lines[-1].endswith(kept)


def test_embed_corpus_ends_in_one_line_when_the_head_dies_and_the_rerun_resumes(project, tmp_path):
    df = make_corpus(n_clusters_per_brand=6)
    big = df.loc[df.index.repeat(20)].reset_index(drop=True)  # about 6k rows
    big["title"] = big["title"] + " #" + big.index.astype(str)
    big.to_csv(tmp_path / "big.csv", index=False)
    # batch_size=1: shard after shard, slowly enough that the head dies part-way through
    args = ["--config", str(project), "corpus.input=big.csv", "corpus.text_column=title", "corpus.encoder=base",
            "corpus.shard_rows=250", "corpus.batch_size=1", "corpus.index.enabled=false", "tracking.enabled=false",
            "embed.backend=torch", "train.precision=fp32", "services.timeout_s=3"]
    shards = tmp_path / "runs" / "base-corpus" / "big" / "shards"
    n_shards = -(-len(big) // 250)
    with ray_head() as head:
        proc = _start("embed-corpus", *args, "corpus.executor=ray", "corpus.workers=1",
                      f"corpus.ray_address={head.address}")
        rc, lines, after_kill, done = _kill_when(head, proc, lambda: sorted(shards.glob("shard-*.json")))
    _ended_in_one_line(rc, lines, after_kill, f"corpus.ray_address={head.address}",
                       "the shards written so far are kept: rerun the same command to encode the others")
    kept = sorted(shards.glob("shard-*.json"))
    assert len(done) <= len(kept) < n_shards, "the head should have died part-way through"

    # the rerun (on the local executor: the cluster is gone; the shards do not depend on the executor)
    # encodes only the shards that were missing
    rerun = subprocess.run([sys.executable, "-m", "pipeline", "embed-corpus", *args],
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                           timeout=DEADLINE)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = json.loads((shards.parent / "manifest.json").read_text())
    assert manifest["rows"] == len(big) and len(manifest["shards"]) == n_shards
    assert manifest["throughput"]["resumed_shards"] == len(kept)


def test_a_sweep_ends_in_one_line_when_the_head_dies_and_the_rerun_skips_finished_children(project, tmp_path,
                                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    # base + two LoRA points, one trial at a time, each child in its own interpreter (the default)
    args = ["--config", str(project), "sweep.name=lost", "sweep.ranks=[2]", "sweep.alpha_multipliers=[2,4]",
            "sweep.include_full=false", "sweep.quality_metric=retrieval.recall@1", "train.max_steps=8",
            "train.lr=0.005", "services.timeout_s=3", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert subprocess.run([sys.executable, "-m", "pipeline", "prepare", *args], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=DEADLINE).returncode == 0
    records = tmp_path / "reports" / "sweep" / "lost" / "children"
    with ray_head() as head:
        proc = _start("sweep", *args, "sweep.executor=ray", "sweep.cpus_per_trial=1", "sweep.max_concurrent=1",
                      f"sweep.ray_address={head.address}")
        rc, lines, after_kill, done = _kill_when(head, proc, lambda: sorted(records.glob("*.json")))
    _ended_in_one_line(rc, lines, after_kill, f"sweep.ray_address={head.address}",
                       "children that finished are kept: rerun the same command to run the others")
    kept = sorted(p.stem for p in records.glob("*.json"))
    assert 1 <= len(kept) < 3

    rerun = subprocess.run([sys.executable, "-m", "pipeline", "sweep", *args], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                           timeout=DEADLINE)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    skipped = [l for l in rerun.stderr.splitlines() if l.endswith("finished before, skipped")]
    assert len(skipped) == len(kept)
    summary = json.loads((records.parent / "summary.json").read_text())
    assert len(summary["children"]) == 3 and summary["failed"] == []
