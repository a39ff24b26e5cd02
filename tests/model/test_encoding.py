"""Encoding batches: bounded by rows and by padded tokens, and the result never depends on the batching."""

import numpy as np

from pipeline.model import tokens as encoding


def test_batch_bounds_respect_rows_and_token_budget():
    lengths = [10, 10, 8, 5, 5, 5, 3, 3, 2, 2]  # sorted longest first
    assert encoding._batch_bounds(lengths, 4, None) == [(0, 4), (4, 8), (8, 10)]
    # budget 20: width 10 -> 2 rows; width 8 -> 2 rows; width 5 -> 4 rows (row cap); width 3 -> 4 rows
    assert encoding._batch_bounds(lengths, 4, 20) == [(0, 2), (2, 4), (4, 8), (8, 10)]
    assert encoding._batch_bounds([100, 1], 4, 20) == [(0, 1), (1, 2)]  # one over-long text still runs alone
    assert encoding._batch_bounds([], 4, 20) == []


def test_encode_ids_is_independent_of_batching(tiny_model_dir, monkeypatch):
    from pipeline.model.encoder import load_encoder

    st = load_encoder(str(tiny_model_dir))
    texts = ["a phone", "samsung galaxy s21 128gb black unlocked smartphone", "tv", "bosch fridge freezer",
             "intel core i7 12700k processor 12 cores", "x"] * 3
    ids = encoding.tokenize(st, texts, 32)
    monkeypatch.setattr(encoding, "CPU_TOKEN_BUDGET", None)
    whole = encoding.encode_ids(st, ids, batch_size=64)
    monkeypatch.setattr(encoding, "CPU_TOKEN_BUDGET", 24)
    split = encoding.encode_ids(st, ids, batch_size=64)
    assert whole.shape == (len(texts), 32)
    np.testing.assert_allclose(split, whole, atol=1e-5)
    np.testing.assert_allclose(split[0], split[6], atol=1e-6)  # rows come back in input order
