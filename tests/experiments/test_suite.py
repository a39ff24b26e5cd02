"""make suite over two tiny synthetic corpora (a labelled product table and a query -> positive pair file):
the summary table against each run's metrics.json, the MLflow parent/child structure, a failing corpus,
and a rerun that skips finished corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.experiments import suite
from pipeline.core.config import load_config
from tests.conftest import make_corpus


@pytest.fixture(autouse=True)
def _own_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def _pair_corpus_config(project: Path) -> Path:
    """A query -> positive file: every other title of a product points at its first title."""
    rows = []
    for _, titles in make_corpus(seed=1).groupby("cluster")["title"]:
        titles = list(titles)
        rows += [{"query": t, "positive": titles[0]} for t in titles[1:]]
    pd.DataFrame(rows).to_csv("pairs.csv", index=False)
    tree = yaml.safe_load(project.read_text())
    tree["data"] = {"name": "pairsynth", "format": "pairs", "path": "pairs.csv"}
    path = project.parent / "pairsynth.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _count_train_calls(monkeypatch) -> list[str]:
    from pipeline.train import stage as train

    calls: list[str] = []
    real = train.run

    def counting(cfg, **kw):
        calls.append(cfg.resolved_run_name)
        return real(cfg, **kw)

    monkeypatch.setattr(train, "run", counting)
    return calls


def test_suite_table_mlflow_structure_and_resume(project, monkeypatch):
    import mlflow

    products = project.parent / "products.yaml"
    products.write_text(project.read_text())
    pairs = _pair_corpus_config(project)
    configs = [str(products), str(pairs), "configs/missing.yaml"]
    cfg = load_config(project, ["suite.name=t", f"suite.configs={json.dumps(configs)}",
                                "suite.overrides=[train.max_steps=8,train.lr=0.005]"])
    calls = _count_train_calls(monkeypatch)
    with pytest.raises(suite.SuiteError, match="missing.yaml"):
        suite.run(cfg)
    assert calls == ["suite-t-products", "suite-t-pairsynth"]
    tm = json.loads(Path("runs/suite-t-pairsynth/model/manifest.json").read_text())
    assert tm["train"]["steps"] == 8  # the suite's overrides reach every corpus

    out = Path("reports/suite/t")
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["corpus"]: r for r in summary["corpora"]}
    assert set(rows) == {"products", "pairsynth"} and summary["failed"][0]["config"] == "configs/missing.yaml"
    for name, row in rows.items():
        m = json.loads((Path("reports") / f"suite-t-{name}" / "metrics.json").read_text())
        got = row["models"]["adapted"]["retrieval.recall@1"]
        assert (got["value"], got["ci"]) == (m["retrieval"]["recall@1"], m["ci"]["retrieval"]["recall@1"])
        base = row["models"]["base"]["retrieval.ndcg@10"]
        assert (base["value"], base["ci"]) == (m["baseline"]["retrieval"]["ndcg@10"], m["baseline"]["ci"]["retrieval"]["ndcg@10"])
        assert row["vs_base"] == m["verdict"]["test"]["vs_base"]
        prep = json.loads((Path("data/processed") / row["dataset"] / "manifest.json").read_text())
        assert row["objective"] == prep["objective"]["name"] == {"products": "group", "pairsynth": "pairs"}[name]
        assert row["train_seconds"] == m["train"]["seconds"]
    assert "classification.macro_f1" in rows["products"]["models"]["lexical"]
    assert "classification.macro_f1" not in rows["pairsynth"]["models"]["adapted"]
    text = (out / "summary.md").read_text()
    for line in ("| products (synthetic) | base model |", "|  | TF-IDF |", "|  | adapted (lora) |", "|  | adapted − base |",
                 "| pairsynth (pairsynth) | base model |", "## Failed", "configs/missing.yaml"):
        assert line in text, line
    d = rows["products"]["vs_base"]["retrieval.recall@1"]
    assert f"{d['delta']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] {d['verdict']}" in text

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("tests")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("suite.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("suite.role") == "child"]
    assert len(parents) == 1 and len(runs) == 3 and summary["parent_run_id"] == parents[0].info.run_id
    assert {c.data.tags["suite.corpus"] for c in children} == {"products", "pairsynth"}
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert {c.info.run_id for c in children} == {r["mlflow_run_id"] for r in rows.values()}
    assert {"summary.md", "summary.json"} <= {a.path for a in client.list_artifacts(parents[0].info.run_id)}

    # the table shows the objective the prepare manifest names, read again on a rerun
    manifest = Path("data/processed/pairsynth/manifest.json")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "objective": "query-positive"}))
    # rerun: finished corpora are skipped, same parent, no new MLflow runs
    calls.clear()
    metrics_path = Path("reports/suite-t-products/metrics.json")
    before = metrics_path.stat().st_mtime_ns
    with pytest.raises(suite.SuiteError):
        suite.run(cfg)
    assert calls == [] and metrics_path.stat().st_mtime_ns == before
    assert len(client.search_runs([exp.experiment_id])) == 3
    again = json.loads((out / "summary.json").read_text())
    assert again["parent_run_id"] == summary["parent_run_id"]
    assert {r["corpus"]: r["objective"] for r in again["corpora"]} == {"products": "group", "pairsynth": "query-positive"}
    assert "| query-positive |" in (out / "summary.md").read_text()


def test_a_corpus_objective_set_runs_in_the_suite(beir_project):
    from pathlib import Path as _P

    _P("beir/qrels/train.tsv").unlink()  # documents without train judgments: the corpus objective
    cfg = load_config(beir_project, ["suite.name=c", f"suite.configs={json.dumps([str(beir_project)])}",
                                     "suite.overrides=[train.max_steps=4,pairs.corpus.max_pairs=64,"
                                     "train.validation.base_is_candidate=false]"])
    suite.run(cfg)
    row = json.loads(Path("reports/suite/c/summary.json").read_text())["corpora"][0]
    assert row["objective"] == "corpus" and row["models"]["adapted"]["retrieval.ndcg@10"]["ci"]
    assert "| corpus |" in Path("reports/suite/c/summary.md").read_text()
