"""Pair datasets (Walmart-Amazon layout): leak-free training pairs, whole-gallery retrieval, metrics file."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.prepare import pairs as prepare_pairs
from pipeline.search import scoring
from pipeline.contracts.prepared_data import load_gallery, load_queries
from pipeline.core.config import load_config
from pipeline.contracts.prepared_data import load_pairs
from tests.conftest import REPO, SHARED_DATA, run_stages

def test_test_queries_never_meet_their_records_in_training(wa_project):
    cfg = load_config(wa_project)
    corpus, _ = prepare_pairs.load_walmart_amazon(cfg, Path("data/raw/walmart_amazon"))
    parts = prepare_pairs.split_corpus(corpus)
    q, pairs, counts = parts["queries"], parts["pairs"], parts["counts"]
    relevant_texts = set(corpus.gallery.set_index("id").loc[[i for r in q["relevant"] for i in r], "text"])
    assert not set(pairs["anchor"]) & set(q["text"])
    assert not set(pairs["positive"]) & relevant_texts
    # record 1 is matched in train and in test: it is a test query, and its train pair was dropped
    assert "1" in set(q["id"]) and counts["train_pairs_dropped_query_is_test_query"] == 1
    # its relevant items are all its labelled matches, including the one labelled in train
    assert q.set_index("id").loc["1", "relevant"] == ["1", "2"]
    assert counts["relevant_from_other_splits"] == 1
    # held-out items are not in the negative pool either
    assert not set(parts["pool"]["text"]) & relevant_texts


def test_records_linked_by_a_match_share_a_group():
    corpus = prepare_pairs.PairCorpus(
        queries=pd.DataFrame({"id": ["1", "2", "3"], "text": ["w one", "w two", "w three"]}),
        gallery=pd.DataFrame({"id": ["10", "11", "12"], "text": ["a ten", "a eleven", "a twelve"]}),
        matches=pd.DataFrame({"query_id": ["1", "1", "2", "3"], "item_id": ["10", "11", "11", "12"],
                              "split": ["train", "train", "train", "test"]}))
    pairs = prepare_pairs.split_corpus(corpus)["pairs"]
    groups = dict(zip(zip(pairs["anchor"], pairs["positive"]), pairs["group"]))
    assert groups[("w one", "a ten")] == groups[("w one", "a eleven")] == groups[("w two", "a eleven")]
    assert len(pairs) == 3


def test_retrieval_scores_against_the_whole_gallery():
    g = np.eye(4, dtype=np.float32)
    q = np.array([[1, 0.1, 0, 0], [0, 0, 0.2, 1]], dtype=np.float32)
    # query 0: relevant row 1 ranked second; query 1: relevant rows 3 (first) and 0 (not in top 2)
    out = scoring.retrieval_scores(q, g, [np.array([1]), np.array([3, 0])], k=2)
    assert out["recall@1"].tolist() == [0.0, 1.0]
    assert out["recall@2"].tolist() == [1.0, 1.0]
    assert out["mrr@2"].tolist() == [0.5, 1.0]
    assert np.allclose(out["ndcg@2"], [1 / np.log2(3), 1 / (1 + 1 / np.log2(3))])


def test_pair_dataset_trains_and_evaluates_without_classification(wa_project):
    cfg = ["--config", str(wa_project)]
    run_stages(*cfg)
    processed = Path("data/processed/walmart_amazon")
    assert {p.name for p in processed.iterdir()} == {"queries.jsonl", "val_queries.jsonl", "gallery.jsonl", "pairs.jsonl",
                                                    "manifest.json"}
    run = "walmart_amazon-lora-r4-a8-s0"
    val_queries = pd.read_json(processed / "val_queries.jsonl", lines=True)
    test_ids = set(pd.read_json(processed / "queries.jsonl", lines=True, dtype={"id": str})["id"])
    assert len(val_queries) > 0 and not set(val_queries["id"].astype(str)) & test_ids
    selection = json.loads((Path("runs") / run / "model" / "manifest.json").read_text())["train"]["validation"]
    assert selection["metric"] == "recall@1" and selection["curve"][0]["step"] == 0
    emb = Path("runs") / run / "embeddings"
    assert {p.name for p in emb.iterdir()} == {"queries.npy", "val_queries.npy", "gallery.npy", "manifest.json"}
    assert len(np.load(emb / "gallery.npy")) == len(pd.read_csv(Path(load_config(wa_project).paths.mirror)
                                                                / "walmart_amazon" / "tableB.csv"))
    m = json.loads((Path("reports") / run / "metrics.json").read_text())
    assert {"run_name", "dataset", "mlflow_run_id", "model", "classification", "retrieval", "baseline", "lexical",
            "train"} <= set(m)
    assert m["classification"] == {} and m["baseline"]["classification"] == {} and m["lexical"]["classification"] == {}
    assert "no classification" in m["notes"]["classification"]
    for block in (m, m["baseline"], m["lexical"]):
        assert {"recall@1", "recall@10", "ndcg@10", "mrr@10"} <= set(block["retrieval"])
    assert m["retrieval_queries"] == m["test_items"] > 0 and m["gallery_items"] == 85
    lo, hi = m["ci"]["retrieval"]["recall@10"]
    assert lo <= m["retrieval"]["recall@10"] <= hi
    d = m["delta_vs_base"]["retrieval"]["mrr@10"]
    assert d["delta"] == pytest.approx(m["retrieval"]["mrr@10"] - m["baseline"]["retrieval"]["mrr@10"], abs=1e-4)
    md = (Path("reports") / run / "report.md").read_text()
    assert "| base (untrained) |" in md and "Change vs the base model" in md and "no classification" in md.lower()


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "walmart_amazon").exists(), reason="../shared/data not present")
def test_real_walmart_amazon_prepare_counts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = prepare_pairs.prepare(load_config(REPO / "configs" / "walmart_amazon.yaml",
                                            [f"paths.mirror={SHARED_DATA}"]))
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["test_queries"] == 191 and m["counts"]["gallery_records"] == 22074
    assert m["counts"]["train_pairs_dropped_query_is_test_query"] >= 17
    assert len(load_pairs(out)) == m["counts"]["train_pairs"]


def test_mined_negatives_for_a_pair_dataset_avoid_held_out_records(wa_project):
    cfg = load_config(wa_project, ["pairs.hard_negatives.enabled=true", "pairs.hard_negatives.range_min=0",
                                   "pairs.hard_negatives.relative_margin=0.0"])
    out = prepare_pairs.prepare(cfg)
    pairs, queries = load_pairs(out), load_queries(out)
    gallery = load_gallery(out).set_index("id")
    held = set(gallery.loc[[i for r in queries["relevant"] for i in r], "text"])
    has = pairs[pairs["negative"].notna()]
    assert len(has) == len(pairs)
    assert not set(has["negative"]) & held
    assert (has["negative_group"] != has["group"]).all() and (has["negative"] != has["positive"]).all()
