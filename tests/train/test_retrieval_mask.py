"""The judged-relevant mask of retrieval-set training (pipeline/train/retrieval.py): a document judged relevant
to an anchor's query is never its negative, in the batch or as a mined negative."""

from __future__ import annotations

import numpy as np
import pytest
import pandas as pd

from pipeline.train.retrieval import RelevantMask


def test_a_document_relevant_to_the_anchors_query_is_masked_whoever_brought_it():
    # q1 judges d1 and d2 relevant, q2 judges d3; the pairs are (q1, d1), (q2, d3), (q1, d2)... and q2's pair
    # with d2, a document q1 also judges relevant.
    pairs = pd.DataFrame({"query_id": ["q1", "q2", "q2"], "positive_id": ["d1", "d3", "d2"]})
    text_id = {"d1": 10, "d2": 11, "d3": 12}
    mask = RelevantMask.build(pairs, text_id, {"q1": {"d1", "d2"}, "q2": {"d3", "d2"}})
    idx = np.array([0, 1, 2])
    got = mask(idx, np.array([10, 12, 11])).numpy()
    # anchor 0 (q1): d1 (its own) and d2 (pair 2's positive) relevant, d3 not
    assert got[0].tolist() == [True, False, True]
    assert got[1].tolist() == [False, True, True] and got[2].tolist() == [False, True, True]
    # mined negatives: text 11 (d2) is relevant to both queries, text 99 to neither
    assert mask(idx, np.array([11, 99])).numpy().tolist() == [[True, False]] * 3


def test_the_batch_loss_leaves_out_another_pairs_positive_that_is_relevant_to_the_anchors_query(tiny_model_dir):
    """Two queries whose judged documents overlap: with the mask the loss equals the loss computed with that
    candidate removed by hand; without it (data.relevant None) the candidate counts as a negative."""
    import torch
    from sentence_transformers import SentenceTransformer

    from pipeline.core.config import TrainConfig
    from pipeline.train.loop import PairTensors, Stepper, batch_loss

    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    pairs = pd.DataFrame({"anchor": ["statins and the heart", "cholesterol drugs"], "positive": ["doc a", "doc b"],
                          "kind": "pair", "group": ["q:1", "q:2"], "label": None, "query_id": ["1", "2"],
                          "positive_id": ["a", "b"]})
    data = PairTensors(pairs, model, 32)
    t = TrainConfig(mask_same_label=False)
    sp = Stepper(model, data, t, optimizer=None, scheduler=None, device=torch.device("cpu"))
    idx = np.array([0, 1])
    with torch.no_grad():
        unmasked = batch_loss(sp, idx).item()
        data.relevant = RelevantMask.build(pairs, data.doc_text_id, {"1": {"a", "b"}, "2": {"b"}})
        masked = batch_loss(sp, idx).item()
        # by hand: anchor 0 has only its own positive left (loss 0), anchor 1 still sees document a
        a = torch.nn.functional.normalize(torch.tensor(model.encode(["statins and the heart", "cholesterol drugs"])), dim=-1)
        p = torch.nn.functional.normalize(torch.tensor(model.encode(["doc a", "doc b"])), dim=-1)
        s = a @ p.T * t.scale
        expected = (0.0 + torch.nn.functional.cross_entropy(s[1:2], torch.tensor([1])).item()) / 2
    assert masked == pytest.approx(expected, abs=1e-4) and masked < unmasked
