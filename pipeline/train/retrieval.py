"""Training on a retrieval set: the judged-relevant mask and the validation set.

- **Mask.** A retrieval set's judgments are dense (tens of relevant documents per query), so another pair's
  positive in the batch, or a mined negative, is often relevant to the anchor's query too. Every document judged
  relevant (grade > 0) to an anchor's train query is masked for that anchor, never used as its negative; so is any
  text identical to one (duplicate documents). The in-batch mask of pipeline/train/losses.py covers groups, labels
  and identical texts; this adds the per-query judgments, which no group can express (grouping queries linked
  through shared documents would merge nearly the whole corpus into one group and leave no negatives).
- **Validation** (``train.validation``): nDCG@10 (graded, pytrec_eval) of a seeded sample of the val queries over
  their judged documents plus a seeded sample of the others, each document by its first passage. The documents
  embedded per evaluation are capped at the token budget of ``max_texts`` 64-token texts (a 256-token corpus gets
  a quarter as many), so an evaluation costs about what one on titles does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.contracts.prepared_data import load_passages, load_qrels, load_relevant, load_retrieval_queries

TITLE_TOKENS = 64  # the text length ``train.validation.max_texts`` was sized for


class RelevantMask:
    """Which candidate texts are judged relevant to each pair's query: ``(B, C)`` masks for a batch."""

    def __init__(self, query_code: np.ndarray, relevant_texts: list[set[int]]):
        self.query_code = query_code  # (n_pairs,) index into relevant_texts, -1: no query
        self.relevant_texts = relevant_texts

    @classmethod
    def build(cls, pairs: pd.DataFrame, text_id_of_doc: dict[str, int], relevant: dict[str, set[str]]) -> "RelevantMask":
        """pairs: with ``query_id``; text_id_of_doc: document id -> text id of its training text; relevant: per
        train query, its judged-relevant document ids."""
        queries = list(dict.fromkeys(pairs["query_id"]))
        code = {q: i for i, q in enumerate(queries)}
        texts = [{text_id_of_doc[d] for d in relevant.get(q, ()) if d in text_id_of_doc} for q in queries]
        return cls(pairs["query_id"].map(code).to_numpy(dtype=np.int64), texts)

    def __call__(self, idx: np.ndarray, candidates: np.ndarray) -> torch.Tensor:
        """(len(idx), len(candidates)) bool: True where candidate text j is relevant to pair i's query."""
        out = np.zeros((len(idx), len(candidates)), dtype=bool)
        for row, i in enumerate(idx):
            c = self.query_code[i]
            if c >= 0 and self.relevant_texts[c]:
                out[row] = np.isin(candidates, list(self.relevant_texts[c]))
        return torch.as_tensor(out)


def relevant_mask(folder: Path, pairs: pd.DataFrame, text_id_of_doc: dict[str, int]) -> RelevantMask | None:
    """The mask for a prepared retrieval set's pairs; None for other corpora (pairs without ``query_id``)."""
    if "query_id" not in pairs or pairs["query_id"].isna().all():
        return None
    return RelevantMask.build(pairs, text_id_of_doc, load_relevant(folder, "train"))


def validation_set(folder: Path, prep: dict, max_texts: int, rng: np.random.Generator):
    """The val queries' nDCG@10 set (pipeline/train/validation.py's ValidationSet), or None without val queries."""
    from pipeline.search import ir
    from pipeline.train.validation import ValidationSet

    queries = load_retrieval_queries(folder, "val")
    qrels = load_qrels(folder, "val")
    if len(queries) == 0 or not qrels:
        return None
    passages = load_passages(folder)
    first = passages[~passages["doc"].duplicated()].reset_index(drop=True)
    length = int((prep.get("lengths") or {}).get("encoder") or TITLE_TOKENS)
    budget = max(50, int(max_texts * TITLE_TOKENS / max(length, TITLE_TOKENS)))
    order = queries.iloc[rng.permutation(len(queries))]
    chosen, judged = [], set()
    for qid in order["id"]:
        docs = set(qrels.get(qid, {}))
        if chosen and len(judged | docs) > 0.6 * budget:
            break
        chosen.append(qid)
        judged |= docs
    is_judged = first["doc"].isin(judged).to_numpy()
    others = rng.permutation(np.flatnonzero(~is_judged))[: max(0, budget - int(is_judged.sum()))]
    docs = first.iloc[np.sort(np.concatenate([np.flatnonzero(is_judged), others]))].reset_index(drop=True)
    asked = queries.set_index("id").loc[chosen]
    sub_qrels = {q: qrels[q] for q in chosen}
    doc_ids = docs["doc"].tolist()

    def score(q_emb, d_emb):
        run = ir.dense_search(d_emb, np.arange(len(doc_ids)), q_emb, 10)
        return float(ir.per_query(sub_qrels, chosen, doc_ids, *run)["ndcg@10"].mean())

    return ValidationSet("ndcg@10", asked["text"].tolist(), docs["text"].tolist(), score,
                         f"nDCG@10 of {len(chosen):,} val queries over {len(docs):,} documents (first passages)")
