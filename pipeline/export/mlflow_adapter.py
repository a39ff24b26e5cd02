"""The exported LoRA adapter as an MLflow model of its own, beside the merged one (field note 8).

MLflow's sentence_transformers flavor saves whatever ``save()`` writes and knows nothing of adapters, so the
adapter is logged as a pyfunc model ("models from code", ``pipeline/export/mlflow_adapter_model.py``: nothing is
pickled). Its only artifact is the export's ``adapter/`` folder, whose ``base_model.json`` names the base
and its weights hash; loading puts the adapter back on that base through ``pipeline.contracts.export_folder.load_adapter_form``,
which refuses a base whose weights differ. Loading needs this project's package importable.

    model = mlflow.pyfunc.load_model(uri)      # ArtifactError if the base weights changed
    vectors = model.predict(["some text", ...])  # (n, dim) float32, L2-normalised
    st_model = model.unwrap_python_model().model  # the SentenceTransformer with its PeftModel inside
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

import mlflow
from pipeline.core.config import Config

MODEL_FILE = Path(__file__).with_name("mlflow_adapter_model.py")
ARTIFACT = "adapter"
NAME = "adapter"


class AdapterEncoder(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: the adapter on its recorded, fingerprint-checked base, encoded through the export
    contract's adapter form (pipeline/model/interface.py), prompts included; ``params={"role": "query"}``
    embeds queries, the default is documents."""

    def load_context(self, context) -> None:
        from pipeline.contracts.export_folder import adapter_prompts, load_adapter_form
        from pipeline.core.artifacts import read_json
        from pipeline.model.backends import TorchEncoder

        folder = Path(context.artifacts[ARTIFACT])
        self.meta = read_json(folder / "base_model.json")
        self.model = load_adapter_form(folder)
        self.encoder = TorchEncoder(self.model, max_seq_length=int(self.meta["max_seq_length"]), batch_size=64,
                                    used=adapter_prompts(folder), name="adapter")

    def predict(self, context, model_input, params=None) -> np.ndarray:
        if isinstance(model_input, str):
            texts = [model_input]
        elif hasattr(model_input, "iloc"):  # a DataFrame (first column) or a Series
            frame = model_input.iloc[:, 0] if getattr(model_input, "ndim", 1) == 2 else model_input
            texts = [str(t) for t in frame.tolist()]
        else:
            texts = [str(t) for t in model_input]
        return self.encoder.encode(texts, (params or {}).get("role", "document"))


def register_name(cfg: Config) -> str | None:
    """The merged model is registered as ``export.register_name``; the adapter beside it with ``-adapter``,
    so one name's versions are always the same kind of model."""
    return f"{cfg.export.register_name}-adapter" if cfg.export.register_name else None


def log_adapter_model(cfg: Config, run_id: str, adapter_dir: Path, base_meta: dict) -> dict:
    """Log ``adapter_dir`` as a pyfunc model to MLflow run ``run_id``; returns its URI and registration."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from pipeline.core import tracking

    reqs = [f"{p}=={metadata.version(p)}" for p in ("sentence-transformers", "transformers", "torch", "peft")]
    dim = int(base_meta.get("embedding_dim") or -1)
    signature = ModelSignature(inputs=Schema([ColSpec("string")]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]),
                               params=ParamSchema([ParamSpec("role", "string", "document")]))
    with tracking.run(cfg, run_name=cfg.resolved_run_name, run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=NAME, python_model=str(MODEL_FILE), artifacts={ARTIFACT: str(adapter_dir)},
            pip_requirements=reqs, signature=signature, registered_model_name=register_name(cfg),
            metadata={"base": base_meta["base"], "base_fingerprint": base_meta["base_fingerprint"],
                      "revision": base_meta.get("revision"), "run_name": cfg.resolved_run_name})
    return {"model_uri": info.model_uri, "model_id": getattr(info, "model_id", None),
            "registered_model": register_name(cfg), "registered_version": getattr(info, "registered_model_version", None)}
