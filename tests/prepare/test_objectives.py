"""The objective chosen from the corpus's shape (pipeline/contracts/pair_kinds.py) and the pairs it builds."""

import pandas as pd
import pytest

from pipeline.core.config import Config
from pipeline.core.errors import DataError
from pipeline.contracts.pair_kinds import AUTO_LABEL_LOSS, label_loss_weight, mask_same_label, resolve, resolve_retrieval
from pipeline.prepare.labelled import build_pairs


def _cfg(**over) -> Config:
    tree = {"data": {"format": "table", "path": "x.csv"}}
    for dotted, value in over.items():
        node = tree
        *head, last = dotted.split("__")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return Config.model_validate(tree)


def test_auto_follows_the_shape_of_the_corpus():
    groups = resolve(_cfg(), has_groups=True, has_labels=True)
    assert (groups.name, groups.mask_same_label, groups.same_label_pairs) == ("group", False, 0.0)
    labels = resolve(_cfg(), has_groups=False, has_labels=True)
    assert (labels.name, labels.mask_same_label, labels.same_label_pairs) == ("label", True, 1.0)
    pairs = resolve(_cfg(data__format="pairs"), has_groups=False, has_labels=False)
    assert pairs.name == "pairs" and not pairs.mask_same_label
    texts = resolve(_cfg(), has_groups=False, has_labels=False)  # texts alone: the corpus objective (issue 24)
    assert texts.name == "corpus" and "neither entity ids nor labels" in texts.reason


def test_a_retrieval_set_trains_on_judged_train_queries_else_on_its_documents():
    assert resolve_retrieval(_cfg(), has_train_judgments=True).name == "pairs"
    assert resolve_retrieval(_cfg(), has_train_judgments=False).name == "corpus"
    withheld = resolve_retrieval(_cfg(pairs__objective="corpus"), has_train_judgments=True)
    assert withheld.name == "corpus" and "withheld" in withheld.reason
    with pytest.raises(DataError, match="needs judged train queries"):
        resolve_retrieval(_cfg(pairs__objective="pairs"), has_train_judgments=False)
    with pytest.raises(DataError, match="needs a labelled corpus"):
        resolve_retrieval(_cfg(pairs__objective="group"), has_train_judgments=True)


def test_explicit_settings_win_over_auto():
    o = resolve(_cfg(pairs__objective="label", pairs__same_label_pairs=0.25, train__mask_same_label=False),
                has_groups=True, has_labels=True)
    assert (o.name, o.same_label_pairs, o.mask_same_label, o.reason) == ("label", 0.25, False, "set in the config")
    with pytest.raises(DataError, match="needs entity ids"):
        resolve(_cfg(pairs__objective="group"), has_groups=False, has_labels=True)
    with pytest.raises(DataError, match="needs a labelled corpus"):
        resolve(_cfg(data__format="pairs", pairs__objective="label"), has_groups=False, has_labels=False)


def test_train_reads_the_mask_from_the_prepared_data_unless_the_config_sets_it():
    prep = {"objective": {"name": "label", "mask_same_label": True}}
    assert mask_same_label(_cfg(), prep) is True
    assert mask_same_label(_cfg(train__mask_same_label=False), prep) is False
    assert mask_same_label(_cfg(), {}) is False  # prepared before objectives existed


def _labels_only() -> pd.DataFrame:
    rows = [{"text": f"{lab} text {i}", "label": lab, "group": f"t:{lab} text {i}"}
            for lab in ("a", "b", "c") for i in range(6)]
    return pd.DataFrame(rows)


def test_the_label_head_weight_follows_the_objective_unless_set_and_needs_trainable_labels():
    for shape, (groups, labels) in {"group": (True, True), "label": (False, True)}.items():
        o = resolve(_cfg(), has_groups=groups, has_labels=labels)
        assert (o.name, o.label_loss_weight) == (shape, AUTO_LABEL_LOSS[shape])
    assert resolve(_cfg(), has_groups=False, has_labels=False).label_loss_weight == 0.0  # nothing to classify
    set_ = resolve(_cfg(train__label_loss_weight=0.5), has_groups=True, has_labels=True)
    assert set_.label_loss_weight == 0.5
    # train reads the prepared folder's weight unless the config sets one; folders from before heads: none
    assert label_loss_weight(_cfg(), {"objective": set_.as_dict()}) == 0.5
    assert label_loss_weight(_cfg(train__label_loss_weight=2.0), {"objective": set_.as_dict()}) == 2.0
    assert label_loss_weight(_cfg(), {}) == 0.0
    with pytest.raises(DataError, match="needs labels"):
        resolve(_cfg(train__label_loss_weight=1.0), has_groups=False, has_labels=False)
    # the corpus objective withholds the labels: a head on them is refused, and auto trains none
    with pytest.raises(DataError, match="withholds them"):
        resolve(_cfg(pairs__objective="corpus", train__label_loss_weight=1.0), has_groups=True, has_labels=True)
    assert resolve(_cfg(pairs__objective="corpus"), has_groups=True, has_labels=True).label_loss_weight == 0.0


def test_label_objective_pairs_two_different_texts_of_one_label_and_no_group_pairs():
    train = _labels_only()
    o = resolve(_cfg(), has_groups=False, has_labels=True)
    pairs = build_pairs(train, _cfg(), 0, o)
    same = pairs[pairs["kind"] == "same_label"]
    assert set(pairs["kind"]) == {"same_label", "label"}
    assert len(same) == len(train)  # share 1.0: every text once as an anchor
    assert (same["anchor"] != same["positive"]).all()
    label_of = dict(zip(train["text"], train["label"]))
    assert (same["positive"].map(label_of) == same["label"]).all()
    assert (same["anchor"].map(label_of) == same["label"]).all()


def test_a_same_label_share_above_one_gives_texts_several_partners():
    train = _labels_only()
    o = resolve(_cfg(pairs__same_label_pairs=2.0, pairs__label_pairs=0.0), has_groups=False, has_labels=True)
    pairs = build_pairs(train, _cfg(pairs__label_pairs=0.0), 0, o)
    assert len(pairs) == 2 * len(train) and pairs["anchor"].value_counts().max() == 2


def test_group_objective_keeps_same_label_texts_of_other_groups_as_negatives():
    train = pd.DataFrame({"text": ["p1 a", "p1 b", "p2 a", "p2 b"], "label": ["x"] * 4,
                          "group": ["1", "1", "2", "2"]})
    o = resolve(_cfg(), has_groups=True, has_labels=True)
    pairs = build_pairs(train, _cfg(), 0, o)
    assert set(pairs["kind"]) <= {"group", "label"} and (pairs["kind"] == "group").sum() == 2


def test_a_labels_only_train_test_corpus_trains_with_no_extra_setting(tmp_path, monkeypatch, tiny_model_dir):
    """The issue's corpus shape: text, category and a train/test split column, no entity ids and no val
    split. With a config holding only its data section (plus the tiny model and test-speed knobs) it
    prepares, picks the label objective, chooses its step on validation macro-F1 and is evaluated."""
    import json
    from pathlib import Path

    import yaml

    from tests.conftest import run_stages

    monkeypatch.chdir(tmp_path)
    rows = [{"text": f"how do i {verb} my {thing} please {i}", "category": verb, "split": "test" if i < 3 else "train"}
            for verb in ("reset", "cancel", "upgrade", "transfer") for thing in ("card", "plan") for i in range(12)]
    pd.DataFrame(rows).to_csv("intents.csv", index=False)
    cfg = {"data": {"name": "intents", "format": "table", "path": "intents.csv", "text_column": "text",
                    "label_column": "category", "group_column": None, "split_column": "split"},
           "model": {"base": str(tiny_model_dir)},
           "train": {"batch_size": 8, "max_seq_length": 32, "epochs": 2}, "runtime": {"num_threads": 1},
           "eval": {"bootstrap": 20}, "tracking": {"experiment": "tests"}}
    Path("c.yaml").write_text(yaml.safe_dump(cfg))
    run_stages("--config", "c.yaml")
    prep = json.loads(Path("data/processed/intents/manifest.json").read_text())
    assert prep["objective"]["name"] == "label" and prep["objective"]["mask_same_label"] is True
    assert prep["split_plan"]["carved"] == ["val"] and prep["pairs"]["same_label"] > 0
    run = "intents-lora-r16-a32-s0"
    trained = json.loads(Path(f"runs/{run}/model/manifest.json").read_text())["train"]
    assert trained["mask_same_label"] is True and trained["validation"]["metric"] == "macro_f1"
    m = json.loads(Path(f"reports/{run}/metrics.json").read_text())
    assert m["objective"]["name"] == "label" and "macro_f1" in m["classification"] and m["retrieval"] == {}
    assert "objective **label**" in Path(f"reports/{run}/report.md").read_text()
