"""Domain adaptation of bi-encoders: prepare -> train -> embed -> eval -> export, tracked in MLflow."""

__version__ = "0.1.0"
