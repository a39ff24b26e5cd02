"""Hard-negative mining: rank window, margin, and the guard that keeps false negatives out."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.prepare import stage as prepare
from pipeline.core.config import load_config
from pipeline.prepare.hard_negatives import Window, choose, mine
from pipeline.contracts.prepared_data import load_pairs, load_split
from tests.conftest import cli


def _choose(scores, ok, pos, rng=None, **window):
    return choose(np.asarray(scores), np.asarray(ok), pos, Window(**window), rng or np.random.default_rng(0))


def test_window_counts_only_guarded_candidates_and_margin_applies():
    scores = [0.95, 0.9, 0.8, 0.7, 0.6]
    assert _choose(scores, [True] * 5, 1.0) == 0
    assert _choose(scores, [False, True, True, True, True], 1.0) == 1
    assert _choose(scores, [False, True, True, True, True], 1.0, range_min=2) == 3  # skips 2 valid ones
    assert _choose(scores, [True] * 5, 1.0, range_min=1, range_max=2) == 1
    assert _choose(scores, [True] * 5, 0.8, relative_margin=0.05) == 3  # <= 0.76
    assert _choose(scores, [True] * 5, 0.5, relative_margin=0.0) is None
    picks = {_choose(scores, [True] * 5, 1.0, sampling="random", rng=np.random.default_rng(s)) for s in range(60)}
    assert picks == {0, 1, 2, 3, 4}


def test_mined_negatives_respect_group_and_label_guard(project):
    cfg = load_config(project, ["pairs.same_label_pairs=0.5", "pairs.hard_negatives.enabled=true",
                                "pairs.hard_negatives.range_min=0", "pairs.hard_negatives.relative_margin=0.0"])
    out = prepare.run(cfg)
    pairs, train = load_pairs(out), load_split(out, "train")
    assert {"negative", "negative_group", "negative_label", "negative_kind"} <= set(pairs.columns)
    has = pairs[pairs["negative"].notna()]
    assert len(has) > 0.5 * len(pairs)
    text_negs = has[has["negative_kind"] == "text"]
    assert set(text_negs["negative"]) <= set(train["text"])  # the pool is the train split only
    assert (text_negs["negative_group"] != text_negs["group"]).all()
    assert (has["negative"] != has["anchor"]).all() and (has["negative"] != has["positive"]).all()
    same_label = has[has["kind"] == "same_label"]
    assert len(same_label) and (same_label["negative_label"] != same_label["label"]).all()
    label = has[has["kind"] == "label"]
    assert len(label) and (label["negative_kind"] == "label").all()
    assert (label["negative_label"] != label["label"]).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hard_negatives"]["with_negative"] == len(has)
    # the negatives change the prepared data: a different fingerprint than without mining
    plain = prepare.run(load_config(project), force=True)
    assert json.loads((plain / "manifest.json").read_text())["fingerprint"] != manifest["fingerprint"]


def test_negatives_are_never_from_the_anchors_group_even_when_closest(tiny_model_dir):
    from pipeline.core.config import Config

    cfg = Config.model_validate({"model": {"base": str(tiny_model_dir)}, "train": {"max_seq_length": 32},
                                 "pairs": {"hard_negatives": {"enabled": True, "relative_margin": 0.0}}})
    pairs = pd.DataFrame({"anchor": ["red apple phone x1"], "positive": ["apple phone x1 red"], "kind": ["group"],
                          "group": ["g1"], "label": [None]})
    # the pool's most similar texts are the same product (group g1); only the last one may be taken
    pool = pd.DataFrame({"text": ["red apple phone x1 new", "apple phone x1", "a garden hose"],
                         "group": ["g1", "g1", "g2"], "label": [None] * 3})
    mined, stats = mine(pairs, pool, cfg)
    assert mined["negative"].tolist() == ["a garden hose"] and mined["negative_group"].tolist() == ["g2"]
    assert stats["with_negative"] == 1


def test_training_uses_the_mined_negatives(project, monkeypatch):
    cfg = ["--config", str(project), "pairs.hard_negatives.enabled=true", "pairs.hard_negatives.range_min=0",
           "tracking.enabled=false"]
    assert cli("prepare", *cfg) == 0
    with_negative = int(load_pairs(Path("data/processed/synthetic"))["negative"].notna().sum())
    assert with_negative > 0
    from pipeline.train import loop as train

    seen = {"rows": 0, "changed": 0}
    loss_fn = train.contrastive_loss_with_negatives

    def spy(a, p, n, **kw):
        # the negatives reach the loss, and they change it (the loss without them differs)
        if n is not None:
            seen["rows"] += len(n)
            seen["changed"] += int(not torch.isclose(loss_fn(a, p, n, **kw), loss_fn(a, p, None, **kw)))
        return loss_fn(a, p, n, **kw)

    monkeypatch.setattr(train, "contrastive_loss_with_negatives", spy)
    assert cli("train", *cfg) == 0
    m = json.loads(Path("runs/synthetic-lora-r4-a8-s0/model/manifest.json").read_text())
    assert m["train"]["lora_b_abs_sum"] > 0
    # each pair with a negative is seen once per epoch; a shortened last epoch can only see fewer
    epochs = math.ceil(load_config(project, cfg[2:]).train.epochs)
    assert 0 < seen["rows"] <= with_negative * epochs and seen["changed"] > 0


def test_mining_reuses_the_base_embeddings_of_the_same_texts(project):
    cfg = ["--config", str(project), "tracking.enabled=false", "eval.lexical=false"]
    for extra in ([], ["pairs.hard_negatives.enabled=true", "run_name=hn"]):
        assert cli("prepare", *cfg, *extra) == 0 and cli("train", *cfg, *extra) == 0
        assert cli("embed", *cfg, *extra) == 0
    plain = json.loads(Path("runs/synthetic-lora-r4-a8-s0/embeddings/manifest.json").read_text())
    mined = json.loads(Path("runs/hn/embeddings/manifest.json").read_text())
    assert plain["base_dir"] == mined["base_dir"]  # same texts, same base model: one cache entry
    assert len(list(Path("cache/embeddings").iterdir())) == 1
