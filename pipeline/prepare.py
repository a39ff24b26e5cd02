"""prepare: raw labelled corpus -> leak-free train/val/test splits and contrastive training pairs.

Outputs (``data/processed/<dataset>/``): ``{train,val,test}.jsonl`` records (id, text, label, group),
``pairs.jsonl`` (anchor, positive, kind, group, label) built from the train split only, ``labels.json``
and ``manifest.json`` with sizes, class counts, dropped rows, seed and input hashes.

Leakage rules: a group (PriceRunner's product cluster; the text itself when there is no group column)
never spans two splits, and a text never appears in two splits. A text that lands in several splits
because it occurs in several groups is kept in the earliest split (train, then val) and dropped from
the later ones; the manifest counts those drops.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.artifacts import (Layout, atomic_dir, clean_stale, is_up_to_date, make_manifest, sha256_file,
                                write_json_atomic, MANIFEST)
from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.objectives import Objective, resolve as resolve_objective
from pipeline.sources import load_records

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def clean_records(df: pd.DataFrame, cfg: Config, source: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """Strip texts, handle blanks, drop exact duplicates. Returns the cleaned frame and drop counts."""
    counts: dict[str, int] = {"rows_read": int(len(df))}
    if len(df) == 0:
        raise DataError(f"{source}: no rows to prepare")
    text = df["text"].astype("string").str.strip()
    blank = text.isna() | (text == "")
    if blank.any():
        if cfg.data.blank_texts == "error":
            first = int(np.flatnonzero(blank.to_numpy())[0])
            raise DataError(f"{source}: {int(blank.sum())} blank or whitespace-only texts "
                            f"(first at row {first}); set data.blank_texts=drop to drop them")
        log.warning("prepare: %s: dropping %d blank or whitespace-only texts (data.blank_texts=drop; "
                    "set data.blank_texts=error to stop instead)", source, int(blank.sum()))
    counts["blank_texts_dropped"] = int(blank.sum())
    df = df.assign(text=text.astype(object))[~blank.to_numpy()]
    if df["label"].notna().any():
        # A whitespace-only label is as missing as an empty one; kept, it would become a class named "".
        label = df["label"].astype("string").str.strip()
        missing = label.isna() | (label == "")
        counts["missing_label_dropped"] = int(missing.sum())
        if missing.any():
            log.warning("prepare: %s: dropping %d rows with a blank or missing label", source, int(missing.sum()))
        df = df.assign(label=label.astype(object))[~missing.to_numpy()]
    if len(df) == 0:
        raise DataError(f"{source}: every row has a blank text or label")
    if df["group"].isna().all():
        # Without an entity column a text is its own group, so duplicates of one text stay together.
        df = df.assign(group="t:" + df["text"])
    key = ["text", "group"]
    dup = df.duplicated(subset=key, keep="first")
    counts["duplicate_rows_dropped"] = int(dup.sum())
    df = df[~dup.to_numpy()].reset_index(drop=True)
    counts["rows_kept"] = int(len(df))
    return df, counts


def assign_splits(df: pd.DataFrame, cfg: Config, seed: int, source: str = "") -> pd.Series:
    """Assign whole groups to train/val/test, per label, so that every label is in every split.

    Groups are shuffled within each label and cut at the cumulative record fractions of the config.
    """
    if "split" in df.columns and df["split"].notna().all():
        bad = sorted(set(df["split"]) - set(SPLITS))
        if bad:
            raise DataError(f"data.split_column has values {bad}; expected train, val (or validation) and test")
        return df["split"]
    fr = cfg.data.split
    rng = np.random.default_rng(seed)
    split = pd.Series(index=df.index, dtype=object)
    labels = df["label"].fillna("__none__")
    # A group with two labels is label noise; it follows its majority label so it is never cut.
    group_label = labels.groupby(df["group"]).agg(lambda s: s.value_counts().index[0])
    for label, groups in group_label.groupby(group_label):
        names = groups.index.to_numpy()
        if len(names) < 3:
            members = int((labels == label).sum())
            where = f"{source}: " if source else ""
            column = f" in column '{cfg.data.label_column}'" if cfg.data.format == "table" else ""
            raise DataError(
                f"{where}label '{label}' has {len(names)} group(s) ({members} record(s)){column}: it cannot be split "
                f"into train, val and test; remove it or merge it with another label")
        names = names[rng.permutation(len(names))]
        sizes = df.groupby("group").size().reindex(names).to_numpy()
        cum = np.cumsum(sizes) / sizes.sum()
        where = np.where(cum <= fr.train, "train", np.where(cum <= fr.train + fr.val, "val", "test"))
        # Small labels: make sure each split gets at least one group.
        for i, name in enumerate(SPLITS):
            if name not in where:
                where[{"train": 0, "val": len(where) // 2, "test": len(where) - 1}[name]] = name
        mapping = dict(zip(names, where))
        mask = labels == label
        split[mask] = df.loc[mask, "group"].map(mapping)
    return split


def remove_cross_split_texts(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    order = {s: i for i, s in enumerate(SPLITS)}
    rank = df["split"].map(order)
    first = rank.groupby(df["text"]).transform("min")
    leak = rank > first
    dropped = df[leak]["split"].value_counts().to_dict()
    counts = {f"cross_split_text_dropped_{s}": int(dropped.get(s, 0)) for s in ("val", "test")}
    return df[~leak.to_numpy()].reset_index(drop=True), counts


def build_pairs(train: pd.DataFrame, cfg: Config, seed: int, objective: Objective) -> pd.DataFrame:
    """Contrastive pairs from the train split only, of the kinds ``objective`` uses.

    kinds: ``group`` (two different texts of one group; group objective), ``label`` (text -> label name),
    ``same_label`` (two different texts of one label, from different groups).
    """
    p = cfg.pairs
    rng = np.random.default_rng(seed + 1)
    rows: list[dict] = []
    if objective.name == "group" and p.product_pairs_per_group > 0:
        rows += _group_pairs(train, p.product_pairs_per_group, rng)
    labelled = train[train["label"].notna()]
    if p.label_pairs > 0 and len(labelled):
        n = int(round(p.label_pairs * len(labelled)))
        for i in rng.permutation(len(labelled))[:n]:
            r = labelled.iloc[i]
            rows.append({"anchor": r["text"], "positive": p.label_template.format(label=r["label"]),
                         "kind": "label", "group": r["group"], "label": r["label"]})
    if objective.same_label_pairs > 0 and len(labelled):
        rows += _same_label_pairs(labelled, objective.same_label_pairs, rng)
    pairs = pd.DataFrame(rows, columns=["anchor", "positive", "kind", "group", "label"])
    pairs = pairs.iloc[rng.permutation(len(pairs))].reset_index(drop=True)
    if p.max_pairs is not None and len(pairs) > p.max_pairs:
        pairs = pairs.iloc[: p.max_pairs].reset_index(drop=True)
    if len(pairs) == 0:
        raise DataError(f"no training pairs could be built from the train split for the {objective.name} "
                        "objective (no group with two different texts and no labels)")
    return pairs


def _group_pairs(train: pd.DataFrame, per_group: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    for group, members in train.groupby("group", sort=True):
        texts = list(dict.fromkeys(members["text"]))
        if len(texts) < 2:
            continue
        label = members["label"].iloc[0]
        combos = [(a, b) for i, a in enumerate(texts) for b in texts[i + 1:]]
        for k in rng.permutation(len(combos))[:per_group]:
            a, b = combos[k]
            if rng.random() < 0.5:
                a, b = b, a
            rows.append({"anchor": a, "positive": b, "kind": "group", "group": group, "label": label})
    return rows


def _same_label_pairs(labelled: pd.DataFrame, share: float, rng: np.random.Generator) -> list[dict]:
    """``share`` x len(labelled) pairs (a share above 1 gives texts several partners), each text with a
    random text of its label from another group; a label with no such text gives no pair."""
    by_label = {k: v.reset_index(drop=True) for k, v in labelled.groupby("label")}
    n = int(round(share * len(labelled)))
    order = np.concatenate([rng.permutation(len(labelled)) for _ in range(int(np.ceil(share)))])[:n]
    rows = []
    for i in order:
        r = labelled.iloc[i]
        pool = by_label[r["label"]]
        others = np.flatnonzero(pool["group"].to_numpy() != r["group"])
        if len(others) == 0:
            continue
        other = pool.iloc[int(others[rng.integers(len(others))])]
        rows.append({"anchor": r["text"], "positive": other["text"], "kind": "same_label",
                     "group": r["group"], "label": r["label"]})
    return rows


def subsample_groups(df: pd.DataFrame, max_rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed + 2)
    groups = df["group"].unique()
    keep, total = [], 0
    sizes = df.groupby("group").size()
    for g in groups[rng.permutation(len(groups))]:
        if total >= max_rows:
            break
        keep.append(g)
        total += int(sizes[g])
    return df[df["group"].isin(set(keep))].reset_index(drop=True)


def fingerprint(cfg: Config, input_hashes: dict[str, str], *, splits_only: bool = False) -> str:
    """Identity of the prepared data; ``splits_only`` leaves out the pairs settings, so outputs that
    depend only on the splits (base-model embeddings, the lexical baseline) survive a change of pairs."""
    import hashlib

    sections = ("data",) if splits_only else ("data", "pairs")
    payload = {"cfg": cfg.section_hash(*sections), "seed": cfg.seed, "in": input_hashes}
    if cfg.pairs.hard_negatives.enabled and not splits_only:
        # mined negatives depend on the base encoder and its max length
        from pipeline.model import base_fingerprint, resolve_base

        payload["miner"] = [base_fingerprint(resolve_base(cfg.model.base)), cfg.train.max_seq_length,
                            cfg.train.mask_same_label]
    payload = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run(cfg: Config, *, force: bool = False) -> Path:
    clean_stale(Layout(cfg).processed.parent, Layout(cfg).raw)
    if cfg.data.format in ("walmart_amazon", "pairs"):
        from pipeline import pairs_dataset

        return pairs_dataset.prepare(cfg, force=force)
    layout = Layout(cfg)
    out = layout.processed
    df, files = load_records(cfg, layout.raw)
    input_hashes = {name: sha256_file(path) for name, path in files.items()}
    fp = fingerprint(cfg, input_hashes)
    if not force and is_up_to_date(out, fp):
        log.info("prepare: %s is up to date", out)
        return out
    source = ", ".join(files) or cfg.data.path or cfg.data.name
    df, counts = clean_records(df, cfg, source)
    if cfg.data.max_rows:
        df = subsample_groups(df, cfg.data.max_rows, cfg.seed)
    df = df.assign(split=assign_splits(df, cfg, cfg.seed, source))
    df, leak_counts = remove_cross_split_texts(df)
    counts.update(leak_counts)
    splits = {s: df[df["split"] == s].drop(columns=["split"]).reset_index(drop=True) for s in SPLITS}
    for s, part in splits.items():
        if len(part) == 0:
            raise DataError(f"the {s} split is empty after preparation; the corpus is too small")
    objective = resolve_objective(cfg, has_groups=not splits["train"]["group"].str.startswith("t:").all(),
                                  has_labels=bool(splits["train"]["label"].notna().any()))
    log.info("prepare: objective %s (%s)", objective.name, objective.reason)
    pairs = build_pairs(splits["train"], cfg, cfg.seed, objective)
    labels = sorted(df["label"].dropna().unique().tolist())
    hn_stats = None
    if cfg.pairs.hard_negatives.enabled:
        from pipeline import hard_negatives

        pairs, hn_stats = hard_negatives.mine(pairs, splits["train"][["text", "group", "label"]], cfg, labels,
                                              mask_same_label=objective.mask_same_label)
    summary = {
        "counts": counts,
        "sizes": {s: int(len(p)) for s, p in splits.items()},
        "groups": {s: int(p["group"].nunique()) for s, p in splits.items()},
        "class_counts": {s: {k: int(v) for k, v in p["label"].value_counts().sort_index().items()}
                         for s, p in splits.items()},
        "pairs": {"total": int(len(pairs)), **{k: int(v) for k, v in pairs["kind"].value_counts().items()}},
        "labels": labels,
        "objective": objective.as_dict(),
        **({"hard_negatives": hn_stats} if hn_stats else {}),
    }
    with atomic_dir(out) as tmp:
        for s, part in splits.items():
            part.to_json(tmp / f"{s}.jsonl", orient="records", lines=True, force_ascii=False)
        pairs.to_json(tmp / "pairs.jsonl", orient="records", lines=True, force_ascii=False)
        write_json_atomic(tmp / "labels.json", labels)
        summary["texts_fingerprint"] = texts_fingerprint(tmp, [f"{s}.jsonl" for s in SPLITS] + ["labels.json"])
        write_json_atomic(tmp / MANIFEST, make_manifest("prepare", cfg, fingerprint=fp, inputs=input_hashes,
                                                        extra={"kind": "labelled", "splits_fingerprint": fingerprint(cfg, input_hashes, splits_only=True),
                                                               **summary}))
    log.info("prepare: wrote %s (%s; %d pairs)", out,
             ", ".join(f"{s} {n}" for s, n in summary["sizes"].items()), len(pairs))
    return out


def texts_fingerprint(folder: Path, names: list[str]) -> str:
    """Hash of the files whose texts embed encodes (not the pairs): the base-embedding cache key."""
    import hashlib

    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update(sha256_file(Path(folder) / name).encode())
    return h.hexdigest()[:16]


def load_split(folder: Path, split: str) -> pd.DataFrame:
    path = Path(folder) / f"{split}.jsonl"
    df = pd.read_json(path, lines=True, dtype={"id": str, "group": str, "label": str, "text": str})
    return df


def load_pairs(folder: Path) -> pd.DataFrame:
    return pd.read_json(Path(folder) / "pairs.jsonl", lines=True,
                        dtype={"anchor": str, "positive": str, "group": str, "label": str, "kind": str,
                               "negative": str, "negative_group": str, "negative_label": str, "negative_kind": str})
