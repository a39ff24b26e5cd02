"""Search over a document corpus (pipeline/search/ir.py): measures, passage search, BM25 and fusion."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.search import ir


def _run(rows):
    ids = np.array([[d for d, _ in r] + [-1] * (4 - len(r)) for r in rows], dtype=np.int64)
    scores = np.array([[s for _, s in r] + [0.0] * (4 - len(r)) for r in rows], dtype=np.float32)
    return ids, scores


def test_graded_ndcg_mrr_and_success_match_hand_computed_values():
    docs = ["d0", "d1", "d2", "d3"]
    qrels = {"q1": {"d0": 2, "d1": 1, "d2": 0}, "q2": {"d3": 1}, "q3": {"d1": 1}}
    # q1 ranks d2 (grade 0), d0 (grade 2), d1 (grade 1); q2 finds nothing relevant; q3 retrieves nothing at all
    ids, scores = _run([[(2, 0.9), (0, 0.8), (1, 0.7)], [(0, 0.5)], []])
    m = ir.per_query(qrels, ["q1", "q2", "q3"], docs, ids, scores)
    dcg = 2 / np.log2(3) + 1 / np.log2(4)
    ideal = 2 / np.log2(2) + 1 / np.log2(3)
    assert m["ndcg@10"][0] == pytest.approx(dcg / ideal)
    assert m["mrr@10"].tolist() == pytest.approx([0.5, 0.0, 0.0])
    assert m["recall@1"].tolist() == [0.0, 0.0, 0.0] and m["recall@10"].tolist() == [1.0, 0.0, 0.0]
    assert m["recall_all@100"][0] == pytest.approx(1.0)
    assert len(m["ndcg@10"]) == 3  # the query with nothing retrieved counts, as 0


def test_mrr_at_10_ignores_a_first_hit_below_rank_10():
    docs = [f"d{i}" for i in range(12)]
    ids = np.arange(12)[None, :]
    m = ir.per_query({"q": {"d11": 1}}, ["q"], docs, ids, -np.arange(12, dtype=np.float32)[None, :])
    assert m["mrr@10"][0] == 0.0 and m["recall_all@100"][0] == 1.0


def test_dense_search_scores_a_document_by_its_best_passage_exactly():
    rng = np.random.default_rng(0)
    passages = rng.normal(size=(60, 8)).astype(np.float32)
    passages /= np.linalg.norm(passages, axis=1, keepdims=True)
    doc_of = np.sort(rng.integers(0, 20, 60))
    doc_of = np.unique(doc_of, return_inverse=True)[1]  # documents 0..n-1, each with 1+ passages
    queries = rng.normal(size=(7, 8)).astype(np.float32)
    ids, scores = ir.dense_search(passages, doc_of, queries, k=5, block=3)
    sims = queries @ passages.T
    best = np.full((7, doc_of.max() + 1), -np.inf)
    for p, d in enumerate(doc_of):
        best[:, d] = np.maximum(best[:, d], sims[:, p])
    expect = np.argsort(-best, axis=1)[:, :5]
    assert (ids == expect).all()
    assert np.allclose(scores, np.take_along_axis(best, expect, 1), atol=1e-5)


def test_bm25_finds_the_matching_document_and_reloads_the_same(tmp_path):
    texts = ["Statins and breast cancer survival", "Vitamin D and bone health in the elderly",
             "Cholesterol feeds breast cancer cells", "Green tea and blood pressure"]
    bm = ir.BM25.fit(texts)
    ids, scores = bm.search(["breast cancers", "zzzz qqqq"], k=3)
    assert set(ids[0][:2]) == {0, 2} and scores[0][0] > 0
    assert (ids[1] == -1).all()  # no word of the query is in the corpus: nothing found
    bm.save(tmp_path)
    again, _ = ir.BM25.load(tmp_path).search(["breast cancers"], k=3)
    assert (again == ids[:1]).all()


def test_fusion_ranks_as_qdrant_does():
    from qdrant_client.http import models
    from qdrant_client.hybrid.fusion import reciprocal_rank_fusion

    dense = (np.array([[3, 1, 4, 0]]), np.array([[0.9, 0.8, 0.7, 0.6]]))
    lexical = (np.array([[4, 2, 3, -1]]), np.array([[7.0, 5.0, 1.0, 0.0]]))
    for k, w in ((2, 1.0), (10, 3.0), (1, 0.5)):
        ids, scores = ir.fuse([dense, lexical], [w, 1.0], k, depth=5)
        lists = [[models.ScoredPoint(id=int(d), version=0, score=float(s)) for d, s in zip(r[0][0], r[1][0]) if d >= 0]
                 for r in (dense, lexical)]
        theirs = reciprocal_rank_fusion(lists, limit=5, ranking_constant_k=k, weights=[w, 1.0])
        assert [p.id for p in theirs] == [d for d in ids[0] if d >= 0]
        assert np.allclose([p.score for p in theirs], scores[0][: len(theirs)])


def test_dense_search_deepens_when_one_document_fills_the_first_hits():
    rng = np.random.default_rng(1)
    query = rng.normal(size=(1, 8)).astype(np.float32)
    query /= np.linalg.norm(query)
    near = query + 0.01 * rng.normal(size=(50, 8)).astype(np.float32)  # 50 passages of document 0
    far = rng.normal(size=(10, 8)).astype(np.float32)
    passages = np.vstack([near, far])
    passages /= np.linalg.norm(passages, axis=1, keepdims=True)
    doc_of = np.array([0] * 50 + list(range(1, 11)))
    ids, _ = ir.dense_search(passages, doc_of, query, k=5)
    sims = (query @ passages[50:].T)[0]
    assert ids[0, 0] == 0 and ids[0, 1:].tolist() == (1 + np.argsort(-sims)[:4]).tolist()
