"""``python -m pipeline <stage> [--config FILE] [key=value ...]``.

Errors a user can fix (bad config, missing data, stale artefacts) print as one line and exit 2;
``--debug`` shows the traceback instead. Any other exception is a bug: it prints one line naming the
exception and where its full traceback was saved, and exits 1 (see ``_report_unexpected``).
SIGTERM (how schedulers pre-empt a job) is turned into an exception so that temporaries are removed and
the MLflow run is ended as FAILED; rerunning the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import time
import traceback

from pipeline.stages import MODULES

STAGES = tuple(MODULES)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.lora.r=8")
    p.add_argument("--config", default=None, help="YAML config (default configs/default.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    p.add_argument("--force", action="store_true", help="redo a stage even if its outputs are up to date; "
                   "export: export a run that eval found not better than the base model on validation")
    p.add_argument("--run", default=None, help="run name to act on (export/serve; default: from the config)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM; a BaseException so no ``except Exception`` swallows it."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _report_unexpected(exc: BaseException, stage: str) -> int:
    """One line for an exception the pipeline did not anticipate, with the traceback kept in a file.

    Why not the bare traceback: the user is told plainly that this is a bug and not their input, on the
    same one-line form as every other error. Why not only the line: the traceback is what a fix needs,
    and after a long run nobody should have to rerun with --debug to get it, so it is saved. Results are
    unaffected either way: stages write through atomic_dir, so what was complete before stays complete.
    """
    path = None
    try:
        fd, path = tempfile.mkstemp(prefix=f"pipeline-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(" ".join(sys.argv) + "\n")
            traceback.print_exception(exc, file=fh)
    except OSError:
        path = None
    where = f"traceback saved to {path}" if path else "rerun with --debug for the traceback"
    first = _one_line(str(exc))[:300]
    print(f"error: unexpected {type(exc).__name__} in {stage}{': ' + first if first else ''} "
          f"(a bug, not a problem with your input; {where})", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "sentence_transformers", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipeline.core.errors import PipelineError

    previous_handler = None
    try:
        previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a worker): keep the default
        pass
    try:
        from pipeline.core.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.run:
            cfg.run_name = args.run
        return _dispatch(args, cfg) or 0
    except PipelineError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue (training resumes from its last checkpoint)",
              file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM); rerun the same command to continue (training resumes from its last "
              "checkpoint)", file=sys.stderr)
        return 143
    except Exception as exc:
        if args.debug:
            raise
        return _report_unexpected(exc, args.stage)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _dispatch(args, cfg) -> int | None:
    from pipeline import stages

    stage = args.stage
    if stage in ("prepare", "embed", "embed-corpus"):
        stages.run(stage, cfg, force=args.force)
    elif stage in ("train", "sweep", "suite"):
        stages.run(stage, cfg, overwrite=args.overwrite)
    elif stage == "export":
        out = stages.run("export", cfg, overwrite=args.overwrite, force=args.force)
        if cfg.targets.engines:
            stages.run("targets", cfg, export_dir=out)
    elif stage == "targets":  # load an existing export into targets.engines without exporting again
        from pipeline.core.artifacts import Layout
        from pipeline.core.errors import ConfigError

        if not cfg.targets.engines:
            raise ConfigError("targets: targets.engines is empty; e.g. targets.engines=[qdrant,lancedb,opensearch]")
        stages.run("targets", cfg, export_dir=Layout(cfg).export())
    else:
        stages.run(stage, cfg)
    return 0
