"""export: every form written and proven equal, a broken merge refused, peft-free loading in a fresh
process, the same neighbours from each form, the index types, and the MLflow model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import QUIET, REPO, RUN, cli, run_stages, save_trained, split_texts, trained

def test_export_writes_every_form_passes_the_gate_and_logs_an_mlflow_model(project, trained_cache, monkeypatch):
    # mlflow.set_tracking_uri also sets this variable for the whole process; pin it to this project's
    # store and let monkeypatch remove it afterwards, so later tests do not log into this store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    cfg = ["--config", str(project)]
    run_stages(*cfg)
    save_trained(trained_cache)
    # A few steps of the tiny model may or may not beat the base on validation; this test is about the
    # forms, so it exports either way (the refusal has its own test below).
    assert cli("export", *cfg, "--force") == 0

    out = Path("exports") / RUN
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"manifest.json", "README.md", "merged/config.json", "merged/model.safetensors", "merged/modules.json",
            "merged/tokenizer.json", "merged/1_Pooling/config.json", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors", "adapter/base_model.json", "onnx/model.onnx",
            "onnx/model_qint8.onnx", "onnx/tokenizer.json", "onnx/onnx_config.json", "index/index.faiss",
            "index/records.jsonl", "index/index.json"} <= files
    assert not list(Path("exports").glob(".*"))  # no temporary folder left beside it

    # merged weights are plain transformer weights: no LoRA tensors, no PEFT prefixes
    from safetensors import safe_open

    with safe_open(out / "merged" / "model.safetensors", "pt") as fh:
        keys = list(fh.keys())
    assert keys and not [k for k in keys if "lora" in k or k.startswith("base_model.")]

    info = json.loads(Path(f"runs/{RUN}/model/model_info.json").read_text())
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    base_meta = json.loads((out / "adapter" / "base_model.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == info["base"]
    assert base_meta["base_fingerprint"] == info["base_fingerprint"] and base_meta["base_resolved"]

    m = json.loads((out / "manifest.json").read_text())
    gate = m["gate"]
    assert gate["passed"] and gate["reference"] == "unmerged adapter" and gate["sample_size"] == 64
    assert gate["merged_vs_reference_min_cos"] >= 0.9999
    assert gate["onnx_vs_torch_min_cos"] >= 0.999
    assert gate["merged_vs_base_mean_cos"] < 0.999999 and gate["changed_weight_tensors"] > 0
    assert -1 <= gate["onnx_int8_vs_torch_min_cos"] <= gate["onnx_int8_vs_torch_mean_cos"] <= 1.0001
    for form in ("merged", "adapter", "onnx"):
        assert m["neighbours"]["forms"][form]["top1_agreement"] == 1.0
    assert set(m["timing"]) >= {"merge_seconds", "onnx_seconds", "index_build_seconds", "total_seconds"}

    # the index covers every prepared offer, row i <-> records line i
    n_all = sum(len(split_texts(s)) for s in ("train", "val", "test"))
    assert m["index"]["n"] == n_all and m["index"]["type"] == "flat" and m["index"]["corpus"] == "all"
    assert m["index"]["encoder"] == "onnx"  # proven equal to merged by the gate, and faster on CPU
    records = [json.loads(line) for line in (out / "index" / "records.jsonl").open()]
    assert [r["row"] for r in records] == list(range(n_all))
    assert {"id", "text", "label", "group", "split"} <= set(records[0])

    card = (out / "README.md").read_text()
    assert info["base"] in card and "95% bootstrap CI" in card and "| retrieval recall@1 |" in card
    assert "Equivalence gate (passed)" in card and "MLflow" in card

    # the merged model is logged to the training run and loads back with mlflow
    import mlflow

    train_run = json.loads(Path(f"runs/{RUN}/model/manifest.json").read_text())["mlflow_run_id"]
    assert m["mlflow"]["run_id"] == train_run
    mlflow.set_tracking_uri(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    assert mlflow.get_run(train_run).data.tags["exported"] == "true"
    loaded = mlflow.sentence_transformers.load_model(m["mlflow"]["model_uri"])
    from pipeline.contracts.export_folder import load_form

    sample = split_texts()[:5]
    a = loaded.encode(sample, normalize_embeddings=True)
    b = load_form(out, "merged").encode(sample, "document")
    assert np.allclose(a, b, atol=1e-5)

    # a rerun is a no-op; a changed export config needs --overwrite
    before = (out / "manifest.json").stat().st_mtime_ns
    assert cli("export", *cfg) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == before
    assert cli("export", *cfg, "export.neighbour_k=5") == 2
    assert (out / "manifest.json").stat().st_mtime_ns == before


PEFT_FREE = r"""
import json, sys
sys.modules["peft"] = None  # as if peft were not installed: any import of it fails
try:
    import peft  # noqa: F401
    raise SystemExit("peft is importable")
except ImportError:
    pass
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1] + "/merged", device="cpu")
assert type(model[0].model).__module__.startswith("transformers."), type(model[0].model)
from pipeline.export.stage import neighbours_report
queries = json.loads(sys.argv[2])
print(json.dumps(neighbours_report(sys.argv[1], ["merged", "onnx", "onnx_int8"], queries, k=5)))
"""


def _same_neighbours(a: dict, b: dict) -> None:
    """Same top-k ids per query; an order swap is allowed only between (near-)tied scores."""
    for ids_a, ids_b, sc_a, sc_b in zip(a["ids"], b["ids"], a["scores"], b["scores"]):
        assert np.allclose(sc_a, sc_b, atol=1e-4)
        if ids_a != ids_b:
            assert set(ids_a) == set(ids_b)
            assert all(abs(sa - sb) < 1e-4 for sa, sb, x, y in zip(sc_a, sc_b, ids_a, ids_b) if x != y)


def test_merged_and_onnx_load_without_peft_in_a_fresh_process_with_the_adapters_neighbours(project, trained_cache):
    cfg = trained(project, trained_cache)
    assert cli("export", *cfg) == 0
    out = Path("exports") / RUN
    queries = split_texts()[:4] + ["samsung tv", "intel cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", PEFT_FREE, str(out), json.dumps(queries)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])

    from pipeline.export.stage import neighbours_report

    adapter = neighbours_report(out, ["adapter"], queries, k=5)["adapter"]
    _same_neighbours(fresh["merged"], adapter)
    _same_neighbours(fresh["onnx"], adapter)
    # a test text finds itself first, in every exact form
    for form in (fresh["merged"], fresh["onnx"], adapter):
        assert [ids[0] for ids in form["ids"][:4]] == _ids_of(queries[:4])
    assert len(fresh["onnx_int8"]["ids"][0]) == 5  # int8 loads and answers; its accuracy is reported, not gated


def _ids_of(texts: list[str]) -> list[str]:
    by_text = {}
    for split in ("train", "val", "test"):
        for line in open(f"data/processed/synthetic/{split}.jsonl"):
            r = json.loads(line)
            by_text.setdefault(r["text"], r["id"])
    return [by_text[t] for t in texts]


def test_gate_refuses_a_merge_that_silently_returned_the_base(project, trained_cache, monkeypatch, capsys):
    cfg = trained(project, trained_cache)
    from pipeline.export import stage as export
    from pipeline.model.encoder import load_encoder

    real = export.load_trained

    def merge_does_nothing(folder, merge=False, **kw):  # field note 2: the merged model is the base
        if not merge:
            return real(folder, **kw)
        info = json.loads((Path(folder) / "model_info.json").read_text())
        return load_encoder(info["base"], max_seq_length=info["max_seq_length"])

    monkeypatch.setattr(export, "load_trained", merge_does_nothing)
    capsys.readouterr()
    assert cli("export", *cfg) == 2
    err = capsys.readouterr().err
    assert "failed its equivalence gate" in err and "equals the untrained base" in err
    assert not (Path("exports") / RUN).exists()
    assert not list(Path("exports").glob(".*"))


def test_gate_refuses_a_perturbed_merge_and_keeps_the_previous_export(project, trained_cache, monkeypatch):
    cfg = trained(project, trained_cache)
    assert cli("export", *cfg, "export.quantize_int8=false") == 0
    out = Path("exports") / RUN
    good = (out / "manifest.json").read_text()

    import torch

    from pipeline.export import stage as export
    from pipeline.core.config import load_config
    from pipeline.core.errors import ExportError

    real = export.load_trained

    def noisy_merge(folder, merge=False, **kw):
        model = real(folder, merge=merge, **kw)
        if merge:
            torch.manual_seed(1)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "attention.self.value.weight" in name:
                        p.add_(torch.randn_like(p) * p.std())
        return model

    monkeypatch.setattr(export, "load_trained", noisy_merge)
    with pytest.raises(ExportError, match="differs from the unmerged adapter"):
        export.run(load_config(project, [*QUIET, "export.quantize_int8=false"]), overwrite=True)
    assert (out / "manifest.json").read_text() == good  # the previous export is untouched
    assert not list(Path("exports").glob(".*"))


def test_hnsw_index_over_the_test_split_and_ivf_settings(project, trained_cache, capsys):
    cfg = trained(project, trained_cache)
    assert cli("export", *cfg, "export.index_type=hnsw", "export.index_corpus=test", "export.onnx=false",
               "export.hnsw_m=8") == 0
    out = Path("exports") / RUN
    m = json.loads((out / "manifest.json").read_text())
    assert m["forms"]["onnx"] is None and not (out / "onnx").exists() and m["index"]["encoder"] == "merged"
    assert m["index"]["type"] == "hnsw" and m["index"]["factory"] == "HNSW8,Flat"
    test = split_texts()
    assert m["index"]["n"] == len(test)

    from pipeline.contracts.export_folder import SearchIndex, load_form

    index = SearchIndex(out / "index")
    hits = index.search(load_form(out, "merged").encode(test[:5], "document"), k=3)
    assert [h[0]["text"] for h in hits] == test[:5]
    assert all(h[0]["split"] == "test" and h[0]["score"] > 0.999 for h in hits)

    from pipeline.export import stage as export

    capsys.readouterr()
    assert export._main([str(out), "merged", "adapter", "--query", test[0], "-k", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["merged"]["ids"] == printed["adapter"]["ids"] and len(printed["merged"]["ids"][0]) == 2

    from pipeline.core.config import ExportConfig
    from pipeline.contracts.export_folder import build_index

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index, meta = build_index(x, ExportConfig(index_type="ivf", ivf_nprobe=64))
    assert meta["factory"] == "IVF10,Flat" and meta["params"] == {"nlist": 10, "nprobe": 10}
    _, rows = index.search(x[:20], 1)
    assert rows[:, 0].tolist() == list(range(20))  # every list probed: exact


def test_a_model_whose_onnx_trace_fails_ships_its_other_forms_with_the_reason(project, trained_cache, monkeypatch):
    """Issue 22: the ONNX exporter dying inside a model's code (Gemma3's vmap-built mask gave
    ``RuntimeError: unordered_map::at``) must not cost the user the merged model, the adapter and the index.
    Both exporters (TorchScript, then dynamo) are made to fail the way that model did."""
    import torch

    from pipeline.contracts.export_folder import load_form
    from pipeline.core.errors import ArtifactError

    cfg = trained(project, trained_cache)
    calls = []

    def dies(*args, **kwargs):
        calls.append(kwargs.get("dynamo"))
        raise RuntimeError("unordered_map::at")

    monkeypatch.setattr(torch.onnx, "export", dies)
    assert cli("export", *cfg, "--force") == 0
    assert calls == [False, True]  # the TorchScript trace, then the dynamo exporter
    out = Path("exports") / RUN
    m = json.loads((out / "manifest.json").read_text())
    assert m["gate"]["passed"] and m["gate"]["onnx_vs_torch_min_cos"] is None
    assert m["forms"]["onnx"]["left_out"] == ("torchscript: RuntimeError: unordered_map::at; "
                                              "dynamo: RuntimeError: unordered_map::at")
    assert m["forms"]["onnx_int8"] == {"left_out": "no ONNX graph to quantise"}
    assert m["forms"]["merged"] and m["forms"]["adapter"] and m["index"]["encoder"] == "merged"
    assert not (out / "onnx").exists() and (out / "index" / "index.faiss").exists()
    card = (out / "README.md").read_text()
    assert "ONNX: **not included**" in card and "unordered_map::at" in card
    with pytest.raises(ArtifactError, match="has no onnx form \\(left out: torchscript: RuntimeError"):
        load_form(out, "onnx")
    texts = split_texts()[:4]
    a, b = load_form(out, "merged").encode(texts, "query"), load_form(out, "adapter").encode(texts, "query")
    assert np.min(np.sum(a * b, axis=1)) >= 0.9999


def test_full_fine_tuned_run_exports_without_adapter_and_base_reference_is_refused(project, trained_cache, capsys):
    cfg = trained(project, trained_cache, "full")
    assert cli("export", *cfg, "export.quantize_int8=false") == 0
    m = json.loads((Path("exports") / "synthetic-full-s0" / "manifest.json").read_text())
    assert m["forms"]["adapter"] is None and m["gate"]["reference"] == "trained full model"
    assert m["gate"]["merged_vs_reference_min_cos"] >= 0.9999 and m["gate"]["onnx_vs_torch_min_cos"] >= 0.999
    assert "adapter" not in m["neighbours"]["forms"]

    base_cfg = ["--config", str(project), *QUIET, "train.method=base"]
    assert cli("train", *base_cfg) == 0
    capsys.readouterr()
    assert cli("export", *base_cfg) == 2
    assert "nothing trained to export" in capsys.readouterr().err


def _fake_metrics(run: str, fingerprint: str, validation: dict | None) -> Path:
    path = Path("reports") / run / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"run_name": run, "model_fingerprint": fingerprint}
    if validation is not None:
        payload["verdict"] = {"test": {"vs_base": {}}, "validation": validation}
    path.write_text(json.dumps(payload))
    return path


def test_export_refuses_a_run_not_better_than_the_base_on_validation(project, trained_cache, capsys):
    from pipeline.export import stage as export

    cfg = trained(project, trained_cache)
    fp = json.loads((Path("runs") / RUN / "model" / "manifest.json").read_text())["fingerprint"]
    worse = {"metric": "recall@1", "adapted": 0.41, "base": 0.45, "better": False, "source": "eval (validation split)"}
    path = _fake_metrics(RUN, fp, worse)
    capsys.readouterr()
    assert cli("export", *cfg) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not better than the base model" in err
    assert "recall@1 0.4100" in err and "0.4500" in err and "--force" in err
    assert not Path("exports").exists()
    # --force passes the check (checked at the function: a full export is the test above)
    export.check_verdict(RUN, path, fp, force=True)
    # nothing to refuse: better, nothing claimed, no verdict (eval from before verdicts), another model's eval
    for validation, model_fp in (({**worse, "better": True}, fp), ({**worse, "better": None}, fp), (None, fp),
                                 (worse, "another-model")):
        export.check_verdict(RUN, _fake_metrics(RUN, model_fp, validation), fp, force=False)
    export.check_verdict(RUN, Path("reports") / "nothing-here" / "metrics.json", fp, force=False)
