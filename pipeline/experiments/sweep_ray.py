"""Sweep children as Ray Tune trials (``sweep.executor: ray``).

pipeline/experiments/sweep.py decides which children still have to run (resume) and hands them here with the
function that runs one child; each becomes a Tune trial with its own resources (``sweep.cpus_per_trial``
CPUs, ``sweep.gpus_per_trial`` GPUs: Ray sets ``CUDA_VISIBLE_DEVICES``, so a child sees only its GPU),
at most ``sweep.max_concurrent`` at a time. A trial runs exactly what the local executor runs for a
child, so it writes the same per-child record, log and MLflow run (nested under the sweep's parent run
through the child's config), and resume and the summary are the local ones. A trial that raises is a
failed child with the exception as its reason, as a failing child is in the local path.

The cluster: one this process is already connected to (``ray.init`` before the sweep); else
``sweep.ray_address`` (an existing cluster, e.g. ``auto`` on a cluster node; checked before the sweep
starts, pipeline/core/services.py); else a local cluster that this call starts on the loopback interface
and shuts down after. A cluster that goes away mid-sweep ends it with one line within about
``services.timeout_s``; finished children keep their records, so the rerun runs only the others.
Each trial works in the driver's working directory, since the sweep's paths are relative to it: on a
multi-node cluster every node needs the checkout, the prepared data and the run folders at the same path
(a shared filesystem).

Besides the children's own files, ``reports/sweep/<name>/ray_trials.json`` lists which trial ran which
child, where, with which resources and when; Tune's own trial folders are under ``.../tune/``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core import raycluster
from pipeline.core.artifacts import write_json_atomic
from pipeline.core.config import SweepConfig
from pipeline.core.errors import ConfigError

log = logging.getLogger(__name__)

Outcome = tuple[dict | None, dict | None]  # (record, None) for a finished child, (None, failure) otherwise


def _check_local_resources(s: SweepConfig) -> None:
    """A trial that asks for more than this machine's local cluster has would wait forever."""
    import ray

    have = ray.cluster_resources()
    for key, need in (("CPU", s.cpus_per_trial), ("GPU", s.gpus_per_trial)):
        if need and have.get(key, 0) < need:
            raise ConfigError(f"sweep.{key.lower()}s_per_trial={need:g} but this machine's Ray cluster has "
                              f"{have.get(key, 0):g} {key}s; lower it or give sweep.ray_address of a larger cluster")


def _trial(config: dict, *, jobs: list, run_one: Callable[[Any], Outcome], cwd: str) -> dict:
    """One child as a Tune trial: run it, report its outcome and when and where it ran."""
    import ray

    os.chdir(cwd)  # Tune starts a trial in a folder of its own; the child's paths are relative to the sweep's
    started = time.time()
    record, failure = run_one(jobs[config["child"]])
    return {"outcome": json.dumps([record, failure]), "started": started, "ended": time.time(),
            "pid": os.getpid(), "node": ray.util.get_node_ip_address()}


def run_children(s: SweepConfig, jobs: list, run_one: Callable[[Any], Outcome], out: Path, *,
                 timeout_s: float) -> dict[str, Outcome]:
    """Run ``run_one(job)`` for every job as a Ray Tune trial; returns each job's outcome by run name.

    A job is pipeline/experiments/sweep.py's ChildJob (``name``, ``point``, ``log_path`` are read here);
    ``timeout_s`` is ``services.timeout_s`` (how long the cluster may stay silent)."""
    try:
        from ray import tune
    except ImportError as exc:
        raise ConfigError(f"sweep.executor=ray needs Ray Tune ({exc}); install the extra: "
                          "pip install -e '.[ray]'") from exc

    resources = {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial}
    kept = "children that finished are kept: rerun the same command to run the others"
    with raycluster.session(s.ray_address, setting="sweep.ray_address", timeout_s=timeout_s, kept=kept) as started:
        if started and not s.ray_address:
            _check_local_resources(s)
        trainable = tune.with_resources(tune.with_parameters(_trial, jobs=jobs, run_one=run_one, cwd=os.getcwd()),
                                        resources)
        tuner = tune.Tuner(
            trainable, param_space={"child": tune.grid_search(list(range(len(jobs))))},
            # A fresh worker per trial: peak memory (ru_maxrss) is per process, so it stays per child.
            tune_config=tune.TuneConfig(max_concurrent_trials=s.max_concurrent, reuse_actors=False,
                                        trial_name_creator=lambda t: jobs[t.config["child"]].name,
                                        trial_dirname_creator=lambda t: jobs[t.config["child"]].name),
            # Resume is the sweep's (child records), not Tune's: a failed child is retried by the next
            # invocation, so Tune does not retry it here.
            run_config=tune.RunConfig(name=time.strftime("%Y%m%d-%H%M%S"), verbose=0,
                                      storage_path=str(Path(out).resolve() / "tune"),
                                      failure_config=tune.FailureConfig(max_failures=0)))
        log.info("sweep: %d children as Ray Tune trials, %s each, at most %s at a time", len(jobs), resources,
                 s.max_concurrent or "as many as fit")
        results = tuner.fit()
    return _outcomes(s, jobs, results, out, resources)


def _outcomes(s: SweepConfig, jobs: list, results, out: Path, resources: dict) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    trials = []
    for result in results:
        job = jobs[result.config["child"]]
        m = result.metrics or {}
        if result.error is not None:
            cause = getattr(result.error, "cause", None) or result.error
            last = (str(cause).strip().splitlines() or [""])[-1]  # a RayTaskError's text ends with the message
            reason = f"the Ray trial failed: {type(cause).__name__}: {last}"
            log.error("%s: %s (Tune's trial folder: %s)", job.tag, reason, result.path)
            p = job.point
            outcomes[job.name] = (None, {"run": job.name, "config_id": p.config_id, "method": p.method,
                                         "seed": p.seed, "reason": reason,
                                         "log": str(job.log_path) if s.isolate else None})
        elif "outcome" in m:
            record, failure = json.loads(m["outcome"])
            outcomes[job.name] = (record, failure)
        trials.append({"run": job.name, "trial_id": m.get("trial_id"), "node": m.get("node"), "pid": m.get("pid"),
                       "started": m.get("started"), "ended": m.get("ended"), "resources": resources,
                       "error": None if result.error is None else outcomes[job.name][1]["reason"]})
    write_json_atomic(Path(out) / "ray_trials.json", trials)
    missing = [job.name for job in jobs if job.name not in outcomes]
    if missing:  # neither reported nor failed: Tune stopped them (Ctrl-C), as an interrupted local sweep
        raise KeyboardInterrupt(f"Ray Tune stopped before {len(missing)} children reported: {', '.join(missing)}")
    return outcomes
