"""Domain adaptation of bi-encoders: prepare -> train -> embed -> eval -> export, tracked in MLflow.

The public API, for a notebook (imported on first use, so ``python -m pipeline`` starts without torch):

    import pipeline
    encoder = pipeline.load_run("pricerunner-lora-r16-a32-s0")    # a run name under runs/, or its folder
    vectors = encoder.encode(["samsung galaxy s21 128gb"], "query")  # float32, rows L2-normalised
    found = pipeline.open_export("exports/pricerunner-lora-r16-a32-s0").search("4k tv", k=5)

``Encoder`` is the interface every form implements (``encode(texts, role)``); ``ExportSearch`` is what
``open_export`` returns (``encode`` and ``search``, as ``make serve`` answers them).
"""

__version__ = "0.1.0"

_API = {
    "load_run": "pipeline.model.runs",
    "Encoder": "pipeline.model.interface",
    "open_export": "pipeline.contracts.export_search",
    "ExportSearch": "pipeline.contracts.export_search",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'pipeline' has no attribute '{name}'")
    import importlib

    module = importlib.import_module(_API[name])
    return getattr(module, name)
