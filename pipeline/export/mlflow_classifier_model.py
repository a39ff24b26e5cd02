"""MLflow "models from code" entry for the classifier model (see pipeline/export/mlflow_classifier.py)."""

import mlflow

from pipeline.export.mlflow_classifier import Classifier

mlflow.models.set_model(Classifier())
