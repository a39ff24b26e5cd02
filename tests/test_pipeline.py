"""Smoke run of every stage on the tiny in-code BERT in a temp dir: exact artefacts and manifests."""

import json
from pathlib import Path

import numpy as np

from pipeline.core.config import Config
from tests.conftest import RUN, cli



def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_all_stages_write_exactly_their_artefacts(project):
    cfg = ["--config", str(project)]
    assert cli("prepare", *cfg) == 0
    processed = Path("data/processed/synthetic")
    assert _files(processed) == {"train.jsonl", "val.jsonl", "test.jsonl", "pairs.jsonl", "labels.json",
                                 "manifest.json"}

    assert cli("train", *cfg) == 0
    model = Path("runs") / RUN / "model"
    assert _files(model) == {"manifest.json", "model_info.json", "adapter/adapter_config.json",
                             "adapter/adapter_model.safetensors", "adapter/README.md"}
    assert not (Path("runs") / RUN / "checkpoints").exists()
    tm = json.loads((model / "manifest.json").read_text())
    info = json.loads((model / "model_info.json").read_text())
    assert tm["stage"] == "train" and tm["seed"] == 0 and tm["mlflow_run_id"]
    assert tm["inputs"] == {"prepared_data": json.loads((processed / "manifest.json").read_text())["fingerprint"]}
    assert {"torch", "transformers", "peft", "sentence-transformers"} <= set(tm["versions"])
    assert tm["train"]["lora_b_abs_sum"] > 0 and tm["train"]["probe_cosine_to_base"] < 0.999999
    assert info["method"] == "lora" and info["base_fingerprint"] and Path(info["base_resolved"]).exists()
    assert 0 < info["trainable_params"] < 0.2 * info["total_params"]

    assert cli("embed", *cfg) == 0
    emb = Path("runs") / RUN / "embeddings"
    assert _files(emb) == {"train.npy", "val.npy", "test.npy", "labels.npy", "manifest.json"}
    em = json.loads((emb / "manifest.json").read_text())
    assert em["merge_min_cosine"] >= 0.9999
    test_emb = np.load(emb / "test.npy")
    assert test_emb.dtype == np.float32 and np.allclose(np.linalg.norm(test_emb, axis=1), 1, atol=1e-4)
    base = Path(em["base_dir"])
    assert _files(base) == {"train.npy", "val.npy", "test.npy", "labels.npy", "manifest.json"}
    assert not np.allclose(np.load(base / "test.npy"), test_emb)

    assert cli("eval", *cfg) == 0
    report = Path("reports") / RUN
    assert _files(report) == {"metrics.json", "report.md", "confusion.png", "curve.png"}
    head = json.loads((report / "metrics.json").read_text())["classifier"]["head"]
    assert f"## Per class (test split; adapted: {head}, base: " in (report / "report.md").read_text()
    assert _files(Path("reports/latest")) == _files(report)
    m = json.loads((report / "metrics.json").read_text())
    assert m == json.loads(Path("reports/latest/metrics.json").read_text())
    # the contract's keys, all present
    assert {"run_name", "dataset", "mlflow_run_id", "model", "classification", "retrieval", "baseline", "lexical",
            "train"} <= set(m)
    assert m["run_name"] == RUN and m["mlflow_run_id"] == tm["mlflow_run_id"]
    lora = m["model"]["lora"]
    assert m["model"]["method"] == "lora" and {k: lora[k] for k in ("r", "alpha", "target_modules")} == {
        "r": 4, "alpha": 8.0, "target_modules": ["query", "key", "value"]}
    # added beside the contract's keys: what the qkv preset resolved to on this architecture
    assert (lora["preset"], lora["adapted_modules"], lora["architecture"]) == ("qkv", 6, "bert")
    for block in (m, m["baseline"], m["lexical"]):
        assert {"macro_f1", "accuracy"} <= set(block["classification"])
        assert {"recall@1", "recall@10", "ndcg@10", "mrr@10"} <= set(block["retrieval"])
        for k, v in {**block["classification"], **block["retrieval"]}.items():
            if k.endswith("_C"):  # the chosen regularisation of a classifier head: one of the config's grid
                assert v in Config().eval.classifier_c, (k, v)
            else:  # every metric is a rate
                assert 0 <= v <= 1, (k, v)
    assert "knn_macro_f1" in m["classification"]
    lo, hi = m["ci"]["retrieval"]["recall@1"]
    assert lo <= m["retrieval"]["recall@1"] <= hi
    assert {"seconds", "pairs_per_second", "peak_rss_mb"} <= set(m["train"])
    # throughput is over the optimiser steps alone; the validation scorings are timed apart, inside the total
    t = tm["train"]
    assert t["validation"]["curve"] and t["validation_seconds"] > 0 and t["step_seconds"] > 0
    assert t["step_seconds"] + t["validation_seconds"] <= t["seconds"]
    pairs = sum(1 for _ in open(processed / "pairs.jsonl")) * t["steps"] / t["planned_steps"]  # whole epochs here
    # step_seconds is rounded to 0.01 s: on a tiny run that alone moves the product by pairs_per_second * 0.005
    assert abs(t["pairs_per_second"] * t["step_seconds"] - pairs) <= t["pairs_per_second"] * 0.005 + 0.01 * pairs + 1
    assert 0 < m["train"]["rss_before_train_mb"] <= m["train"]["peak_rss_mb"]
    assert "| base (untrained) |" in (report / "report.md").read_text()

    # MLflow holds the run with params, per-step loss and eval metrics
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    run = mlflow.get_run(m["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lora.r"] == "4" and "data_fingerprint" in run.data.params
    assert "train_loss" in run.data.metrics and "recall_at_1" in run.data.metrics
    assert "base.recall_at_1" in run.data.metrics and "lexical.macro_f1" in run.data.metrics
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
    assert len(history) >= 1


def test_rerun_skips_up_to_date_stages_and_refuses_a_changed_config(project, capsys):
    cfg = ["--config", str(project), "tracking.enabled=false"]
    assert cli("prepare", *cfg) == 0 and cli("train", *cfg) == 0
    model = Path("runs") / RUN / "model" / "manifest.json"
    before = model.stat().st_mtime_ns
    capsys.readouterr()
    assert cli("prepare", *cfg) == 0 and cli("train", *cfg) == 0
    assert model.stat().st_mtime_ns == before
    assert cli("train", *cfg, "train.lr=0.01") == 2
    assert "already exists" in capsys.readouterr().err
    assert model.stat().st_mtime_ns == before
    assert cli("train", *cfg, "train.lr=0.01", "--overwrite") == 0
    assert model.stat().st_mtime_ns != before


def test_full_fine_tuning_and_base_reference(project):
    cfg = ["--config", str(project), "tracking.enabled=false", "eval.lexical=false"]
    assert cli("prepare", *cfg) == 0
    for method, run in (("full", "synthetic-full-s0"), ("base", "synthetic-base-s0")):
        assert cli("train", *cfg, f"train.method={method}") == 0
        assert cli("embed", *cfg, f"train.method={method}") == 0
        assert cli("eval", *cfg, f"train.method={method}") == 0
        m = json.loads((Path("reports") / run / "metrics.json").read_text())
        assert m["model"]["method"] == method
    full = json.loads((Path("reports/synthetic-full-s0/metrics.json")).read_text())
    base = json.loads((Path("reports/synthetic-base-s0/metrics.json")).read_text())
    assert full["model"]["trainable_params"] == full["model"]["total_params"]
    assert base["model"]["trainable_params"] == 0
    # the base run's adapted metrics are the base model's: same embeddings, same numbers
    assert base["retrieval"] == base["baseline"]["retrieval"]
    # ...and its baseline block came from the cache the full run filled: scored once, equal when reused
    assert base["classification"] == base["baseline"]["classification"] == full["baseline"]["classification"]
    assert base["baseline"] == full["baseline"] and base["classifier"]["head"] == base["classifier"]["base_head"]
    assert len(list(Path("cache/base-scores").glob("*.json"))) == 1
    # the cache key hashes the embeddings themselves: changed base embeddings are scored afresh
    base_dir = Path(json.loads(Path("runs/synthetic-base-s0/embeddings/manifest.json").read_text())["base_dir"])
    test_npy = base_dir / "test.npy"
    np.save(test_npy, np.load(test_npy)[:, ::-1].copy())
    assert cli("eval", *cfg, "train.method=full") == 0
    assert len(list(Path("cache/base-scores").glob("*.json"))) == 2
    assert full["retrieval"] != full["baseline"]["retrieval"]
    assert (Path("runs/synthetic-full-s0/model") / "model.safetensors").exists()
