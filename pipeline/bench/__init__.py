"""The measurement harness: speed, memory, parity and index benchmarks -> reports/bench/.

Not a stage: it reads the stages only through their public functions and writes nothing they read.
``python -m pipeline bench`` dispatches to :func:`pipeline.bench.harness.run`.
"""
from pipeline.bench.harness import run

__all__ = ["run"]
