"""Bench: the FLOP model and token counting on hand-checked cases, and a quick-mode run on the tiny model
that must write the report files with every field present and in range (never a timing assertion)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.bench.harness import _parity_blocks, recommend_indexes, seed_item_bootstrap_ci
from pipeline.bench.workers import TokenCounter, encoder_shape, flops, window_stats
from tests.conftest import cli

QUICK = ["bench.train_pairs=48", "bench.warmup_steps=1", "bench.steps=2", "bench.repeats=2", "bench.profile_steps=2",
         "bench.project_precisions=[auto]", "bench.reference_precisions=[fp32]", "bench.encode_texts=40",
         "bench.parity_pairs=48", "bench.parity_classifier_texts=60", "bench.parity_seeds=[0,1]",
         "bench.memory_shapes=[bert-tiny]", "bench.memory_steps=1", "bench.faiss_sizes=[2000,4000]",
         "bench.hnsw_max_n=3000",
         "bench.faiss_queries=50", "bench.matmul_size=128", "eval.bootstrap=50",
         "bench.serve_adapter_counts=[]"]  # the serve part has its own quick test (tests/bench/test_bench_serve.py)


def test_flop_model_matches_hand_count():
    shape = {"dense": 100, "lora": 10, "hidden": 4, "layers": 2}
    # one sequence of 3 tokens: weights 2*100*3 + lora 2*10*3, attention 4*4*2*9
    assert flops(shape, 3, 9) == 600 + 60 + 288
    assert flops(shape, 3, 9, train="full") == 3 * 600 + 3 * 60 + 3 * 288
    assert flops(shape, 3, 9, train="lora") == 2 * 600 + 3 * 60 + 3 * 288


def test_encoder_shape_and_token_counter(tiny_model_dir):
    from pipeline.core.config import LoraSettings
    from pipeline.model.encoder import apply_lora, load_encoder

    st = load_encoder(str(tiny_model_dir))
    shape = encoder_shape(st)
    # 2 layers x (q, k, v, attn-out 32x32 each + ffn 32x64 twice)
    assert shape == {"dense": 2 * (4 * 32 * 32 + 2 * 32 * 64), "lora": 0, "hidden": 32, "layers": 2}
    apply_lora(st, LoraSettings(r=4, alpha=8, target_modules=["query", "value"]))
    assert encoder_shape(st)["lora"] == 2 * 2 * (4 * 32 + 32 * 4)
    assert encoder_shape(st)["dense"] == shape["dense"]

    counter = TokenCounter(st)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    st({"input_ids": torch.ones_like(mask) * 1000, "attention_mask": mask})
    snap = counter.snapshot()
    assert snap == {"real": 5.0, "real_sq": 13.0, "padded": 8.0, "padded_sq": 32.0}
    counter.close()


def test_window_stats_are_per_window_rates():
    shape = {"dense": 10, "lora": 0, "hidden": 1, "layers": 1}
    stamps = [{"time": float(i), "items": 4 * i, "counter": {"real": 6.0 * i, "real_sq": 0.0,
                                                            "padded": 8.0 * i, "padded_sq": 0.0}} for i in range(7)]
    w = window_stats(stamps, warmup=2, steps=2, repeats=2, shape=shape, train=None, unit="pairs")
    assert len(w) == 2
    for row in w:
        assert row["seconds"] == 2.0 and row["pairs_per_s"] == 4.0 and row["real_tokens_per_s"] == 6.0
        assert row["padding_share"] == pytest.approx(0.25)
        assert row["useful_gflops"] == pytest.approx(2 * 10 * 6 / 1e9)


def test_index_recommendation_prefers_exact_search_while_it_is_fast():
    def res(n, flat_ms, rows):
        return {"n": n, "k": 10, "rows": [{"index": "flat", "params": {}, "single_query_ms": flat_ms,
                                            "recall_at_k": 1.0}] + rows}

    ann = [{"index": "hnsw", "params": {"efSearch": 16}, "single_query_ms": 0.2, "recall_at_k": 0.9},
           {"index": "hnsw", "params": {"efSearch": 64}, "single_query_ms": 0.5, "recall_at_k": 0.97},
           {"index": "ivf", "params": {"nprobe": 32}, "single_query_ms": 0.8, "recall_at_k": 0.96}]
    recs = recommend_indexes([res(1_000_000, 40.0, ann), res(100_000, 4.0, ann)], 0.95, 10.0)
    assert [r["n"] for r in recs] == [100_000, 1_000_000]
    assert recs[0]["index"] == "flat" and recs[0]["flat_under_budget_up_to_n"] == 250_000
    assert recs[1]["index"] == "hnsw" and recs[1]["params"] == {"efSearch": 64}
    none_good = recommend_indexes([res(10, 40.0, ann[:1])], 0.95, 10.0)
    assert none_good[0]["index"] == "flat" and "no IVF/HNSW" in none_good[0]["reason"]


def test_synthetic_vectors_have_the_structure_they_claim():
    from pipeline.bench.workers import synthetic_vectors

    rng = np.random.default_rng(0)
    xb, xq = synthetic_vectors(rng, 5000, 200, 384, "clustered", cluster_size=100, chunk=1500)
    assert xb.shape == (5000, 384) and xq.shape == (200, 384) and xb.dtype == xq.dtype == np.float32
    assert np.allclose(np.linalg.norm(xb, axis=1), 1, atol=1e-5) and np.allclose(np.linalg.norm(xq, axis=1), 1, atol=1e-5)
    sims = xq @ xb.T
    top = np.sort(sims, axis=1)[:, ::-1]
    assert 0.85 < np.median(top[:, 0]) < 0.95  # each query sits next to one item
    assert 0.4 < np.median(top[:, 9]) < 0.7  # ... and among its topic's items
    assert abs(np.median(sims)) < 0.05  # unrelated items are about orthogonal
    ub, uq = synthetic_vectors(np.random.default_rng(0), 5000, 200, 384, "uniform")
    assert np.median(np.sort(uq @ ub.T, axis=1)[:, -1]) < 0.3  # no structure: the nearest is barely near
    with pytest.raises(ValueError):
        synthetic_vectors(rng, 10, 2, 4, "lumpy")


@pytest.mark.slow
def test_quick_bench_writes_report_with_sane_fields(project):
    assert cli("prepare", "--config", str(project)) == 0
    assert cli("bench", "--config", str(project), *QUICK) == 0
    outs = sorted(Path("reports/bench").glob("*.json"))
    assert len(outs) == 1
    report = json.loads(outs[0].read_text())
    md = outs[0].with_suffix(".md").read_text()
    assert "## Training" in md and "## Encoding" in md and "## Quality parity" in md and "## FAISS" in md

    peaks = report["peaks"]["cpu"]
    assert peaks["fp32_gflops"] > 0 and peaks["bf16_gflops"] > 0
    train = {r["name"]: r for r in report["train"]}
    assert set(train) == {"project lora auto", "project lora auto levers off", "reference lora fp32",
                          "project full auto"}
    assert train["project lora auto"]["cpu_levers"]["fast_dropout_layers"] > 0
    assert train["project lora auto levers off"]["cpu_levers"] == {}
    for r in train.values():
        assert r["pairs_per_s"] > 0 and len(r["pairs_per_s_runs"]) == 2 and r["real_tokens_per_s"] > 0
        assert 0 <= r["padding_share"] < 1 and r["useful_gflops"] > 0 and r["peak_fraction"] > 0
        assert r["executed_gflops"] >= r["useful_gflops"] and r["peak_rss_mb"] > 100
    # what LoRA saves: weights + gradients + AdamW moments (4 + 12 bytes per trainable weight)
    lora_row, full_row = train["project lora auto"], train["project full auto"]
    assert full_row["train_state_mb"] == round(16 * full_row["total_params"] / 2**20, 1)
    assert lora_row["train_state_mb"] < full_row["train_state_mb"] / 2
    assert report["ratios"]["memory: full fine-tuning / LoRA weights+gradients+optimiser"] > 2
    # the same LoRA on both paths: same number of trainable weights; full trains everything
    assert train["project lora auto"]["trainable_params"] == train["reference lora fp32"]["trainable_params"] > 0
    assert train["project full auto"]["trainable_params"] > 10 * train["project lora auto"]["trainable_params"]

    profiles = {p["name"]: p for p in report["profile"]}
    assert set(profiles) == {"project lora auto", "reference lora fp32"} and "### Profile: project lora auto" in md
    for prof in profiles.values():
        ops = [r["op"] for r in prof["top"]]
        shares = [r["share"] for r in prof["top"]]
        assert ops and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0001
        assert prof["self_ms_per_step_total"] >= sum(r["self_ms_per_step"] for r in prof["top"]) - 0.5
    # a training step is mostly matrix products: they must show among the top operators
    assert any("mm" in op for op in (r["op"] for r in profiles["project lora auto"]["top"]))

    encode = {r["name"]: r for r in report["encode"]}
    assert set(encode) == {"project auto", "project auto levers off", "reference fp32"}
    assert all(r["texts_per_s"] > 0 and r["peak_rss_mb"] > 100 for r in encode.values())
    cos = encode["project auto"]["cosine_to_reference"]
    assert cos["min"] > 0.99  # the same model: bf16 may differ slightly, never change the embedding
    assert {"train: project lora auto / reference lora fp32", "encode: project auto / reference fp32",
            "memory: full fine-tuning / LoRA peak RSS", "levers: project lora auto on / off",
            "levers: project auto on / off"} <= set(report["ratios"])
    assert all(v > 0 for v in report["ratios"].values())
    assert report["encode_cost_per_1m"][0]["hours_per_1m"] > 0

    # memory by model size: LoRA and full fine-tuning on a shape built with random weights
    mem = {r["name"]: r for r in report["memory"]}
    assert set(mem) == {"bert-tiny lora", "bert-tiny full"} and "## Memory: LoRA vs full" in md
    assert mem["bert-tiny full"]["trainable_params"] == mem["bert-tiny full"]["total_params"]
    assert 0 < mem["bert-tiny lora"]["trainable_params"] < mem["bert-tiny full"]["total_params"] / 10
    for r in list(mem.values()) + [lora_row, full_row]:
        assert 0 < r["rss_before_train_mb"] <= r["peak_rss_mb"]
        assert r["train_added_rss_mb"] == pytest.approx(r["peak_rss_mb"] - r["rss_before_train_mb"], abs=0.11)
    assert "memory at bert-tiny: full fine-tuning / LoRA peak RSS" in report["ratios"]

    par = report["parity"]
    assert set(par["scores"]) == {"project", "reference", "base"}
    for s in par["scores"].values():
        for m in ("recall@1", "macro_f1"):
            lo, hi = s[f"{m}_ci"]
            assert 0 <= lo <= s[m] <= hi <= 1
    lo, hi = par["comparison"]["recall@1_diff_ci"]
    assert -1 <= lo <= hi <= 1 and isinstance(par["parity"], bool)
    assert par["training"]["project"]["pairs"] == par["training"]["reference"]["pairs"] == 48
    # one training run per parity seed; the verdict is on their mean difference
    assert par["seeds"] == [0, 1] and [r["seed"] for r in par["runs"]] == [0, 1]
    per_seed = [r["comparison"]["recall@1_diff"] for r in par["runs"]]
    assert par["comparison"]["recall@1_diff_per_seed"] == per_seed
    assert par["comparison"]["recall@1_diff"] == pytest.approx(np.mean(per_seed), abs=1e-4)
    assert "| seed | project recall@1 |" in md

    small, large = report["faiss"]["results"]
    assert small["n"] == 2000 and {r["index"] for r in small["rows"]} == {"flat", "ivf", "hnsw"}
    for res in (small, large):
        assert next(r for r in res["rows"] if r["index"] == "flat")["recall_at_k"] == 1.0
        assert all(0 <= r["recall_at_k"] <= 1 and r["single_query_ms"] > 0 for r in res["rows"])
    # above bench.hnsw_max_n the HNSW build is extrapolated, never reported as measured
    assert {r["index"] for r in large["rows"]} == {"flat", "ivf"} and large["hnsw_skipped"]
    assert large["hnsw_build_s_extrapolated"] > 0 and large["hnsw_extrapolated_from_n"] == 2000
    assert [r["n"] for r in report["faiss"]["recommendation"]] == [2000, 4000]

    if not torch.cuda.is_available():
        assert "no CUDA" in report["gpu"]["skipped"] and "Skipped" in md
    assert not list(Path("cache").glob("bench-*")), "the bench work folder must be removed"


def test_seed_item_bootstrap_carries_the_spread_between_training_seeds():
    rng = np.random.default_rng(0)
    items = rng.normal(0, 0.1, 500)
    # the same per-item noise in every run, shifted by a seed effect: one run's interval is narrow ...
    one = seed_item_bootstrap_ci(lambda k, idx: items[idx].mean(), 1, 500, 400, 0)
    assert one[1] - one[0] < 0.05
    # ... three seeds at -0.3, -0.3 and +0.6 give an interval that covers the seed means' spread
    offsets = np.array([-0.3, -0.3, 0.6])
    lo, hi = seed_item_bootstrap_ci(lambda k, idx: offsets[k] + items[idx].mean(), 3, 500, 400, 0)
    assert lo < -0.25 and hi > 0.25
    # seeds that agree stay as narrow as one run
    lo, hi = seed_item_bootstrap_ci(lambda k, idx: 0.2 + items[idx].mean(), 3, 500, 400, 0)
    assert hi - lo < 0.05 and lo < 0.2 < hi


def test_parity_blocks_average_seeds_and_score_macro_f1_like_scikit_learn():
    from sklearn.metrics import f1_score

    y = np.array(["a", "a", "b", "b", "c", "c"])
    project = [np.array(["a", "a", "b", "b", "c", "a"]), np.array(["a", "b", "b", "b", "c", "c"])]
    reference = [np.array(["a", "a", "b", "c", "c", "c"]), np.array(["a", "a", "b", "b", "c", "c"])]
    hits_p = [np.array([1.0, 1, 0, 1]), np.array([1.0, 0, 0, 1])]
    hits_r = [np.array([1.0, 0, 0, 1]), np.array([1.0, 1, 1, 1])]
    scores, comp = _parity_blocks({"project": hits_p, "reference": hits_r}, {"project": project, "reference": reference},
                                  y, 200, 0)
    assert scores["project"]["recall@1"] == pytest.approx(0.625)
    assert comp["recall@1_diff_per_seed"] == [0.25, -0.5] and comp["recall@1_diff"] == pytest.approx(-0.125)
    expect = [f1_score(y, p, average="macro") - f1_score(y, r, average="macro") for p, r in zip(project, reference)]
    assert comp["macro_f1_diff_per_seed"] == pytest.approx(expect, abs=1e-5)
    assert scores["reference"]["macro_f1"] == pytest.approx(np.mean([f1_score(y, r, average="macro")
                                                                      for r in reference]), abs=1e-5)
    for block in (comp["recall@1_diff_ci"], comp["macro_f1_diff_ci"], scores["project"]["macro_f1_ci"]):
        assert block[0] <= block[1]


def test_reference_trainer_uses_the_same_loraplus_groups_as_the_project(tiny_model_dir, tmp_path):
    import pandas as pd

    from pipeline.bench.workers import RefRun, add_reference_lora, reference_trainer
    from pipeline.core.config import Config
    from pipeline.model.encoder import load_encoder

    pairs = pd.DataFrame({"anchor": [f"title {i}" for i in range(8)], "positive": [f"other {i}" for i in range(8)]})
    for ratio, expected in ((None, [1e-3]), (8, [1e-3, 8e-3])):
        cfg = Config.model_validate({"train": {"method": "lora", "lr": 1e-3, "batch_size": 4,
                                               "lora": {"r": 2, "alpha": 4, "loraplus_lr_ratio": ratio}}})
        st = load_encoder(str(tiny_model_dir))
        add_reference_lora(st, cfg.train.lora)
        trainer = reference_trainer(st, pairs, cfg, RefRun("fp32", torch.device("cpu"), max_steps=1, epochs=1,
                                                           drop_last=True), tmp_path / f"r{ratio}")
        trainer.train()
        lrs = sorted({g["initial_lr"] for g in trainer.optimizer.param_groups if g["params"]})
        assert lrs == pytest.approx(expected)
