"""Train-stage pieces that the end-to-end tests do not single out: the optimiser's parameter groups."""

import pytest
import torch

from pipeline.config import LoraSettings, TrainConfig
from pipeline.model import apply_lora, load_encoder
from pipeline.train import make_optimizer


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
