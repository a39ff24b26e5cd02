"""Pair datasets: queries with relevant items in a gallery, no class labels (Walmart-Amazon, or any
file of query -> positive rows with ``data.format: pairs``).

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
- Classification: the shop categories are noisy, shop-specific labels (SOURCE.md), so this dataset has
  no classification metrics; metrics.json leaves the blocks empty and says why.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import metrics as M
from pipeline import tracking
from pipeline.artifacts import (MANIFEST, Layout, atomic_dir, is_up_to_date, make_manifest, sha256_file,
                                write_json_atomic)
from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.sources import _read_csv, ensure_raw

log = logging.getLogger(__name__)
TEXT_FILES = ["queries.jsonl", "gallery.jsonl"]
VAL_QUERIES = "val_queries.jsonl"  # queries of the val split: read by training to choose its checkpoint
CLASSIFICATION_NOTE = ("no classification metrics: this is a pair dataset (query -> matching record) without a "
                       "shared label space; the shop categories are noisy and differ between the two shops "
                       "(only 41 of 962 matches share a category string), so no classifier is scored rather "
                       "than a number invented")


@dataclass
class PairCorpus:
    """A retrieval corpus: query records, gallery records and labelled matches between them."""

    queries: pd.DataFrame  # id, text
    gallery: pd.DataFrame  # id, text
    matches: pd.DataFrame  # query_id, item_id, split (train/val/test): labelled positives only
    negatives: pd.DataFrame | None = None  # query_id, item_id: given negatives (format pairs)


def _id_order(x: str):
    return (0, int(x), "") if str(x).isdigit() else (1, 0, str(x))


def load_walmart_amazon(cfg: Config, raw_dir: Path) -> tuple[PairCorpus, dict[str, Path]]:
    files = ensure_raw(cfg, raw_dir)
    col = cfg.data.text_column

    def table(name: str) -> pd.DataFrame:
        path = raw_dir / name
        df = _read_csv(path)
        if col not in df.columns:
            raise DataError(f"{path}: column '{col}' (data.text_column) not found; the file has: "
                            f"{', '.join(df.columns)}")
        text = df[col].astype("string").str.strip()
        keep = text.notna() & (text != "")
        return pd.DataFrame({"id": df["id"].astype(str), "text": text.astype(object)})[keep.to_numpy()]

    queries, gallery = table("tableA.csv"), table("tableB.csv")
    parts = []
    for name, split in (("train.csv", "train"), ("valid.csv", "val"), ("test.csv", "test")):
        df = _read_csv(raw_dir / name)
        missing = {"ltable_id", "rtable_id", "label"} - set(df.columns)
        if missing:
            raise DataError(f"{raw_dir / name}: columns {sorted(missing)} not found")
        pos = df[df["label"] == 1]
        parts.append(pd.DataFrame({"query_id": pos["ltable_id"].astype(str), "item_id": pos["rtable_id"].astype(str),
                                   "split": split}))
    matches = pd.concat(parts, ignore_index=True)
    known = matches["query_id"].isin(set(queries["id"])) & matches["item_id"].isin(set(gallery["id"]))
    matches = matches[known.to_numpy()].reset_index(drop=True)
    return PairCorpus(queries, gallery, matches), {str(f): f for f in files}


def load_pair_table(cfg: Config) -> tuple[PairCorpus, dict[str, Path]]:
    """A CSV/TSV/JSONL/Parquet file (or ``hf:`` dataset) of query -> positive rows, as a PairCorpus.

    Queries are the distinct query texts, the gallery every distinct positive (and given negative) text.
    Splits come from ``data.split_column`` or are drawn per distinct query with ``data.split`` fractions,
    so one query never spans two splits.
    """
    from pipeline.sources import canonical_splits, read_table

    d = cfg.data
    if not d.path:
        raise DataError("data.path must name the pairs file (or hf:<dataset>) when data.format is 'pairs'")
    df = read_table(d.path)
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
                        matches=matches, negatives=negatives)
    return corpus, ({d.path: Path(d.path)} if not d.path.startswith("hf:") else {})


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
    from pipeline.prepare import fingerprint, texts_fingerprint

    layout = Layout(cfg)
    out = layout.processed
    if cfg.data.format == "walmart_amazon":
        corpus, files = load_walmart_amazon(cfg, layout.raw)
    elif cfg.data.format == "pairs":
        corpus, files = load_pair_table(cfg)
    else:
        raise DataError(f"data.format '{cfg.data.format}' is not a pair dataset")
    input_hashes = {name: sha256_file(path) for name, path in files.items()}
    fp = fingerprint(cfg, input_hashes)
    if not force and is_up_to_date(out, fp):
        log.info("prepare: %s is up to date", out)
        return out
    parts = split_corpus(corpus)
    pairs, counts = parts["pairs"], parts["counts"]
    if len(parts["queries"]) == 0:
        raise DataError("the test split has no query with a positive; nothing to evaluate retrieval on")
    if len(pairs) == 0:
        raise DataError("no training pairs are left after removing those that touch a test query")
    if cfg.pairs.max_pairs is not None and len(pairs) > cfg.pairs.max_pairs:
        keep = np.random.default_rng(cfg.seed + 1).permutation(len(pairs))[: cfg.pairs.max_pairs]
        pairs = pairs.iloc[np.sort(keep)].reset_index(drop=True)
    hn_stats = None
    if cfg.pairs.hard_negatives.enabled:
        from pipeline import hard_negatives

        # Mined negatives fill in where the data gave none.
        todo = pairs["negative"].isna().to_numpy() if "negative" in pairs else np.ones(len(pairs), dtype=bool)
        mined, hn_stats = hard_negatives.mine(pairs[todo].drop(columns=hard_negatives.NEGATIVE_COLUMNS,
                                                               errors="ignore"), parts["pool"], cfg)
        pairs = pairs.copy() if "negative" in pairs else pairs.assign(
            **{c: None for c in hard_negatives.NEGATIVE_COLUMNS})
        pairs.loc[todo, hard_negatives.NEGATIVE_COLUMNS] = mined[hard_negatives.NEGATIVE_COLUMNS].to_numpy()
    pairs = pairs.iloc[np.random.default_rng(cfg.seed + 1).permutation(len(pairs))].reset_index(drop=True)
    summary = {
        "kind": "pairs",
        # embed encodes the val queries too, so eval can judge both models on validation (the rule of
        # eval.validation_verdict) against the whole gallery
        "text_files": TEXT_FILES + ([VAL_QUERIES] if len(parts["val_queries"]) else []),
        "counts": {**counts, "query_records": int(len(corpus.queries)), "gallery_records": int(len(corpus.gallery))},
        "sizes": {"queries": int(len(parts["queries"])), "gallery": int(len(corpus.gallery)),
                  "pairs": int(len(pairs))},
        "pairs": {"total": int(len(pairs)), "pair": int(len(pairs)),
                  "with_negative": int(pairs["negative"].notna().sum()) if "negative" in pairs else 0},
        "labels": [],
        "objective": {"name": "pairs", "reason": "the corpus is query -> positive pairs", "same_label_pairs": 0.0,
                      "mask_same_label": bool(cfg.train.mask_same_label)},
        "retrieval_protocol": "query: a Walmart record with a labelled match in test.csv; gallery: every Amazon "
                              "record; relevant: all the query's labelled matches (any split)",
        **({"hard_negatives": hn_stats} if hn_stats else {}),
    }
    with atomic_dir(out) as tmp:
        parts["queries"].to_json(tmp / "queries.jsonl", orient="records", lines=True, force_ascii=False)
        parts["val_queries"].to_json(tmp / VAL_QUERIES, orient="records", lines=True, force_ascii=False)
        corpus.gallery.to_json(tmp / "gallery.jsonl", orient="records", lines=True, force_ascii=False)
        pairs.to_json(tmp / "pairs.jsonl", orient="records", lines=True, force_ascii=False)
        summary["texts_fingerprint"] = texts_fingerprint(tmp, summary["text_files"])
        write_json_atomic(tmp / MANIFEST, make_manifest("prepare", cfg, fingerprint=fp, inputs=input_hashes,
                                                        extra=summary))
    log.info("prepare: wrote %s (%d test queries, %d gallery records, %d training pairs; %d dropped for leakage)",
             out, len(parts["queries"]), len(corpus.gallery), len(pairs),
             sum(v for k, v in counts.items() if k.startswith("train_pairs_dropped")))
    return out


# ----------------------------------------------------------------------------------------------- evaluation

def load_queries(folder: Path, name: str = "queries.jsonl") -> pd.DataFrame:
    return pd.read_json(Path(folder) / name, lines=True, dtype={"id": str, "text": str})


def load_gallery(folder: Path) -> pd.DataFrame:
    return pd.read_json(Path(folder) / "gallery.jsonl", lines=True, dtype={"id": str, "text": str})


def relevance_rows(queries: pd.DataFrame, gallery: pd.DataFrame) -> list[np.ndarray]:
    """Gallery row indices of each query's relevant items."""
    where = {g: i for i, g in enumerate(gallery["id"])}
    return [np.array([where[str(r)] for r in rel if str(r) in where], dtype=np.int64) for rel in queries["relevant"]]


def retrieval_scores(q_emb, g_emb, relevant: list[np.ndarray], k: int, search_fn=None) -> dict[str, np.ndarray]:
    """Per-query recall@1/@k (success), recall_all@k, nDCG@k, MRR@k of queries against the whole gallery.

    q_emb: (n_queries, dim), g_emb: (n_gallery, dim) L2-normalised (or sparse TF-IDF rows with a
    ``search_fn``); relevant: per query, the gallery rows that count as hits (>= 1 each).
    """
    _, ids = (search_fn or M.search)(g_emb, q_emb, k)
    hits = np.zeros(ids.shape, dtype=bool)
    for row, (found, rel) in enumerate(zip(ids, relevant)):
        hits[row] = np.isin(found, rel)
    return M.retrieval_per_query(hits, np.array([len(r) for r in relevant]), ks=(1, k))


def summarize(per_query: dict[str, np.ndarray], cfg: Config) -> tuple[dict, dict]:
    means = {k: round(float(v.mean()), 5) for k, v in per_query.items()}
    ci = {k: [round(x, 5) for x in M.bootstrap_mean_ci(v, cfg.eval.bootstrap, cfg.seed)] for k, v in per_query.items()}
    return means, ci


def paired_deltas(adapted: dict[str, np.ndarray], base: dict[str, np.ndarray], cfg: Config) -> dict:
    """Mean per-query difference adapted - base with a paired bootstrap 95% CI (same queries resampled)
    and its verdict, for every metric."""
    out = {}
    for k in adapted:
        r = M.paired_bootstrap_mean(adapted[k], base[k], cfg.eval.bootstrap, cfg.seed)
        out[k] = {"delta": round(r["delta"], 5), "ci": [round(x, 5) for x in r["ci"]], "verdict": r["verdict"]}
    return out


def tfidf_search_fn():
    """Sparse top-k by cosine over TF-IDF rows (both inputs L2-normalised CSR matrices)."""
    from pipeline.metrics import sparse_search

    return sparse_search


def lexical_retrieval(queries: pd.DataFrame, gallery: pd.DataFrame, relevant, cfg: Config) -> dict[str, np.ndarray]:
    """TF-IDF (word 1-2 grams + char_wb 2-5 grams, as eval's lexical baseline) fit on the gallery texts."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    word = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True,
                           token_pattern=r"(?u)\b\w[\w.\-/]*\b").fit(gallery["text"])
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2).fit(gallery["text"])

    def vec(texts):
        return normalize(hstack([word.transform(texts), char.transform(texts)]).tocsr())

    return retrieval_scores(vec(queries["text"]), vec(gallery["text"]), relevant, cfg.eval.retrieval_k,
                            search_fn=tfidf_search_fn())


def score_embeddings(emb_dir: Path, queries, gallery, relevant, cfg: Config) -> dict[str, np.ndarray]:
    q = np.load(Path(emb_dir) / "queries.npy")
    g = np.load(Path(emb_dir) / "gallery.npy")
    if len(q) != len(queries) or len(g) != len(gallery):
        raise DataError(f"embeddings in {emb_dir} do not match the prepared queries/gallery; rerun embed --force")
    return retrieval_scores(q, g, relevant, cfg.eval.retrieval_k)


def validation_figures(processed: Path, emb_manifest: dict, gallery: pd.DataFrame, cfg: Config) -> dict:
    """``{metric: (adapted, base)}`` of retrieval on the validation queries, where prepare wrote
    ``val_queries.jsonl`` and embed embedded it for both models; else empty (the validation rule then
    falls back to the training curve)."""
    path = Path(processed) / "val_queries.jsonl"
    dirs = [Path(emb_manifest["adapted_dir"]), Path(emb_manifest["base_dir"])]
    if not path.exists() or not all((d / "val_queries.npy").exists() for d in dirs):
        return {}
    queries = load_queries(processed, "val_queries.jsonl")
    relevant = relevance_rows(queries, gallery)
    keep = np.array([len(r) > 0 for r in relevant], dtype=bool)
    if not keep.all():
        log.warning("eval: %d of %d validation queries have no relevant item in the gallery; scored without them",
                    int((~keep).sum()), len(keep))
    if not keep.any():
        return {}
    scores = []
    for d in dirs:
        q, g = np.load(d / "val_queries.npy"), np.load(d / "gallery.npy")
        if len(q) != len(queries):
            raise DataError(f"embeddings in {d} do not match {path}; rerun embed --force")
        per_query = retrieval_scores(q[keep], g, [r for r, k in zip(relevant, keep) if k], cfg.eval.retrieval_k)
        scores.append({k: float(v.mean()) for k, v in per_query.items()})
    return {k: (scores[0][k], scores[1][k]) for k in scores[0]}


def delta_table(deltas: dict) -> list[str]:
    lines = ["| metric | adapted - base | 95% CI (paired bootstrap) | verdict |", "|---|---|---|---|"]
    for k, d in deltas.items():
        lines.append(f"| {k} | {d['delta']:+.3f} | [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] | {d.get('verdict', '–')} |")
    return lines


def evaluate(cfg: Config, layout: Layout, prep: dict, emb_manifest: dict, train_manifest: dict, info: dict) -> Path:
    from pipeline import eval as E
    from pipeline import report
    from pipeline.families import lora_block

    queries, gallery = load_queries(layout.processed), load_gallery(layout.processed)
    relevant = relevance_rows(queries, gallery)
    if any(len(r) == 0 for r in relevant):
        raise DataError("a prepared query has no relevant item in the gallery; rerun prepare --force")
    log.info("eval: %d queries against %d gallery records", len(queries), len(gallery))
    adapted = score_embeddings(Path(emb_manifest["adapted_dir"]), queries, gallery, relevant, cfg)
    base = score_embeddings(Path(emb_manifest["base_dir"]), queries, gallery, relevant, cfg)
    ret, ci = summarize(adapted, cfg)
    base_ret, base_ci = summarize(base, cfg)
    lexical, lex_items = None, None
    if cfg.eval.lexical:
        lex_per_query = lexical_retrieval(queries, gallery, relevant, cfg)
        lex_ret, lex_ci = summarize(lex_per_query, cfg)
        lexical = {"classification": {}, "retrieval": lex_ret, "ci": {"retrieval": lex_ci}}
        lex_items = {"retrieval": lex_per_query}
    curve = E.train_curve(train_manifest)
    val_figures = validation_figures(layout.processed, emb_manifest, gallery, cfg)
    verdict = E.verdict_block(cfg, info["method"], {"retrieval": adapted}, {"retrieval": base}, lex_items, None,
                              val_figures, curve)
    train_stats = train_manifest.get("train", {})
    lora = info.get("lora")
    payload = {
        "run_name": cfg.resolved_run_name,
        "dataset": cfg.data.name,
        "mlflow_run_id": train_manifest.get("mlflow_run_id") or "",
        "model": {"base": info["base"], "method": info["method"],
                  "lora": lora_block(lora),
                  "trainable_params": info["trainable_params"], "total_params": info["total_params"]},
        "classification": {},
        "retrieval": ret,
        "baseline": {"classification": {}, "retrieval": base_ret, "ci": {"retrieval": base_ci}},
        "lexical": lexical or {"classification": {}, "retrieval": {}},
        "train": {"seconds": train_stats.get("seconds", 0.0), "pairs_per_second": train_stats.get("pairs_per_second"),
                  "peak_rss_mb": train_stats.get("peak_rss_mb"),
                  "real_tokens_per_second": train_stats.get("real_tokens_per_second"),
                  "steps": train_stats.get("steps"), "device": train_stats.get("device"),
                  "precision": train_stats.get("precision")},
        "ci": {"retrieval": ci},
        "delta_vs_base": {"retrieval": paired_deltas(adapted, base, cfg)},
        "verdict": verdict,
        **({"validation": {"adapted": {"retrieval": {k: round(a, 5) for k, (a, _) in val_figures.items()}},
                           "base": {"retrieval": {k: round(b, 5) for k, (_, b) in val_figures.items()}}}}
           if val_figures else {}),
        "notes": {"classification": CLASSIFICATION_NOTE, "retrieval": prep.get("retrieval_protocol", "")},
        "embed": emb_manifest.get("timing", {}),
        "test_items": int(len(queries)),
        "gallery_items": int(len(gallery)),
        "retrieval_queries": int(len(queries)),
        "objective": prep.get("objective"),  # the objective the training pairs were built for
        "seed": cfg.seed,
        "data_fingerprint": prep["fingerprint"],
        "model_fingerprint": train_manifest["fingerprint"],
    }
    out = layout.report()
    with atomic_dir(out) as tmp:
        write_json_atomic(tmp / "metrics.json", payload)
        has_curve = E.write_curve(curve, tmp, f"{cfg.resolved_run_name}: validation during training")
        others = report.other_runs(Path(cfg.paths.reports), payload)
        md = report.markdown(payload, None, others, curve=has_curve)
        md += "\n".join([
            f"Gallery: {len(gallery):,} records. {prep.get('retrieval_protocol', '')}.", "",
            "## Change vs the base model (same queries)", "", *delta_table(payload["delta_vs_base"]["retrieval"]),
            "", "## Notes", "", f"- {CLASSIFICATION_NOTE[0].upper()}{CLASSIFICATION_NOTE[1:]}.",
            "- recall@k is success@k (a relevant record in the top k); unlabelled true matches count as misses, "
            "so every figure is a lower bound.", ""])
        (tmp / "report.md").write_text(md, encoding="utf-8")
    with atomic_dir(layout.latest_report) as tmp:
        for f in out.iterdir():
            shutil.copy2(f, tmp / f.name)

    _log_to_mlflow(cfg, train_manifest, payload, out)
    log.info("eval: wrote %s (recall@1 %.3f vs base %.3f)", out / "metrics.json", ret["recall@1"],
             base_ret["recall@1"])
    return out


def _log_to_mlflow(cfg: Config, train_manifest: dict, payload: dict, out: Path) -> None:
    from pipeline import eval as E

    with tracking.run(cfg, run_name=cfg.resolved_run_name, run_id=train_manifest.get("mlflow_run_id")) as tracker:
        flat = {}
        for prefix, block in (("", payload), ("base.", payload["baseline"]), ("lexical.", payload["lexical"])):
            flat.update({f"{prefix}{k}": v for k, v in block.get("retrieval", {}).items()})
        for k, (lo, hi) in payload["ci"]["retrieval"].items():
            flat[f"{k}.ci_low"], flat[f"{k}.ci_high"] = lo, hi
        flat.update({f"delta.{k}": d["delta"] for k, d in payload["delta_vs_base"]["retrieval"].items()})
        tracker.log_metrics(flat)
        tracker.set_tags({"evaluated": "true", "classification": "absent (pair dataset)"})
        E.log_verdict(tracker, payload["verdict"])
        for f in ("metrics.json", "report.md", "curve.png"):
            tracker.log_artifact(out / f, "report")
