"""train.document_length: the document side of a training pair is cut shorter than the queries, the lever on a
retrieval set's training time; queries keep their length and masks still see one text as one text."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

LONG = " ".join(f"word{i}" for i in range(60))


@pytest.fixture
def tiny_model(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_model_dir), device="cpu")


def _pairs() -> pd.DataFrame:
    # the second pair's positive is the first pair's anchor: one text on both sides
    return pd.DataFrame({"anchor": [LONG, "a short query"], "positive": ["another " + LONG, LONG], "kind": "pair",
                         "group": [None, None], "label": None})


def test_documents_are_cut_and_queries_keep_their_length(tiny_model):
    from pipeline.train.loop import PairTensors

    full = PairTensors(_pairs(), tiny_model, 48)
    cut = PairTensors(_pairs(), tiny_model, 48, document_length=12)
    assert full.document_ids is full.ids
    assert cut.ids == full.ids  # the query side and the text ids are unchanged
    assert [len(cut.document_ids[i]) for i in cut.positive] == [12, 12]
    assert len(cut.ids[cut.anchor[0]]) == 48
    # one text on both sides keeps one id: anchor 0 is pair 1's positive, so it stays masked as a candidate
    assert cut.anchor[0] == cut.positive[1]
    assert cut.real_tokens == 48 + 12 + len(cut.ids[cut.anchor[1]]) + 12 < full.real_tokens


def test_the_loss_embeds_the_cut_documents(tiny_model):
    from pipeline.core.config import TrainConfig
    from pipeline.train.loop import PairTensors, Stepper, batch_loss

    pairs = pd.DataFrame({"anchor": ["first query", "second query"], "positive": ["one " + LONG, "two " + LONG],
                          "kind": "pair", "group": [None, None], "label": None})
    t = TrainConfig(mask_same_label=False)
    data = PairTensors(pairs, tiny_model, 48, document_length=10)
    sp = Stepper(tiny_model, data, t, optimizer=None, scheduler=None, device=torch.device("cpu"))
    with torch.no_grad():
        got = batch_loss(sp, np.array([0, 1])).item()
        tiny_model.max_seq_length = 48
        a = torch.tensor(tiny_model.encode(["first query", "second query"], normalize_embeddings=True))
        tiny_model.max_seq_length = 10
        p = torch.tensor(tiny_model.encode(list(pairs["positive"]), normalize_embeddings=True))
        expected = torch.nn.functional.cross_entropy(a @ p.T * t.scale, torch.tensor([0, 1])).item()
    assert got == pytest.approx(expected, abs=1e-4)
