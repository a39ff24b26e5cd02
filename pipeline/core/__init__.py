"""The core: typed config, errors, artefact layout and manifests, MLflow tracking, run recovery. Imports nothing above it."""
