"""The protocol check of issue 23: the untrained all-MiniLM-L6-v2 on NFCorpus test at MTEB's settings gives the
figure MTEB publishes (nDCG@10 0.31594; ../shared/data/nfcorpus/SOURCE.md). Real data and the real model: slow.

It runs the project's own pieces end to end: prepare (BEIR folder, CRLF qrels, query split), the packaged base,
the project's encoder in fp32 at 256 tokens on ``title + " " + text`` (no passages, no prompt), exact search and
pytrec_eval's graded nDCG.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tests.conftest import SHARED_DATA, cli

pytestmark = pytest.mark.slow


def test_base_minilm_reproduces_mteb_on_nfcorpus(tmp_path, monkeypatch):
    if not (SHARED_DATA / "nfcorpus" / "corpus.jsonl").exists():
        pytest.skip("NFCorpus is not staged")
    from pipeline.contracts import prepared_data as P
    from pipeline.core.config import load_config
    from pipeline.model import tokens
    from pipeline.model.encoder import load_base
    from pipeline.search import ir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA_MIRROR", str(SHARED_DATA))
    cfg = {"data": {"name": "nfcorpus", "format": "beir", "path": "mirror:nfcorpus",
                    "lengths": {"query": 256, "document": 256, "passages": False}}}
    (tmp_path / "nf.yaml").write_text(yaml.safe_dump(cfg))
    assert cli("prepare", "--config", "nf.yaml", "tracking.enabled=false") == 0
    folder = tmp_path / "data/processed/nfcorpus"
    corpus, queries = P.load_corpus(folder), P.load_retrieval_queries(folder, "test")
    model = load_base(load_config("nf.yaml").model, max_seq_length=256)
    docs = tokens.encode_texts(model, (corpus["title"] + " " + corpus["text"]).str.strip().tolist(),
                               max_seq_length=256, batch_size=32)
    q = tokens.encode_texts(model, queries["text"].tolist(), max_seq_length=256, batch_size=32)
    run = ir.dense_search(docs, np.arange(len(docs)), q, ir.DEPTH)
    m = ir.per_query(P.load_qrels(folder, "test"), queries["id"].tolist(), corpus["id"].tolist(), *run)
    assert len(queries) == 323
    assert abs(m["ndcg@10"].mean() - 0.31594) <= 0.005
