"""Errors a user can act on. The CLI prints them as one line and exits non-zero, without a traceback."""


class PipelineError(Exception):
    """A problem with the user's input, data or environment, stated so that they can fix it."""

    exit_code = 2


class ConfigError(PipelineError):
    """Unknown key, wrong type, missing file: names the key or file."""


class DataError(PipelineError):
    """Missing, empty, malformed or unsplittable data: names the file and column."""


class ArtifactError(PipelineError):
    """A stage's input artefact is missing, stale or inconsistent."""


class TrainingError(PipelineError):
    """Training finished but its result cannot be trusted (e.g. the adapter did not move)."""


class ServiceError(PipelineError):
    """A service the command talks to (a Ray cluster, a search engine, a tracking server) cannot be reached,
    or stopped answering mid-run: names the setting, the address and what was tried (pipeline/core/services.py)."""


class TrackingError(ServiceError):
    """The MLflow tracking server cannot be reached."""


class ExportError(PipelineError):
    """An export failed its equivalence gate."""
