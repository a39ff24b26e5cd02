"""Given splits in the forms corpora come in (a split column, a folder of split files, a Hugging Face
dataset's splits), what prepare carves when val or test is missing, and the errors bad input gets."""

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from pipeline.prepare import stage as prepare
from pipeline.core.config import load_config
from pipeline.core.errors import DataError
from pipeline.contracts.prepared_data import load_split
from pipeline.prepare.sources import canonical_splits
from tests.conftest import REPO, SHARED_DATA, cli, make_corpus

PROCESSED = Path("data/processed/corpus")


def _intents(n_labels: int = 4, per_label: int = 40, test_share: float = 0.25) -> pd.DataFrame:
    """An intent corpus: distinct texts, one label each, no entity ids, and a train/test split column."""
    rows = []
    for label in range(n_labels):
        n_test = int(per_label * test_share)
        for i in range(per_label):
            rows.append({"text": f"query {i} about topic {label}", "category": f"intent_{label}",
                         "split": "test" if i < n_test else "train"})
    return pd.DataFrame(rows)


def _cfg(path: str = "corpus.csv", *overrides: str, **data):
    data = {"name": "corpus", "format": "table", "path": path, "text_column": "text", "label_column": "category",
            "group_column": None, "split_column": "split", **data}
    items = [f"data.{k}={'null' if v is None else v}" for k, v in data.items()]
    return load_config(REPO / "configs" / "template.yaml", items + list(overrides))


def _splits(out: Path) -> dict[str, pd.DataFrame]:
    return {s: load_split(out, s) for s in ("train", "val", "test")}


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- the forms given splits come in --------------------------------------------------------------------------

def test_train_and_test_given_carve_val_from_train_per_label(here, caplog):
    """The issue's corpus: text, category, split in {train, test}. It used to stop with 'the val split is
    empty ... the corpus is too small'."""
    df = _intents()
    df.to_csv("corpus.csv", index=False)
    caplog.set_level(logging.INFO, logger="pipeline.prepare.labelled")
    out = prepare.run(_cfg())
    splits = _splits(out)
    given_train, given_test = df[df["split"] == "train"], df[df["split"] == "test"]
    assert splits["test"]["text"].tolist() == given_test["text"].tolist()  # the given test split, untouched
    assert set(splits["val"]["text"]) <= set(given_train["text"])
    assert set(splits["train"]["text"]) | set(splits["val"]["text"]) == set(given_train["text"])
    assert not set(splits["train"]["text"]) & set(splits["val"]["text"])
    # per label, in the config's proportion val / (train + val) of each label's train rows
    want = 0.15 / 0.85
    for label, rows in given_train.groupby("category"):
        n_val = int((splits["val"]["label"] == label).sum())
        assert abs(n_val / len(rows) - want) <= 1 / len(rows) + 1e-9, label
    plan = _manifest(out)["split_plan"]
    assert plan["given"] == ["train", "test"] and plan["carved"] == ["val"]
    assert plan["carved_rows"] == {"val": len(splits["val"])} and plan["train_rows_given"] == len(given_train)
    lines = [r.getMessage() for r in caplog.records if "carved" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0] == (f"prepare: no validation split given; carved {len(splits['val']):,} rows "
                        f"({100 * len(splits['val']) / len(given_train):.0f}% of train, by text, per label) from train")


def test_carved_val_never_cuts_a_group_and_given_test_is_untouched(here):
    df = make_corpus(n_clusters_per_brand=4).rename(columns={"title": "text"})
    clusters = sorted(df["cluster"].unique())
    test_clusters = set(clusters[::4])
    df["split"] = ["test" if c in test_clusters else "train" for c in df["cluster"]]
    df.to_csv("corpus.csv", index=False)
    out = prepare.run(_cfg(group_column="cluster"))
    splits = _splits(out)
    assert not set(splits["train"]["group"]) & set(splits["val"]["group"])
    assert sorted(splits["test"]["text"]) == sorted(df.loc[df["split"] == "test", "text"])
    assert set(splits["val"]["label"]) == set(df["category"])
    assert _manifest(out)["counts"]["groups_spanning_given_splits"] == 0


def test_train_only_given_carves_val_and_test_like_an_own_split(here, caplog):
    df = make_corpus().rename(columns={"title": "text"}).assign(split="Train")
    df.to_csv("corpus.csv", index=False)
    caplog.set_level(logging.INFO, logger="pipeline.prepare.labelled")
    carved = _splits(prepare.run(_cfg(group_column="cluster")))
    own = _splits(prepare.run(_cfg(group_column="cluster", split_column=None, name="own")))
    for s in ("train", "val", "test"):
        assert carved[s]["text"].tolist() == own[s]["text"].tolist(), s
    assert any(r.getMessage().startswith("prepare: only a train split given; carved val ") for r in caplog.records)


def test_train_and_val_given_carve_test_from_train(here, caplog):
    df = _intents().replace({"split": {"test": "validation"}})
    df.to_csv("corpus.csv", index=False)
    caplog.set_level(logging.INFO, logger="pipeline.prepare.labelled")
    out = prepare.run(_cfg())
    splits = _splits(out)
    assert splits["val"]["text"].tolist() == df.loc[df["split"] == "validation", "text"].tolist()
    assert set(splits["test"]["text"]) < set(df.loc[df["split"] == "train", "text"])
    assert _manifest(out)["split_plan"]["carved"] == ["test"]
    assert any(r.getMessage().startswith("prepare: no test split given; carved ") for r in caplog.records)


def test_three_given_splits_are_used_as_given_whatever_their_names(here):
    df = _intents()
    df["split"] = [[" Training ", "DEV", "testing\t", "train"][i % 4] for i in range(len(df))]
    df.to_csv("corpus.csv", index=False)
    out = prepare.run(_cfg())
    sizes = _manifest(out)["sizes"]
    assert sizes == {"train": len(df) // 2, "val": len(df) // 4, "test": len(df) // 4}
    assert _manifest(out)["split_plan"]["carved"] == []


ALIASES = {"train": ["train", "training"], "val": ["val", "validation", "valid", "dev", "eval", "development"],
           "test": ["test", "testing"]}


@pytest.mark.parametrize("split,alias", [(s, a) for s, names in ALIASES.items() for a in names])
def test_every_usual_split_name_is_accepted_in_any_case(split, alias):
    cfg = _cfg()
    values = pd.Series([alias, alias.upper(), f"  {alias.title()} "])
    assert canonical_splits(values, cfg, "x").tolist() == [split] * 3


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_folder_of_split_files_is_read_by_file_name(here, suffix):
    df = _intents()
    df["split"] = ["train", "train", "val", "test"] * (len(df) // 4)
    Path("corpus").mkdir()
    for name, given in (("Train", "train"), ("dev", "val"), ("test", "test")):
        part = df[df["split"] == given].drop(columns=["split"])
        path = f"corpus/{name}.{suffix}"
        {"csv": lambda: part.to_csv(path, index=False),
         "jsonl": lambda: part.to_json(path, orient="records", lines=True),
         "parquet": lambda: part.to_parquet(path, index=False)}[suffix]()
    Path("corpus/README.md").write_text("not data")
    out = prepare.run(_cfg("corpus", split_column=None))
    splits = _splits(out)
    for s in ("train", "val", "test"):
        assert splits[s]["text"].tolist() == df.loc[df["split"] == s, "text"].tolist(), s
    assert sorted(Path(p).name for p in _manifest(out)["inputs"]) == sorted(
        f"{n}.{suffix}" for n in ("Train", "dev", "test"))


def test_sharded_split_files_are_one_split_and_two_files_for_one_split_are_an_error(here):
    df = _intents()
    Path("corpus").mkdir()
    train = df[df["split"] == "train"].drop(columns=["split"])
    train.iloc[::2].to_parquet("corpus/train-00000-of-00002.parquet", index=False)
    train.iloc[1::2].to_parquet("corpus/train-00001-of-00002.parquet", index=False)
    df[df["split"] == "test"].drop(columns=["split"]).to_parquet("corpus/test-00000-of-00001.parquet", index=False)
    out = prepare.run(_cfg("corpus", split_column=None))
    splits = _splits(out)
    assert len(splits["train"]) + len(splits["val"]) == len(train)
    train.to_csv("corpus/training.csv", index=False)
    with pytest.raises(DataError, match=r"several files for the train split \(train-00000-of-00002.parquet, "
                                        r"train-00001-of-00002.parquet, training.csv\); keep one per split"):
        prepare.run(_cfg("corpus", split_column=None))


def test_folder_with_train_and_test_files_carves_val(here):
    df = _intents()
    Path("corpus").mkdir()
    for s in ("train", "test"):
        df[df["split"] == s].drop(columns=["split"]).to_csv(f"corpus/{s}.csv", index=False)
    out = prepare.run(_cfg("corpus", split_column=None))
    assert _manifest(out)["split_plan"]["carved"] == ["val"]
    assert _splits(out)["test"]["text"].tolist() == df.loc[df["split"] == "test", "text"].tolist()


def test_hugging_face_split_names_go_through_the_same_mapping(here, monkeypatch):
    """A local dataset folder read through ``datasets`` (offline): its train/test splits get a carved val."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(here / "hf-cache"))
    df = _intents()
    Path("hfdata").mkdir()
    for s in ("train", "test"):
        df[df["split"] == s].drop(columns=["split"]).to_csv(f"hfdata/{s}.csv", index=False)
    out = prepare.run(_cfg(f"hf:{here / 'hfdata'}", split_column=None))
    plan = _manifest(out)["split_plan"]
    assert plan["given"] == ["train", "test"] and plan["carved"] == ["val"]
    assert sorted(_splits(out)["test"]["text"]) == sorted(df.loc[df["split"] == "test", "text"])


def test_split_names_config_maps_other_names_and_drops_rows(here):
    df = _intents()
    df.loc[df.index % 10 == 1, "split"] = "holdout"
    df.loc[df.index % 10 == 2, "split"] = "Unlabelled"
    df.to_csv("corpus.csv", index=False)
    out = prepare.run(_cfg("corpus.csv", "data.split_names={holdout: val, unlabelled: drop}"))
    m = _manifest(out)
    assert m["sizes"]["val"] == int((df["split"] == "holdout").sum())
    assert m["counts"]["split_name_dropped"] == int((df["split"] == "Unlabelled").sum())
    assert m["split_plan"]["carved"] == []


# ---- leakage rules with given splits -------------------------------------------------------------------------

def test_text_in_given_train_and_test_is_kept_in_train_whatever_the_row_order(here):
    df = _intents()
    shared = df.loc[df["split"] == "train", "text"].iloc[-1]
    copy = df[df["split"] == "train"].iloc[[-1]].assign(split="test")
    pd.concat([copy, df]).to_csv("corpus.csv", index=False)  # the test copy comes first in the file
    out = prepare.run(_cfg())
    splits = _splits(out)
    assert shared in set(splits["train"]["text"]) | set(splits["val"]["text"])
    assert shared not in set(splits["test"]["text"])
    m = _manifest(out)
    assert m["counts"]["cross_split_text_dropped_test"] == 1 and m["counts"]["duplicate_rows_dropped"] == 0


def test_groups_spanning_given_splits_are_counted_and_warned_once(here, caplog):
    df = make_corpus(n_clusters_per_brand=4).rename(columns={"title": "text"})
    df["split"] = ["test" if i % 5 == 0 else "train" for i in range(len(df))]  # cuts many clusters
    df.to_csv("corpus.csv", index=False)
    spanning = int((df.groupby("cluster")["split"].nunique() > 1).sum())
    caplog.set_level(logging.INFO, logger="pipeline.prepare.labelled")
    out = prepare.run(_cfg(group_column="cluster"))
    assert spanning > 0 and _manifest(out)["counts"]["groups_spanning_given_splits"] == spanning
    warnings = [r.getMessage() for r in caplog.records if "two given splits" in r.getMessage()]
    assert len(warnings) == 1 and f"{spanning} group(s)" in warnings[0]


def test_label_with_one_group_in_train_stays_there_and_is_named(here, caplog):
    df = _intents()
    rare = pd.DataFrame({"text": ["a rare ask", "another rare ask"], "category": "rare", "split": ["train", "test"]})
    pd.concat([df, rare]).to_csv("corpus.csv", index=False)
    caplog.set_level(logging.INFO, logger="pipeline.prepare.labelled")
    out = prepare.run(_cfg())
    splits = _splits(out)
    assert "a rare ask" in set(splits["train"]["text"]) and "rare" not in set(splits["val"]["label"])
    assert _manifest(out)["split_plan"]["labels_only_in_train"] == ["rare"]
    assert any("'rare'" in r.getMessage() and "carved val" in r.getMessage() for r in caplog.records)


# ---- errors: one line, nothing written -----------------------------------------------------------------------

def _fails(cfg, pattern: str) -> str:
    with pytest.raises(DataError, match=pattern) as err:
        prepare.run(cfg)
    assert "\n" not in str(err.value)
    assert not PROCESSED.exists() and not list(Path("data/processed").glob(".corpus*"))
    return str(err.value)


def test_too_small_corpus_says_what_each_split_got_and_what_is_needed(here):
    rows = [{"text": f"ask {label} {i}", "category": label, "split": "train" if i == 0 else "test"}
            for label in ("a", "b", "c") for i in range(3)]
    pd.DataFrame(rows).to_csv("corpus.csv", index=False)
    msg = _fails(_cfg(), r"^the val split is empty after preparation: train 3 rows / 3 groups, val 0 / 0, "
                         r"test 6 / 6; ")
    assert "needs at least 2 groups in train" in msg and "too small" not in msg


def test_label_with_one_example_is_named_with_the_fix(here):
    df = _intents().drop(columns=["split"])
    pd.concat([df, pd.DataFrame([{"text": "a lonely ask", "category": "lonely"}])]).to_csv("corpus.csv", index=False)
    msg = _fails(_cfg(split_column=None), r"corpus.csv: labels with a single example \(column 'category'\): "
                                          r"'lonely' \(1 row\); ")
    assert msg.endswith("add examples, merge the label into another, or remove its row")


def test_test_label_absent_from_train_is_named(here):
    df = _intents()
    extra = pd.DataFrame({"text": ["refund please", "my refund", "where is my card"],
                          "category": ["refund", "refund", "card"], "split": "test"})
    pd.concat([df, extra]).to_csv("corpus.csv", index=False)
    _fails(_cfg(), r"the given test split has labels that the train split lacks \(column 'category'\): "
                   r"'refund' \(2 rows\), 'card' \(1 row\); .*add train rows with these labels or remove their "
                   r"rows from test$")


def test_unknown_split_values_are_listed_with_the_accepted_names(here):
    df = _intents()
    df.loc[df.index[:3], "split"] = "holdout"
    df.loc[df.index[3], "split"] = None
    df.to_csv("corpus.csv", index=False)
    msg = _fails(_cfg(), r"corpus.csv: column 'split' \(data.split_column\) has split names the pipeline does "
                         r"not know: 'holdout' \(3 rows\), <blank> \(1 row\); accepted, in any case: "
                         r"train/training; val/validation/valid/dev/eval/development; test/testing")
    assert "data.split_names" in msg


def test_split_folder_without_train_lists_files_and_accepted_names(here):
    Path("corpus").mkdir()
    for name in ("learn.csv", "dev.csv", "test.csv"):
        _intents().drop(columns=["split"]).to_csv(f"corpus/{name}", index=False)
    _fails(_cfg("corpus", split_column=None),
           r"corpus: no train file among the split files \(found: dev.csv, learn.csv, test.csv\); name the files "
           r"by split, in any case: train/training; val/validation")


def test_bad_input_leaves_a_prepared_folder_unchanged(here):
    df = _intents()
    df.to_csv("corpus.csv", index=False)
    out = prepare.run(_cfg())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    df.assign(split=df["split"].replace({"test": "exam"})).to_csv("corpus.csv", index=False)
    with pytest.raises(DataError, match="'exam'"):
        prepare.run(_cfg())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_error_is_one_line_on_the_console_with_exit_code_2(here, capsys):
    df = _intents()
    df.loc[df.index[0], "split"] = "holdout"
    df.to_csv("corpus.csv", index=False)
    Path("c.yaml").write_text((REPO / "configs" / "template.yaml").read_text())
    rc = cli("prepare", "--config", "c.yaml", "data.name=corpus", "data.path=corpus.csv", "data.text_column=text",
             "data.label_column=category", "data.group_column=null", "data.split_column=split")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "'holdout' (1 row)" in err[0]
    assert not PROCESSED.exists()


# ---- shipped data through the mirror -------------------------------------------------------------------------

def test_mirror_path_copies_the_file_read_only_into_data_raw(here):
    mirror = here / "mirror"
    (mirror / "intents").mkdir(parents=True)
    _intents().to_csv(mirror / "intents" / "all.csv", index=False)
    out = prepare.run(_cfg("mirror:intents/all.csv", f"paths.mirror={mirror}"))
    copy = Path("data/raw/corpus/all.csv")
    assert copy.read_bytes() == (mirror / "intents" / "all.csv").read_bytes()
    assert not copy.stat().st_mode & 0o222
    assert list(_manifest(out)["inputs"]) == [str(copy)]


def test_mirror_path_missing_names_both_places(here):
    _fails(_cfg("mirror:intents/all.csv", f"paths.mirror={here / 'nowhere'}"),
           r"data.path mirror:intents/all.csv: data/raw/corpus/all.csv does not exist and the mirror has no "
           r".*nowhere/intents/all.csv \(set DATA_MIRROR or paths.mirror\)")


@pytest.mark.skipif(not (SHARED_DATA / "clinc150").exists(), reason="../shared/data not present")
def test_clinc150_config_prepares_from_the_mirror(here):
    cfg = load_config(REPO / "configs" / "clinc150.yaml", [f"paths.mirror={SHARED_DATA}"])
    out = prepare.run(cfg)
    m = _manifest(out)
    assert m["counts"]["rows_read"] == 22500 and m["split_plan"]["carved"] == []
    # SOURCE.md: 15,000 / 3,000 / 4,500 rows; texts also in train are dropped from val and test
    assert m["sizes"] == {"train": 15000, "val": 3000 - m["counts"]["cross_split_text_dropped_val"],
                          "test": 4500 - m["counts"]["cross_split_text_dropped_test"]}
    assert all(len(m["class_counts"][s]) == 150 for s in ("train", "val", "test"))
