"""The corpus objective end to end on the tiny model (issue 24): a corpus with no judged query trains, is reported
unverified and is not exported without --force; a run whose trained steps never beat the untrained base keeps the
base and says so; the pseudo-pair counts and the pre-step reach MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from pipeline.core.config import Config
from pipeline.train import selection
from pipeline.train.stage import base_is_candidate
from pipeline.train.tsdae import damage
from tests.conftest import OFF, cli, mlflow_client, run_stages
from tests.test_cli import _fails_cleanly

RUN = "tinybeir-lora-r4-a8-s0"
CORPUS = ["pairs.corpus.methods=[ict,title,crops]", "pairs.corpus.max_pairs=120"]


def _metrics() -> dict:
    return json.loads((Path("reports") / RUN / "metrics.json").read_text())


def test_a_corpus_with_no_judged_query_trains_is_unverified_and_exports_only_with_force(beir_project, capsys):
    shutil.rmtree("beir/qrels")
    Path("beir/queries.jsonl").unlink()
    args = ("--config", str(beir_project), OFF, *CORPUS)
    run_stages(*args)
    m = _metrics()
    assert m["verified"] is False and m["verdict"]["status"] == "unverified" and m["retrieval"] == {}
    assert m["objective"]["name"] == "corpus"
    train = json.loads((Path("runs") / RUN / "model" / "manifest.json").read_text())["train"]
    assert train["steps"] > 0 and train["validation"] is None  # it trained, and nothing chose its step
    assert "**UNVERIFIED**" in (Path("reports") / RUN / "report.md").read_text()
    msg = _fails_cleanly(capsys, "export", *args)
    assert "is unverified" in msg and "--force" in msg
    assert cli("export", *args, "--force") == 0 and (Path("exports") / RUN / "manifest.json").exists()


def test_step_zero_is_a_candidate_and_a_run_that_never_beats_it_keeps_the_base(beir_project, monkeypatch, capsys):
    Path("beir/qrels/train.tsv").unlink()  # no train judgments: the corpus objective, the base a candidate
    values = iter([0.5, 0.4, 0.3, 0.2, 0.1])
    monkeypatch.setattr("pipeline.train.stage._validate", lambda *a: (next(values), {}))  # (score, figures)
    args = ("--config", str(beir_project), *CORPUS, "train.pre_step=tsdae", "train.tsdae.steps=2",
            "train.tsdae.batch_size=4")
    run_stages(*args)
    manifest = json.loads((Path("runs") / RUN / "model" / "manifest.json").read_text())
    v = manifest["train"]["validation"]
    assert manifest["kept"] == "base" and v["best_step"] == 0 and v["kept"] == "base" and v["stopped_early"]
    assert manifest["model"]["method"] == "base" and manifest["model"]["kept_base"] is True
    assert manifest["train"]["pre_step"]["name"] == "tsdae" and manifest["train"]["pre_step"]["steps"] == 2
    m = _metrics()
    assert m["kept"] == "base" and m["verdict"]["validation"]["kept"] == "base"
    assert m["retrieval"] == m["baseline"]["retrieval"]  # the run is the base model
    assert "kept the base model" in (Path("reports") / RUN / "report.md").read_text()
    msg = _fails_cleanly(capsys, "export", *args, "--force")
    assert "kept the untrained base model" in msg
    params = mlflow_client().get_run(m["mlflow_run_id"]).data.params
    assert params["objective"] == "corpus" and params["pre_step"] == "tsdae"
    assert int(params["pseudo_pairs"]) == sum(int(params[f"pseudo_pairs.{k}"]) for k in ("ict", "title", "crops"))


def test_the_base_is_a_candidate_for_the_corpus_objective_only_unless_the_config_says():
    corpus, group = {"objective": {"name": "corpus"}}, {"objective": {"name": "group"}}
    assert base_is_candidate(Config(), corpus) and not base_is_candidate(Config(), group)
    forced = Config.model_validate({"train": {"validation": {"base_is_candidate": True}}})
    assert base_is_candidate(forced, group)


class _V:
    metric = "ndcg@10"
    description = ""


def test_selection_keeps_a_trained_step_only_where_it_beats_the_base():
    vcfg = Config().train.validation
    sel = selection.Selection(_V(), vcfg, base_is_candidate=True)
    sel.record(0, 0.0, 0.30)
    assert sel.kept_base and not sel.record(10, 1.0, 0.29)
    assert sel.record(20, 2.0, 0.31) and not sel.kept_base and sel.best_step == 20
    old = selection.Selection(_V(), vcfg)
    old.record(0, 0.0, 0.30)
    assert old.record(10, 1.0, 0.29) and old.best_step == 10  # other objectives: the base is only a reference


def test_tsdae_damage_deletes_words_and_keeps_one():
    rng = np.random.default_rng(0)
    text = " ".join(f"w{i}" for i in range(1000))
    kept = damage(text, 0.6, rng).split()
    assert 300 < len(kept) < 500 and set(kept) <= set(text.split())
    assert len(damage("one two", 0.999, rng).split()) == 1
