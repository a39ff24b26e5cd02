"""``python -m pipeline <stage> [--config FILE] [key=value ...]``.

Errors a user can fix (bad config, missing data, stale artefacts) print as one line and exit 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

STAGES = ("prepare", "train", "embed", "eval", "export", "sweep", "serve", "bench")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.lora.r=8")
    p.add_argument("--config", default=None, help="YAML config (default configs/default.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    p.add_argument("--force", action="store_true", help="redo a stage even if its outputs are up to date")
    p.add_argument("--run", default=None, help="run name to act on (export/serve; default: from the config)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "sentence_transformers", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipeline.errors import PipelineError

    try:
        from pipeline.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.run:
            cfg.run_name = args.run
        return _dispatch(args, cfg) or 0
    except PipelineError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args, cfg) -> int | None:
    stage = args.stage
    if stage == "prepare":
        from pipeline import prepare

        prepare.run(cfg, force=args.force)
    elif stage == "train":
        from pipeline import train

        train.run(cfg, overwrite=args.overwrite)
    elif stage == "embed":
        from pipeline import embed

        embed.run(cfg, force=args.force)
    elif stage == "eval":
        from pipeline import eval as evaluate

        evaluate.run(cfg)
    elif stage == "export":
        from pipeline import export

        export.run(cfg, overwrite=args.overwrite)
    elif stage == "sweep":
        from pipeline import sweep

        sweep.run(cfg, overwrite=args.overwrite)
    elif stage == "serve":
        from pipeline import serve

        serve.run(cfg)
    elif stage == "bench":
        from pipeline import bench

        bench.run(cfg)
    return 0
