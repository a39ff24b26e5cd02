"""prepare for retrieval sets (pipeline/prepare/retrieval.py): the BEIR layout, pairs + a document table, the
split and leakage rules, lengths and passages, training pairs, and the bad-input matrix (one line, exit 2,
nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.contracts import prepared_data as P
from tests.conftest import OFF, cli
from tests.retrieval_data import as_hf_dataset, as_pairs, make_beir, pairs_config
from tests.test_cli import _fails_cleanly

def _prepare(config: Path, *overrides: str) -> Path:
    assert cli("prepare", "--config", str(config), OFF, *overrides) == 0
    name = yaml.safe_load(config.read_text())["data"]["name"]
    return Path("data/processed") / name


def test_beir_folder_with_crlf_qrels_is_prepared_in_beir_layout(beir_project):
    out = _prepare(beir_project)
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "retrieval" and m["text_files"] == ["passages.jsonl", "queries.jsonl"]
    corpus = P.load_corpus(out)
    assert len(corpus) == 48 and m["sizes"]["documents"] == 48
    test = P.load_qrels(out, "test")
    assert test and all(isinstance(g, int) for docs in test.values() for g in docs.values())
    assert {2, 1} == {g for docs in test.values() for g in docs.values()}  # no "\r" left on a grade
    queries = P.load_retrieval_queries(out)
    assert set(queries["split"]) == {"train", "val", "test"} and m["split_plan"]["given"] == ["train", "val", "test"]
    # documents over the 32-token model maximum became passages, each led by the title
    passages = P.load_passages(out)
    assert m["lengths"]["encoder"] <= 32 and len(passages) > len(corpus)
    long_doc = passages[passages["doc"] == "D0-0"]
    assert len(long_doc) > 1 and all(t.startswith("statins statin report 0") for t in long_doc["text"])
    pairs = P.load_pairs(out)
    train_q = set(queries.loc[queries["split"] == "train", "id"])
    assert set(pairs["query_id"]) <= train_q and pairs.groupby("query_id").size().max() <= 4


def test_a_test_query_text_in_train_leaves_train_not_test(beir_project):
    beir = Path("beir")
    queries = [json.loads(line) for line in (beir / "queries.jsonl").read_text().splitlines()]
    train_ids = {line.split("\t")[0] for line in (beir / "qrels/train.tsv").read_text().splitlines()[1:]}
    test_ids = {line.split("\t")[0] for line in (beir / "qrels/test.tsv").read_text().splitlines()[1:]}
    test_text = next(q["text"] for q in queries if q["_id"] in test_ids)
    victim = next(q for q in queries if q["_id"] in train_ids)
    victim["text"] = "  " + test_text.upper() + " "  # same text, other case and spacing
    (beir / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    out = _prepare(beir_project)
    kept = P.load_retrieval_queries(out)
    assert victim["_id"] not in set(kept["id"]) and test_ids <= set(kept["id"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["train_queries_dropped_text_in_test_or_val"] == 1
    assert victim["_id"] not in set(P.load_pairs(out)["query_id"])


def test_without_dev_qrels_val_queries_are_carved_from_train(beir_project):
    Path("beir/qrels/dev.tsv").unlink()
    out = _prepare(beir_project)
    m = json.loads((out / "manifest.json").read_text())
    assert m["split_plan"]["carved"] == ["val"] and m["sizes"]["queries"]["val"] > 0
    val = set(P.load_retrieval_queries(out, "val")["id"])
    assert val and not val & set(P.load_pairs(out)["query_id"])


@pytest.mark.parametrize("by", ["id", "text"])
def test_pairs_with_a_document_table_prepare_the_same_set_as_beir(beir_project, tmp_path, by):
    beir_out = _prepare(beir_project)
    pairs_out = _prepare(pairs_config(beir_project, tmp_path, by=by))

    def judged(folder):
        q = P.load_retrieval_queries(folder).set_index("id")
        return {s: sorted((q.loc[qid, "text"], d, g) for qid, docs in P.load_qrels(folder, s).items()
                          for d, g in docs.items()) for s in P.SPLITS}

    assert judged(beir_out) == judged(pairs_out)
    assert P.load_corpus(beir_out).equals(P.load_corpus(pairs_out))
    assert P.load_passages(beir_out).equals(P.load_passages(pairs_out))


def test_an_hf_dataset_in_beir_form_prepares_the_same_set(beir_project, tmp_path):
    beir_out = _prepare(beir_project)
    hf = as_hf_dataset(Path("beir"), tmp_path / "hf_set")
    cfg = yaml.safe_load(beir_project.read_text())
    cfg["data"] = {"name": "tinyhf", "format": "beir", "path": f"hf:{hf}"}
    config = tmp_path / "configs" / "hf.yaml"
    config.write_text(yaml.safe_dump(cfg))
    hf_out = _prepare(config)
    for split in P.SPLITS:
        assert P.load_qrels(beir_out, split) == P.load_qrels(hf_out, split)
    assert P.load_retrieval_queries(beir_out).equals(P.load_retrieval_queries(hf_out))
    assert P.load_corpus(beir_out).equals(P.load_corpus(hf_out))


# ---------------------------------------------------------------------------------------- bad input

def _edit_qrels(split: str, extra: str) -> None:
    path = Path(f"beir/qrels/{split}.tsv")
    path.write_bytes(path.read_bytes() + extra.encode())


def test_qrels_naming_an_unknown_document_is_one_line(beir_project, capsys):
    _edit_qrels("test", "Q0-0\tNOPE-1\t1\r\n")
    msg = _fails_cleanly(capsys, "prepare", "--config", str(beir_project), OFF)
    assert "1 documents that are not in the corpus ('NOPE-1')" in msg


def test_qrels_naming_an_unknown_query_is_one_line(beir_project, capsys):
    _edit_qrels("train", "GHOST\tD0-1\t1\r\n")
    msg = _fails_cleanly(capsys, "prepare", "--config", str(beir_project), OFF)
    assert "queries that are not in the queries ('GHOST')" in msg


def test_an_empty_corpus_is_one_line(beir_project, capsys):
    Path("beir/corpus.jsonl").write_text("")
    msg = _fails_cleanly(capsys, "prepare", "--config", str(beir_project), OFF)
    assert "the corpus has no documents" in msg


@pytest.mark.parametrize("file,what", [("corpus.jsonl", "document"), ("queries.jsonl", "query")])
def test_duplicate_ids_are_one_line(beir_project, capsys, file, what):
    path = Path("beir") / file
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[1]]) + "\n")
    msg = _fails_cleanly(capsys, "prepare", "--config", str(beir_project), OFF)
    assert f"1 duplicate {what} id(s)" in msg


def test_a_query_with_no_judged_relevant_document_in_its_split_is_one_line(beir_project, capsys):
    path = Path("beir/qrels/test.tsv")
    lines = path.read_text().splitlines()
    first_q = lines[1].split("\t")[0]
    kept = [lines[0]] + [line if line.split("\t")[0] != first_q else line.rsplit("\t", 1)[0] + "\t0"
                         for line in lines[1:]]
    path.write_text("\n".join(kept) + "\n")
    msg = _fails_cleanly(capsys, "prepare", "--config", str(beir_project), OFF)
    assert f"'{first_q}' in test" in msg and "no judged-relevant document" in msg


def test_a_document_table_without_the_named_columns_is_one_line(beir_project, capsys, tmp_path):
    pairs, table = as_pairs(Path("beir"), tmp_path / "as_pairs")
    cfg = yaml.safe_load(beir_project.read_text())
    cfg["data"] = {"name": "tinypairs", "format": "pairs", "path": str(pairs), "query_column": "question",
                   "positive_column": "doc", "corpus_path": str(table), "corpus_id_column": "doc_id",
                   "corpus_title_column": "heading", "corpus_text_column": "content"}
    Path("configs/bad.yaml").write_text(yaml.safe_dump(cfg))
    msg = _fails_cleanly(capsys, "prepare", "--config", "configs/bad.yaml", OFF)
    assert "column 'content' (text) not found" in msg and "doc_id, heading, body" in msg


def test_short_documents_keep_a_short_encoder_length_and_no_passages(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    make_beir(tmp_path / "short", long_every=0, short_words=3)  # no long document: a title and three words
    cfg = {"model": {"base": str(tiny_model_dir)}, "data": {"name": "short", "format": "beir", "path": "short"}}
    Path("short.yaml").write_text(yaml.safe_dump(cfg))
    out = _prepare(Path("short.yaml"))
    lengths = json.loads((out / "manifest.json").read_text())["lengths"]
    assert lengths["encoder"] < lengths["model_max"] and lengths["passages_total"] == 48
    assert lengths["documents_in_passages"] == 0


def test_mined_negatives_come_from_the_corpus_and_are_never_judged_relevant_to_the_query(beir_project):
    out = _prepare(beir_project, "pairs.hard_negatives.enabled=true", "pairs.hard_negatives.relative_margin=0")
    pairs = P.load_pairs(out)
    relevant = P.load_relevant(out, "train")
    mined = pairs[pairs["negative_id"].notna()]
    assert len(mined) > 0 and set(mined["negative_id"]) <= set(P.load_corpus(out)["id"])
    assert not any(n in relevant[q] for q, n in zip(mined["query_id"], mined["negative_id"]))
