"""MLflow "models from code" entry for the adapter model (see pipeline/export/mlflow_adapter.py)."""

import mlflow

from pipeline.export.mlflow_adapter import AdapterEncoder

mlflow.models.set_model(AdapterEncoder())
