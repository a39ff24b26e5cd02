"""prepare under the corpus objective (issue 24): documents alone, in each form they come in (a BEIR folder without
train judgments, a corpus with no judged query at all, a table of texts with a judged pairs file, a labelled corpus
whose ids and labels are withheld), and the bad-input matrix (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import yaml

from pipeline.contracts import prepared_data as P
from pipeline.prepare.pseudo import text_key

from tests.conftest import OFF, cli
from tests.prepare.test_retrieval_prepare import _prepare
from tests.test_cli import _fails_cleanly

METHODS = "pairs.corpus.methods=[ict,title,crops]"


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_a_beir_corpus_without_train_judgments_gets_the_corpus_objective(beir_project):
    Path("beir/qrels/train.tsv").unlink()
    out = _prepare(beir_project)
    m = _manifest(out)
    assert m["objective"]["name"] == "corpus" and "without train judgments" in m["objective"]["reason"]
    assert m["sizes"]["queries"]["train"] == 0 and m["judged"] == {"val_queries": 12, "test_queries": 12,
                                                                    "verified": True}
    pairs = P.load_pairs(out)
    assert set(pairs["kind"]) == set(m["pseudo"]["by_method"]) == {"ict", "title", "crops"}
    assert len(pairs) == m["pseudo"]["pairs"] and set(pairs["positive_id"]) <= set(P.load_corpus(out)["id"])
    judged = set(P.load_retrieval_queries(out)["text"].map(text_key))
    assert judged and not judged & set(pairs["anchor"].map(text_key))


def test_an_explicit_corpus_objective_withholds_the_train_judgments(beir_project):
    out = _prepare(beir_project, "pairs.objective=corpus")
    m = _manifest(out)
    assert m["objective"]["name"] == "corpus" and m["counts"]["train_judgments_withheld"] == 60
    assert not P.load_qrels(out, "train") and "query_id" not in P.load_pairs(out)


def test_a_judged_set_of_one_split_is_cut_into_validation_and_test(beir_project):
    Path("beir/qrels/train.tsv").unlink()
    Path("beir/qrels/dev.tsv").unlink()
    m = _manifest(_prepare(beir_project))
    assert m["split_plan"]["given"] == ["test"] and m["split_plan"]["carved"] == ["val"]
    assert m["sizes"]["queries"]["val"] + m["sizes"]["queries"]["test"] == 12 and m["sizes"]["queries"]["val"] > 0


def test_a_corpus_with_no_judged_query_prepares_unverified(beir_project):
    shutil.rmtree("beir/qrels")
    Path("beir/queries.jsonl").unlink()
    out = _prepare(beir_project)
    m = _manifest(out)
    assert m["objective"]["name"] == "corpus" and m["judged"]["verified"] is False
    assert m["sizes"]["queries"] == {"train": 0, "val": 0, "test": 0} and m["pseudo"]["pairs"] > 0


def _text_table(tmp: Path, texts: list[str], judged: list[dict] | None = None) -> Path:
    pd.DataFrame({"id": range(len(texts)), "body": texts}).to_csv(tmp / "texts.csv", index=False)
    data = {"name": "texts", "format": "table", "path": "texts.csv", "text_column": "body", "label_column": None}
    if judged is not None:
        pd.DataFrame(judged).to_csv(tmp / "judged.csv", index=False)
        data.update({"judged_path": "judged.csv", "query_column": "q", "positive_column": "doc"})
    cfg = yaml.safe_load(Path("configs/beir.yaml").read_text())
    cfg["data"] = data
    path = Path("configs/texts.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _beir_texts() -> list[str]:
    corpus = pd.read_json("beir/corpus.jsonl", lines=True)
    return (corpus["title"] + ". " + corpus["text"]).tolist()


def test_a_table_of_texts_with_a_judged_pairs_file_is_a_corpus_set_judged_by_text(beir_project, tmp_path):
    texts = _beir_texts()
    judged = [{"q": f"question {i}", "doc": texts[i]} for i in range(0, 40, 2)]
    out = _prepare(_text_table(tmp_path, texts, judged), METHODS)
    m = _manifest(out)
    assert m["objective"]["name"] == "corpus" and m["sizes"]["documents"] == len(texts)
    assert m["sizes"]["queries"]["val"] + m["sizes"]["queries"]["test"] == 20 and m["judged"]["verified"]
    corpus = P.load_corpus(out)
    assert corpus["id"].tolist() == [str(i) for i in range(len(texts))]
    test = P.load_qrels(out, "test")
    queries = P.load_retrieval_queries(out).set_index("id")["text"]
    assert all(docs == {str(int(queries[q].split()[1])): 1} for q, docs in test.items())


def test_a_table_of_texts_without_a_judged_set_prepares_unverified(beir_project, tmp_path):
    m = _manifest(_prepare(_text_table(tmp_path, _beir_texts()), METHODS))
    assert m["judged"]["verified"] is False and m["pseudo"]["pairs"] > 0


def test_a_labelled_corpus_under_the_corpus_objective_trains_on_its_train_texts_alone(project):
    assert cli("prepare", "--config", str(project), OFF, "pairs.objective=corpus", METHODS) == 0
    out = Path("data/processed/synthetic")
    m = _manifest(out)
    train = P.load_split(out, "train")
    pairs = P.load_pairs(out)
    assert m["objective"]["name"] == "corpus" and set(pairs["kind"]) <= {"ict", "crops"}
    assert set(pairs["source_id"].astype(str)) <= set(train["id"].astype(str))
    text_of = dict(zip(train["id"].astype(str), train["text"]))
    assert all(set(a.split()) <= set(text_of[s].split()) for a, s in zip(pairs["anchor"], pairs["source_id"]))
    assert pairs["label"].isna().all() and P.has_groups(P.load_split(out, "test"))  # the judged set keeps its ids


# ---------------------------------------------------------------------------------------- bad input

def test_an_empty_table_of_texts_is_one_line(beir_project, tmp_path, capsys):
    config = _text_table(tmp_path, ["x"])
    Path("texts.csv").write_text("id,body\n")
    msg = _fails_cleanly(capsys, "prepare", "--config", str(config), OFF)
    assert "no rows" in msg or "no documents" in msg


def test_all_blank_texts_are_one_line(beir_project, tmp_path, capsys):
    config = _text_table(tmp_path, ["  ", "\t", " "])
    msg = _fails_cleanly(capsys, "prepare", "--config", str(config), OFF)
    assert "all 3 documents are blank" in msg


def test_all_blank_documents_of_a_beir_corpus_are_one_line(beir_project, capsys):
    rows = [json.loads(line) for line in Path("beir/corpus.jsonl").read_text().splitlines()]
    Path("beir/corpus.jsonl").write_text("".join(json.dumps({**r, "title": "", "text": " "}) + "\n" for r in rows))
    msg = _fails_cleanly(capsys, "prepare", "--config", str(beir_project), OFF, "pairs.objective=corpus")
    assert f"all {len(rows)} documents are blank" in msg


def test_a_judged_set_naming_documents_not_in_the_corpus_is_one_line(beir_project, tmp_path, capsys):
    texts = _beir_texts()
    config = _text_table(tmp_path, texts, [{"q": "a question", "doc": texts[0]},
                                           {"q": "another", "doc": "a document nobody wrote"}])
    msg = _fails_cleanly(capsys, "prepare", "--config", str(config), OFF)
    assert "1 positive(s) match neither a document id nor a document text" in msg


def test_judgments_naming_documents_not_in_a_beir_corpus_are_one_line_under_the_corpus_objective(beir_project,
                                                                                                 capsys):
    Path("beir/qrels/train.tsv").unlink()
    path = Path("beir/qrels/test.tsv")
    path.write_bytes(path.read_bytes() + b"Q0-0\tNOPE-1\t1\r\n")
    msg = _fails_cleanly(capsys, "prepare", "--config", str(beir_project), OFF)
    assert "1 documents that are not in the corpus ('NOPE-1')" in msg
