"""The exported encoder with its label head as one MLflow model that classifies (runs that trained a head).

MLflow's sentence_transformers flavor returns embeddings only, so the classifier is a pyfunc model ("models
from code", ``pipeline/export/mlflow_classifier_model.py``: nothing is pickled) whose artifacts are the
export's ``merged/`` folder and ``head/`` folder (pipeline/contracts/label_head.py). It classifies with the
merged model, the form the export gate checked the head on. Loading needs this project's package importable.

    model = mlflow.pyfunc.load_model(uri)
    table = model.predict(["some text", ...])   # DataFrame: label, probability (one row per text)
    top = model.predict(texts, params={"k": 3})  # also a "top" column: the k best labels with probabilities
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from pipeline.core.config import Config

MODEL_FILE = Path(__file__).with_name("mlflow_classifier_model.py")
NAME = "classifier"


def _texts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc"):  # a DataFrame (first column) or a Series
        frame = model_input.iloc[:, 0] if getattr(model_input, "ndim", 1) == 2 else model_input
        return [str(t) for t in frame.tolist()]
    return [str(t) for t in model_input]


class Classifier(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: the merged sentence-transformers model and the label head read from the artifacts."""

    def load_context(self, context) -> None:
        from sentence_transformers import SentenceTransformer

        from pipeline.contracts import label_head
        from pipeline.contracts.export_folder import STEncoder

        self.encoder = STEncoder(SentenceTransformer(str(context.artifacts["merged"]), device="cpu"))
        self.head = label_head.load(Path(context.artifacts["head"]))

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        from pipeline.contracts import label_head

        texts = _texts(model_input)
        k = int((params or {}).get("k", 1))
        top = self.head.top(self.encoder.encode(texts, label_head.ROLE), k)
        out = pd.DataFrame({"label": [t[0]["label"] for t in top], "probability": [t[0]["probability"] for t in top]})
        if k > 1:
            out["top"] = [[f"{c['label']}:{c['probability']:.6f}" for c in t] for t in top]
        return out


def register_name(cfg: Config) -> str | None:
    """Registered beside the merged model as ``<export.register_name>-classifier``."""
    return f"{cfg.export.register_name}-classifier" if cfg.export.register_name else None


def log_classifier_model(cfg: Config, run_id: str, merged_dir: Path, head_dir: Path) -> dict:
    """Log the merged model + head as a pyfunc model to MLflow run ``run_id``; returns its URI and registration."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from pipeline.contracts import label_head
    from pipeline.core import tracking

    reqs = [f"{p}=={metadata.version(p)}" for p in ("sentence-transformers", "transformers", "torch", "safetensors")]
    signature = ModelSignature(inputs=Schema([ColSpec("string")]),
                               outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability")]),
                               params=ParamSchema([ParamSpec("k", "long", np.int64(1))]))
    head_meta = label_head.meta(head_dir)
    with tracking.run(cfg, run_name=cfg.resolved_run_name, run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=NAME, python_model=str(MODEL_FILE), artifacts={"merged": str(merged_dir), "head": str(head_dir)},
            pip_requirements=reqs, signature=signature, registered_model_name=register_name(cfg),
            metadata={"labels": len(head_meta["labels"]), "run_name": cfg.resolved_run_name})
    return {"model_uri": info.model_uri, "model_id": getattr(info, "model_id", None),
            "registered_model": register_name(cfg), "registered_version": getattr(info, "registered_model_version", None)}
