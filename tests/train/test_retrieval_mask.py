"""The judged-relevant mask of retrieval-set training (pipeline/train/retrieval.py): a document judged relevant
to an anchor's query is never its negative, in the batch or as a mined negative."""

from __future__ import annotations

import numpy as np
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
