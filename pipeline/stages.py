"""The stages by name: the one place that maps a stage to the function that runs it.

The CLI and the orchestrators (sweep and suite run train -> embed -> eval per child; probe prepares
another corpus) start stages through here, by their public ``run``, so no stage module imports another
and each stage's internals stay its own. Imports are lazy: starting one stage never loads the others.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pipeline.core.config import Config

# name -> module whose ``run(cfg, **options)`` is the stage
MODULES = {
    "prepare": "pipeline.prepare.stage",
    "train": "pipeline.train.stage",
    "embed": "pipeline.embed.stage",
    "embed-corpus": "pipeline.scale.stage",
    "eval": "pipeline.evaluate.stage",
    "export": "pipeline.export.stage",
    "targets": "pipeline.export.targets",
    "sweep": "pipeline.experiments.sweep",
    "suite": "pipeline.experiments.suite",
    "serve": "pipeline.serve.stage",
    "probe": "pipeline.experiments.forgetting",
    "bench": "pipeline.bench",
}


def run(name: str, cfg: Config, **options):
    """Run stage ``name`` with ``cfg``; ``options`` are that stage's keyword options (force, overwrite).

    First the services the stage will talk to (a Ray cluster, Qdrant, the MLflow server) must answer
    (pipeline/core/services.py): a wrong address is one line before the stage writes anything."""
    from pipeline.core import services

    services.preflight(name, cfg)
    return importlib.import_module(MODULES[name]).run(cfg, **options)


def prepare(cfg: Config, *, force: bool = False) -> Path:
    return run("prepare", cfg, force=force)


def train_embed_eval(cfg: Config, *, overwrite: bool = False) -> Path:
    """One run end to end after prepare (each stage skips what is up to date); returns the report folder."""
    run("train", cfg, overwrite=overwrite)
    run("embed", cfg, force=overwrite)
    return run("eval", cfg)
