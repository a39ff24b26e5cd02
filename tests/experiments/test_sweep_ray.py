"""Sweeps on Ray Tune (sweep.executor=ray) on a local 2-CPU Ray cluster bound to the loopback interface:
children run as concurrent Tune trials and leave the same summary, MLflow structure and resume records
as the local executor; a failing child, or a trial that raises, is a failed child."""

import json
import os
import sys
from pathlib import Path

import pytest
import ray

from pipeline.experiments import sweep
from pipeline.experiments import sweep_ray
from pipeline.core.config import load_config

# Two trained children (one LoRA point, full fine-tuning), in-process in their trial (isolate=false keeps
# the test quick: no second interpreter per child), two at a time on the 2-CPU cluster.
SMALL = ["sweep.ranks=[2]", "sweep.alpha_multipliers=[2]", "sweep.isolate=false", "sweep.include_base=false",
         "sweep.full_lr=0.0005", "sweep.quality_metric=retrieval.recall@1", "train.max_steps=8", "train.lr=0.005"]
RAY = ["sweep.executor=ray", "sweep.cpus_per_trial=1", "sweep.max_concurrent=2"]
pytestmark = pytest.mark.slow  # each test runs on a local Ray cluster: seconds to start, trials in processes


@pytest.fixture(autouse=True)
def _own_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def _sweep_runs(name: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tests")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("sweep") == name]
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = {r.data.tags["sweep.config"]: r for r in runs if r.data.tags.get("sweep.role") == "child"}
    return parents, children


# What does not depend on where or when a child ran (its name, wall time and MLflow run id do).
SAME = ("config_id", "method", "seed", "r", "alpha", "preset", "target_modules", "lr", "trainable_params",
        "total_params", "adapter_bytes", "adapted_modules", "steps", "metrics", "baseline", "lexical", "test_items")


def test_cluster_listens_on_loopback_only(ray_cluster):
    import psutil

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    # every socket that this test's Ray processes (GCS, raylet, workers, this driver) listen on
    pids = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    ours = [c.laddr.ip for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len(ours) >= 2 and set(ours) <= {"127.0.0.1", "::ffff:127.0.0.1"}, ours


PRESETS = {"qkv": ["query", "key", "value"], "broken": ["no_such_module"]}


def test_ray_sweep_matches_the_local_one(ray_cluster, project):
    # three children: a LoRA point, one whose target modules do not exist (it fails), full fine-tuning
    args = [*SMALL, f"sweep.target_presets={json.dumps(PRESETS)}"]
    with pytest.raises(sweep.SweepError, match="1 of 3 sweep children failed"):
        sweep.run(load_config(project, [*args, "sweep.name=loc"]))
    with pytest.raises(sweep.SweepError, match="1 of 3 sweep children failed"):
        sweep.run(load_config(project, [*args, *RAY, "sweep.name=tune"]))
    local, out = Path("reports/sweep/loc"), Path("reports/sweep/tune")

    # every child was a Tune trial in a process of its own, and trials ran at the same time
    trials = json.loads((out / "ray_trials.json").read_text())
    assert sorted(t["run"] for t in trials) == [f"sweep-tune-{c}-s0" for c in ("full", "lora-r2-a4-broken",
                                                                                 "lora-r2-a4-qkv")]
    assert all(t["trial_id"] for t in trials) and len({t["pid"] for t in trials}) >= 2
    assert any(max(a["started"], b["started"]) < min(a["ended"], b["ended"])
               for i, a in enumerate(trials) for b in trials[i + 1:])

    # the same summary: same children, settings and metrics (training is seeded and single-threaded), and
    # the same failed child with the same reason
    want = json.loads((local / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    assert [{k: c[k] for k in SAME} for c in got["children"]] == [{k: c[k] for k in SAME} for c in want["children"]]
    assert [c["metrics"] for c in got["configurations"]] == [c["metrics"] for c in want["configurations"]]
    assert [c["config_id"] for c in got["children"]] == ["lora-r2-a4-qkv", "full"]
    assert [(f["config_id"], f["reason"]) for f in got["failed"]] == [(f["config_id"], f["reason"])
                                                                     for f in want["failed"]]
    assert got["failed"][0]["config_id"] == "lora-r2-a4-broken" and "no_such_module" in got["failed"][0]["reason"]
    assert "**failed**" in (out / "summary.md").read_text()

    # the same MLflow structure: one parent, each finished child nested under it with the same params and tags
    for name in ("loc", "tune"):
        parents, children = _sweep_runs(name)
        assert len(parents) == 1 and set(children) == {"lora-r2-a4-qkv", "full"}
        assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children.values())
        assert all(c.info.status == "FINISHED" for c in children.values())
    _, loc_children = _sweep_runs("loc")
    _, tune_children = _sweep_runs("tune")
    strip = {"run_name", "tracking.parent_run_id", "sweep.name", "sweep.executor", "sweep.max_concurrent"}
    for cid, c in tune_children.items():
        assert {k: v for k, v in c.data.params.items() if k not in strip} == {
            k: v for k, v in loc_children[cid].data.params.items() if k not in strip}
        assert {k for k in c.data.tags if k.startswith("sweep.")} == {
            k for k in loc_children[cid].data.tags if k.startswith("sweep.")}

    # resume: with the broken preset dropped every child is finished, so no trial starts and no record changes
    records = {p.name: p.stat().st_mtime_ns for p in (out / "children").glob("*.json")}
    tune_runs = sorted((out / "tune").iterdir())
    assert len(records) == 2 and len(tune_runs) == 1
    sweep.run(load_config(project, [*SMALL, *RAY, "sweep.name=tune",
                                    f"sweep.target_presets={json.dumps({'qkv': PRESETS['qkv']})}"]))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "children").glob("*.json")} == records
    assert sorted((out / "tune").iterdir()) == tune_runs
    summary = json.loads((out / "summary.json").read_text())
    assert [c["config_id"] for c in summary["children"]] == ["lora-r2-a4-qkv", "full"] and summary["failed"] == []


def _raise_for_full(job):
    if job.point.method == "full":
        raise RuntimeError(f"trial of {job.name} crashed")
    return {"run": job.name}, None


def test_a_trial_that_raises_is_a_failed_child(ray_cluster, project, tmp_path):
    # the function runs in the trial's worker process, which cannot import this test module: send it by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = load_config(project, [*SMALL, *RAY, "sweep.name=t"])
    jobs = [sweep.child_job(cfg, p, p.config_id, parent_run_id=None, tracking_uri=None) for p in sweep.grid(cfg)]
    outcomes = sweep_ray.run_children(cfg.sweep, jobs, _raise_for_full, tmp_path,
                                       timeout_s=cfg.services.timeout_s)
    assert outcomes["sweep-t-lora-r2-a4-qkv-s0"] == ({"run": "sweep-t-lora-r2-a4-qkv-s0"}, None)
    record, failure = outcomes["sweep-t-full-s0"]
    assert record is None and failure["config_id"] == "full"
    assert "RuntimeError: trial of sweep-t-full-s0 crashed" in failure["reason"]
