"""prepare, retrieval sets: documents, queries and graded judgments -> the prepared retrieval set
(:mod:`pipeline.contracts.prepared_data`, ``kind: retrieval``), whichever form the set came in
(:mod:`pipeline.prepare.retrieval_sources`: a BEIR folder, an ``hf:`` dataset, pairs plus a document table).

The protocol is BEIR's and MTEB's (field note 19):

- **Split by query, documents shared.** The whole corpus is the search space of every split. Given splits
  are kept (a query judged in two splits goes to the later: test, then val); a missing val split is carved
  from the train queries, a missing test split too (seeded, ``data.split`` proportions).
- **Leakage: no test query text in train.** A train query whose text (case and spacing ignored) is a test or
  val query's text is removed from train, and a val query with a test query's text from val; the test split
  is never changed. Documents are shared, so a document judged for a test query may be a training positive
  for another query, as in BEIR.
- **Every query of a split has a judged-relevant document** (grade > 0) in that split; otherwise one line,
  exit 2 (nDCG of a query with nothing relevant is undefined).
- **Lengths**: documents are ``title + " " + text``. The query length is the longest query, the document
  length the ``data.lengths.quantile`` of document lengths, both in tokens of the base model's tokenizer and
  capped at its maximum; the encoder truncates at the larger of the two. A document longer than the document
  length becomes overlapping passages (title + a window of the text, ``stride`` tokens apart) and is scored by
  its best passage; with ``passages: false`` it is truncated, as MTEB does. Shares are in the manifest.
- **Training pairs**: train query -> judged document (its first passage), at most ``pairs.positives_per_query``
  per query, highest grade first; mined negatives never come from the query's judged-relevant documents.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.contracts import pair_kinds
from pipeline.contracts.identity import prepared_fingerprint
from pipeline.contracts.prepared_data import (CORPUS, PAIRS, PASSAGES, QRELS_DIR, QRELS_HEADER, QUERIES,
                                              RETRIEVAL_TEXT_FILES, SPLITS, texts_fingerprint)
from pipeline.core.artifacts import MANIFEST, Layout, atomic_dir, digest, is_up_to_date, make_manifest, write_json_atomic
from pipeline.core.config import Config
from pipeline.core.errors import ConfigError, DataError
from pipeline.prepare import retrieval_sources as sources
from pipeline.prepare.sources import hash_inputs

log = logging.getLogger(__name__)
NOTES = {"retrieval": "query: a query of the test split; search space: every document of the corpus (the same for "
                      "every split); relevant: its judged documents, graded (nDCG uses the grades)",
         "classification": "no classification metrics: a retrieval set has queries and documents, no label space"}


def text_key(text: str) -> str:
    """What makes two query texts the same query: case and spacing ignored."""
    return " ".join(str(text).split()).casefold()


# -------------------------------------------------------------------------------------------------- splits

def has_train_judgments(rs: sources.RetrievalSet) -> bool:
    """Does the set judge train queries (given as train, or without splits, so that prepare draws some)?"""
    split = rs.qrels["split"]
    return bool(len(rs.qrels) and ((split == "train").any() or split.isna().all()))


def assign_query_splits(rs: sources.RetrievalSet, cfg: Config,
                        objective: str = "pairs") -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(queries with their split, judgments of each query's split only, the split plan). Under the corpus objective
    the train judgments are withheld and the judged queries are validation and test only."""
    qrels = rs.qrels.copy()
    plan: dict = {}
    if objective == "corpus":
        withheld = qrels["split"] == "train"
        plan["train_judgments_withheld"] = int(withheld.sum())
        qrels = qrels[~withheld]
    if len(qrels) == 0:  # no judged queries at all: the run is unverified (corpus objective only)
        plan.update({"given": [], "carved": []})
        return (pd.DataFrame(columns=["id", "text", "split"]),
                pd.DataFrame(columns=["query_id", "doc_id", "score", "split"]), plan)
    shares = _shares(cfg, ("val", "test") if objective == "corpus" else SPLITS)
    if qrels["split"].isna().all():  # no split given: draw per query
        qids = list(dict.fromkeys(qrels["query_id"]))
        drawn = dict(zip(qids, sources.draw_split(len(qids), shares, cfg.seed)))
        qrels["split"] = qrels["query_id"].map(drawn)
        plan.update({"given": [], "carved": list(shares)})
    elif qrels["split"].isna().any():
        raise DataError(f"{rs.source}: some judgments have a split and some have none; give every row a split")
    rank = qrels["split"].map({s: i for i, s in enumerate(SPLITS)})
    last = rank.groupby(qrels["query_id"]).transform("max")
    plan["judgments_dropped_query_in_a_later_split"] = int((rank < last).sum())
    qrels = qrels[rank == last]
    split_of = qrels.groupby("query_id")["split"].first()
    if not plan.get("carved"):
        plan["given"] = [s for s in SPLITS if s in set(split_of)]
        carve = _carve_judged if objective == "corpus" else _carve_missing
        split_of = carve(split_of, cfg, plan)
        qrels = qrels.assign(split=qrels["query_id"].map(split_of))
    queries = rs.queries[rs.queries["id"].isin(split_of.index)]
    queries = queries.assign(split=queries["id"].map(split_of).to_numpy())
    return queries.reset_index(drop=True), qrels.reset_index(drop=True), plan


def _shares(cfg: Config, names) -> dict[str, float]:
    """``data.split``'s fractions of the named splits, renormalised to sum to one."""
    share = {s: getattr(cfg.data.split, s) for s in names}
    return {s: v / sum(share.values()) for s, v in share.items()}


def _carve_judged(split_of: pd.Series, cfg: Config, plan: dict) -> pd.Series:
    """The corpus objective's judged set is validation and test: where it has one of them only, the other is carved
    from it (``data.split``'s val:test proportions, seeded)."""
    given = [s for s in ("val", "test") if s in plan["given"]]
    plan["carved"] = [s for s in ("val", "test") if s not in given]
    if len(given) != 1:
        return split_of
    drawn = sources.draw_split(len(split_of), _shares(cfg, ("val", "test")), cfg.seed)
    out = pd.Series(drawn, index=split_of.index)
    plan["carved_queries"] = {s: int((drawn == s).sum()) for s in plan["carved"]}
    log.info("prepare: %s carved from the %s queries (%s)", plan["carved"][0], given[0],
             ", ".join(f"{s} {n:,}" for s, n in plan["carved_queries"].items()))
    return out


def _carve_missing(split_of: pd.Series, cfg: Config, plan: dict) -> pd.Series:
    """Val (and test) carved from the train queries where the set gives none."""
    missing = [s for s in ("val", "test") if s not in plan["given"]]
    plan["carved"] = missing
    train = split_of.index[split_of == "train"]
    if not missing or len(train) == 0:
        return split_of
    share = _shares(cfg, ("train", *missing))
    drawn = sources.draw_split(len(train), share, cfg.seed)
    out = split_of.copy()
    out[train] = drawn
    plan["carved_queries"] = {s: int((drawn == s).sum()) for s in missing}
    log.info("prepare: %s carved from the train queries (%s)", " and ".join(missing),
             ", ".join(f"{s} {n:,}" for s, n in plan["carved_queries"].items()))
    return out


def remove_leaks(queries: pd.DataFrame, qrels: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Train queries with a test or val query's text leave train; val queries with a test query's text leave
    val. Test is never changed."""
    keys = queries["text"].map(text_key)
    test_keys = set(keys[queries["split"] == "test"])
    val_keys = set(keys[queries["split"] == "val"])
    drop_train = (queries["split"] == "train") & keys.isin(test_keys | val_keys)
    drop_val = (queries["split"] == "val") & keys.isin(test_keys)
    counts = {"train_queries_dropped_text_in_test_or_val": int(drop_train.sum()),
              "val_queries_dropped_text_in_test": int(drop_val.sum())}
    keep = ~(drop_train | drop_val).to_numpy()
    kept = queries[keep].reset_index(drop=True)
    return kept, qrels[qrels["query_id"].isin(set(kept["id"]))].reset_index(drop=True), counts


def check_judged(queries: pd.DataFrame, qrels: pd.DataFrame, source: str, *, unverified_ok: bool = False) -> None:
    """Every query of every split needs a judged-relevant document (grade > 0) in its split; test queries are needed
    unless ``unverified_ok`` (the corpus objective) and there are no judged queries at all."""
    relevant = set(qrels.loc[qrels["score"] > 0, "query_id"])
    lacking = queries[~queries["id"].isin(relevant)]
    if len(lacking):
        first = lacking.iloc[0]
        raise DataError(f"{source}: {len(lacking)} quer{'y has' if len(lacking) == 1 else 'ies have'} no judged-relevant "
                        f"document (grade > 0) in their split, e.g. '{first['id']}' in {first['split']}; nDCG needs one: "
                        f"add a judgment or remove the query")
    if not (queries["split"] == "test").any() and not (unverified_ok and len(queries) == 0):
        raise DataError(f"{source}: no test queries; a retrieval set needs judged test queries to evaluate on")


# ------------------------------------------------------------------------------------------------- lengths

def _ceil8(n: float) -> int:
    return int(8 * math.ceil(n / 8))


def choose_lengths(cfg: Config, model_max: int, doc_lengths: np.ndarray, query_lengths: np.ndarray,
                   prompt_tokens: dict[str, int]) -> dict:
    """Query, document and encoder lengths (tokens, special tokens and prompts included)."""
    lc = cfg.data.lengths
    for key in ("query", "document"):
        value = getattr(lc, key)
        if value is not None and value > model_max:
            raise ConfigError(f"data.lengths.{key}={value} is above the model's maximum of {model_max} tokens")
    q_need = query_lengths + prompt_tokens["query"]
    d_need = doc_lengths + prompt_tokens["document"]
    query = lc.query or min(model_max, _ceil8(q_need.max() if len(q_need) else 8))
    document = lc.document or min(model_max, _ceil8(np.quantile(d_need, lc.quantile)))
    encoder = max(query, document)
    return {"query": int(query), "document": int(document), "encoder": int(encoder), "model_max": int(model_max),
            "quantile": lc.quantile, "passages": lc.passages,
            "stride": int(lc.stride or max(1, (document - 2 - prompt_tokens["document"]) // 2)),
            "queries_truncated_share": round(float((q_need > encoder).mean()) if len(q_need) else 0.0, 5),
            "documents_over_document_length_share": round(float((d_need > document).mean()), 5),
            "mean_document_tokens": round(float(doc_lengths.mean()), 1)}


def make_passages(corpus: pd.DataFrame, tok, lengths: dict, prompt_tokens: int) -> pd.DataFrame:
    """One passage per document, or, for a document over the document length (and passages on), overlapping
    windows of its text, each led by the title, cut at word starts; char spans, so any encoder embeds them."""
    full = (corpus["title"] + " " + corpus["text"]).str.strip().tolist()
    budget = lengths["document"] - 2 - prompt_tokens
    enc = tok(corpus["text"].tolist(), add_special_tokens=False, return_offsets_mapping=True)
    title_len = [len(x) for x in tok(corpus["title"].tolist(), add_special_tokens=False)["input_ids"]]
    rows = []
    for i, doc in enumerate(corpus["id"]):
        title = corpus["title"].iat[i]
        room = budget - (title_len[i] if title else 0)
        n = len(enc["input_ids"][i])
        if not lengths["passages"] or n <= room or room < 16:
            rows.append((f"{doc}#0", doc, full[i]))
            continue
        starts = _window_starts(enc.word_ids(i), n, room, lengths["stride"])
        offsets, text = enc["offset_mapping"][i], corpus["text"].iat[i]
        for p, start in enumerate(starts):
            stop = min(n, start + room)
            piece = text[offsets[start][0]:offsets[stop - 1][1]]
            rows.append((f"{doc}#{p}", doc, f"{title} {piece}".strip()))
    return pd.DataFrame(rows, columns=["id", "doc", "text"])


def _window_starts(word_ids: list, n: int, room: int, stride: int) -> list[int]:
    """Token positions where windows of ``room`` tokens start, ``stride`` apart, each moved to a word start, the
    last one ending at the text's end."""
    starts, start = [], 0
    while True:
        while 0 < start < n and word_ids[start] is not None and word_ids[start] == word_ids[start - 1]:
            start += 1
        starts.append(start)
        if start + room >= n:
            return starts
        start = min(start + stride, n - room)


# --------------------------------------------------------------------------------------------------- pairs

def build_pairs(queries: pd.DataFrame, qrels: pd.DataFrame, first_passage: dict[str, str], cfg: Config) -> pd.DataFrame:
    """Train query -> judged document pairs: per query at most ``pairs.positives_per_query`` of its relevant
    documents, highest grade first, ties in a seeded order; then ``pairs.max_pairs``, then shuffled."""
    rng = np.random.default_rng(cfg.seed + 1)
    train = queries[queries["split"] == "train"]
    rel = qrels[(qrels["score"] > 0) & qrels["query_id"].isin(set(train["id"]))].copy()
    rel["draw"] = rng.random(len(rel))
    rel = rel.sort_values(["query_id", "score", "draw"], ascending=[True, False, True], kind="stable")
    if cfg.pairs.positives_per_query is not None:
        rel = rel.groupby("query_id", sort=False).head(cfg.pairs.positives_per_query)
    text = dict(zip(queries["id"], queries["text"]))
    pairs = pd.DataFrame({"anchor": rel["query_id"].map(text).to_numpy(),
                          "positive": rel["doc_id"].map(first_passage).to_numpy(), "kind": "pair",
                          "group": ("q:" + rel["query_id"]).to_numpy(), "label": None,
                          "query_id": rel["query_id"].to_numpy(), "positive_id": rel["doc_id"].to_numpy()})
    if cfg.pairs.max_pairs is not None and len(pairs) > cfg.pairs.max_pairs:
        pairs = pairs.iloc[np.sort(rng.permutation(len(pairs))[: cfg.pairs.max_pairs])]
    return pairs.iloc[rng.permutation(len(pairs))].reset_index(drop=True)


def mine_negatives(pairs: pd.DataFrame, corpus_ids: list[str], first_passage: dict[str, str],
                   relevant: dict[str, set[str]], cfg: Config, encoder_length: int) -> tuple[pd.DataFrame, dict]:
    """One mined negative per pair from the whole corpus (pipeline/prepare/hard_negatives.py's rank window and
    margin), never a judged-relevant document of the pair's query nor a document with such a document's text."""
    from pipeline.prepare import hard_negatives as hn

    docs = [first_passage[d] for d in corpus_ids]
    key_of = np.array([text_key(t) for t in docs], dtype=object)
    queries = pairs.drop_duplicates("query_id")[["query_id", "anchor"]]
    mine_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_seq_length": encoder_length})})
    emb, q_form = hn._embed(mine_cfg, docs + queries["anchor"].tolist(), queries["anchor"].tolist())
    d_emb = emb[: len(docs)]
    q_emb = q_form if q_form is not None else emb[len(docs):]
    q_row = {q: i for i, q in enumerate(queries["query_id"])}
    d_row = {d: i for i, d in enumerate(corpus_ids)}
    pos_score = np.sum(q_emb[[q_row[q] for q in pairs["query_id"]]] * d_emb[[d_row[d] for d in pairs["positive_id"]]],
                       axis=1)
    settings = cfg.pairs.hard_negatives
    depth = min(len(docs), settings.range_max + max(len(v) for v in relevant.values()) + 16)
    from pipeline.search.metrics import search

    scores, ids = search(d_emb, q_emb, depth)
    ok = np.zeros(ids.shape, dtype=bool)
    for r, qid in enumerate(queries["query_id"]):  # the guard, once per query
        rel = [d_row[d] for d in relevant.get(qid, ()) if d in d_row]
        ok[r] = (ids[r] >= 0) & ~np.isin(ids[r], rel) & ~np.isin(key_of[np.maximum(ids[r], 0)], key_of[rel])
    rng = np.random.default_rng(cfg.seed + 3)
    out = {"negative": [None] * len(pairs), "negative_id": [None] * len(pairs)}
    for i, qid in enumerate(pairs["query_id"]):
        r = q_row[qid]
        pick = hn.choose(scores[r], ok[r], pos_score[i], hn.Window.of(settings), rng)
        if pick is not None:
            j = ids[r, pick]
            out["negative"][i], out["negative_id"][i] = docs[j], corpus_ids[j]
    mined = pairs.assign(**out, negative_group=[f"d:{d}" if d else None for d in out["negative_id"]],
                         negative_label=None, negative_kind=["text" if d else None for d in out["negative_id"]])
    has = mined["negative"].notna()
    return mined, {"pairs": int(len(pairs)), "with_negative": int(has.sum()), "pool_size": len(docs),
                   "settings": settings.model_dump()}


# ------------------------------------------------------------------------------------------------- the stage

def _tokenizer(cfg: Config):
    """(tokenizer, the model's maximum length, prompt token counts per role) of the base model."""
    from pipeline.model import prompts
    from pipeline.model.encoder import load_base

    st_model = load_base(cfg.model)
    tok = st_model[0].tokenizer
    used = prompts.for_run(cfg, st_model)
    count = {role: len(tok(used.prefix(role), add_special_tokens=False)["input_ids"]) if used.prefix(role) else 0
             for role in ("query", "document")}
    model_max = int(st_model.max_seq_length or tok.model_max_length)
    return tok, model_max, count


def _token_lengths(tok, texts: list[str]) -> np.ndarray:
    if not texts:  # a corpus with no judged query (the corpus objective, unverified)
        return np.zeros(0, dtype=np.int64)
    return np.array([len(x) for x in tok(texts, add_special_tokens=True)["input_ids"]], dtype=np.int64)


def prepare(cfg: Config, *, force: bool = False) -> Path:
    """A retrieval set -> corpus, queries, qrels, passages, pairs and the manifest under data/processed/<name>/."""
    from pipeline.model.encoder import base_fingerprint, resolve_base

    layout = Layout(cfg)
    out = layout.processed
    rs = sources.read(cfg, layout.raw)
    input_hashes = hash_inputs(rs.inputs)
    # lengths and passages are in the base model's tokens, and mined negatives come from the base model
    fp = digest([prepared_fingerprint(cfg, input_hashes), base_fingerprint(resolve_base(cfg.model.base)),
                 cfg.model.prompts.model_dump()])
    if not force and is_up_to_date(out, fp):
        log.info("prepare: %s is up to date", out)
        return out
    # a table of texts alone is judged by its judged set (validation and test), never trained on it
    trainable = has_train_judgments(rs) and not sources.is_text_table(cfg)
    objective = pair_kinds.resolve_retrieval(cfg, has_train_judgments=trainable)
    log.info("prepare: objective %s (%s)", objective.name, objective.reason)
    queries, qrels, plan = assign_query_splits(rs, cfg, objective.name)
    queries, qrels, leaks = remove_leaks(queries, qrels)
    check_judged(queries, qrels, rs.source, unverified_ok=objective.name == "corpus")
    tok, model_max, prompt_tokens = _tokenizer(cfg)
    full = (rs.corpus["title"] + " " + rs.corpus["text"]).str.strip().tolist()
    lengths = choose_lengths(cfg, model_max, _token_lengths(tok, full), _token_lengths(tok, queries["text"].tolist()),
                             prompt_tokens)
    passages = make_passages(rs.corpus, tok, lengths, prompt_tokens["document"])
    lengths["passages_total"] = int(len(passages))
    lengths["documents_in_passages"] = int(passages["doc"].duplicated(keep=False).groupby(passages["doc"]).any().sum())
    first = dict(zip(passages["doc"][~passages["doc"].duplicated()], passages["text"][~passages["doc"].duplicated()]))
    if objective.name == "corpus":
        pairs, hn_stats = _pseudo_pairs(rs, queries, cfg, lengths["encoder"])
    else:
        pairs, hn_stats = _pairs(queries, qrels, rs, first, cfg, lengths["encoder"])
    summary = _summary(rs, Judged(queries, qrels, plan, leaks), pairs, hn_stats, lengths, objective)
    with atomic_dir(out) as tmp:
        _write(tmp, rs.corpus, queries, qrels, passages, pairs)
        summary["texts_fingerprint"] = texts_fingerprint(tmp, summary["text_files"])
        write_json_atomic(tmp / MANIFEST, make_manifest("prepare", cfg, fingerprint=fp, inputs=input_hashes,
                                                        extra=summary))
    log.info("prepare: wrote %s (%d documents in %d passages; queries %s; %d training pairs)", out, len(rs.corpus),
             len(passages), ", ".join(f"{s} {n}" for s, n in summary["sizes"]["queries"].items()), len(pairs))
    return out


def _pairs(queries, qrels, rs, first: dict[str, str], cfg: Config, encoder_length: int):
    if not (queries["split"] == "train").any():
        raise DataError(f"{rs.source}: no train judgments, so there is nothing to train on; give train qrels (or "
                        f"judged train pairs)")
    pairs = build_pairs(queries, qrels, first, cfg)
    if not cfg.pairs.hard_negatives.enabled:
        return pairs, None
    train_q = set(queries.loc[queries["split"] == "train", "id"])
    rel = qrels[(qrels["score"] > 0) & qrels["query_id"].isin(train_q)]
    relevant = rel.groupby("query_id")["doc_id"].apply(set).to_dict()
    return mine_negatives(pairs, rs.corpus["id"].tolist(), first, relevant, cfg, encoder_length)


def _pseudo_pairs(rs, queries: pd.DataFrame, cfg: Config, encoder_length: int) -> tuple[pd.DataFrame, dict]:
    """The corpus objective: pseudo pairs from every document (pipeline/prepare/pseudo.py); no val or test query text
    is ever a pseudo query. Returns (pairs, the manifest's ``pseudo`` block)."""
    from pipeline.prepare import pseudo

    docs = pseudo.Documents(rs.corpus["id"].tolist(), rs.corpus["title"].tolist(), rs.corpus["text"].tolist())
    avoid = set(queries["text"].map(text_key))
    built = pseudo.build(docs, cfg, encoder_length=encoder_length, avoid=avoid)
    return built.pairs, built.stats


def _write(tmp: Path, corpus: pd.DataFrame, queries: pd.DataFrame, qrels: pd.DataFrame, passages: pd.DataFrame,
           pairs: pd.DataFrame) -> None:
    corpus[["id", "title", "text"]].to_json(tmp / CORPUS, orient="records", lines=True, force_ascii=False)
    queries[["id", "text", "split"]].to_json(tmp / QUERIES, orient="records", lines=True, force_ascii=False)
    passages.to_json(tmp / PASSAGES, orient="records", lines=True, force_ascii=False)
    pairs.to_json(tmp / PAIRS, orient="records", lines=True, force_ascii=False)
    (tmp / QRELS_DIR).mkdir()
    for split in SPLITS:
        part = qrels[qrels["split"] == split][["query_id", "doc_id", "score"]]
        part.set_axis(list(QRELS_HEADER), axis=1).to_csv(tmp / QRELS_DIR / f"{split}.tsv", sep="\t", index=False)


@dataclass(frozen=True)
class Judged:
    """The judged queries as split: queries and qrels with their split, the split plan and the leaks removed."""

    queries: pd.DataFrame
    qrels: pd.DataFrame
    plan: dict
    leaks: dict


def _summary(rs, judged: Judged, pairs: pd.DataFrame, hn_stats: dict | None, lengths: dict, objective) -> dict:
    queries, qrels, plan, leaks = judged.queries, judged.qrels, judged.plan, judged.leaks
    grades = {str(k): int(v) for k, v in qrels["score"].value_counts().sort_index().items()}
    corpus_objective = objective.name == "corpus"
    n_queries = {s: int((queries["split"] == s).sum()) for s in SPLITS}
    return {
        "kind": "retrieval",
        # with no judged query (the corpus objective, unverified) there are no queries to embed
        "text_files": RETRIEVAL_TEXT_FILES if len(queries) else [PASSAGES],
        "sizes": {"documents": int(len(rs.corpus)), "passages": lengths["passages_total"], "queries": n_queries,
                  "judgments": {s: int((qrels["split"] == s).sum()) for s in SPLITS}, "pairs": int(len(pairs))},
        "counts": {"queries_read": int(len(rs.queries)), "judgments_read": int(len(rs.qrels)),
                   "queries_without_judgments_left_out": int((~rs.queries["id"].isin(set(rs.qrels["query_id"]))).sum()),
                   "blank_documents_dropped": rs.blank_documents_dropped,
                   **leaks, **{k: v for k, v in plan.items() if isinstance(v, int)}},
        "grades": grades,
        "split_plan": {k: v for k, v in plan.items() if not isinstance(v, int)},
        "lengths": lengths,
        "pairs": {"total": int(len(pairs)), "pair": 0 if corpus_objective else int(len(pairs)),
                  "train_queries": 0 if corpus_objective else int(pairs["query_id"].nunique()),
                  "with_negative": int(pairs["negative"].notna().sum()) if "negative" in pairs else 0,
                  **({"by_method": hn_stats["by_method"]} if corpus_objective else {})},
        # the judged set: what eval can verify the run with (none: the run is "unverified")
        "judged": {"val_queries": n_queries["val"], "test_queries": n_queries["test"],
                   "verified": n_queries["test"] > 0},
        "labels": [],
        "objective": objective.as_dict(),
        "notes": NOTES,
        **({"pseudo": hn_stats} if corpus_objective else {"hard_negatives": hn_stats} if hn_stats else {}),
    }
