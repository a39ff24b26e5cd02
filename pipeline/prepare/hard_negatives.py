"""Hard-negative mining with the untrained base encoder: one extra negative text per training pair.

Why our own miner instead of sentence-transformers' ``mine_hard_negatives``: its only guard against
false negatives is the pair's own positive (plus score margins). It knows nothing of groups or labels,
so another title of the same product, a record linked to the same entity, or the name of the right
category would be mined as a "hard negative" -- the very false negatives the loss mask exists to keep
out (field note 10). Here every candidate carries its group and label, and the guard removes those
before the rank window is applied. Search is exact FAISS inner product on normalised embeddings, and
encoding goes through ``pipeline.model.tokens`` (tokenise once, pad per batch) like the rest of the pipeline.

Rules, per pair (``pairs.hard_negatives``):

- text pairs (kind ``group``, ``same_label``, ``pair``): candidates are the pool's texts ranked by
  similarity to the anchor. Never a candidate of the anchor's group, never the anchor's or the
  positive's own text, never one of the anchor's label when the positive stands for that label (kind
  ``same_label``, or ``train.mask_same_label``). Of the remaining candidates, ranks
  ``[range_min, range_max)`` are eligible, and of those the ones scoring at most
  ``(1 - relative_margin) x`` the pair's positive score (the nearest ones are often unlabelled positives).
- label pairs (text -> category name): the candidates are the other category names; the margin applies,
  the rank window does not (the label set is closed: another category's name is never a right answer).

``sampling=top`` takes the most similar eligible candidate, ``random`` a seeded random one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.model import tokens as encoding
from pipeline.model import prompts
from pipeline.core.config import Config, HardNegativesConfig
from pipeline.search.metrics import search

log = logging.getLogger(__name__)
NEGATIVE_COLUMNS = ["negative", "negative_group", "negative_label", "negative_kind"]


def _embed(cfg: Config, texts: list[str], anchors: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """(``texts`` as documents, ``anchors`` as queries or None when the two forms are equal), float32
    L2-normalised, with the config's base model and its prompts (anchors are queries as in training)."""
    from pipeline.model.encoder import load_base, pick_device, pick_dtype

    device = pick_device(cfg.train.device)
    st_model = load_base(cfg.model, device=device, max_seq_length=cfg.train.max_seq_length)
    used = prompts.for_run(cfg, st_model)

    def encode(items, role):
        return encoding.encode_texts(st_model, used.apply(items, role), max_seq_length=cfg.train.max_seq_length,
                                     batch_size=cfg.eval.batch_size, device=device,
                                     dtype=pick_dtype(cfg.train.precision, device), progress=f"mine: embed {role}s")

    return encode(texts, "document"), (encode(anchors, "query") if used.differ else None)


@dataclass(frozen=True)
class Window:
    """Which ranked candidates may become a negative: ranks ``[range_min, range_max)`` among those that pass the
    guard, scoring at most ``(1 - relative_margin)`` x the pair's positive; ``top`` takes the first, ``random``
    a seeded one."""

    range_min: int = 0
    range_max: int | None = None
    relative_margin: float = 0.0
    sampling: str = "top"

    @classmethod
    def of(cls, hn: HardNegativesConfig) -> Window:
        return cls(hn.range_min, hn.range_max, hn.relative_margin, hn.sampling)


def choose(scores: np.ndarray, ok: np.ndarray, positive_score: float, window: Window,
           rng: np.random.Generator) -> int | None:
    """Pick one candidate from a ranked list; returns its position in ``scores`` or None.

    scores: (depth,) similarities in descending order; ok: (depth,) bool, False for guarded candidates.
    The rank window counts only candidates that pass the guard.
    """
    valid = np.flatnonzero(ok)
    eligible = valid[window.range_min:window.range_max]
    eligible = eligible[scores[eligible] <= (1.0 - window.relative_margin) * positive_score]
    if len(eligible) == 0:
        return None
    return int(eligible[0]) if window.sampling == "top" else int(rng.choice(eligible))


@dataclass
class _Mining:
    """One mining pass: the pairs, their anchors' query embeddings and positive scores, and what is filled in
    (``out``: the negative columns, ``neg_scores``: each pick's similarity)."""

    pairs: pd.DataFrame
    a_emb: np.ndarray
    pos_score: np.ndarray
    window: Window
    rng: np.random.Generator
    out: dict
    neg_scores: np.ndarray


def mine(pairs: pd.DataFrame, pool: pd.DataFrame, cfg: Config,
         label_names: list[str] | None = None, *, mask_same_label: bool | None = None) -> tuple[pd.DataFrame, dict]:
    """Add ``negative``, ``negative_group``, ``negative_label``, ``negative_kind`` columns to ``pairs``.

    pairs: anchor, positive, kind, group, label (one row per training pair).
    pool: text, group, label -- the texts a negative may be drawn from; only training data belongs here.
    label_names: the category names (label pairs draw their negative among their templated forms).
    mask_same_label: the objective's resolved mask (pipeline/contracts/pair_kinds.py); None: train.mask_same_label.
    Pairs for which no candidate passes the guard, window and margin get no negative (null).
    """
    hn = cfg.pairs.hard_negatives
    started = time.perf_counter()
    rng = np.random.default_rng(cfg.seed + 3)
    pool = pool.drop_duplicates(subset=["text", "group"]).reset_index(drop=True)
    label_names = list(label_names or [])
    label_texts = [cfg.pairs.label_template.format(label=n) for n in label_names]
    texts = list(dict.fromkeys(list(pairs["anchor"]) + list(pairs["positive"]) + list(pool["text"]) + label_texts))
    row = {t: i for i, t in enumerate(texts)}
    anchors = list(dict.fromkeys(pairs["anchor"]))
    emb, anchor_form = _embed(cfg, texts, anchors)
    # one row per pair: the anchor embedded as a query (its document form when the model has no prompts)
    anchor_row = {t: i for i, t in enumerate(anchors)}
    a_emb = (emb[[row[t] for t in pairs["anchor"]]] if anchor_form is None
             else anchor_form[[anchor_row[t] for t in pairs["anchor"]]])
    pos_score = np.sum(a_emb * emb[[row[t] for t in pairs["positive"]]], axis=1)
    m = _Mining(pairs, a_emb, pos_score, Window.of(hn), rng, out={c: [None] * len(pairs) for c in NEGATIVE_COLUMNS},
                neg_scores=np.full(len(pairs), np.nan))
    guard = cfg.train.mask_same_label if mask_same_label is None else mask_same_label
    _mine_texts(m, pool, emb[[row[t] for t in pool["text"]]], guard)
    _mine_labels(m, label_names, emb[[row[t] for t in label_texts]] if label_texts else None, label_texts)
    mined, neg_scores = pairs.assign(**m.out), m.neg_scores
    has = mined["negative"].notna().to_numpy()
    stats = {
        "pairs": int(len(pairs)),
        "with_negative": int(has.sum()),
        "by_kind": {str(k): int(v) for k, v in mined.loc[has, "kind"].value_counts().items()},
        "pool_size": int(len(pool)),
        "mean_positive_score": round(float(pos_score[has].mean()), 4) if has.any() else None,
        "mean_negative_score": round(float(np.nanmean(neg_scores)), 4) if has.any() else None,
        "seconds": round(time.perf_counter() - started, 2),
        "settings": hn.model_dump(),
    }
    log.info("hard negatives: %d of %d pairs got one (pool %d texts, %.0fs)", stats["with_negative"],
             len(pairs), len(pool), stats["seconds"])
    return mined, stats


def _mine_texts(m: _Mining, pool: pd.DataFrame, pool_emb: np.ndarray, label_guard: bool) -> None:
    """Negatives of text pairs, drawn from ``pool``: never the pair's own group or texts, never the
    anchor's label when the guard is on (or the pair is a same-label pair). Fills ``m.out`` in place."""
    pairs, out = m.pairs, m.out
    kinds = pairs["kind"].to_numpy()
    text_pairs = np.flatnonzero(kinds != "label")
    if not len(text_pairs) or not len(pool):
        return
    groups, labels = pairs["group"].astype(str).to_numpy(), pairs["label"].to_numpy()
    pool_text = pool["text"].to_numpy()
    pool_group = pool["group"].astype(str).to_numpy()
    pool_label = pool["label"].to_numpy()
    largest_group = int(pool.groupby("group").size().max())
    depth = min(len(pool), m.window.range_max + largest_group + 16)
    scores, ids = search(pool_emb, m.a_emb[text_pairs], depth)
    for qi, i in enumerate(text_pairs):
        hit = ids[qi]
        ok = (hit >= 0) & (pool_group[hit] != groups[i])
        ok &= (pool_text[hit] != pairs["anchor"].iat[i]) & (pool_text[hit] != pairs["positive"].iat[i])
        if (label_guard or kinds[i] == "same_label") and isinstance(labels[i], str):
            ok &= pool_label[hit] != labels[i]
        pick = choose(scores[qi], ok, m.pos_score[i], m.window, m.rng)
        if pick is None:
            continue
        j = hit[pick]
        out["negative"][i], out["negative_group"][i] = pool_text[j], pool_group[j]
        out["negative_label"][i] = pool_label[j] if isinstance(pool_label[j], str) else None
        out["negative_kind"][i] = "text"
        m.neg_scores[i] = scores[qi, pick]


def _mine_labels(m: _Mining, label_names: list[str], lab_emb: np.ndarray | None, label_texts: list[str]) -> None:
    """Negatives of label pairs (anchor -> its category name): another category's name. Fills ``m.out``."""
    pairs, out = m.pairs, m.out
    window = dataclasses.replace(m.window, range_min=0, range_max=None)  # the label set is closed: no rank window
    label_pairs = np.flatnonzero(pairs["kind"].to_numpy() == "label")
    if not len(label_pairs) or len(label_names) <= 1:
        return
    labels = pairs["label"].to_numpy()
    sims = m.a_emb[label_pairs] @ lab_emb.T  # (n_label_pairs, n_labels)
    names = np.asarray(label_names)
    for qi, i in enumerate(label_pairs):
        order = np.argsort(-sims[qi], kind="stable")
        ok = names[order] != labels[i]
        pick = choose(sims[qi][order], ok, m.pos_score[i], window, m.rng)
        if pick is None:
            continue
        j = order[pick]
        out["negative"][i], out["negative_label"][i] = label_texts[j], names[j]
        out["negative_kind"][i] = "label"
        m.neg_scores[i] = sims[qi, j]
