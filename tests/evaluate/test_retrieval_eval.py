"""A retrieval set end to end (prepare, train, embed, eval) on the tiny model: the whole corpus searched,
passages scored by the best one, BM25 and the hybrid beside dense, and the same figures whichever form the set
came in (BEIR folder, or pairs + a document table)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import OFF, run_stages
from tests.retrieval_data import pairs_config


def _metrics(config: Path) -> dict:
    run_stages("--config", str(config), OFF)
    cfg = yaml.safe_load(config.read_text())
    return json.loads((Path("reports") / f"{cfg['data']['name']}-lora-r4-a8-s0" / "metrics.json").read_text())


def test_retrieval_set_scores_adapted_base_bm25_and_hybrid_on_the_whole_corpus(beir_project):
    m = _metrics(beir_project)
    assert m["corpus"]["documents"] == 48 and m["corpus"]["passages"] > 48
    for block in (m, m["baseline"], m["lexical"], m["hybrid"]):
        assert set(block["retrieval"]) == {"ndcg@10", "map@100", "recall_all@100", "recall@1", "recall@10", "mrr@10"}
        assert 0 <= block["retrieval"]["ndcg@10"] <= 1 and len(block["ci"]["retrieval"]["ndcg@10"]) == 2
    assert m["lexical"]["method"].startswith("bm25") and m["classification"] == {}
    assert m["hybrid"]["fusion"]["chosen_on"] == "validation ndcg@10" and m["hybrid"]["fusion"]["tried"]
    assert set(m["verdict"]["test"]["vs_base"]) == {"retrieval.recall@1", "retrieval.ndcg@10"}
    assert m["verdict"]["validation"]["metric"] == "ndcg@10"
    report = (Path("reports") / m["run_name"] / "report.md").read_text()
    assert "| BM25 |" in report and "hybrid (BM25 + adapted)" in report and "vs BM25" in report
    train = json.loads((Path("runs") / m["run_name"] / "model" / "manifest.json").read_text())["train"]
    assert train["validation"]["metric"] == "ndcg@10"


def test_pairs_with_a_document_table_score_the_same_as_the_beir_folder(beir_project, tmp_path):
    beir = _metrics(beir_project)
    other = _metrics(pairs_config(beir_project, tmp_path, by="text"))
    for block in ("retrieval", "baseline", "lexical", "hybrid"):
        mine, theirs = (beir[block] if block != "retrieval" else beir), (other[block] if block != "retrieval" else other)
        assert mine["retrieval"] == theirs["retrieval"], block
