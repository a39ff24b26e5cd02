"""Encoder backends (pipeline/model/backends.py): every form matches the project's PyTorch encoder, ``auto`` picks a
form that passed the gate and records it, a failing form is never chosen, the ONNX trace is cached, and the
choice reaches the base-embedding cache key and metrics.json."""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.model import backends
from pipeline.model import tokens as encoding
from pipeline.core.config import Config
from pipeline.core.errors import ConfigError
from pipeline.model.interface import Encoder
from tests.conftest import CATEGORIES, cli

TEXTS = [f"{brand} model {i} {'extra words ' * (i % 5)}".strip()
         for i, brand in enumerate(b for bs in CATEGORIES.values() for b in bs)] + ["a", "Ünïcödé café – 4K TV"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tiny_model_dir), device="cpu")
    st.eval()
    return st


def _cfg(tmp_path: Path, backend: str, **embed) -> Config:
    return Config.model_validate({"embed": {"backend": backend, "probe_repeats": 1, **embed},
                                  "runtime": {"num_threads": 1}, "eval": {"batch_size": 4},
                                  "paths": {"cache": str(tmp_path / "cache")}})


def _reference(st) -> np.ndarray:
    return encoding.encode_texts(st, TEXTS, max_seq_length=st.max_seq_length, batch_size=4)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_each_backend_agrees_with_the_project_encoder(tiny, tmp_path, backend):
    encoder, record = backends.select(_cfg(tmp_path, backend), tiny, TEXTS)
    assert encoder.name.startswith(backend) and record["name"] == encoder.name
    out = encoder.encode(TEXTS, "document")
    assert out.shape == (len(TEXTS), tiny.get_embedding_dimension()) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert backends.row_cosines(out, _reference(tiny)).min() >= 0.999
    # input order is kept although batches run longest first
    assert np.allclose(encoder.encode(TEXTS[::-1], "document")[::-1], out, atol=1e-5)
    assert isinstance(encoder, Encoder)  # the one interface (pipeline/model/interface.py)


def test_auto_picks_a_form_that_passed_and_records_the_gate(tiny, tmp_path):
    encoder, record = backends.select(_cfg(tmp_path, "auto"), tiny, TEXTS)
    assert {"torch-fp32", "onnx-fp32"} <= set(record["candidates"])
    chosen = record["candidates"][record["name"]]
    assert record["name"] == encoder.name and chosen["passed"] and chosen["min_cos"] >= record["gate_min_cos"]
    assert all("texts_per_s" in c for c in record["candidates"].values() if c["passed"])
    assert record["requested"] == "auto" and record["probe_texts"] == len(set(TEXTS))
    json.dumps(record)  # it goes into manifests as is


class _Wrong:
    """Instant, and wrong: what a broken fast form (a bad quantisation, a traced-away mask) looks like."""

    name = "onnx-wrong"

    def encode(self, texts, role):
        rng = np.random.default_rng(len(texts))
        x = rng.normal(size=(len(texts), 32)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_form_that_fails_the_gate_is_never_chosen(tiny, tmp_path, monkeypatch):
    real = backends.candidates

    def with_wrong(cfg, *a, **kw):
        return [c for c in real(cfg, *a, **kw) if c.name == "torch-fp32"] + [backends.Candidate("onnx-wrong", _Wrong)]

    monkeypatch.setattr(backends, "candidates", with_wrong)
    encoder, record = backends.select(_cfg(tmp_path, "auto"), tiny, TEXTS)
    assert record["candidates"]["onnx-wrong"]["passed"] is False
    assert encoder.name == record["name"] == "torch-fp32"
    with pytest.raises(ConfigError, match="embed.backend=onnx: no onnx form matches"):
        backends.select(_cfg(tmp_path, "onnx"), tiny, TEXTS)


def test_a_form_that_cannot_be_built_is_recorded_under_auto_and_fatal_when_asked_for(tiny, tmp_path, monkeypatch):
    real = backends.candidates

    def broken():
        raise RuntimeError("unsupported operator in the trace")

    monkeypatch.setattr(backends, "candidates", lambda cfg, *a, **kw: [
        c for c in real(cfg, *a, **kw) if c.name == "torch-fp32"] + [backends.Candidate("onnx-fp32", broken)])
    encoder, record = backends.select(_cfg(tmp_path, "auto"), tiny, TEXTS)
    assert encoder.name == "torch-fp32" and record["candidates"]["onnx-fp32"] == {
        "passed": False, "error": "RuntimeError: unsupported operator in the trace"}
    with pytest.raises(RuntimeError, match="unsupported operator"):
        backends.select(_cfg(tmp_path, "onnx"), tiny, TEXTS)


def test_bf16_weights_are_a_candidate_where_the_cpu_has_bf16(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "cpu_has_bf16", lambda: True)
    encoder, record = backends.select(_cfg(tmp_path, "torch"), tiny, TEXTS)
    bf16 = record["candidates"]["torch-bf16"]
    assert 0 < bf16["min_cos"] <= 1 and bf16["passed"] == (bf16["min_cos"] >= record["gate_min_cos"])
    assert next(tiny.parameters()).dtype.is_floating_point and str(next(tiny.parameters()).dtype) == "torch.float32"
    if encoder.name == "torch-bf16":  # a copy runs in bf16; the caller's model stays fp32
        assert str(next(encoder.model.parameters()).dtype) == "torch.bfloat16"
    # train.precision=fp32 asks for fp32 arithmetic: no bf16 form then
    cfg = _cfg(tmp_path, "torch").model_copy(update={"train": _cfg(tmp_path, "torch").train.model_copy(
        update={"precision": "fp32"})})
    assert "torch-bf16" not in backends.select(cfg, tiny, TEXTS)[1]["candidates"]


def test_the_onnx_trace_is_cached_by_weights(tiny, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "onnx")
    backends.select(cfg, tiny, TEXTS)
    built = list((tmp_path / "cache" / "onnx").iterdir())
    assert len(built) == 1 and (built[0] / backends.ONNX_META).exists()

    def no_trace(*a, **kw):
        raise AssertionError("traced again although the weights did not change")

    monkeypatch.setattr(backends, "export_onnx", no_trace)
    backends.select(cfg, tiny, TEXTS)
    # other weights: another cache entry (and a trace, which is now refused)
    import copy

    import torch

    other = copy.deepcopy(tiny)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    assert backends.weights_fingerprint(other) != backends.weights_fingerprint(tiny)
    with pytest.raises(AssertionError, match="traced again"):
        backends.select(cfg, other, TEXTS)


def test_base_cache_key_changes_with_the_backend(project):
    from pipeline.core.config import load_config
    from pipeline.contracts.identity import base_embeddings_key as base_cache_key

    keys = {b: base_cache_key(load_config(project, [f"embed.backend={b}"]), "prep", 32) for b in ("auto", "torch", "onnx")}
    assert len(set(keys.values())) == 3
    assert base_cache_key(load_config(project, ["embed.gate_min_cos=0.99"]), "prep", 32) != keys["auto"]


def test_metrics_json_carries_the_backend(project):
    cfg = ["--config", str(project), "train.method=base", "embed.backend=onnx"]
    assert cli("prepare", *cfg) == 0 and cli("train", *cfg) == 0 and cli("embed", *cfg) == 0
    emb = json.loads(Path("runs/synthetic-base-s0/embeddings/manifest.json").read_text())
    assert emb["backend"]["name"] == "onnx-fp32" and emb["backend"]["candidates"]["onnx-fp32"]["passed"]
    assert cli("eval", *cfg) == 0
    metrics = json.loads(Path("reports/synthetic-base-s0/metrics.json").read_text())
    assert metrics["backend"] == emb["backend"]


@pytest.mark.slow
def test_bench_encode_measures_the_selected_backend_against_sentence_transformers(project, tmp_path):
    from pipeline.bench.harness import bench_encode
    from pipeline.core.config import load_config

    cfg = load_config(project, ["bench.repeats=1", "bench.lever_ablation=false", "embed.backend=onnx"])
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(TEXTS))
    rows = {r["name"]: r for r in bench_encode(cfg, tmp_path / "work", texts, {}, "cpu")}
    assert set(rows) == {"project auto", "reference fp32"}
    project_row = rows["project auto"]
    assert project_row["backend"] == "onnx-fp32" == project_row["backend_record"]["name"]
    assert project_row["batch_size"] == rows["reference fp32"]["batch_size"] == cfg.bench.encode_batch_size
    assert project_row["speed_ratio_to_reference"] == round(project_row["texts_per_s"] / rows["reference fp32"]["texts_per_s"], 2)
    assert project_row["cosine_to_reference"]["min"] >= 0.999
    assert project_row["real_tokens_per_s"] > 0  # tokens counted without a torch forward to hook


def test_auto_does_not_trace_for_a_job_too_small_to_pay_for_it(tiny, tmp_path, monkeypatch):
    """Issue 22: a few hundred texts on a large base must not be traced. The trace cost is set to what a 110M
    base costs here (about a minute); the tiny model encodes a text in well under a millisecond."""
    def no_trace(*a, **kw):
        raise AssertionError("traced for a job that cannot pay for the trace")

    monkeypatch.setattr(backends, "export_onnx", no_trace)
    monkeypatch.setattr(backends, "estimated_trace_seconds", lambda *a: 60.0)
    encoder, record = backends.select(_cfg(tmp_path, "auto"), tiny, TEXTS, n_texts=1000)
    onnx = record["candidates"]["onnx-fp32"]
    assert onnx["passed"] is False and "more than it could save on 1000 texts" in onnx["skipped"]
    assert onnx["estimated_build_s"] == 60.0 and onnx["best_case_saving_s"] < 60.0
    assert encoder.name == record["name"] != "onnx-fp32" and record["n_texts"] == 1000
    assert not (tmp_path / "cache" / "onnx").exists()
    # a job large enough to repay the trace tries it (here: the trace is refused, so it is recorded as an error)
    _, big = backends.select(_cfg(tmp_path, "auto"), tiny, TEXTS, n_texts=10**9)
    assert "traced for a job" in big["candidates"]["onnx-fp32"]["error"]
    # asked for by name, ONNX is built whatever the job's size
    with pytest.raises(AssertionError, match="traced for a job"):
        backends.select(_cfg(tmp_path, "onnx"), tiny, TEXTS, n_texts=10)


def test_a_cached_trace_costs_nothing_and_the_cost_estimate_learns_from_the_cache(tiny, tmp_path):
    cfg = _cfg(tmp_path, "onnx")
    backends.select(cfg, tiny, TEXTS)
    meta = json.loads(next((tmp_path / "cache" / "onnx").glob(f"*/{backends.ONNX_META}")).read_text())
    assert meta["build"]["seconds"] > 0 and meta["build"]["params"] == sum(p.numel() for p in tiny.parameters())
    rate = meta["build"]["seconds"] / (meta["build"]["params"] / 1e6)
    assert backends.estimated_trace_seconds(tiny, tmp_path / "cache") == pytest.approx(
        rate * meta["build"]["params"] / 1e6)
    onnx = next(c for c in backends.candidates(_cfg(tmp_path, "auto"), tiny, "cpu", 32, 4) if c.name == "onnx-fp32")
    assert onnx.build_seconds == 0.0  # in the cache: no trace to pay for


def test_the_onnx_cache_keeps_to_its_size_bound(tmp_path):
    import os
    import time

    root = tmp_path / "onnx"
    for i, age in enumerate((300, 200, 100)):  # entry 0 used longest ago
        folder = root / f"entry{i}"
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"x" * 2**20)
        (folder / backends.ONNX_META).write_text("{}")
        os.utime(folder / backends.ONNX_META, (time.time() - age,) * 2)
    removed = backends.prune_onnx_cache(root, limit_mb=2.5, keep=root / "entry0")
    assert removed == ["entry1"]  # the oldest is the one just built, so the next oldest goes
    assert sorted(p.name for p in root.iterdir()) == ["entry0", "entry2"]
    assert backends.prune_onnx_cache(root, limit_mb=10) == []
