"""Never worse than the base without saying so: the verdict block of metrics.json, the opening of
report.md, the validation rule with its warning, the curve from the train manifest, and export's refusal."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluate import verdicts as E
from pipeline.evaluate import report
from tests.conftest import RUN, cli, mlflow_client, run_stages

WA_RUN = "walmart_amazon-lora-r4-a8-s0"


def _metrics(run: str) -> dict:
    return json.loads((Path("reports") / run / "metrics.json").read_text())


def _add_curve(run: str, metric: str, values: list[float]) -> dict:
    """Write a validation curve of the agreed schema into the run's train manifest, as the train stage
    will: step 0 is the untrained base; best is the highest value."""
    path = Path("runs") / run / "model" / "manifest.json"
    manifest = json.loads(path.read_text())
    best = int(np.argmax(values))
    curve = {"metric": metric, "split": "val",
             "curve": [{"step": 10 * i, "epoch": i / 2, "value": v} for i, v in enumerate(values)],
             "best_step": 10 * best, "best_value": values[best], "base_value": values[0],
             "stopped_early": True, "patience": 2}
    manifest["train"]["validation"] = curve
    path.write_text(json.dumps(manifest))
    return curve


def test_verdicts_follow_the_paired_differences_and_open_the_report(project):
    cfg = ["--config", str(project)]
    run_stages(*cfg)
    m = _metrics(RUN)
    v = m["verdict"]
    assert set(v["test"]) == {"vs_base", "vs_lexical"}
    for ref, block in (("vs_base", m["baseline"]), ("vs_lexical", m["lexical"])):
        assert set(v["test"][ref]) == {"classification.macro_f1", "retrieval.recall@1", "retrieval.ndcg@10"}
        for key, d in v["test"][ref].items():
            kind, metric = key.split(".", 1)
            # the paired difference is the difference of the two reported scores on the same items
            assert d["delta"] == pytest.approx(m[kind][metric] - block[kind][metric], abs=2e-5)
            lo, hi = d["ci"]
            assert lo <= d["delta"] + 1e-9 and d["delta"] <= hi + 1e-9
            assert d["verdict"] == ("better" if lo > 0 else "worse" if hi < 0 else "no measurable difference")
    val = v["validation"]
    # the rule judges the metric training chose its step on (same-group recall@1 for a corpus with groups),
    # with eval's validation figures for both models
    trained_on = json.loads((Path("runs") / RUN / "model" / "manifest.json").read_text())["train"]["validation"]
    assert val["metric"] == trained_on["metric"] == "recall@1" and val["source"].startswith("eval")
    assert val["adapted"] == m["validation"]["adapted"]["retrieval"]["recall@1"]
    assert val["base"] == m["validation"]["base"]["retrieval"]["recall@1"]
    assert val["better"] == (val["adapted"] > val["base"])
    md = (Path("reports") / RUN / "report.md").read_text()
    assert md.startswith(f"# {RUN}\n\n## Verdict\n")
    assert "| macro-F1 |" in md and "| recall@1 |" in md and "vs TF-IDF" in md


def test_a_model_worse_than_the_base_is_called_worse_warned_about_and_not_exported(project, caplog):
    cfg = ["--config", str(project)]
    run_stages(*cfg, stages=("prepare", "train", "embed"))
    # Replace the adapted embeddings by random unit vectors: a model that learned nothing useful.
    emb = Path(json.loads((Path("runs") / RUN / "embeddings" / "manifest.json").read_text())["adapted_dir"])
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        x = rng.standard_normal(np.load(emb / f"{split}.npy").shape).astype(np.float32)
        np.save(emb / f"{split}.npy", x / np.linalg.norm(x, axis=1, keepdims=True))
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluate.verdicts"):
        assert cli("eval", *cfg) == 0
    m = _metrics(RUN)
    assert m["verdict"]["test"]["vs_base"]["retrieval.recall@1"]["verdict"] == "worse"
    assert m["verdict"]["test"]["vs_base"]["classification.macro_f1"]["verdict"] == "worse"
    val = m["verdict"]["validation"]
    assert val["better"] is False and val["adapted"] < val["base"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("NOT better than the base model on validation" in w and f"{val['adapted']:.4f}" in w for w in warnings)
    md = (Path("reports") / RUN / "report.md").read_text()
    assert "**worse**" in md.split("Dataset **")[0] and "WARNING: not better than the base model" in md
    assert cli("export", *cfg) == 2 and not Path("exports").exists()


def test_pair_dataset_verdict_and_the_training_curve_as_validation_source(wa_project, caplog):
    cfg = ["--config", str(wa_project)]
    run_stages(*cfg)
    m = _metrics(WA_RUN)
    assert m["classification"] == {} and "classification.macro_f1" not in m["verdict"]["test"]["vs_base"]
    assert set(m["verdict"]["test"]["vs_lexical"]) == {"retrieval.recall@1", "retrieval.ndcg@10"}
    d = m["verdict"]["test"]["vs_base"]["retrieval.recall@1"]
    assert d == m["delta_vs_base"]["retrieval"]["recall@1"]  # one computation, two places
    # the val queries, embedded by both models, are judged against the whole gallery
    val = m["verdict"]["validation"]
    assert (val["metric"], val["source"]) == ("recall@1", "eval (validation split)")
    assert (val["adapted"], val["base"]) == (m["validation"]["adapted"]["retrieval"]["recall@1"],
                                             m["validation"]["base"]["retrieval"]["recall@1"])
    assert (Path("reports") / WA_RUN / "curve.png").exists()  # the real training curve

    # without embedded val queries the train stage's curve is the source: here its best never beat step 0
    emb = json.loads((Path("runs") / WA_RUN / "embeddings" / "manifest.json").read_text())
    for key in ("adapted_dir", "base_dir"):
        (Path(emb[key]) / "val_queries.npy").unlink()
    curve = _add_curve(WA_RUN, "recall@1", [0.40, 0.35, 0.38, 0.31])
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluate.verdicts"):
        assert cli("eval", *cfg) == 0
    val = _metrics(WA_RUN)["verdict"]["validation"]
    assert val == {"metric": "recall@1", "adapted": 0.40, "base": 0.40, "better": False,
                   "source": "train manifest (validation curve)", "best_step": curve["best_step"]}
    assert any("NOT better" in r.getMessage() for r in caplog.records)
    out = Path("reports") / WA_RUN
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![validation curve](curve.png)" in (out / "report.md").read_text()

    client = mlflow_client()
    run_id = _metrics(WA_RUN)["mlflow_run_id"]
    assert "report/curve.png" in {a.path for a in client.list_artifacts(run_id, "report")}
    tags = client.get_run(run_id).data.tags
    assert tags["verdict.validation.better"] == "no" and tags["verdict.vs_base.recall_at_1"] == d["verdict"]
    assert cli("export", *cfg) == 2

    _add_curve(WA_RUN, "recall@1", [0.40, 0.52, 0.55, 0.50])
    assert cli("eval", *cfg) == 0
    val = _metrics(WA_RUN)["verdict"]["validation"]
    assert val["better"] is True and (val["adapted"], val["base"], val["best_step"]) == (0.55, 0.40, 20)

    # neither: nothing is claimed, and export keeps its behaviour
    manifest_path = Path("runs") / WA_RUN / "model" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["train"]["validation"]
    manifest_path.write_text(json.dumps(manifest))
    assert cli("eval", *cfg) == 0
    m = _metrics(WA_RUN)
    assert m["verdict"]["validation"]["better"] is None and m["verdict"]["validation"]["source"] == "none"
    assert "Validation: nothing claimed" in (Path("reports") / WA_RUN / "report.md").read_text()
    assert not (Path("reports") / WA_RUN / "curve.png").exists()


def test_validation_rule_sources_in_order():
    curve = {"metric": "recall@1", "best_value": 0.6, "base_value": 0.5, "best_step": 30, "curve": [{}]}
    figures = {"macro_f1": (0.90, 0.91), "recall@1": (0.70, 0.60)}
    # eval's own validation figures first, on the metric training validated on
    v = E.validation_verdict("lora", figures, curve)
    assert (v["metric"], v["adapted"], v["base"], v["better"]) == ("recall@1", 0.7, 0.6, True)
    # without a curve: macro-F1 where there are labels (strictly better is required)
    v = E.validation_verdict("lora", figures, None)
    assert (v["metric"], v["better"], v["source"]) == ("macro_f1", False, "eval (validation split)")
    assert E.validation_verdict("lora", {"macro_f1": (0.9, 0.9)}, None)["better"] is False
    # no eval figures: the curve's best against its step-0 (base) value
    v = E.validation_verdict("full", {}, curve)
    assert (v["adapted"], v["base"], v["better"], v["best_step"]) == (0.6, 0.5, True, 30)
    assert v["source"].startswith("train manifest")
    for method, figs, c in (("lora", {}, None), ("base", figures, curve)):
        v = E.validation_verdict(method, figs, c)
        assert v["better"] is None and v["source"] == "none" and v["note"]
    assert E.train_curve({"train": {}}) is None and E.train_curve({}) is None
    assert E.train_curve({"train": {"validation": curve}}) is curve


def test_report_opening_words(tmp_path):
    verdict = {"test": {"vs_base": {"retrieval.recall@1": {"delta": -0.1, "ci": [-0.2, -0.05], "verdict": "worse"}},
                        "vs_lexical": {"retrieval.recall@1": {"delta": 0.01, "ci": [-0.02, 0.03],
                                                              "verdict": "no measurable difference"}}},
               "validation": {"metric": "recall@1", "adapted": 0.5, "base": 0.6, "better": False, "source": "eval"}}
    text = "\n".join(report.verdict_lines(verdict))
    assert "| recall@1 | **worse**: -0.100 [-0.200, -0.050] | no measurable difference: +0.010 [-0.020, +0.030] |" in text
    assert "WARNING: not better than the base model on validation" in text and "0.5000" in text
    report.curve_png({"metric": "recall@1", "curve": [{"step": 0, "value": 0.3}, {"step": 5, "value": 0.4}],
                      "best_step": 5, "best_value": 0.4, "base_value": 0.3}, tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
