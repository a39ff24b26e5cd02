"""prepare: leak-free splits, pairs from train only, clear errors on unsplittable data."""

import json

import pandas as pd
import pytest

from pipeline.prepare import stage as prepare
from pipeline.core.config import load_config
from pipeline.core.errors import DataError
from pipeline.contracts.prepared_data import load_pairs, load_split
from tests.conftest import SHARED_DATA, make_corpus


def _splits(folder):
    return {s: load_split(folder, s) for s in ("train", "val", "test")}


def _assert_leak_free(splits):
    for a in splits:
        for b in splits:
            if a < b:
                assert not set(splits[a]["group"]) & set(splits[b]["group"]), f"group in {a} and {b}"
                assert not set(splits[a]["text"]) & set(splits[b]["text"]), f"text in {a} and {b}"


def test_splits_share_no_group_or_text_and_every_label_is_everywhere(project):
    out = prepare.run(load_config(project))
    splits = _splits(out)
    _assert_leak_free(splits)
    labels = set(pd.read_csv("corpus.csv")["category"])
    for s, df in splits.items():
        assert set(df["label"]) == labels, s


def test_pairs_come_from_the_train_split_only(project):
    out = prepare.run(load_config(project))
    splits = _splits(out)
    pairs = load_pairs(out)
    train_texts = set(splits["train"]["text"])
    labels = set(splits["train"]["label"])
    for _, p in pairs.iterrows():
        assert p["anchor"] in train_texts
        assert p["positive"] in train_texts or (p["kind"] == "label" and p["positive"] in labels)
    assert set(pairs["kind"]) == {"group", "label"}
    group_pairs = pairs[pairs["kind"] == "group"]
    assert (group_pairs["anchor"] != group_pairs["positive"]).all()


def test_text_in_two_groups_is_kept_in_one_split_only(project, tmp_path):
    df = make_corpus()
    dup_title = df.iloc[0]["title"]
    # put the same title into every cluster of the first category: it must end up in one split only
    first_cat = df["category"] == df.iloc[0]["category"]
    extra = df[first_cat].drop_duplicates("cluster").assign(title=dup_title)
    pd.concat([df, extra]).to_csv(tmp_path / "corpus.csv", index=False)
    out = prepare.run(load_config(project))
    splits = _splits(out)
    _assert_leak_free(splits)
    manifest = json.loads((out / "manifest.json").read_text())
    dropped = manifest["counts"]["cross_split_text_dropped_val"] + manifest["counts"]["cross_split_text_dropped_test"]
    assert dropped >= 1


def test_manifest_records_sizes_counts_seed_and_input_hash(project):
    out = prepare.run(load_config(project))
    m = json.loads((out / "manifest.json").read_text())
    assert m["seed"] == 0 and m["stage"] == "prepare"
    assert set(m["inputs"]) == {"corpus.csv"} and len(m["inputs"]["corpus.csv"]) == 64
    assert sum(m["sizes"].values()) == m["counts"]["rows_kept"] - m["counts"]["cross_split_text_dropped_val"] \
        - m["counts"]["cross_split_text_dropped_test"]
    assert m["pairs"]["total"] == len(load_pairs(out))
    assert set(m["class_counts"]["test"]) == set(m["labels"])


def test_same_seed_same_split_and_other_seed_differs(project):
    a = _splits(prepare.run(load_config(project)))["test"]["id"].tolist()
    b = _splits(prepare.run(load_config(project), force=True))["test"]["id"].tolist()
    c = _splits(prepare.run(load_config(project, ["seed=1"]), force=True))["test"]["id"].tolist()
    assert a == b and a != c


def test_label_with_too_few_groups_cannot_be_split(project, tmp_path):
    df = make_corpus()
    lonely = pd.DataFrame([{"title": "a singular gadget", "category": "gadgets", "cluster": 999},
                           {"title": "another gadget", "category": "gadgets", "cluster": 998}])
    pd.concat([df, lonely]).to_csv(tmp_path / "corpus.csv", index=False)
    with pytest.raises(DataError, match=r"label 'gadgets' has 2 group\(s\) \(2 record\(s\)\)"):
        prepare.run(load_config(project))
    assert not (tmp_path / "data" / "processed" / "synthetic").exists()


@pytest.mark.skipif(not (SHARED_DATA / "pricerunner").exists(), reason="../shared/data not present")
def test_real_pricerunner_split_is_leak_free(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(__import__("tests.conftest").conftest.REPO / "configs" / "default.yaml",
                      [f"paths.mirror={SHARED_DATA}"])
    out = prepare.run(cfg)
    splits = _splits(out)
    _assert_leak_free(splits)
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["rows_read"] == 35311
    assert m["counts"]["duplicate_rows_dropped"] == 3000
    for s in splits.values():
        assert s["label"].nunique() == 10
    total = sum(m["sizes"].values())
    assert abs(m["sizes"]["test"] / total - 0.15) < 0.02
