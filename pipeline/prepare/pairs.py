"""prepare, pair corpora: queries with relevant items in a gallery, no class labels (Walmart-Amazon, or
any file of query -> positive rows with ``data.format: pairs``).

prepare writes to ``data/processed/<dataset>/``:

- ``queries.jsonl``: the test queries (id, text, relevant: gallery ids), one per query record;
- ``gallery.jsonl``: every gallery record (id, text), the whole search space;
- ``pairs.jsonl``: training pairs (anchor = query text, positive = matching item text, kind ``pair``,
  group, no label), plus mined negatives when ``pairs.hard_negatives.enabled``;
- ``manifest.json`` with ``kind: pairs``, the ``text_files`` that embed encodes, counts and drops.

Walmart-Amazon protocol (see ../shared/data/walmart_amazon/SOURCE.md):

- Queries are the Walmart records with a labelled match in ``test.csv``; the gallery is all 22,074
  Amazon records. A query's relevant items are *all* its labelled matches, in any split: an Amazon
  record labelled as the same product in ``train.csv`` is a right answer too, and scoring it as wrong
  would punish the model for being right. (Unlabelled true matches still count as misses, so recall is
  a lower bound, as SOURCE.md says.)
- Leakage: 17 Walmart records have matches in both train and test. A training pair is dropped when its
  Walmart record is a test query, its Amazon record is relevant to a test query, or either text equals
  a test query's or relevant item's text. The manifest counts each drop.
- Groups: training pairs linked through a shared record (one Walmart record with two Amazon matches,
  one Amazon record matched by two Walmart records) or through an identical title form one group, so
  the loss never treats one product's records as each other's negatives.
- ``format: pairs`` (a user's file): queries are the distinct query texts, the gallery every distinct
  positive or given-negative text; splits come from ``split_column`` or are drawn per query, and the
  same leakage rules apply (a training pair never touches a test query or its relevant texts).
- Classification: a pair corpus has no shared label space, so it has no classification metrics;
  metrics.json leaves the blocks empty and says why (the reader's ``notes``, e.g. Walmart-Amazon's shop
  categories, travel in the manifest).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.artifacts import MANIFEST, Layout, atomic_dir, is_up_to_date, make_manifest, write_json_atomic
from pipeline.core.config import Config
from pipeline.core.errors import DataError
from pipeline.contracts.identity import prepared_fingerprint
from pipeline.contracts.prepared_data import PAIR_TEXT_FILES, PAIRS, VAL_QUERIES, texts_fingerprint
from pipeline.prepare.sources import ensure_raw, hash_inputs, read_csv

log = logging.getLogger(__name__)
# What a user's pair file means; a named dataset's reader states its own protocol.
PAIR_FILE_NOTES = {"retrieval": "query: a distinct query text of the test split; gallery: every distinct positive "
                                "or given-negative text; relevant: the query's positives (any split)",
                   "classification": "no classification metrics: a pair corpus (query -> matching record) has "
                                     "no shared label space, so no classifier is scored"}
WALMART_AMAZON_NOTES = {
    "retrieval": "query: a Walmart record with a labelled match in test.csv; gallery: every Amazon record; "
                 "relevant: all the query's labelled matches (any split)",
    "classification": "no classification metrics: a pair dataset (query -> matching record) without a shared label "
                      "space; the shop categories are noisy and differ between the two shops (SOURCE.md), so no "
                      "classifier is scored rather than a number invented"}


@dataclass
class PairCorpus:
    """A retrieval corpus: query records, gallery records and labelled matches between them."""

    queries: pd.DataFrame  # id, text
    gallery: pd.DataFrame  # id, text
    matches: pd.DataFrame  # query_id, item_id, split (train/val/test): labelled positives only
    negatives: pd.DataFrame | None = None  # query_id, item_id: given negatives (format pairs)
    notes: dict[str, str] | None = None  # what retrieval means on this corpus, why no classification


def _id_order(x: str):
    return (0, int(x), "") if str(x).isdigit() else (1, 0, str(x))


def load_walmart_amazon(cfg: Config, raw_dir: Path) -> tuple[PairCorpus, dict[str, Path]]:
    files = ensure_raw(cfg, raw_dir)
    col = cfg.data.text_column

    def table(name: str) -> pd.DataFrame:
        path = raw_dir / name
        df = read_csv(path)
        if col not in df.columns:
            raise DataError(f"{path}: column '{col}' (data.text_column) not found; the file has: "
                            f"{', '.join(df.columns)}")
        text = df[col].astype("string").str.strip()
        keep = text.notna() & (text != "")
        return pd.DataFrame({"id": df["id"].astype(str), "text": text.astype(object)})[keep.to_numpy()]

    queries, gallery = table("tableA.csv"), table("tableB.csv")
    parts = []
    for name, split in (("train.csv", "train"), ("valid.csv", "val"), ("test.csv", "test")):
        df = read_csv(raw_dir / name)
        missing = {"ltable_id", "rtable_id", "label"} - set(df.columns)
        if missing:
            raise DataError(f"{raw_dir / name}: columns {sorted(missing)} not found")
        pos = df[df["label"] == 1]
        parts.append(pd.DataFrame({"query_id": pos["ltable_id"].astype(str), "item_id": pos["rtable_id"].astype(str),
                                   "split": split}))
    matches = pd.concat(parts, ignore_index=True)
    known = matches["query_id"].isin(set(queries["id"])) & matches["item_id"].isin(set(gallery["id"]))
    matches = matches[known.to_numpy()].reset_index(drop=True)
    return PairCorpus(queries, gallery, matches, notes=WALMART_AMAZON_NOTES), {str(f): f for f in files}


def load_pair_table(cfg: Config) -> tuple[PairCorpus, dict[str, Path]]:
    """A CSV/TSV/JSONL/Parquet file (or ``hf:`` dataset) of query -> positive rows, as a PairCorpus.

    Queries are the distinct query texts, the gallery every distinct positive (and given negative) text.
    Splits come from ``data.split_column`` or are drawn per distinct query with ``data.split`` fractions,
    so one query never spans two splits.
    """
    from pipeline.prepare.sources import canonical_splits, read_source

    d = cfg.data
    if not d.path:
        raise DataError("data.path must name the pairs file (or hf:<dataset>) when data.format is 'pairs'")
    df, inputs = read_source(d.path)
    split_col = "__split__" if d.path.startswith("hf:") and d.split_column is None else d.split_column
    cols = {"query_column": d.query_column, "positive_column": d.positive_column,
            "negative_column": d.negative_column, "split_column": split_col}
    for key, col in cols.items():
        if col is not None and col not in df.columns:
            raise DataError(f"{d.path}: column '{col}' (data.{key}) not found; the file has: "
                            f"{', '.join(map(str, df.columns))}")
    clean = lambda c: df[c].astype("string").str.strip()  # noqa: E731
    q, p = clean(d.query_column), clean(d.positive_column)
    keep = (q.notna() & (q != "") & p.notna() & (p != "")).to_numpy()
    given = None
    if split_col:
        where = (f"{d.path} (the split names)" if split_col == "__split__"
                 else f"{d.path}: column '{split_col}' (data.split_column)")
        given = canonical_splits(df[split_col], cfg, where)
        keep &= (given != "drop").to_numpy()
    if not keep.any():
        raise DataError(f"{d.path}: no row has both a query and a positive text")
    q, p = q[keep].astype(str), p[keep].astype(str)
    neg = clean(d.negative_column)[keep].astype(object) if d.negative_column else None
    gallery_texts = list(dict.fromkeys(list(p) + ([t for t in neg if isinstance(t, str) and t] if neg is not None
                                                  else [])))
    query_texts = list(dict.fromkeys(q))
    g_id = {t: str(i) for i, t in enumerate(gallery_texts)}
    q_id = {t: str(i) for i, t in enumerate(query_texts)}
    if split_col:
        split = given[keep].to_numpy()
    else:
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(query_texts))
        cut = np.cumsum([d.split.train, d.split.val]) * len(query_texts)
        where = np.where(np.arange(len(query_texts)) < cut[0], "train",
                         np.where(np.arange(len(query_texts)) < cut[1], "val", "test"))
        by_query = {query_texts[i]: where[r] for r, i in enumerate(order)}
        split = np.array([by_query[t] for t in q])
    matches = pd.DataFrame({"query_id": [q_id[t] for t in q], "item_id": [g_id[t] for t in p], "split": split})
    matches = matches.drop_duplicates(subset=["query_id", "item_id"]).reset_index(drop=True)
    negatives = None
    if neg is not None:
        has = np.array([isinstance(t, str) and bool(t) for t in neg])
        negatives = pd.DataFrame({"query_id": [q_id[t] for t in q[has]], "item_id": [g_id[t] for t in neg[has]],
                                  "split": split[has]})
    corpus = PairCorpus(queries=pd.DataFrame({"id": list(q_id.values()), "text": query_texts}),
                        gallery=pd.DataFrame({"id": list(g_id.values()), "text": gallery_texts}),
                        matches=matches, negatives=negatives, notes=PAIR_FILE_NOTES)
    return corpus, inputs


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def split_corpus(corpus: PairCorpus) -> dict:
    """Test queries with their relevant items, and leak-free training pairs with groups.

    Returns a dict with ``queries`` (DataFrame id, text, relevant), ``pairs`` (DataFrame anchor, positive,
    kind, group, label), ``pool`` (gallery records a mined negative may come from) and ``counts``.
    """
    q_text = dict(zip(corpus.queries["id"], corpus.queries["text"]))
    g_text = dict(zip(corpus.gallery["id"], corpus.gallery["text"]))
    m = corpus.matches
    test_q = sorted(set(m.loc[m["split"] == "test", "query_id"]), key=_id_order)
    relevant = m[m["query_id"].isin(set(test_q))].groupby("query_id")["item_id"].apply(
        lambda s: sorted(set(s), key=_id_order)).to_dict()
    test_pairs = m[m["split"] == "test"]
    counts = {
        "test_queries": len(test_q),
        "test_matches": int(len(test_pairs)),
        "relevant_items": int(sum(len(v) for v in relevant.values())),
        "relevant_from_other_splits": int(sum(len(v) for v in relevant.values()) - len(test_pairs)),
    }
    queries = pd.DataFrame({"id": test_q, "text": [q_text[q] for q in test_q],
                            "relevant": [relevant[q] for q in test_q]})

    held_q, held_i = set(test_q), {i for v in relevant.values() for i in v}
    held_q_text, held_i_text = {q_text[q] for q in held_q}, {g_text[i] for i in held_i}
    train = m[m["split"] == "train"].copy()
    counts["train_matches"] = int(len(train))
    drops = {
        "train_pairs_dropped_query_is_test_query": train["query_id"].isin(held_q),
        "train_pairs_dropped_item_is_test_relevant": train["item_id"].isin(held_i),
        "train_pairs_dropped_query_text_in_test": train["query_id"].map(q_text).isin(held_q_text),
        "train_pairs_dropped_item_text_in_test": train["item_id"].map(g_text).isin(held_i_text),
    }
    leak = np.zeros(len(train), dtype=bool)
    for name, hit in drops.items():
        counts[name] = int((hit.to_numpy() & ~leak).sum())  # each pair counted under its first reason
        leak |= hit.to_numpy()
    train = train[~leak].reset_index(drop=True)

    uf = _UnionFind()
    for q, i in zip(train["query_id"], train["item_id"]):
        uf.union(f"a:{q}", f"b:{i}")
        uf.union(f"a:{q}", f"ta:{q_text[q]}")
        uf.union(f"b:{i}", f"tb:{g_text[i]}")
    pairs = pd.DataFrame({
        "anchor": train["query_id"].map(q_text), "positive": train["item_id"].map(g_text), "kind": "pair",
        "group": ["g:" + uf.find(f"a:{q}") for q in train["query_id"]], "label": None})
    if corpus.negatives is not None:
        pairs = _attach_given_negatives(pairs, train, corpus.negatives, uf, g_text, held_i, held_i_text)
    pairs = pairs.drop_duplicates(subset=["anchor", "positive"]).reset_index(drop=True)
    counts["train_pairs"] = int(len(pairs))
    counts["train_groups"] = int(pairs["group"].nunique())

    val_queries = _val_queries(m, q_text, held_q, set(train["query_id"]))
    counts["val_queries"] = int(len(val_queries))
    pool = corpus.gallery[~corpus.gallery["id"].isin(held_i) & ~corpus.gallery["text"].isin(held_i_text)]
    pool = pd.DataFrame({"text": pool["text"].to_numpy(),
                         "group": ["g:" + uf.find(f"b:{i}") if f"b:{i}" in uf.parent else f"b:{i}"
                                   for i in pool["id"]],
                         "label": None})
    return {"queries": queries, "val_queries": val_queries, "pairs": pairs, "pool": pool, "counts": counts}


def _val_queries(m: pd.DataFrame, q_text: dict, test_q: set, train_q: set) -> pd.DataFrame:
    """Validation queries for choosing a checkpoint: queries with a labelled match in the val split that
    are neither test queries nor anchors of a training pair (so the score is not recall of seen pairs);
    relevant items are all their labelled matches, as for the test queries."""
    val_q = sorted(set(m.loc[m["split"] == "val", "query_id"]) - test_q - train_q, key=_id_order)
    relevant = m[m["query_id"].isin(set(val_q))].groupby("query_id")["item_id"].apply(
        lambda s: sorted(set(s), key=_id_order)).to_dict()
    return pd.DataFrame({"id": val_q, "text": [q_text[q] for q in val_q], "relevant": [relevant[q] for q in val_q]},
                        columns=["id", "text", "relevant"])


def _attach_given_negatives(pairs, train, negatives, uf, g_text, held_i, held_i_text) -> pd.DataFrame:
    """The first given negative of each pair's query (train split) that is not held out for the test
    queries and not linked to the pair's own group; none where no such negative exists."""
    neg = negatives[(negatives["split"] == "train") & ~negatives["item_id"].isin(held_i)]
    by_query = neg.groupby("query_id")["item_id"].apply(list).to_dict()
    out = {c: [None] * len(pairs) for c in ("negative", "negative_group", "negative_label", "negative_kind")}
    for row, (q, group) in enumerate(zip(train["query_id"], pairs["group"])):
        for item in by_query.get(q, []):
            item_group = "g:" + uf.find(f"b:{item}") if f"b:{item}" in uf.parent else f"b:{item}"
            if item_group != group and g_text[item] not in held_i_text:
                out["negative"][row], out["negative_group"][row], out["negative_kind"][row] = (
                    g_text[item], item_group, "text")
                break
    return pairs.assign(**out)


def prepare(cfg: Config, *, force: bool = False) -> Path:
    """Pair corpus -> ``queries.jsonl``, ``val_queries.jsonl``, ``gallery.jsonl``, ``pairs.jsonl`` and the manifest."""
    layout = Layout(cfg)
    out = layout.processed
    if cfg.data.format == "walmart_amazon":
        corpus, files = load_walmart_amazon(cfg, layout.raw)
    elif cfg.data.format == "pairs":
        corpus, files = load_pair_table(cfg)
    else:
        raise DataError(f"data.format '{cfg.data.format}' is not a pair dataset")
    input_hashes = hash_inputs(files)
    fp = prepared_fingerprint(cfg, input_hashes)
    if not force and is_up_to_date(out, fp):
        log.info("prepare: %s is up to date", out)
        return out
    parts = split_corpus(corpus)
    if len(parts["queries"]) == 0:
        raise DataError("the test split has no query with a positive; nothing to evaluate retrieval on")
    if len(parts["pairs"]) == 0:
        raise DataError("no training pairs are left after removing those that touch a test query")
    pairs, hn_stats = _training_pairs(parts, cfg)
    summary = _summary(corpus, parts, pairs, cfg, hn_stats)
    with atomic_dir(out) as tmp:
        parts["queries"].to_json(tmp / "queries.jsonl", orient="records", lines=True, force_ascii=False)
        parts["val_queries"].to_json(tmp / VAL_QUERIES, orient="records", lines=True, force_ascii=False)
        corpus.gallery.to_json(tmp / "gallery.jsonl", orient="records", lines=True, force_ascii=False)
        pairs.to_json(tmp / PAIRS, orient="records", lines=True, force_ascii=False)
        summary["texts_fingerprint"] = texts_fingerprint(tmp, summary["text_files"])
        write_json_atomic(tmp / MANIFEST, make_manifest("prepare", cfg, fingerprint=fp, inputs=input_hashes,
                                                        extra=summary))
    log.info("prepare: wrote %s (%d test queries, %d gallery records, %d training pairs; %d dropped for leakage)",
             out, len(parts["queries"]), len(corpus.gallery), len(pairs),
             sum(v for k, v in parts["counts"].items() if k.startswith("train_pairs_dropped")))
    return out


def _training_pairs(parts: dict, cfg: Config) -> tuple[pd.DataFrame, dict | None]:
    """The leak-free pairs, capped at ``pairs.max_pairs``, with mined negatives where the data gave none,
    shuffled with the run's seed."""
    pairs = parts["pairs"]
    if cfg.pairs.max_pairs is not None and len(pairs) > cfg.pairs.max_pairs:
        keep = np.random.default_rng(cfg.seed + 1).permutation(len(pairs))[: cfg.pairs.max_pairs]
        pairs = pairs.iloc[np.sort(keep)].reset_index(drop=True)
    hn_stats = None
    if cfg.pairs.hard_negatives.enabled:
        from pipeline.prepare import hard_negatives

        todo = pairs["negative"].isna().to_numpy() if "negative" in pairs else np.ones(len(pairs), dtype=bool)
        mined, hn_stats = hard_negatives.mine(pairs[todo].drop(columns=hard_negatives.NEGATIVE_COLUMNS,
                                                               errors="ignore"), parts["pool"], cfg)
        pairs = pairs.copy() if "negative" in pairs else pairs.assign(
            **{c: None for c in hard_negatives.NEGATIVE_COLUMNS})
        pairs.loc[todo, hard_negatives.NEGATIVE_COLUMNS] = mined[hard_negatives.NEGATIVE_COLUMNS].to_numpy()
    pairs = pairs.iloc[np.random.default_rng(cfg.seed + 1).permutation(len(pairs))].reset_index(drop=True)
    return pairs, hn_stats


def _summary(corpus: PairCorpus, parts: dict, pairs: pd.DataFrame, cfg: Config, hn_stats: dict | None) -> dict:
    """The manifest's description of the prepared pair corpus."""
    return {
        "kind": "pairs",
        # embed encodes the val queries too, so eval can judge both models on validation (the rule of
        # eval.validation_verdict) against the whole gallery
        "text_files": PAIR_TEXT_FILES + ([VAL_QUERIES] if len(parts["val_queries"]) else []),
        "counts": {**parts["counts"], "query_records": int(len(corpus.queries)),
                   "gallery_records": int(len(corpus.gallery))},
        "sizes": {"queries": int(len(parts["queries"])), "gallery": int(len(corpus.gallery)),
                  "pairs": int(len(pairs))},
        "pairs": {"total": int(len(pairs)), "pair": int(len(pairs)),
                  "with_negative": int(pairs["negative"].notna().sum()) if "negative" in pairs else 0},
        "labels": [],
        "objective": {"name": "pairs", "reason": "the corpus is query -> positive pairs", "same_label_pairs": 0.0,
                      "mask_same_label": bool(cfg.train.mask_same_label)},
        "notes": corpus.notes or PAIR_FILE_NOTES,
        **({"hard_negatives": hn_stats} if hn_stats else {}),
    }
