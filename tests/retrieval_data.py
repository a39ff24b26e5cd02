"""A small synthetic retrieval set in BEIR layout (and the same set as pairs + a document table), for tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

TOPICS = {
    "statins": ["statin", "cholesterol", "heart", "lipid"],
    "vitamin": ["vitamin", "bone", "calcium", "sunlight"],
    "tea": ["green", "tea", "catechin", "pressure"],
    "fibre": ["fibre", "colon", "bowel", "grain"],
    "sugar": ["sugar", "insulin", "diabetes", "glucose"],
    "soy": ["soy", "isoflavone", "estrogen", "tofu"],
}
FILLER = ["study", "patients", "results", "trial", "effect", "cohort", "risk", "analysis", "data", "group"]


def make_beir(folder: Path, *, docs_per_topic: int = 8, queries_per_topic: int = 6, long_every: int = 3,
              seed: int = 0, crlf: bool = True, splits=("train", "dev", "test"), short_words: int = 12) -> Path:
    """corpus.jsonl, queries.jsonl and qrels/<split>.tsv; every third document is long enough to be cut into
    passages by a 32-token model. Query q of a topic is judged relevant (grade 2 for its first document, 1 for
    the others) to that topic's documents; queries are spread over ``splits`` round robin."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    docs, queries, qrels = [], [], {s: [] for s in splits}
    for t, (topic, words) in enumerate(TOPICS.items()):
        ids = []
        for i in range(docs_per_topic):
            n = 60 if long_every and i % long_every == 0 else short_words
            body = " ".join(rng.choice(words + FILLER, n))
            doc_id = f"D{t}-{i}"
            docs.append({"_id": doc_id, "title": f"{topic} {words[i % 4]} report {i}", "text": body,
                         "metadata": {}})
            ids.append(doc_id)
        for j in range(queries_per_topic):
            qid = f"Q{t}-{j}"
            queries.append({"_id": qid, "text": f"does {words[j % 4]} {words[(j + 1) % 4]} matter {j}"})
            split = splits[(t + j) % len(splits)]
            qrels[split] += [(qid, d, 2 if k == 0 else 1) for k, d in enumerate(ids[: 4 + j % 3])]
    with open(folder / "corpus.jsonl", "w") as fh:
        fh.writelines(json.dumps(d) + "\n" for d in docs)
    with open(folder / "queries.jsonl", "w") as fh:
        fh.writelines(json.dumps(q) + "\n" for q in queries)
    end = "\r\n" if crlf else "\n"
    for split, rows in qrels.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in rows]
        (folder / "qrels" / f"{split}.tsv").write_bytes((end.join(lines) + end).encode())
    return folder


def as_pairs(beir: Path, out: Path, *, by: str = "id") -> tuple[Path, Path]:
    """The same set as a pairs CSV (query, positive = document id or text, score, split) + a document table."""
    beir, out = Path(beir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = pd.read_json(beir / "corpus.jsonl", lines=True, dtype={"_id": str})
    queries = pd.read_json(beir / "queries.jsonl", lines=True, dtype={"_id": str}).set_index("_id")["text"]
    rows = []
    for f in sorted((beir / "qrels").glob("*.tsv")):
        q = pd.read_csv(f, sep="\t", dtype=str)
        text = corpus.set_index("_id")["text"]
        for qid, did, score in zip(q["query-id"], q["corpus-id"], q["score"]):
            rows.append({"question": queries[qid], "doc": did if by == "id" else text[did], "grade": int(score),
                         "part": f.stem})
    pairs = out / "pairs.csv"
    pd.DataFrame(rows).to_csv(pairs, index=False)
    table = out / "documents.jsonl"
    corpus.rename(columns={"_id": "doc_id", "title": "heading", "text": "body"})[["doc_id", "heading", "body"]].to_json(
        table, orient="records", lines=True)
    return pairs, table


def pairs_config(project_config: Path, tmp_path: Path, *, by: str = "id") -> Path:
    """The project's BEIR folder (``beir/``) given as a pairs file + a document table instead: a config beside
    ``project_config`` that differs only in its data section."""
    pairs, table = as_pairs(Path("beir"), tmp_path / "as_pairs", by=by)
    cfg = yaml.safe_load(Path(project_config).read_text())
    cfg["data"] = {"name": "tinypairs", "format": "pairs", "path": str(pairs), "query_column": "question",
                   "positive_column": "doc", "score_column": "grade", "split_column": "part",
                   "corpus_path": str(table), "corpus_id_column": "doc_id", "corpus_title_column": "heading",
                   "corpus_text_column": "body"}
    config = tmp_path / "configs" / "pairs.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(cfg))
    return config


def as_hf_dataset(beir: Path, out: Path) -> Path:
    """The same set as a local Hugging Face dataset with corpus / queries / default (qrels) configs, as MTEB's
    retrieval datasets are laid out (datasets reads the configs from README.md, offline)."""
    beir, out = Path(beir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pd.read_json(beir / "corpus.jsonl", lines=True, dtype={"_id": str})[["_id", "title", "text"]].to_parquet(
        out / "corpus.parquet")
    pd.read_json(beir / "queries.jsonl", lines=True, dtype={"_id": str}).to_parquet(out / "queries.parquet")
    splits = []
    for f in sorted((beir / "qrels").glob("*.tsv")):
        pd.read_csv(f, sep="\t", dtype={"query-id": str, "corpus-id": str}).to_parquet(out / f"qrels-{f.stem}.parquet")
        splits.append(f"      - split: {f.stem}\n        path: qrels-{f.stem}.parquet")
    (out / "README.md").write_text(
        "---\nconfigs:\n  - config_name: corpus\n    data_files:\n      - split: corpus\n        path: corpus.parquet\n"
        "  - config_name: queries\n    data_files:\n      - split: queries\n        path: queries.parquet\n"
        "  - config_name: default\n    data_files:\n" + "\n".join(splits) + "\n---\n")
    return out
