"""MLflow helpers: one tracking store per project, fail fast when a server is unreachable.

The default store is ``sqlite:///<working dir>/mlflow.db`` with artefacts in ``mlartifacts/`` beside
it, so ``make ui`` and every stage see the same runs. A train and its eval share one MLflow run: the
train manifest records the run id and eval reopens it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from pipeline.core import services
from pipeline.core.config import Config
from pipeline.core.errors import TrackingError

log = logging.getLogger(__name__)


def default_uri() -> str:
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def resolve_uri(cfg: Config) -> str:
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    server = services.mlflow_service(cfg)
    problem = services.probe(server, cfg.services.timeout_s) if server is not None else None
    if problem is not None:
        if cfg.tracking.on_unreachable == "local":
            local = default_uri()
            log.warning("MLflow server %s is unreachable (%s); logging to the local store %s instead", uri, problem,
                        local)
            return local
        raise TrackingError(services.unreachable(server, problem, cfg.services.timeout_s))
    return uri


def preflight(cfg: Config) -> Config:
    """Check the tracking store before a stage does any work: an unreachable server stops the stage now
    (tracking.on_unreachable=error) instead of after training, or is replaced by the local store
    (=local), in which case the returned config names that store so the check and warning happen once."""
    if not cfg.tracking.enabled:
        return cfg
    asked = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    uri = resolve_uri(cfg)
    if uri == asked:
        return cfg
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": uri})})


def mark_abandoned(uri: str, run_id: str, note: str) -> bool:
    """End a run that a killed process left RUNNING as FAILED, with ``note`` as a tag; True if it did.

    A process killed with SIGKILL cannot end its own MLflow run, so the next attempt does it.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
        if run.info.status != "RUNNING":
            return False
        client.set_tag(run_id, "pipeline.outcome", note)
        client.set_terminated(run_id, status="FAILED")
    except (MlflowException, OSError) as exc:
        log.warning("could not mark the abandoned MLflow run %s in %s as FAILED: %s", run_id, uri, exc)
        return False
    log.warning("marked MLflow run %s FAILED: %s", run_id, note)
    return True


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """Thin wrapper over one active MLflow run; a no-op when tracking is disabled."""

    def __init__(self, run_id: str | None, enabled: bool, uri: str | None = None):
        self.run_id = run_id
        self.enabled = enabled
        self.uri = uri

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        import mlflow

        clean = {k: ("" if v is None else str(v))[:6000] for k, v in params.items()}
        items = list(clean.items())
        for i in range(0, len(items), 90):
            mlflow.log_params(dict(items[i:i + 90]))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        import mlflow

        clean = {k.replace("@", "_at_"): float(v) for k, v in metrics.items() if v is not None}
        mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.enabled or not Path(path).exists():
            return
        import mlflow

        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


    def log_datasets(self, dataset: str, files: dict[str, Path]) -> None:
        """Each prepared file as an MLflow dataset input of the run (``mlflow.data.from_pandas`` + ``log_input``):
        name ``<dataset>-<split>``, digest the file's sha256, source its path, the schema MLflow infers, and the
        split as the input's context, so the UI's Dataset column and filter show what the run read."""
        if not self.enabled:
            return
        import mlflow
        import pandas as pd

        from pipeline.core.artifacts import sha256_file

        for split, path in files.items():
            frame = pd.read_json(path, lines=True, dtype=False)
            # list-valued columns (a query's relevant ids) have no MLflow column type: logged as JSON text
            for col in frame.columns:
                if frame[col].map(lambda v: isinstance(v, (list, dict))).any():
                    frame[col] = frame[col].map(json.dumps)
            with warnings.catch_warnings():
                # MLflow registers its local-file source class twice and warns that a path is ambiguous
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
                data = mlflow.data.from_pandas(frame, source=str(Path(path).resolve()), name=f"{dataset}-{split}",
                                               digest=sha256_file(path)[:16])
            mlflow.log_input(data, context=split)


@contextlib.contextmanager
def run(cfg: Config, *, run_name: str, run_id: str | None = None, tags: dict[str, Any] | None = None,
        parent_run_id: str | None = None) -> Iterator[Tracker]:
    """Open (or reopen, given ``run_id``) an MLflow run; mark it FAILED if the block raises."""
    if not cfg.tracking.enabled:
        yield Tracker(None, False)
        return
    import mlflow

    parent_run_id = parent_run_id or cfg.tracking.parent_run_id
    uri = resolve_uri(cfg)
    user_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # mlflow also exports the URI to the environment; undo that (mlflow keeps its own copy) so that a later
    # stage in this process, in another project folder, does not take it for the user's setting.
    if user_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_env
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.tracking.experiment)
    if run_id is not None:
        if not _run_exists(run_id):  # a run from another store (e.g. the tracking URI changed): start afresh
            log.warning("MLflow run %s not found in %s; starting a new run", run_id, uri)
            run_id = None
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                              tags=tags, parent_run_id=parent_run_id, nested=parent_run_id is not None)
    tracker = Tracker(active.info.run_id, True, uri)
    try:
        yield tracker
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")


def _run_exists(run_id: str) -> bool:
    """Whether the current store holds ``run_id``. Only "does not exist" answers False: any other failure
    (store unreachable, permissions, a corrupt database) is raised, not mistaken for a missing run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise TrackingError(f"cannot look up MLflow run {run_id}: {exc.message}") from None
    return True
