"""Pseudo pairs of the corpus objective (pipeline/prepare/pseudo.py): each method's pair comes from its document,
the bound holds and the documents are visited in shards, the pseudo label agrees with both rankers, mined negatives
pass the false-negative guard, and no judged query text is ever a pseudo query."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.config import Config
from pipeline.prepare import pseudo
from tests.conftest import make_corpus

SENTENCES = ["Statins lower the cholesterol of patients with heart disease.",
             "The trial followed two thousand adults for five years.",
             "Muscle pain was the most common side effect reported.",
             "Green tea catechins had no measurable effect on blood pressure.",
             "Fibre from whole grains was linked with fewer colon cancers."]


def _docs(n: int = 6) -> pseudo.Documents:
    texts = [" ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(5)) for i in range(n)]
    return pseudo.Documents([f"d{i}" for i in range(n)], [f"study {i} of statins" for i in range(n)], texts)


def _cfg(**corpus) -> Config:
    return Config.model_validate({"pairs": {"corpus": corpus}})


def test_ict_takes_one_sentence_and_leaves_it_out_of_its_document():
    docs, rng = _docs(), np.random.default_rng(0)
    query, positive = pseudo.ict(docs, 0, _cfg(), rng)
    assert query in SENTENCES and query not in positive
    assert positive.startswith(docs.titles[0]) and set(positive.split()) <= set(docs.full(0).split())


def test_ict_on_a_short_text_is_a_word_span_and_the_words_around_it():
    docs = pseudo.Documents(["a"], [""], ["samsung galaxy s10 128gb dual sim black unlocked"])
    query, positive = pseudo.ict(docs, 0, _cfg(), np.random.default_rng(1))
    words = docs.texts[0].split()
    assert query in docs.texts[0] and sorted(query.split() + positive.split()) == sorted(words)


def test_title_goes_to_the_body_and_crops_are_spans_of_the_document():
    docs, rng = _docs(), np.random.default_rng(0)
    assert pseudo.title(docs, 2, _cfg(), rng) == (docs.titles[2], pseudo._words(docs.texts[2], 96))
    query, positive = pseudo.crops(docs, 3, _cfg(), rng)
    assert query in docs.texts[3] and positive.startswith(docs.titles[3])
    assert positive[len(docs.titles[3]):].strip() in docs.texts[3]
    assert pseudo.title(pseudo.Documents(["x"], [""], ["no title here"]), 0, _cfg(), rng) is None


def test_the_bound_holds_and_only_the_shards_needed_are_visited():
    docs = _docs(400)
    cfg = _cfg(methods=["ict", "crops"], max_pairs=50, shard_documents=100)
    built = pseudo.build(docs, cfg, encoder_length=64)
    assert len(built.pairs) == 50 and built.stats["documents_visited"] == 100
    assert set(built.pairs["kind"]) == {"ict", "crops"}
    assert (built.pairs["group"] == "d:" + built.pairs["source_id"]).all()
    assert (built.pairs["positive_id"] == built.pairs["source_id"]).all()


def test_a_judged_query_text_is_never_a_pseudo_query():
    docs = pseudo.Documents(["a", "b"], ["Statin side effects", "Tea and pressure"], ["x " * 50, "y " * 50])
    built = pseudo.build(docs, _cfg(methods=["title"]), encoder_length=64, avoid={pseudo.text_key("statin  SIDE effects")})
    assert built.pairs["anchor"].tolist() == ["Tea and pressure"] and built.stats["dropped"]["judged_query_text"] == 1


@pytest.fixture
def offers(tiny_model_dir) -> tuple[pseudo.Documents, Config]:
    corpus = make_corpus(n_clusters_per_brand=2)
    docs = pseudo.Documents([str(i) for i in range(len(corpus))], [""] * len(corpus), corpus["title"].tolist())
    return docs, Config.model_validate({"model": {"base": str(tiny_model_dir)}})


def test_a_pseudo_labelled_neighbour_is_ranked_first_by_bm25_and_the_encoder_and_is_another_text(offers):
    docs, cfg = offers
    rankers = pseudo.Rankers(docs, cfg, encoder_length=32)
    rows = np.arange(len(docs.ids))
    linked = pseudo.neighbours(docs, rows, rankers, cfg)
    assert linked, "no neighbour agreed on"
    _, dense = rankers.dense(rankers.doc_emb[rows], 10)
    lexical = rankers.lexical(rankers.texts, 10)
    for a, b in linked:
        assert b != a and pseudo.text_key(docs.texts[b]) != pseudo.text_key(docs.texts[a])

        def first(ranked):
            return next(d for d in ranked if d >= 0 and d != a and rankers.keys[d] != rankers.keys[a])

        assert first(dense[a]) == b and first(lexical[a]) == b


def test_mined_negatives_pass_the_false_negative_guard(offers):
    docs, cfg = offers
    cfg = cfg.model_copy(update={"pairs": Config.model_validate(
        {"pairs": {"corpus": {"methods": ["crops", "neighbours"], "mine_negatives": True, "guard_k": 3},
                   "hard_negatives": {"relative_margin": 0.0}}}).pairs})
    built = pseudo.build(docs, cfg, encoder_length=32)
    mined = built.pairs[built.pairs["negative_id"].notna()]
    assert len(mined) > 0 and built.stats["negatives"]["with_negative"] == len(mined)
    rankers = pseudo.Rankers(docs, cfg, encoder_length=32)
    guard = rankers.lexical(mined["anchor"].tolist(), 3)
    row = {d: i for i, d in enumerate(docs.ids)}
    for (_, r), top in zip(mined.iterrows(), guard):
        neg = row[r["negative_id"]]
        assert r["negative_id"] not in (r["positive_id"], r["source_id"])
        assert rankers.keys[neg] not in (rankers.keys[row[r["positive_id"]]], rankers.keys[row[r["source_id"]]])
        assert neg not in set(top[top >= 0])


def test_searches_run_a_block_of_queries_at_a_time_and_never_score_the_corpus_against_itself(offers, monkeypatch):
    from pipeline.search import metrics

    docs, cfg = offers
    cfg = cfg.model_copy(update={"pairs": Config.model_validate(
        {"pairs": {"corpus": {"methods": ["crops", "neighbours"], "mine_negatives": True}}}).pairs})
    real, shapes = metrics.search, []

    def spy(gallery, queries, k):
        shapes.append((len(queries), k))
        return real(gallery, queries, k)

    monkeypatch.setattr(metrics, "search", spy)
    monkeypatch.setattr(pseudo, "SEARCH_BLOCK", 7)
    built = pseudo.build(docs, cfg, encoder_length=32)
    assert built.stats["by_method"]["neighbours"] > 0 and shapes
    assert all(n <= 7 and k < len(docs.ids) for n, k in shapes)
