"""A run with a label head: export ships the head and gates it on every form, serve answers /classify and
the MLflow classifier predicts the same labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.contracts import label_head
from tests.conftest import RUN, cli, run_stages

HEAD = ["train.label_loss_weight=1"]


@pytest.fixture
def exported_with_head(project, monkeypatch) -> tuple[list[str], Path]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    cfg = ["--config", str(project), *HEAD]
    run_stages(*cfg)
    # a few steps of the tiny model may or may not beat the base on validation; this is about the head's forms
    assert cli("export", *cfg, "export.quantize_int8=false", "--force") == 0
    return cfg, Path("exports") / RUN


def _sample_texts() -> list[str]:
    with open("data/processed/synthetic/test.jsonl") as fh:
        return [json.loads(line)["text"] for line in fh][:12] + ["a", "tv"]


def test_export_ships_the_head_gated_on_every_form_and_serve_and_mlflow_classify_with_it(exported_with_head):
    from fastapi.testclient import TestClient

    from pipeline.serve.stage import create_app

    _, out = exported_with_head
    manifest = json.loads((out / "manifest.json").read_text())
    run_head = label_head.load(Path("runs") / RUN / "model")
    head = label_head.load(out / "head")
    assert head.labels == run_head.labels and np.array_equal(head.prototypes, run_head.prototypes)
    assert manifest["forms"]["head"] == {"path": "head", "labels": len(head.labels)}
    numbers = manifest["gate"]["label_head"]["forms"]
    assert set(numbers) == {"merged", "adapter", "onnx"}
    assert all(v["max_prob_diff"] <= 0.01 for v in numbers.values())
    card = (out / "README.md").read_text()
    assert "Label head (" in card and "POST /classify" in card and "MLflow classifier" in card

    texts = _sample_texts()
    from pipeline.contracts.export_folder import load_form
    want = head.top(load_form(out, "merged").encode(texts, "document"), 2)
    with TestClient(create_app(out, "onnx")) as client:
        assert client.get("/health").json()["label_head"] == {"labels": len(head.labels)}
        r = client.post("/classify", json={"texts": texts, "k": 2})
        assert r.status_code == 200
        body = r.json()
        assert body["form"] == "onnx" and len(body["results"]) == len(texts)
        assert body["labels"] == [t[0]["label"] for t in body["results"]]
        for got, ref in zip(body["results"], want):
            assert len(got) == 2 and got[0]["probability"] >= got[1]["probability"]
            assert [g["label"] for g in got] == [w["label"] for w in ref]
            assert np.allclose([g["probability"] for g in got], [w["probability"] for w in ref], atol=0.01)
        assert client.post("/classify", json={"texts": []}).status_code == 422
        assert client.post("/classify", json={"texts": ["x"], "k": 0}).status_code == 422
    _mlflow_classifier_predicts_the_same(out, texts)


def _mlflow_classifier_predicts_the_same(out: Path, texts: list[str]) -> None:
    """The MLflow classifier logged by export, loaded back: the labels and probabilities of the head on the
    merged form (the form it runs)."""
    import mlflow

    from pipeline.contracts.export_folder import load_form

    manifest = json.loads((out / "manifest.json").read_text())
    model = mlflow.pyfunc.load_model(manifest["mlflow"]["classifier"]["model_uri"])
    table = model.predict(texts)
    head = label_head.load(out / "head")
    probs = head.probabilities(load_form(out, "merged").encode(texts, "document"))
    assert list(table["label"]) == list(np.asarray(head.labels)[probs.argmax(1)])
    assert np.allclose(table["probability"], probs.max(1), atol=1e-5)
    top = model.predict(texts[:2], params={"k": 3})
    assert len(top["top"][0]) == 3


def test_a_head_that_classifies_differently_on_a_form_fails_the_gate_and_writes_nothing(project, capsys):
    cfg = ["--config", str(project), *HEAD, "tracking.enabled=false"]
    run_stages(*cfg)
    # a tolerance no float computation meets: the merged form's probabilities cannot match to 1e-12
    assert cli("export", *cfg, "export.head_max_prob_diff=1e-12", "export.onnx=false", "--force") == 2
    err = capsys.readouterr().err
    assert "failed its equivalence gate" in err and "label head on the merged form" in err
    assert not (Path("exports") / RUN).exists()


def test_serve_says_404_where_the_run_trained_no_head(project):
    from fastapi.testclient import TestClient

    from pipeline.serve.stage import create_app

    cfg = ["--config", str(project), "tracking.enabled=false"]
    run_stages(*cfg, stages=("prepare", "train"))
    assert cli("export", *cfg, "export.onnx=false", "--force") == 0
    assert not (Path("exports") / RUN / "head").exists()
    with TestClient(create_app(Path("exports") / RUN, "merged")) as client:
        assert client.get("/health").json()["label_head"] is None
        r = client.post("/classify", json={"texts": ["intel cpu"]})
        assert r.status_code == 404 and "no label head" in r.json()["detail"]
