"""The sweep on the tiny in-code BERT: grid and child configs, the MLflow parent/child structure, resume,
failures, and the summary's numbers against each child's metrics.json."""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.search import metrics as M
from pipeline.experiments import sweep
from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from tests.conftest import mlflow_client

SMALL = ["sweep.name=t", "sweep.ranks=[2,4]", "sweep.alpha_multipliers=[2]", "sweep.isolate=false",
         "sweep.full_lr=0.0005", "sweep.quality_metric=retrieval.recall@1", "train.max_steps=8", "train.lr=0.005"]
# The tiny BERT has 2 layers: q,k,v,o on each is 8 adapted modules; its FFN output is layer.N.output.dense.
PRESETS = {"qv": ["query", "value"], "qkvo": ["query", "key", "value", "attention.output.dense"],
           "qkv_ffn": ["query", "key", "value", "intermediate.dense", "layer.0.output.dense", "layer.1.output.dense"]}


@pytest.fixture(autouse=True)
def _own_store(tmp_path, monkeypatch):
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which the pipeline honours: without this,
    # a test would log into the store of the test that ran before it in the same process.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def _cfg(project, *extra):
    return load_config(project, [*SMALL, *extra])


def _count_train_calls(monkeypatch, fail_on: str | None = None):
    from pipeline.train import stage as train

    calls: list[str] = []
    interrupted: list[str] = []
    real = train.run

    def counting(cfg, **kw):
        calls.append(cfg.resolved_run_name)
        if fail_on and cfg.resolved_run_name == fail_on and not interrupted:
            interrupted.append(fail_on)
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while this child trained
        return real(cfg, **kw)

    monkeypatch.setattr(train, "run", counting)
    return calls


def _client():

    return mlflow_client()


def _runs(client):
    exp = client.get_experiment_by_name("tests")
    return client.search_runs([exp.experiment_id])


def test_grid_and_child_configs(project):
    cfg = load_config(project, ["sweep.ranks=[4,2]", "sweep.alpha_multipliers=[1,2]", "sweep.seeds=[0,1]",
                                "sweep.full_lr=0.0001", f"sweep.target_presets={json.dumps(PRESETS)}"])
    points = sweep.grid(cfg)
    # base once; per seed 3 presets x 2 ranks x 2 alphas LoRA points and one full
    assert len(points) == 1 + 2 * (3 * 2 * 2 + 1)
    assert [p.method for p in points[:1]] == ["base"] and points[-1].method == "full" and points[-1].seed == 1
    lora = [p for p in points if p.method == "lora" and p.seed == 0 and p.preset == "qv"]
    assert [(p.r, p.alpha) for p in lora] == [(2, 2.0), (2, 4.0), (4, 4.0), (4, 8.0)]
    child = sweep.child_config(cfg, lora[-1], parent_run_id="abc")
    assert child.train.method == "lora" and child.train.lora.r == 4 and child.train.lora.alpha == 8.0
    assert child.train.lora.target_modules == ["query", "value"]
    assert child.train.lr == cfg.train.lr and child.tracking.parent_run_id == "abc"
    assert child.resolved_run_name == "sweep-default-lora-r4-a8-qv-s0"
    full = sweep.child_config(cfg, points[-1])
    assert full.train.method == "full" and full.train.lr == 1e-4 and full.seed == 1
    assert full.resolved_run_name == "sweep-default-full-s1"
    # every child trains something different, so every train fingerprint differs
    fps = {sweep.child_fingerprint(sweep.child_config(cfg, p), "data")[1] for p in points}
    assert len(fps) == len(points)
    # without presets the config's own target modules form the one preset: a preset name (the default) as
    # itself, resolved per model by the child; attention projections named by their initials
    assert sweep.presets(load_config(project)) == {"qkv": ["qkv"]}
    assert sweep.presets(load_config(project, ["train.lora.target_modules=[query,key,value]"])) == {
        "qkv": ["query", "key", "value"]}
    with pytest.raises(ConfigError, match="duplicate"):
        sweep.grid(load_config(project, ["sweep.ranks=[2,2]"]))


def test_pareto_front_known_points():
    # cost, quality: (1, .5) (2, .7) (3, .6) (4, .9) (4, .8): (3,.6) is beaten by (2,.7); (4,.8) by (4,.9)
    front = sweep.pareto_front(np.array([1, 2, 3, 4, 4]), np.array([.5, .7, .6, .9, .8]))
    assert front.tolist() == [True, True, False, True, False]


def test_sweep_is_one_parent_with_nested_children_in_mlflow(project):
    cfg = _cfg(project)
    out = sweep.run(cfg)
    client = _client()
    runs = _runs(client)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "child"]
    assert len(parents) == 1 and len(runs) == 1 + 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "t"
    assert {c.data.tags["sweep.config"] for c in children} == {"base", "lora-r2-a4-qkv", "lora-r4-a8-qkv", "full"}
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id and c.info.status == "FINISHED"
        m = c.data.metrics
        for key in ("recall_at_1", "recall_at_1.ci_low", "recall_at_1.ci_high", "macro_f1", "macro_f1.ci_low",
                    "trainable_params", "trainable_pct", "adapter_size_mb", "adapted_modules", "train_seconds",
                    "peak_rss_mb"):
            assert key in m, (c.data.tags["sweep.config"], key)
        assert m["recall_at_1.ci_low"] <= m["recall_at_1"] <= m["recall_at_1.ci_high"]
    by = {c.data.tags["sweep.config"]: c for c in children}
    lora = by["lora-r4-a8-qkv"]
    tags = lora.data.tags
    assert (tags["sweep.r"], tags["sweep.alpha"], tags["sweep.targets"]) == ("4", "8", "qkv")
    assert lora.data.params["train.lora.r"] == "4" and lora.data.params["train.lora.alpha"] == "8.0"
    assert lora.data.metrics["adapted_modules"] == 6 and lora.data.metrics["adapter_size_mb"] > 0
    assert by["full"].data.params["train.lr"] == "0.0005" and by["full"].data.params["train.method"] == "full"
    assert by["full"].data.metrics["trainable_pct"] == 100 and by["base"].data.metrics["trainable_params"] == 0
    assert by["base"].data.metrics["adapter_size_mb"] == 0
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.md", "summary.json", "summary.csv", "pareto.png", "sweep_config.yaml"} <= artifacts
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the summary's numbers are the children's metrics.json numbers, and the verdict follows the rule
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parent_run_id"] == parent.info.run_id
    confs = {c["config_id"]: c for c in summary["configurations"]}
    full_m = json.loads((Path("reports") / "sweep-t-full-s0" / "metrics.json").read_text())
    lo, hi = full_m["ci"]["retrieval"]["recall@1"]
    for cid in ("lora-r2-a4-qkv", "lora-r4-a8-qkv"):
        m = json.loads((Path("reports") / f"sweep-t-{cid}-s0" / "metrics.json").read_text())
        s = confs[cid]["metrics"]["retrieval.recall@1"]
        assert (s["mean"], s["ci_low"], s["ci_high"]) == (m["retrieval"]["recall@1"], *m["ci"]["retrieval"]["recall@1"])
        assert confs[cid]["vs_full"]["retrieval.recall@1"] == M.ci_position(s["mean"], (lo, hi))
        assert confs[cid]["trainable_params"] == m["model"]["trainable_params"]
        # the paired difference to full fine-tuning is the difference of the two scores, bracketed by its CI
        d = confs[cid]["paired"]["retrieval.recall@1"]
        assert d["delta"] == pytest.approx(m["retrieval"]["recall@1"] - full_m["retrieval"]["recall@1"], abs=1e-4)
        assert d["ci_low"] <= d["delta"] <= d["ci_high"]
    text = (out / "summary.md").read_text()
    assert "**Rule.**" in text and "inside full fine-tuning's 95% bootstrap CI" in text
    assert "![Pareto plot" in text and "sweep.isolate=false" in text
    for cid in confs:
        assert f"| `{cid}` |" in text
    assert "| TF-IDF (reference) |" in text and "Paired difference to full fine-tuning" in text

    # a second run changes nothing: same parent, no new runs, no training
    sweep.run(cfg)
    runs2 = _runs(client)
    assert len(runs2) == len(runs)
    assert json.loads((out / "summary.json").read_text())["parent_run_id"] == parent.info.run_id


def test_interrupted_sweep_resumes_and_skips_finished_children(project, monkeypatch):
    cfg = _cfg(project, "sweep.ranks=[2]")
    calls = _count_train_calls(monkeypatch, fail_on="sweep-t-full-s0")
    with pytest.raises(KeyboardInterrupt):
        sweep.run(cfg)
    assert calls == ["sweep-t-base-s0", "sweep-t-lora-r2-a4-qkv-s0", "sweep-t-full-s0"]
    client = _client()
    parent = next(r for r in _runs(client) if r.data.tags.get("sweep.role") == "parent")
    assert parent.info.status == "FAILED"

    calls.clear()
    out = sweep.run(cfg)
    assert calls == ["sweep-t-full-s0"]  # the finished two are skipped
    parents = [r for r in _runs(client) if r.data.tags.get("sweep.role") == "parent"]
    assert [p.info.run_id for p in parents] == [parent.info.run_id] and parents[0].info.status == "FINISHED"
    children = [r for r in _runs(client) if r.data.tags.get("sweep.role") == "child"]
    assert len(children) == 3 and all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert len(json.loads((out / "summary.json").read_text())["children"]) == 3

    calls.clear()
    sweep.run(cfg)
    assert calls == []
    # a child whose evaluation went missing is not finished: only it runs again (its training is reused)
    (Path("reports") / "sweep-t-lora-r2-a4-qkv-s0" / "metrics.json").unlink()
    model = Path("runs") / "sweep-t-lora-r2-a4-qkv-s0" / "model" / "manifest.json"
    before = model.stat().st_mtime_ns
    sweep.run(cfg)
    assert calls == ["sweep-t-lora-r2-a4-qkv-s0"] and model.stat().st_mtime_ns == before
    # changed eval settings make every child unfinished again (training is still reused)
    calls.clear()
    sweep.run(load_config(project, [*SMALL, "sweep.ranks=[2]", "eval.bootstrap=40"]))
    assert len(calls) == 3 and model.stat().st_mtime_ns == before


def test_changed_training_settings_need_overwrite(project, monkeypatch):
    cfg = ["sweep.include_full=false", "sweep.include_base=false", "sweep.ranks=[2]"]
    sweep.run(_cfg(project, *cfg))
    first = json.loads(Path("reports/sweep/t/sweep.json").read_text())["parent_run_id"]
    with pytest.raises(ConfigError, match="--overwrite"):
        sweep.run(_cfg(project, *cfg, "train.lr=0.002"))
    calls = _count_train_calls(monkeypatch)
    sweep.run(_cfg(project, *cfg, "train.lr=0.002"), overwrite=True)
    assert calls == ["sweep-t-lora-r2-a4-qkv-s0"]
    tm = json.loads((Path("runs") / "sweep-t-lora-r2-a4-qkv-s0" / "model" / "manifest.json").read_text())
    assert tm["config"]["train"]["lr"] == 0.002
    # the sweep started over under a new parent; the old one is marked, so one parent is current
    roles = {r.info.run_id: r.data.tags.get("sweep.role") for r in _runs(_client())}
    current = json.loads(Path("reports/sweep/t/sweep.json").read_text())["parent_run_id"]
    assert current != first and roles[current] == "parent" and roles[first] == "superseded"
    assert list(roles.values()).count("parent") == 1


def test_seeds_are_pooled_with_their_spread(project):
    out = sweep.run(_cfg(project, "tracking.enabled=false", "sweep.ranks=[2]", "sweep.seeds=[0,1]",
                         "sweep.include_full=false"))
    summary = json.loads((out / "summary.json").read_text())
    confs = {c["config_id"]: c for c in summary["configurations"]}
    assert confs["base"]["seeds"] == [0]  # no training randomness: once
    assert confs["lora-r2-a4-qkv"]["seeds"] == [0, 1]
    values = [json.loads((Path("reports") / f"sweep-t-lora-r2-a4-qkv-s{s}" / "metrics.json").read_text())
              ["retrieval"]["recall@1"] for s in (0, 1)]
    st = confs["lora-r2-a4-qkv"]["metrics"]["retrieval.recall@1"]
    assert st["mean"] == pytest.approx(np.mean(values)) and st["sd"] == pytest.approx(np.std(values, ddof=1))
    assert st["n"] == 2
    text = (out / "summary.md").read_text()
    assert "± is the sample standard deviation over seeds" in text and " ± " in text
    # both seeds trained on the one prepared split
    fps = {json.loads((Path("runs") / f"sweep-t-lora-r2-a4-qkv-s{s}" / "model" / "manifest.json").read_text())["inputs"]
           ["prepared_data"] for s in (0, 1)}
    assert len(fps) == 1


def test_target_presets_and_a_failing_child(project):
    presets = {**PRESETS, "broken": ["no_such_module"]}
    cfg = _cfg(project, "tracking.enabled=false", "sweep.ranks=[2]", "sweep.include_full=false",
               "sweep.include_base=false", f"sweep.target_presets={json.dumps(presets)}")
    with pytest.raises(sweep.SweepError, match="1 of 4 sweep children failed"):
        sweep.run(cfg)
    summary = json.loads(Path("reports/sweep/t/summary.json").read_text())
    confs = {c["config_id"]: c for c in summary["configurations"]}
    # PEFT matches a list entry on the full module name or a "."-suffix: dotted names select exactly
    assert {cid: c["adapted_modules"] for cid, c in confs.items()} == {
        "lora-r2-a4-qv": 4, "lora-r2-a4-qkvo": 8, "lora-r2-a4-qkv_ffn": 10}
    assert confs["lora-r2-a4-qkvo"]["trainable_params"] > confs["lora-r2-a4-qv"]["trainable_params"]
    assert [f["config_id"] for f in summary["failed"]] == ["lora-r2-a4-broken"]
    assert "no_such_module" in summary["failed"][0]["reason"]
    assert "**failed**" in Path("reports/sweep/t/summary.md").read_text()


@pytest.mark.slow
def test_isolated_children_run_in_their_own_processes(project):
    cfg = _cfg(project, "sweep.isolate=true", "sweep.ranks=[2]", "sweep.include_full=false",
               "sweep.include_base=false")
    out = sweep.run(cfg)
    record = json.loads((out / "children" / "sweep-t-lora-r2-a4-qkv-s0.json").read_text())
    assert record["isolated"] is True and record["wall_seconds"] > 0
    assert "train:" in (out / "logs" / "sweep-t-lora-r2-a4-qkv-s0.log").read_text()
    child = next(r for r in _runs(_client()) if r.data.tags.get("sweep.role") == "child")
    parent = next(r for r in _runs(_client()) if r.data.tags.get("sweep.role") == "parent")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "one process per child" in (out / "summary.md").read_text()
    # the child's config file reruns it alone
    assert (out / "children" / "sweep-t-lora-r2-a4-qkv-s0.yaml").exists()


def _kind(module_name: str) -> str:
    for suffix in ("attention.output.dense", "intermediate.dense"):
        if module_name.endswith("." + suffix):
            return suffix
    if module_name.endswith(".output.dense"):
        return "ffn.output.dense"
    return module_name.rsplit(".", 1)[-1]


def test_shipped_target_presets_select_the_intended_minilm_modules():
    """The presets of configs/sweep-targets.yaml on the real MiniLM-L6 (6 layers), counted as PEFT wraps them."""
    from peft.tuners.lora import LoraLayer

    from pipeline.model.encoder import apply_lora, load_encoder

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "sweep-targets.yaml")
    expected = {"qv": {"query", "value"}, "qkv": {"query", "key", "value"},
                "qkvo": {"query", "key", "value", "attention.output.dense"},
                "qkv_ffn": {"query", "key", "value", "intermediate.dense", "ffn.output.dense"}}
    assert set(sweep.presets(cfg)) == set(expected)
    for name, modules in sweep.presets(cfg).items():
        st = load_encoder(cfg.model.base)
        apply_lora(st, cfg.train.lora.model_copy(update={"target_modules": modules}))
        wrapped = [n for n, m in st.named_modules() if isinstance(m, LoraLayer)]
        kinds = {_kind(n) for n in wrapped}
        assert kinds == expected[name], name
        assert len(wrapped) == 6 * len(expected[name]), name
        assert not any("pooler" in n for n in wrapped)


def test_paired_difference_known_cases(project, tmp_path):
    """Identical embeddings differ by exactly 0; an encoder that ranks nothing right is measurably worse."""
    cfg = load_config(project, ["eval.bootstrap=200"])
    groups = np.repeat(np.arange(20), 2)  # 20 products, two test offers each: 40 queries
    processed = Path("data/processed/synthetic")
    processed.mkdir(parents=True)
    with open(processed / "test.jsonl", "w") as fh:
        for i, g in enumerate(groups):
            fh.write(json.dumps({"id": str(i), "text": f"t{i}", "label": "x", "group": str(g)}) + "\n")
    perfect = np.eye(20, dtype=np.float32)[groups]  # same product, same vector
    rng = np.random.default_rng(0)
    shuffled = perfect[rng.permutation(len(groups))]  # each offer sits with a stranger
    rows, configs = [], []
    for cid, method, emb in (("full", "full", perfect), ("same", "lora", perfect), ("bad", "lora", shuffled)):
        folder = tmp_path / cid
        folder.mkdir()
        np.save(folder / "test.npy", emb)
        pq = M.group_retrieval(emb, groups, k=10)
        rows.append({"run": cid, "embeddings_dir": str(folder),
                     "metrics": {f"retrieval.{k}": [float(v.mean()), 0.0, 1.0] for k, v in pq.items()}})
        configs.append({"config_id": cid, "method": method, "runs": [cid]})
    sweep.paired_retrieval_deltas(cfg, configs, rows)
    assert "paired" not in configs[0]
    assert configs[1]["paired"]["retrieval.recall@1"] == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    bad = configs[2]["paired"]["retrieval.recall@1"]
    assert bad["delta"] == pytest.approx(rows[2]["metrics"]["retrieval.recall@1"][0] - 1.0)
    assert bad["ci_high"] < 0
