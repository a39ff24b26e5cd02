"""The exported adapter is logged to MLflow as a model of its own: it loads back onto its base (the base
weights checked), encodes like the export, and is registered beside the merged model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import RUN, cli, split_texts, trained


def test_adapter_is_an_mlflow_model_that_loads_onto_its_checked_base(project, trained_cache, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    cfg = [a for a in trained(project, trained_cache) if a != "tracking.enabled=false"]
    assert cli("export", *cfg, "export.onnx=false", "export.register_name=tiny") == 0
    out = Path("exports") / RUN
    logged = json.loads((out / "manifest.json").read_text())["mlflow"]
    adapter = logged["adapter"]
    assert adapter["registered_model"] == "tiny-adapter" and adapter["model_uri"] != logged["model_uri"]

    mlflow.set_tracking_uri(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    assert {v.name for v in client.search_model_versions("name='tiny-adapter'")} == {"tiny-adapter"}
    assert {v.name for v in client.search_model_versions("name='tiny'")} == {"tiny"}  # the merged one, as before

    model = mlflow.pyfunc.load_model(adapter["model_uri"])
    texts = split_texts()[:6]
    from pipeline.model.backends import row_cosines
    from pipeline.contracts.export_folder import load_form

    vectors = model.predict(texts)
    assert vectors.shape == (6, 32) and row_cosines(vectors, load_form(out, "merged").encode(texts, "document")).min() >= 0.9999
    assert np.allclose(model.predict(__import__("pandas").DataFrame({"text": texts})), vectors, atol=1e-6)
    assert model.metadata.metadata["base_fingerprint"] == json.loads(
        (out / "adapter" / "base_model.json").read_text())["base_fingerprint"]

    # the same model on a base whose weights changed since: refused, naming both fingerprints
    from pipeline.core.errors import ArtifactError
    from pipeline.model import encoder

    monkeypatch.setattr(encoder, "base_fingerprint", lambda resolved: "feedfacefeedface")  # the one check
    assert model.predict(texts[:2], params={"role": "query"}).shape == (2, 32)
    with pytest.raises(ArtifactError, match="feedfacefeedface"):
        mlflow.pyfunc.load_model(f"models:/tiny-adapter/{adapter['registered_version']}")
