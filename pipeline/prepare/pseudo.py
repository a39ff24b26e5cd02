"""Pseudo pairs for the corpus objective: training pairs built from the documents alone (no labels, ids or judged
queries), each pair a pseudo query and the document it came from (pipeline/contracts/pair_kinds.py).

Methods (``pairs.corpus.methods``), each applied per sampled document where it applies:

- ``ict`` (inverse cloze, Lee et al. 2019): a sentence -> the title and the rest of its document, the sentence
  removed; in a text too short for sentences (a product title), a word span -> the words around it.
- ``title``: the title -> the body, where a document has both.
- ``crops`` (independent cropping, Izacard et al. 2021): two random spans of one document, drawn independently.
- ``neighbours`` (a pseudo label): a document -> the one other document that BM25 and the base encoder both rank
  within their first ``agree_k`` for it (an identical text never counts).

``pairs.corpus.mine_negatives`` adds one mined negative per pair from the base encoder's ranking of its pseudo query
(the rank window and margin of ``pairs.hard_negatives``), guarded against false negatives: never the pair's own
document, a text identical to it, nor a document that BM25 also ranks within ``guard_k`` for the query.

Streaming: documents are visited in a seeded order, ``shard_documents`` at a time, until ``max_pairs`` pairs exist,
so the cost follows the pairs asked for, not the corpus size; BM25 and the dense search run per block of queries
(top-k only), so no corpus x corpus matrix is ever held. A pseudo query whose text is a val or test query's (case
and spacing ignored) is dropped: no judged query text is trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.core.config import Config
from pipeline.core.errors import DataError
from pipeline.search import ir

log = logging.getLogger(__name__)
LONG_WORDS = 40  # a text of at least this many words is cut by sentences and short crops; below, by word spans
SENTENCE_WORDS = (4, 64)  # an ICT query sentence has this many words
SEARCH_BLOCK = 512  # queries per BM25 / dense search call
PAIR_COLUMNS = ["anchor", "positive", "kind", "group", "label", "positive_id"]


@dataclass
class Documents:
    """What pseudo pairs are built from: one row per document (title may be empty)."""

    ids: list[str]
    titles: list[str]
    texts: list[str]

    def full(self, i: int) -> str:
        return f"{self.titles[i]} {self.texts[i]}".strip()


@dataclass
class Built:
    """The pseudo pairs and what the manifest says about them."""

    pairs: pd.DataFrame
    stats: dict = field(default_factory=dict)


def text_key(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def _words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


# ------------------------------------------------------------------------------------------ per-document methods

def ict(docs: Documents, i: int, cfg: Config, rng: np.random.Generator) -> tuple[str, str] | None:
    """(a sentence, the title + the rest of the document around it), or in a short text a span and its rest."""
    words = docs.texts[i].split()
    budget = cfg.pairs.corpus.positive_words
    if len(words) >= LONG_WORDS:
        sentences = ir.sentences(docs.texts[i])
        fits = [k for k, s in enumerate(sentences) if SENTENCE_WORDS[0] <= len(s.split()) <= SENTENCE_WORDS[1]]
        if len(sentences) >= 3 and fits:
            k = fits[int(rng.integers(len(fits)))]
            return sentences[k], _around(docs.titles[i], sentences, k, budget)
    if len(words) < 4:
        return None
    length = int(rng.integers(max(1, round(0.3 * len(words))), max(2, round(0.6 * len(words))) + 1))
    start = int(rng.integers(0, len(words) - length + 1))
    rest = words[:start] + words[start + length:]
    if len(rest) < 2:
        return None
    return " ".join(words[start:start + length]), f"{docs.titles[i]} {' '.join(rest[:budget])}".strip()


def _around(title: str, sentences: list[str], k: int, budget: int) -> str:
    """The title and the sentences nearest to sentence ``k`` (itself left out), up to ``budget`` words, in order."""
    chosen, used, lo, hi = [], 0, k - 1, k + 1
    while (lo >= 0 or hi < len(sentences)) and used < budget:
        for j in (hi, lo):
            if 0 <= j < len(sentences) and used < budget and j not in chosen:
                chosen.append(j)
                used += len(sentences[j].split())
        lo, hi = lo - 1, hi + 1
    body = " ".join(sentences[j] for j in sorted(chosen))
    return f"{title} {_words(body, budget)}".strip()


def title(docs: Documents, i: int, cfg: Config, rng: np.random.Generator) -> tuple[str, str] | None:
    t, body = docs.titles[i].strip(), docs.texts[i].strip()
    if not t or not body or text_key(t) == text_key(body):
        return None
    return t, _words(body, cfg.pairs.corpus.positive_words)


def crops(docs: Documents, i: int, cfg: Config, rng: np.random.Generator) -> tuple[str, str] | None:
    """Two independent random spans: in a long text a short query span (10-50% of it, 4-64 words) and a longer
    positive (half to all of ``positive_words``); in a short text two spans of 50-90% of its words."""
    words = docs.texts[i].split()
    n, budget = len(words), cfg.pairs.corpus.positive_words
    if n < 3:
        return None
    if n >= LONG_WORDS:
        lq = int(np.clip(round(rng.uniform(0.1, 0.5) * n), 4, 64))
        lp = int(np.clip(round(rng.uniform(0.5, 1.0) * min(n, budget)), 4, budget))
    else:
        lq, lp = (max(2, int(np.ceil(rng.uniform(0.5, 0.9) * n))) for _ in range(2))

    def span(length: int) -> str:
        start = int(rng.integers(0, n - length + 1))
        return " ".join(words[start:start + length])

    query, positive = span(lq), span(lp)
    if text_key(query) == text_key(positive):
        return None
    return query, f"{docs.titles[i]} {positive}".strip()


METHODS = {"ict": ict, "title": title, "crops": crops}


# ---------------------------------------------------------------------------------------------------- rankers

class Rankers:
    """BM25 and the base encoder over every document (its first ``positive_words`` words after the title), searched
    a block of queries at a time, top-k only."""

    def __init__(self, docs: Documents, cfg: Config, encoder_length: int):
        self.cfg, self.length = cfg, encoder_length
        self.texts = [_words(docs.full(i), cfg.pairs.corpus.positive_words + 32) for i in range(len(docs.ids))]
        self.keys = np.array([text_key(docs.full(i)) for i in range(len(docs.ids))], dtype=object)
        log.info("prepare: pseudo pairs: indexing %d documents with BM25 and the base encoder", len(self.texts))
        self.bm25 = ir.BM25.fit(self.texts)
        self.doc_emb, _ = self._embed(self.texts, [])

    def _embed(self, texts: list[str], queries: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        from pipeline.prepare.hard_negatives import _embed

        cfg = self.cfg.model_copy(update={"train": self.cfg.train.model_copy(update={"max_seq_length": self.length})})
        return _embed(cfg, texts, queries)

    def embed_queries(self, queries: list[str]) -> np.ndarray:
        docs, as_queries = self._embed(queries, queries)
        return as_queries if as_queries is not None else docs

    def dense(self, q_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from pipeline.search.metrics import search

        k = min(k, len(self.texts))
        parts = [search(self.doc_emb, q_emb[s:s + SEARCH_BLOCK], k) for s in range(0, len(q_emb), SEARCH_BLOCK)]
        return np.vstack([p[0] for p in parts]), np.vstack([p[1] for p in parts])

    def lexical(self, queries: list[str], k: int) -> np.ndarray:
        parts = [self.bm25.search(queries[s:s + SEARCH_BLOCK], min(k, len(self.texts)))[0]
                 for s in range(0, len(queries), SEARCH_BLOCK)]
        return np.vstack(parts) if parts else np.zeros((0, k), dtype=np.int64)


def neighbours(docs: Documents, rows: np.ndarray, rankers: Rankers, cfg: Config) -> list[tuple[int, int]]:
    """(document, its pseudo-labelled neighbour) for each document of ``rows`` that has one."""
    k = cfg.pairs.corpus.agree_k
    depth = k + 8  # room for the document itself and identical texts
    queries = [rankers.texts[r] for r in rows]
    _, dense = rankers.dense(rankers.doc_emb[rows], depth)
    lexical = rankers.lexical(queries, depth)
    out = []
    for j, r in enumerate(rows):
        lexical_firsts = set(_firsts(lexical[j], r, rankers.keys, k))
        agree = [d for d in _firsts(dense[j], r, rankers.keys, k) if d in lexical_firsts]
        if agree:
            out.append((int(r), int(agree[0])))
    return out


def _firsts(ranked: np.ndarray, own: int, keys: np.ndarray, k: int) -> list[int]:
    """The first ``k`` documents of a ranking that are neither document ``own`` nor a text identical to it."""
    return [int(d) for d in ranked if d >= 0 and d != own and keys[d] != keys[own]][:k]


# ------------------------------------------------------------------------------------------------------- build

def bound(cfg: Config) -> int:
    """The most pseudo pairs a run builds: ``pairs.corpus.max_pairs``, or ``pairs.max_pairs`` when lower."""
    limits = [cfg.pairs.corpus.max_pairs] + ([cfg.pairs.max_pairs] if cfg.pairs.max_pairs is not None else [])
    return int(min(limits))


def build(docs: Documents, cfg: Config, *, encoder_length: int, avoid: set[str] = frozenset()) -> Built:
    """Pseudo pairs from ``docs`` (at most :func:`bound`), with mined negatives when asked; ``avoid``: text keys of
    judged (val/test) queries, never a pseudo query."""
    c = cfg.pairs.corpus
    if not docs.ids:
        raise DataError("the corpus objective needs documents to build pseudo queries from, and there are none")
    rng = np.random.default_rng(cfg.seed + 11)
    wanted, order = bound(cfg), rng.permutation(len(docs.ids))
    mining = c.mine_negatives or cfg.pairs.hard_negatives.enabled  # either switch mines, with this module's guard
    rankers = Rankers(docs, cfg, encoder_length) if ("neighbours" in c.methods or mining) else None
    rows, dropped, visited = [], {"judged_query_text": 0}, 0
    bar = tqdm(total=wanted, desc="pseudo pairs", unit="pair", mininterval=30)
    for start in range(0, len(order), c.shard_documents):
        shard = order[start:start + c.shard_documents]
        made = _shard_pairs(docs, shard, cfg, rng, rankers)
        keep = [p for p in made if text_key(p[0]) not in avoid]
        dropped["judged_query_text"] += len(made) - len(keep)
        rows += keep[: wanted - len(rows)]
        visited += len(shard)
        bar.update(min(len(keep), bar.total - bar.n))
        if len(rows) >= wanted:
            break
    bar.close()
    if not rows:
        raise DataError(f"no pseudo pair could be built from {len(docs.ids):,} documents with methods "
                        f"{', '.join(c.methods)} (texts too short?); add methods or longer documents")
    pairs = pd.DataFrame(rows, columns=["anchor", "positive", "kind", "source", "doc"])
    pairs = pairs.iloc[rng.permutation(len(pairs))].reset_index(drop=True)
    pairs = pd.DataFrame({"anchor": pairs["anchor"], "positive": pairs["positive"], "kind": pairs["kind"],
                          "group": "d:" + pairs["source"], "label": None, "positive_id": pairs["doc"],
                          "source_id": pairs["source"]})
    stats = {"documents": len(docs.ids), "documents_visited": int(min(visited, len(docs.ids))),
             "bound": wanted, "pairs": int(len(pairs)),
             "by_method": {k: int(v) for k, v in pairs["kind"].value_counts().sort_index().items()},
             "dropped": dropped, "methods": list(c.methods)}
    if mining:
        pairs, stats["negatives"] = mine(pairs, docs, rankers, cfg)
    return Built(pairs, stats)


def _shard_pairs(docs: Documents, shard: np.ndarray, cfg: Config, rng: np.random.Generator,
                 rankers: Rankers | None) -> list[tuple[str, str, str, str]]:
    """(pseudo query, positive, method, document id) for one shard of documents, methods interleaved per document."""
    c = cfg.pairs.corpus
    made = []
    linked = {}
    if "neighbours" in c.methods:
        budget = c.positive_words
        linked = {a: b for a, b in neighbours(docs, shard, rankers, cfg)}
    for i in shard:
        for name in c.methods:
            for _ in range(c.per_document):
                if name == "neighbours":
                    if i in linked:
                        b = linked[i]
                        made.append((_words(docs.full(i), budget), _words(docs.full(b), budget), name, docs.ids[i],
                                     docs.ids[b]))
                    break
                pair = METHODS[name](docs, int(i), cfg, rng)
                if pair is not None:
                    made.append((*pair, name, docs.ids[i], docs.ids[i]))
    return made


def mine(pairs: pd.DataFrame, docs: Documents, rankers: Rankers, cfg: Config) -> tuple[pd.DataFrame, dict]:
    """One guarded negative per pseudo pair (see the module's docstring); pairs keep their order."""
    from pipeline.prepare.hard_negatives import Window, choose

    hn, c = cfg.pairs.hard_negatives, cfg.pairs.corpus
    row_of = {d: i for i, d in enumerate(docs.ids)}
    depth = hn.range_max + 16
    out_text, out_id = [None] * len(pairs), [None] * len(pairs)
    rng = np.random.default_rng(cfg.seed + 13)
    for s in range(0, len(pairs), SEARCH_BLOCK):
        part = pairs.iloc[s:s + SEARCH_BLOCK]
        q_emb = rankers.embed_queries(part["anchor"].tolist())
        scores, ids = rankers.dense(q_emb, depth)
        lexical = rankers.lexical(part["anchor"].tolist(), max(1, c.guard_k)) if c.guard_k else None
        for j, (doc, source) in enumerate(zip(part["positive_id"], part["source_id"])):
            own, src = row_of[doc], row_of[source]
            found = np.maximum(ids[j], 0)
            ok = (ids[j] >= 0) & ~np.isin(ids[j], [own, src]) & ~np.isin(rankers.keys[found], rankers.keys[[own, src]])
            if lexical is not None:
                ok &= ~np.isin(ids[j], lexical[j][lexical[j] >= 0])
            pos = float(q_emb[j] @ rankers.doc_emb[own])
            pick = choose(scores[j], ok, pos, Window.of(hn), rng)
            if pick is not None:
                out_text[s + j], out_id[s + j] = rankers.texts[ids[j, pick]], docs.ids[ids[j, pick]]
    mined = pairs.assign(negative=out_text, negative_id=out_id,
                         negative_group=[f"d:{d}" if d else None for d in out_id], negative_label=None,
                         negative_kind=["text" if d else None for d in out_id])
    return mined, {"with_negative": int(mined["negative"].notna().sum()), "settings": hn.model_dump(),
                   "guard_k": c.guard_k}
