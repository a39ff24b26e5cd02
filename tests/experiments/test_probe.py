"""probe: a trained run scored on another dataset against the base model (forgetting check)."""

import json
from pathlib import Path

import yaml

from tests.conftest import cli, walmart_config


def test_labelled_run_probed_on_a_pair_dataset(project, tmp_path):
    wa = walmart_config(tmp_path)
    cfg = ["--config", str(project)]
    assert cli("prepare", *cfg) == 0 and cli("train", *cfg) == 0
    assert cli("probe", *cfg, f"eval.probe_config={wa}") == 0
    out = Path("reports/probes/synthetic-lora-r4-a8-s0--on--walmart_amazon")
    p = json.loads((out / "probe.json").read_text())
    assert p["trained_on"] == "synthetic" and p["probe_dataset"] == "walmart_amazon" and p["probe_kind"] == "pairs"
    assert p["queries"] > 0 and {"recall@1", "recall@10", "ndcg@10", "mrr@10"} <= set(p["adapted"])
    for k, d in p["delta_vs_base"].items():
        assert abs(d["delta"] - (p["adapted"][k] - p["base"][k])) < 1e-4
        assert d["ci"][0] <= d["delta"] <= d["ci"][1]
    assert "| recall@1 |" in (out / "probe.md").read_text()
    # the probe dataset was prepared with this run's base model, beside the run's own data
    assert Path("data/processed/walmart_amazon/manifest.json").exists()
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    run = mlflow.get_run(p["mlflow_run_id"])
    assert "probe.walmart_amazon.recall_at_1" in run.data.metrics
    assert "probe.walmart_amazon.delta.recall_at_1" in run.data.metrics


def test_base_run_probed_on_a_labelled_dataset_changes_nothing(project, tmp_path):
    wa = walmart_config(tmp_path)
    base_wa = ["--config", str(wa), f"model.base={yaml.safe_load(project.read_text())['model']['base']}",
               "train.method=base", "tracking.enabled=false"]
    assert cli("prepare", *base_wa) == 0 and cli("train", *base_wa) == 0
    assert cli("probe", *base_wa, f"eval.probe_config={project}") == 0
    p = json.loads(Path("reports/probes/walmart_amazon-base-s0--on--synthetic/probe.json").read_text())
    assert p["probe_kind"] == "labelled"
    assert "zero_shot_macro_f1" in p["adapted"] and "recall@1" in p["adapted"]
    assert all(d["delta"] == 0 for d in p["delta_vs_base"].values())


def test_probe_needs_another_dataset(project, capsys):
    assert cli("prepare", "--config", str(project)) == 0
    assert cli("train", "--config", str(project), "train.method=base", "tracking.enabled=false") == 0
    assert cli("probe", "--config", str(project), "train.method=base", "tracking.enabled=false") == 2
    assert "eval.probe_config" in capsys.readouterr().err
    assert cli("probe", "--config", str(project), "train.method=base", "tracking.enabled=false",
               f"eval.probe_config={project}") == 2
    assert "own dataset" in capsys.readouterr().err
