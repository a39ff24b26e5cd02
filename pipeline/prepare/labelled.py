"""prepare, labelled corpora: raw records -> leak-free train/val/test splits and contrastive training pairs.

Outputs (``data/processed/<dataset>/``): ``{train,val,test}.jsonl`` records (id, text, label, group),
``pairs.jsonl`` (anchor, positive, kind, group, label) built from the train split only, ``labels.json``
and ``manifest.json`` with sizes, class counts, dropped rows, seed and input hashes.

Splits: the corpus's own (a split column, a folder of split files, a Hugging Face dataset's splits) when
it has them, else drawn here by group and label with the ``data.split`` fractions. Given splits lacking
val and/or test get them carved from train the same way (``assign_splits``); a given val or test split is
used as it is.

Leakage rules: a group (PriceRunner's product cluster; the text itself when there is no group column)
never spans two splits that prepare draws, and a text never appears in two splits. A text that lands in
several splits (several groups, or given splits that share it) is kept in the earliest split (train, then
val) and dropped from the later ones; the manifest counts those drops. Groups that span *given* splits
are the user's split and are not moved: they are counted and warned about.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.artifacts import (MANIFEST, Layout, atomic_dir, is_up_to_date, make_manifest,
                                write_json_atomic)
from pipeline.core.config import Config
from pipeline.core.errors import DataError
from pipeline.contracts.identity import prepared_fingerprint
from pipeline.contracts.pair_kinds import Objective, resolve as resolve_objective
from pipeline.contracts.prepared_data import (LABELLED_TEXT_FILES, LABELS, PAIRS, SPLITS, has_groups, text_groups,
                                              texts_fingerprint)
from pipeline.prepare.sources import hash_inputs, load_records

log = logging.getLogger(__name__)


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
    if "split" in df.columns:
        drop = (df["split"] == "drop").to_numpy()
        counts["split_name_dropped"] = int(drop.sum())
        df = df[~drop]
        if len(df) == 0:
            raise DataError(f"{source}: every row is in a split that data.split_names maps to drop")
    if df["group"].isna().all():
        # Without an entity column a text is its own group, so duplicates of one text stay together.
        df = df.assign(group=text_groups(df["text"]))
    # With given splits a copy in another split is not a duplicate here: the cross-split rule keeps the
    # earliest split's copy, whatever the row order of the file.
    key = ["text", "group"] + (["split"] if "split" in df.columns else [])
    dup = df.duplicated(subset=key, keep="first")
    counts["duplicate_rows_dropped"] = int(dup.sum())
    df = df[~dup.to_numpy()].reset_index(drop=True)
    counts["rows_kept"] = int(len(df))
    return df, counts


def check_labels(df: pd.DataFrame, cfg: Config, source: str) -> None:
    """Labels no split can serve: one in a given val/test split that train lacks, or one with one example."""
    if not df["label"].notna().any():
        return
    column = f" (column '{cfg.data.label_column}')" if cfg.data.format == "table" else ""
    if "split" in df.columns:
        in_train = set(df.loc[df["split"] == "train", "label"])
        for name in ("val", "test"):
            absent = df.loc[(df["split"] == name) & ~df["label"].isin(in_train), "label"].value_counts()
            if len(absent):
                raise DataError(
                    f"{source}: the given {name} split has labels that the train split lacks{column}: "
                    f"{_listed(absent)}; a label never trained on cannot be learnt: add train rows with these "
                    f"labels or remove their rows from {name}")
    sizes = df["label"].value_counts()
    single = sizes[sizes == 1]
    if len(single):
        raise DataError(
            f"{source}: labels with a single example{column}: {_listed(single)}; a label needs examples in train "
            f"and in test (3 groups when prepare draws the splits): add examples, merge the label into another, "
            f"or remove its row")


def _listed(counts: pd.Series, show: int = 5) -> str:
    named = ", ".join(f"'{k}' ({n} row{'s' * (n != 1)})" for k, n in list(counts.items())[:show])
    return named + (f" and {len(counts) - show} more" if len(counts) > show else "")


def _cut_by_group(df: pd.DataFrame, shares: dict[str, float], rng: np.random.Generator, *, strict: bool,
                  cfg: Config, source: str) -> tuple[pd.Series, list[str]]:
    """Whole groups to the splits named in ``shares`` (in order, fractions summing to 1), per label.

    Groups are shuffled within each label and cut at the cumulative record fractions; each split gets at
    least one group of every label. A label with fewer groups than splits is an error when ``strict``,
    else it stays whole in the first split (returned, so the caller can say so).
    """
    names = list(shares)
    bounds = np.cumsum(list(shares.values()))[:-1]
    labels = df["label"].fillna("__none__")
    # A group with two labels is label noise; it follows its majority label so it is never cut.
    group_label = labels.groupby(df["group"]).agg(lambda s: s.value_counts().index[0])
    group_sizes = df.groupby("group").size()
    mapping: dict[str, str] = {}
    short: list[str] = []
    for label, groups in group_label.groupby(group_label):
        gnames = groups.index.to_numpy()
        if len(gnames) < len(names):
            if strict:
                members = int((labels == label).sum())
                where = f"{source}: " if source else ""
                column = f" in column '{cfg.data.label_column}'" if cfg.data.format == "table" else ""
                raise DataError(
                    f"{where}label '{label}' has {len(gnames)} group(s) ({members} record(s)){column}: it cannot "
                    f"be split into {', '.join(names[:-1])} and {names[-1]}; remove it or merge it with another label")
            short.append(str(label))
            mapping.update(dict.fromkeys(gnames, names[0]))
            continue
        gnames = gnames[rng.permutation(len(gnames))]
        sizes = group_sizes.reindex(gnames).to_numpy()
        where = np.array(names, dtype=object)[np.searchsorted(bounds, np.cumsum(sizes) / sizes.sum(), side="left")]
        # Small labels: make sure each split gets at least one group (first, middle and last of the order).
        slot = {names[0]: 0, names[-1]: len(where) - 1}
        if len(names) == 3:
            slot[names[1]] = len(where) // 2
        for name in names:
            if name not in where:
                where[slot[name]] = name
        mapping.update(zip(gnames, where))
    # By group, not by label: the rows of a minority label in a mixed group go where their group goes.
    return df["group"].map(mapping), short


def assign_splits(df: pd.DataFrame, cfg: Config, seed: int, source: str = "") -> tuple[pd.Series, dict]:
    """train/val/test per row, and the plan: which splits were given and which carved from train.

    No given splits: whole groups per label with the ``data.split`` fractions, every label in every split.
    Given splits with train only, or without val or test: the missing ones are carved from the given train
    rows the same way, in proportion to their ``data.split`` fractions; given val/test rows are not moved.
    """
    fr = cfg.data.split
    share = {"train": fr.train, "val": fr.val, "test": fr.test}
    rng = np.random.default_rng(seed)
    if "split" not in df.columns:
        split, _ = _cut_by_group(df, share, rng, strict=True, cfg=cfg, source=source)
        return split, {"given": [], "carved": list(SPLITS), "fractions": share}
    sizes = df["split"].value_counts()
    given = [s for s in SPLITS if s in sizes.index]
    if "train" not in given:
        found = ", ".join(f"{s} {int(sizes[s]):,} rows" for s in given)
        raise DataError(f"{source}: the given splits have no train rows (found: {found}); the train split is "
                        f"what the model learns from: mark train rows as train (or training)")
    missing = [s for s in SPLITS if s not in given]
    plan = {"given": given, "carved": missing, "train_rows_given": int(sizes["train"])}
    if not missing:
        return df["split"], plan
    part = {s: share[s] for s in SPLITS if s == "train" or s in missing}
    part = {s: v / sum(part.values()) for s, v in part.items()}
    is_train = (df["split"] == "train").to_numpy()
    carved, short = _cut_by_group(df[is_train], part, rng, strict=len(part) == 3, cfg=cfg, source=source)
    split = df["split"].copy()
    split[is_train] = carved
    plan.update(fractions={s: part[s] for s in missing}, labels_only_in_train=short)
    return split, plan


def split_corpus(df: pd.DataFrame, cfg: Config, source: str,
                 counts: dict[str, int]) -> tuple[dict[str, pd.DataFrame], dict]:
    """Check the labels, assign (or carve) the splits, apply the cross-split text rule; adds to ``counts``."""
    check_labels(df, cfg, source)
    if cfg.data.max_rows:
        df = subsample_groups(df, cfg.data.max_rows, cfg.seed)
        check_labels(df, cfg, f"{source} (after subsampling to data.max_rows={cfg.data.max_rows})")
    split, plan = assign_splits(df, cfg, cfg.seed, source)
    df, leak_counts = remove_cross_split_texts(df.assign(split=split))
    counts.update(leak_counts)
    splits = {s: df[df["split"] == s].drop(columns=["split"]).reset_index(drop=True) for s in SPLITS}
    for s, part in splits.items():
        if len(part) == 0:
            raise _empty_split_error(s, splits, plan, counts, cfg)
    if plan["given"]:
        counts["groups_spanning_given_splits"] = _spanning_groups(df, source)
        plan["carved_rows"] = {s: int(len(splits[s])) for s in plan["carved"]}
        _log_carve(plan, by="group" if has_groups(df) else "text")
    return splits, plan


def _empty_split_error(name: str, splits: dict[str, pd.DataFrame], plan: dict, counts: dict[str, int],
                       cfg: Config) -> DataError:
    """What each split got and what the corpus needs, instead of a bare 'too small'."""
    have = ", ".join(f"{s} {len(p):,} rows / {p['group'].nunique():,} groups" if i == 0
                     else f"{s} {len(p):,} / {p['group'].nunique():,}" for i, (s, p) in enumerate(splits.items()))
    group = "group (an entity id, or a distinct text when there is no group column)"
    if name in plan["given"]:
        need = (f"the given {name} split lost every row to cleaning (blank texts, exact duplicates, texts also "
                f"in an earlier split); it needs rows of its own")
    elif len(plan["carved"]) == 1:
        need = (f"the {name} split is carved from train by whole groups per label, so a label needs at least 2 "
                f"groups in train to reach it, where a {group} stays in one split")
    else:
        need = f"each label needs at least 3 groups, one per split, where a {group} stays in one split"
    dropped = counts.get(f"cross_split_text_dropped_{name}", 0)
    extra = f"; {dropped:,} of its rows were dropped because their text is in an earlier split" if dropped else ""
    if cfg.data.max_rows:
        extra += f"; data.max_rows={cfg.data.max_rows} kept only part of the corpus"
    return DataError(f"the {name} split is empty after preparation: {have}; {need}{extra}")


def _spanning_groups(df: pd.DataFrame, source: str) -> int:
    """Groups with rows in two given splits: the user's split, so counted and warned about, not moved."""
    if not has_groups(df):
        return 0  # text groups: the cross-split text rule already kept each text in one split
    per_group = df.groupby("group")["split"].nunique()
    spanning = per_group[per_group > 1]
    if len(spanning):
        examples = ", ".join(f"'{g}'" for g in spanning.index[:3])
        log.warning("prepare: %s: %d group(s) have rows in two given splits (e.g. %s); prepare does not move rows "
                    "between given splits, so these entities are both trained on and evaluated: keep each group "
                    "in one split to avoid it", source, len(spanning), examples)
    return int(len(spanning))


def _log_carve(plan: dict, *, by: str) -> None:
    carved, n_train = plan["carved"], plan["train_rows_given"]
    if not carved:
        return
    rows = plan["carved_rows"]
    how = f"of train, by {by}, per label"
    if len(carved) == 1:
        what = {"val": "no validation split given", "test": "no test split given"}[carved[0]]
        n = rows[carved[0]]
        log.info("prepare: %s; carved %s rows (%.0f%% %s) from train", what, f"{n:,}", 100 * n / n_train, how)
    else:
        log.info("prepare: only a train split given; carved val %s rows and test %s rows (%.0f%% and %.0f%% %s) "
                 "from train", f"{rows['val']:,}", f"{rows['test']:,}", 100 * rows["val"] / n_train,
                 100 * rows["test"] / n_train, how)
    short = plan.get("labels_only_in_train") or []
    if short:
        named = ", ".join(f"'{label}'" for label in short[:5]) + (f" and {len(short) - 5} more" * (len(short) > 5))
        log.warning("prepare: %d label(s) have a single group in train and stay there, so the carved %s "
                    "split has none of them: %s", len(short), carved[0], named)


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


def prepare(cfg: Config, *, force: bool = False) -> Path:
    """Labelled records -> ``{train,val,test}.jsonl``, ``pairs.jsonl``, ``labels.json`` and the manifest."""
    layout = Layout(cfg)
    out = layout.processed
    df, files = load_records(cfg, layout.raw)
    input_hashes = hash_inputs(files)
    fp = prepared_fingerprint(cfg, input_hashes)
    if not force and is_up_to_date(out, fp):
        log.info("prepare: %s is up to date", out)
        return out
    source = ", ".join(files) or cfg.data.path or cfg.data.name
    df, counts = clean_records(df, cfg, source)
    splits, split_plan = split_corpus(df, cfg, source, counts)
    objective = resolve_objective(cfg, has_groups=has_groups(splits["train"]),
                                  has_labels=bool(splits["train"]["label"].notna().any()))
    log.info("prepare: objective %s (%s)", objective.name, objective.reason)
    labels = sorted(pd.concat([p["label"] for p in splits.values()]).dropna().unique().tolist())
    hn_stats = None
    if objective.name == "corpus":
        pairs, hn_stats = _pseudo_pairs(splits, cfg)
    else:
        pairs = build_pairs(splits["train"], cfg, cfg.seed, objective)
    if cfg.pairs.hard_negatives.enabled and objective.name != "corpus":
        from pipeline.prepare import hard_negatives

        pairs, hn_stats = hard_negatives.mine(pairs, splits["train"][["text", "group", "label"]], cfg, labels,
                                              mask_same_label=objective.mask_same_label)
    summary = _summary(splits, pairs, labels, counts, objective, split_plan, hn_stats)
    summary["splits_fingerprint"] = prepared_fingerprint(cfg, input_hashes, splits_only=True)
    with atomic_dir(out) as tmp:
        for s, part in splits.items():
            part.to_json(tmp / f"{s}.jsonl", orient="records", lines=True, force_ascii=False)
        pairs.to_json(tmp / PAIRS, orient="records", lines=True, force_ascii=False)
        write_json_atomic(tmp / LABELS, labels)
        summary["texts_fingerprint"] = texts_fingerprint(tmp, LABELLED_TEXT_FILES + [LABELS])
        write_json_atomic(tmp / MANIFEST, make_manifest("prepare", cfg, fingerprint=fp, inputs=input_hashes,
                                                        extra=summary))
    log.info("prepare: wrote %s (%s; %d pairs)", out,
             ", ".join(f"{s} {n}" for s, n in summary["sizes"].items()), len(pairs))
    return out


def _pseudo_pairs(splits: dict[str, pd.DataFrame], cfg: Config) -> tuple[pd.DataFrame, dict]:
    """The corpus objective on a labelled corpus: pseudo pairs from the train split's texts alone (its ids and labels
    withheld from training); the val and test splits keep theirs as the judged set (pipeline/prepare/pseudo.py)."""
    from pipeline.prepare import pseudo

    train = splits["train"]
    docs = pseudo.Documents(train["id"].astype(str).tolist(), [""] * len(train), train["text"].tolist())
    avoid = set(pd.concat([splits["val"]["text"], splits["test"]["text"]]).map(pseudo.text_key))
    built = pseudo.build(docs, cfg, encoder_length=cfg.train.max_seq_length, avoid=avoid)
    return built.pairs, built.stats


def _summary(splits: dict[str, pd.DataFrame], pairs: pd.DataFrame, labels: list[str], counts: dict,
             objective: Objective, split_plan: dict, hn_stats: dict | None) -> dict:
    """The manifest's description of the prepared corpus: sizes, classes, pairs, how it was split."""
    return {
        "kind": "labelled",
        "counts": counts,
        "sizes": {s: int(len(p)) for s, p in splits.items()},
        "groups": {s: int(p["group"].nunique()) for s, p in splits.items()},
        "class_counts": {s: {k: int(v) for k, v in p["label"].value_counts().sort_index().items()}
                         for s, p in splits.items()},
        "pairs": {"total": int(len(pairs)), **{k: int(v) for k, v in pairs["kind"].value_counts().items()}},
        "labels": labels,
        "objective": objective.as_dict(),
        "split_plan": split_plan,
        **({"pseudo": hn_stats} if objective.name == "corpus" else {"hard_negatives": hn_stats} if hn_stats else {}),
    }
