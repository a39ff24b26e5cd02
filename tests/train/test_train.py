"""Train-stage pieces that the end-to-end tests do not single out: the optimiser's parameter groups."""

import pytest
import torch

from pipeline.core.config import LoraSettings, TrainConfig
from pipeline.model.encoder import apply_lora, load_encoder
from pipeline.train.loop import make_optimizer


def _lrs_by_kind(optimizer, st_model) -> dict[str, set[float]]:
    names = {id(p): n for n, p in st_model.named_parameters()}
    out: dict[str, set[float]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            kind = "lora_B" if "lora_B" in names[id(p)] else "lora_A" if "lora_A" in names[id(p)] else "other"
            out.setdefault(kind, set()).add(group["lr"])
    return out


def test_plain_lora_optimiser_trains_only_the_adapter_at_one_rate(tiny_model_dir):
    st = load_encoder(str(tiny_model_dir))
    t = TrainConfig(method="lora", lr=1e-3, lora=LoraSettings(r=4, alpha=8))
    apply_lora(st, t.lora)
    opt = make_optimizer(st, t)
    assert _lrs_by_kind(opt, st) == {"lora_A": {1e-3}, "lora_B": {1e-3}}
    n_trainable = sum(p.numel() for p in st.parameters() if p.requires_grad)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_trainable


def test_loraplus_gives_lora_b_ratio_times_the_rate(tiny_model_dir):
    st = load_encoder(str(tiny_model_dir))
    t = TrainConfig(method="lora", lr=1e-3, lora=LoraSettings(r=4, alpha=8, loraplus_lr_ratio=16))
    apply_lora(st, t.lora)
    opt = make_optimizer(st, t)
    lrs = _lrs_by_kind(opt, st)
    assert lrs["lora_A"] == {1e-3} and len(lrs["lora_B"]) == 1 and lrs["lora_B"].pop() == pytest.approx(1.6e-2)
    # every trainable weight is in exactly one group
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in st.parameters() if p.requires_grad)


def test_loraplus_is_ignored_by_full_fine_tuning_and_rejects_ratios_below_one(tiny_model_dir):
    st = load_encoder(str(tiny_model_dir))
    t = TrainConfig(method="full", lr=1e-4, lora=LoraSettings(loraplus_lr_ratio=16))
    opt = make_optimizer(st, t)
    assert {g["lr"] for g in opt.param_groups} == {1e-4}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in st.parameters())
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        LoraSettings(loraplus_lr_ratio=0.5)
    assert isinstance(opt, torch.optim.AdamW)


# --------------------------------------------------------------------------- choosing the step on validation

from pipeline.core.config import ValidationConfig  # noqa: E402
from pipeline.train.selection import Selection, eval_steps  # noqa: E402


def test_selection_keeps_the_best_trained_step_and_counts_patience():
    sel = Selection(object(), ValidationConfig(patience=2, min_delta=0.01))
    assert sel.record(0, 0.0, 0.9) is False and sel.best_step is None  # the base is the reference, never kept
    assert sel.record(10, 1.0, 0.5) is True and sel.best_step == 10
    assert sel.record(20, 2.0, 0.505) is False  # below min_delta: no improvement
    assert not sel.exhausted
    assert sel.record(30, 3.0, 0.7) is True and sel.bad_evals == 0
    sel.record(40, 4.0, 0.6)
    sel.record(50, 5.0, 0.6)
    assert sel.exhausted and sel.best_step == 30
    again = Selection(object(), ValidationConfig(patience=2), sel.state())  # as after a resume
    assert (again.best_step, again.best_value, again.bad_evals, again.curve) == (30, 0.7, 2, sel.curve)


def test_validation_is_scored_at_each_epoch_end_or_every_n_steps_and_at_the_last_step():
    assert eval_steps(25, 10, None) == {10, 20, 25}
    assert eval_steps(25, 10, 4) == {4, 8, 12, 16, 20, 24, 25}


def test_training_keeps_the_best_validation_step_and_stops_when_it_stops_improving(project, monkeypatch):
    """A scorer that peaks at the second evaluation: the run stops after `patience` worse ones, and the
    saved model is the one scored at the peak (its embeddings equal those the scorer saw then)."""
    import json
    from pathlib import Path

    import numpy as np

    from pipeline.model import tokens as encoding
    from pipeline.train import validation
    from pipeline.model.encoder import load_trained
    from tests.conftest import cli

    seen: list[np.ndarray] = []
    values = iter([0.1, 0.3, 0.8, 0.5, 0.4, 0.2, 0.1, 0.0])
    real_load = validation.load

    def fake_load(*a, **kw):
        vs = real_load(*a, **kw)
        vs.scorer = lambda q, d: (seen.append(q.copy()), next(values))[1]
        return vs

    monkeypatch.setattr(validation, "load", fake_load)
    over = ["train.epochs=10", "train.warmup_ratio=0", "train.validation.every_steps=2", "train.validation.patience=2", "run_name=sel"]
    assert cli("prepare", "--config", str(project), *over) == 0
    assert cli("train", "--config", str(project), *over) == 0
    manifest = json.loads(open("runs/sel/model/manifest.json").read())
    v = manifest["train"]["validation"]
    assert [c["step"] for c in v["curve"]] == [0, 2, 4, 6, 8]
    assert (v["best_step"], v["best_value"], v["base_value"], v["stopped_early"]) == (4, 0.8, 0.1, True)
    assert manifest["train"]["steps"] == 8 and manifest["train"]["planned_steps"] > 8
    assert v["metric"] == "recall@1"  # the synthetic corpus has product groups
    st = load_trained(Path("runs/sel/model"))
    vs = real_load(Path("data/processed/synthetic"),
                   json.loads(open("data/processed/synthetic/manifest.json").read()), max_texts=5000, seed=0)
    kept = encoding.encode_ids(st, encoding.tokenize(st, vs.queries, 32))
    assert np.allclose(kept, seen[2], atol=1e-4)  # the peak's weights, not the last step's
    assert not np.allclose(kept, seen[-1], atol=1e-4)
    assert not Path("runs/sel/best").exists()
