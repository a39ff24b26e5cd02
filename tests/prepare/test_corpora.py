"""A user's own corpus needs only a YAML file: the shipped template, filled in, trains and evaluates."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.prepare import stage as prepare
from pipeline.core.config import load_config
from pipeline.contracts.prepared_data import load_split
from tests.conftest import REPO, make_corpus, run_stages


def _own_corpus() -> pd.DataFrame:
    """The synthetic offers under column names no shipped reader knows, plus a column to ignore."""
    df = make_corpus().rename(columns={"title": "Offer Name", "category": "dept", "cluster": "sku_family"})
    df["price_eur"] = range(len(df))
    return df


def _from_template(tiny_model_dir: Path, data: dict, **sections) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "template.yaml").read_text())
    cfg["model"]["base"] = str(tiny_model_dir)
    cfg["data"].update(data)
    cfg.setdefault("train", {}).update({"batch_size": 8, "epochs": 1, "lr": 1e-3, "max_seq_length": 32, "lora": {"r": 4, "alpha": 8},
                         "checkpoint_every": 50})
    cfg.setdefault("eval", {}).update({"bootstrap": 50})
    cfg["tracking"] = {"experiment": "tests"}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


def test_template_documents_every_data_key():
    text = (REPO / "configs" / "template.yaml").read_text()
    from pipeline.core.config import DataConfig

    for key in DataConfig.model_fields:
        assert f"  {key}:" in text, key
    assert load_config(REPO / "configs" / "template.yaml").data.format == "table"


def test_new_csv_corpus_with_other_column_names_trains_and_evaluates(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    _own_corpus().to_csv("offers.csv", index=False)
    cfg = _from_template(tiny_model_dir, {"name": "my_offers", "path": "offers.csv", "text_column": "Offer Name",
                                          "label_column": "dept", "group_column": "sku_family",
                                          "split": {"train": 0.6, "val": 0.2, "test": 0.2}})
    Path("my.yaml").write_text(yaml.safe_dump(cfg))
    run_stages("--config", "my.yaml")
    m = json.loads(Path("reports/my_offers-lora-r4-a8-s0/metrics.json").read_text())
    assert m["dataset"] == "my_offers"
    for block in (m, m["baseline"]):
        assert {"macro_f1", "accuracy", "knn_macro_f1", "zero_shot_macro_f1"} <= set(block["classification"])
        assert {"recall@1", "recall@10", "ndcg@10", "mrr@10"} <= set(block["retrieval"])
    assert m["test_items"] == len(load_split(Path("data/processed/my_offers"), "test"))
    assert set(load_split(Path("data/processed/my_offers"), "test")["label"]) == set(_own_corpus()["dept"])


def test_given_splits_and_no_group_column_leave_retrieval_out(tmp_path, monkeypatch, tiny_model_dir):
    """JSONL with its own split column and no entity column: classification only, retrieval absent."""
    monkeypatch.chdir(tmp_path)
    df = _own_corpus().drop_duplicates("Offer Name")
    df["fold"] = ["train", "train", "validation", "test", "train"] * (len(df) // 5) + ["train"] * (len(df) % 5)
    df.drop(columns=["sku_family"]).to_json("offers.jsonl", orient="records", lines=True)
    cfg = _from_template(tiny_model_dir, {"name": "jsonl_offers", "path": "offers.jsonl", "text_column": "Offer Name",
                                          "label_column": "dept", "group_column": None, "split_column": "fold"},
                         train={"epochs": 2, "lr": 3e-3}, pairs={"label_pairs": 1.0})
    Path("my.yaml").write_text(yaml.safe_dump(cfg))
    run_stages("--config", "my.yaml")
    sizes = json.loads(Path("data/processed/jsonl_offers/manifest.json").read_text())["sizes"]
    assert sizes == {"train": int((df["fold"] == "train").sum()), "val": int((df["fold"] == "validation").sum()),
                     "test": int((df["fold"] == "test").sum())}
    m = json.loads(Path("reports/jsonl_offers-lora-r4-a8-s0/metrics.json").read_text())
    assert "macro_f1" in m["classification"] and m["retrieval"] == {} and m["baseline"]["retrieval"] == {}


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl", "parquet"])
def test_every_file_type_gives_the_same_split(tmp_path, monkeypatch, suffix):
    monkeypatch.chdir(tmp_path)
    df = _own_corpus()
    write = {"csv": lambda p: df.to_csv(p, index=False), "tsv": lambda p: df.to_csv(p, sep="\t", index=False),
             "jsonl": lambda p: df.to_json(p, orient="records", lines=True),
             "parquet": lambda p: df.to_parquet(p, index=False)}
    write[suffix](f"offers.{suffix}")
    df.to_csv("reference.csv", index=False)
    data = {"format": "table", "text_column": "Offer Name", "label_column": "dept", "group_column": "sku_family"}
    cfg = load_config(REPO / "configs" / "template.yaml",
                      [f"data.{k}={v}" for k, v in data.items()] + [f"data.path=offers.{suffix}", "data.name=a"])
    ref = load_config(REPO / "configs" / "template.yaml",
                      [f"data.{k}={v}" for k, v in data.items()] + ["data.path=reference.csv", "data.name=b"])
    got = load_split(prepare.run(cfg), "test")
    want = load_split(prepare.run(ref), "test")
    assert got["text"].tolist() == want["text"].tolist() and len(got) > 0


def _pair_rows() -> pd.DataFrame:
    """query -> positive rows from the synthetic offers (first title of a cluster -> each other title), with
    a given negative from another cluster of the same category."""
    df = make_corpus(n_clusters_per_brand=4)
    rows = []
    clusters = list(df.groupby("cluster"))
    for i, (_, members) in enumerate(clusters):
        titles = members["title"].tolist()
        other = clusters[(i + 1) % len(clusters)][1]["title"].iloc[0]
        for t in titles[1:]:
            rows.append({"Search Phrase": f"looking for {titles[0]}", "Clicked Offer": t, "Skipped Offer": other})
    return pd.DataFrame(rows)


def test_new_pairs_corpus_trains_and_evaluates_with_only_a_yaml(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    _pair_rows().to_csv("clicks.csv", index=False)
    cfg = _from_template(tiny_model_dir, {"name": "clicks", "format": "pairs", "path": "clicks.csv",
                                          "query_column": "Search Phrase", "positive_column": "Clicked Offer",
                                          "negative_column": "Skipped Offer", "label_column": None,
                                          "group_column": None},
                         train={"epochs": 4, "lr": 5e-3})
    Path("clicks.yaml").write_text(yaml.safe_dump(cfg))
    run_stages("--config", "clicks.yaml")
    prep = json.loads(Path("data/processed/clicks/manifest.json").read_text())
    assert prep["kind"] == "pairs" and prep["pairs"]["with_negative"] > 0
    pairs = pd.read_json("data/processed/clicks/pairs.jsonl", lines=True)
    queries = pd.read_json("data/processed/clicks/queries.jsonl", lines=True)
    assert not set(pairs["anchor"]) & set(queries["text"])  # a query never spans two splits
    m = json.loads(Path("reports/clicks-lora-r4-a8-s0/metrics.json").read_text())
    assert m["classification"] == {} and {"recall@1", "recall@10", "ndcg@10", "mrr@10"} <= set(m["retrieval"])
    assert m["gallery_items"] == _pair_rows()["Clicked Offer"].nunique() + len(
        set(_pair_rows()["Skipped Offer"]) - set(_pair_rows()["Clicked Offer"]))
