"""Readers of retrieval sets: a BEIR folder, a Hugging Face dataset in BEIR form, or pairs plus a document
table; each gives one :class:`RetrievalSet` (documents, queries, graded judgments with their given split).

What the readers check, each failure one line naming the file and what to fix (field note 19 for the layout):
an empty corpus, duplicate document or query ids, judgments naming an id that the corpus or the queries do not
have, a document table without the named columns. Qrels are read with pandas, so CRLF line ends (as BEIR ships
them) leave no ``\\r`` on the score.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.config import Config
from pipeline.core.errors import DataError
from pipeline.prepare.sources import (MIRROR_PREFIX, canonical_splits, frame_digest, mirror_dir, read_source,
                                      split_name_map)

log = logging.getLogger(__name__)
QRELS_COLUMNS = ("query-id", "corpus-id", "score")


@dataclass
class RetrievalSet:
    """Documents, queries and judgments as a reader found them (ids as strings, splits canonical)."""

    corpus: pd.DataFrame  # id, title, text
    queries: pd.DataFrame  # id, text
    qrels: pd.DataFrame  # query_id, doc_id, score (int), split (train / val / test)
    inputs: dict[str, Path | str]  # name -> file, or a content hash (hash_inputs)
    source: str  # what the messages name
    blank_documents_dropped: int = 0


def _listed(values, show: int = 3) -> str:
    values = list(values)
    named = ", ".join(repr(str(v)) for v in values[:show])
    return named + (f" and {len(values) - show} more" if len(values) > show else "")


def check(rs: RetrievalSet) -> RetrievalSet:
    """The input errors every form shares: empty corpus, duplicate ids, judgments naming unknown ids."""
    if len(rs.corpus) == 0:
        raise DataError(f"{rs.source}: the corpus has no documents; a retrieval set needs the documents to search")
    for what, df in (("document", rs.corpus), ("query", rs.queries)):
        dup = df["id"][df["id"].duplicated()].unique()
        if len(dup):
            raise DataError(f"{rs.source}: {len(dup)} duplicate {what} id(s) ({_listed(dup)}); every {what} needs "
                            f"its own id")
    for column, what, known in (("doc_id", "documents", rs.corpus["id"]), ("query_id", "queries", rs.queries["id"])):
        unknown = rs.qrels.loc[~rs.qrels[column].isin(set(known)), column].unique()
        if len(unknown):
            raise DataError(f"{rs.source}: the judgments name {len(unknown)} {what} that are not in the "
                            f"{'corpus' if what == 'documents' else 'queries'} ({_listed(unknown)}); fix the ids or "
                            f"remove those judgments")
    return rs


def _frame(df: pd.DataFrame, columns: dict[str, str | None], where: str) -> pd.DataFrame:
    """Rename the named columns to ours (a missing one is an error naming the file's columns)."""
    missing = [f"'{col}' ({key})" for key, col in columns.items() if col is not None and col not in df.columns]
    if missing:
        raise DataError(f"{where}: column {', '.join(missing)} not found; the file has: "
                        f"{', '.join(map(str, df.columns))}")
    out = pd.DataFrame({ours: (df[col].astype("string").fillna("").str.strip().astype(object) if col is not None
                               else "") for ours, col in columns.items()})
    return out


def _read_jsonl(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path} does not exist; a BEIR folder holds corpus.jsonl, queries.jsonl and "
                        f"qrels/<split>.tsv")
    if path.stat().st_size == 0:
        return pd.DataFrame()
    try:
        return pd.read_json(path, lines=True, dtype=False)
    except ValueError as exc:
        raise DataError(f"{path}: cannot parse as JSON lines ({exc})") from None


def _read_qrels_file(path: Path, split: str) -> pd.DataFrame:
    """A BEIR qrels TSV (header query-id, corpus-id, score) or a TREC qrels file (qid 0 docid grade)."""
    try:
        df = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False, comment=None)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=["query_id", "doc_id", "score", "split"])
    if len(df) and [str(v).strip() for v in df.iloc[0, :3]] == list(QRELS_COLUMNS):
        df = df.iloc[1:]
    cols = [0, 1, 2] if df.shape[1] == 3 else [0, 2, 3] if df.shape[1] == 4 else None
    if cols is None:
        raise DataError(f"{path}: expected 3 tab-separated columns (query-id, corpus-id, score) or TREC's 4, "
                        f"found {df.shape[1]}")
    score = pd.to_numeric(df[cols[2]].str.strip(), errors="coerce")
    if score.isna().any():
        bad = df[cols[2]][score.isna()].iloc[0]
        raise DataError(f"{path}: a score is not a number ({bad!r}); scores are integer grades")
    return pd.DataFrame({"query_id": df[cols[0]].str.strip().to_numpy(), "doc_id": df[cols[1]].str.strip().to_numpy(),
                         "score": score.astype(int).to_numpy(), "split": split})


def _qrels_folder(folder: Path, cfg: Config) -> tuple[pd.DataFrame, dict[str, Path]]:
    names = split_name_map(cfg)
    files = sorted(f for f in folder.glob("*.tsv") if f.is_file()) + sorted(folder.glob("*.txt"))
    parts, inputs = [], {}
    for f in files:
        split = names.get(f.stem.strip().lower())
        if split is None:
            raise DataError(f"{f}: '{f.stem}' is not a split name; name qrels files train/dev/test.tsv or map the "
                            f"name with data.split_names")
        if split != "drop":
            parts.append(_read_qrels_file(f, split))
            inputs[str(f)] = f
    if not parts:
        raise DataError(f"{folder}: no qrels files (<split>.tsv); a retrieval set needs judgments")
    return pd.concat(parts, ignore_index=True), inputs


def _corpus_frame(df: pd.DataFrame, where: str, id_col: str, title_col: str | None, text_col: str) -> pd.DataFrame:
    if len(df) == 0:
        raise DataError(f"{where}: the corpus has no documents; a retrieval set needs the documents to search")
    title = title_col if title_col in df.columns else None if title_col == "title" else title_col
    return _frame(df, {"id": id_col, "title": title, "text": text_col}, where)


def read_beir_folder(folder: Path, cfg: Config) -> RetrievalSet:
    """``corpus.jsonl`` (_id, title, text), ``queries.jsonl`` (_id, text) and ``qrels/<split>.tsv``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data.path {folder} is not a folder; format beir reads a folder with corpus.jsonl, "
                        f"queries.jsonl and qrels/")
    corpus = _corpus_frame(_read_jsonl(folder / "corpus.jsonl"), str(folder / "corpus.jsonl"), "_id", "title", "text")
    # A corpus alone (no queries.jsonl, no qrels/) is a corpus-objective set with no judged queries (issue 24).
    alone = not (folder / "queries.jsonl").exists() and not (folder / "qrels").is_dir()
    queries = pd.DataFrame() if alone else _read_jsonl(folder / "queries.jsonl")
    queries = _frame(queries, {"id": "_id", "text": "text"}, str(folder / "queries.jsonl")) if len(queries) else \
        pd.DataFrame(columns=["id", "text"])
    qrels, inputs = ((pd.DataFrame(columns=["query_id", "doc_id", "score", "split"]), {}) if alone
                     else _qrels_folder(folder / "qrels", cfg))
    inputs = {str(folder / "corpus.jsonl"): folder / "corpus.jsonl",
              **({} if alone else {str(folder / "queries.jsonl"): folder / "queries.jsonl"}), **inputs}
    return check(RetrievalSet(corpus, queries, qrels, inputs, str(folder)))


def _hf_config(name: str, config: str) -> pd.DataFrame:
    import datasets

    try:
        ds = datasets.load_dataset(name, config)
    except Exception as exc:  # the hub client raises many types; the message is what the user needs
        raise DataError(f"cannot load Hugging Face dataset '{name}' config '{config}': {exc}") from None
    frames = []
    for split, part in ds.items():
        frames.append(part.to_pandas().assign(__split__=split))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_beir_hf(cfg: Config) -> RetrievalSet:
    """``hf:<dataset>`` with corpus / queries / qrels configs (``data.hf_configs``), as BEIR's and MTEB's are."""
    name, c = cfg.data.path[3:], cfg.data.hf_configs
    corpus_df, queries_df = _hf_config(name, c["corpus"]), _hf_config(name, c["queries"])
    corpus = _corpus_frame(corpus_df, f"{cfg.data.path} ({c['corpus']})", "_id", "title", "text")
    queries = _frame(queries_df, {"id": "_id", "text": "text"}, f"{cfg.data.path} ({c['queries']})")
    inputs: dict[str, Path | str] = {f"{cfg.data.path}:{c['corpus']}": frame_digest(corpus_df),
                                     f"{cfg.data.path}:{c['queries']}": frame_digest(queries_df)}
    qpath = cfg.data.qrels_path
    if qpath and not qpath.startswith("hf:"):
        qrels, files = _qrels_folder(Path(qpath), cfg)
        inputs.update(files)
    else:
        qname, qconfig = (qpath[3:], None) if qpath else (name, c["qrels"])
        raw = _hf_config(qname, qconfig) if qconfig else _hf_config(qname, "default")
        qrels = _frame(raw, {"query_id": "query-id", "doc_id": "corpus-id", "score": "score"}, f"hf:{qname} (qrels)")
        qrels["score"] = pd.to_numeric(raw["score"]).astype(int).to_numpy()
        qrels["split"] = canonical_splits(raw["__split__"], cfg, f"hf:{qname} (the qrels split names)").to_numpy()
        qrels = qrels[qrels["split"] != "drop"]
        inputs[f"hf:{qname}:qrels"] = frame_digest(raw)
    return check(RetrievalSet(corpus, queries, qrels.reset_index(drop=True), inputs, cfg.data.path))


def _documents_by(positives: pd.Series, corpus: pd.DataFrame, key: str, where: str) -> pd.Series:
    """The document id each positive names: by id, by text (title + " " + text, or the text alone), or auto."""
    ids = set(corpus["id"])
    if key in ("auto", "id") and (key == "id" or positives.isin(ids).all()):
        unknown = positives[~positives.isin(ids)].unique()
        if len(unknown):
            raise DataError(f"{where}: {len(unknown)} positive(s) name no document id of the corpus "
                            f"({_listed(unknown)}); data.document_key=id")
        return positives
    by_text: dict[str, str] = {}
    for i, title, text in zip(corpus["id"], corpus["title"], corpus["text"]):
        by_text.setdefault(text, i)
        by_text.setdefault(f"{title} {text}".strip(), i)
    found = positives.map(by_text)
    if found.isna().any():
        missing = positives[found.isna()].unique()
        raise DataError(f"{where}: {len(missing)} positive(s) match neither a document id nor a document text of "
                        f"data.corpus_path ({_listed([m[:60] for m in missing])}); data.document_key={key}")
    return found


def read_pairs_with_corpus(cfg: Config) -> RetrievalSet:
    """``format: pairs`` rows (query, positive naming a document, optional score and split) and the document
    table ``data.corpus_path``; queries are the distinct query texts, in order of first appearance."""
    d = cfg.data
    if not d.path:
        raise DataError("data.path must name the pairs file (or hf:<dataset>) when data.format is 'pairs'")
    docs, doc_inputs = read_source(d.corpus_path)
    corpus = _corpus_frame(docs, d.corpus_path, d.corpus_id_column, d.corpus_title_column, d.corpus_text_column)
    queries, qrels, inputs = judged_pairs(cfg, d.path, corpus)
    return check(RetrievalSet(corpus, queries, qrels, {**inputs, **doc_inputs}, d.path))


def judged_pairs(cfg: Config, path: str, corpus: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """A pairs file (``data.query_column`` -> ``data.positive_column`` naming a document of ``corpus`` by id or text,
    optional ``score_column`` and ``split_column``) as (queries, qrels, inputs)."""
    d = cfg.data
    table, inputs = read_source(path)
    split_col = "__split__" if path.startswith("hf:") and d.split_column is None else d.split_column
    cols = {"query": d.query_column, "positive": d.positive_column, "split": split_col, "score": d.score_column}
    rows = _frame(table, cols, path)
    rows = rows[(rows["query"] != "") & (rows["positive"] != "")]
    if len(rows) == 0:
        raise DataError(f"{path}: no row has both a query and a positive")
    doc_id = _documents_by(rows["positive"], corpus, d.document_key, path)
    query_texts = list(dict.fromkeys(rows["query"]))
    q_id = {t: f"q{i}" for i, t in enumerate(query_texts)}
    split = (canonical_splits(rows["split"], cfg, f"{path}: column '{split_col}' (data.split_column)")
             if split_col else pd.Series([None] * len(rows), index=rows.index, dtype=object))
    score = pd.to_numeric(rows["score"], errors="coerce") if d.score_column else pd.Series(1, index=rows.index)
    if score.isna().any():
        raise DataError(f"{path}: column '{d.score_column}' (data.score_column) holds a value that is not a number")
    qrels = pd.DataFrame({"query_id": rows["query"].map(q_id).to_numpy(), "doc_id": doc_id.to_numpy(),
                          "score": score.astype(int).to_numpy(), "split": split.to_numpy()})
    qrels = qrels[qrels["split"] != "drop"].drop_duplicates(subset=["query_id", "doc_id", "split"])
    queries = pd.DataFrame({"id": list(q_id.values()), "text": query_texts})
    return queries, qrels.reset_index(drop=True), inputs


def is_text_table(cfg: Config) -> bool:
    """A table with neither labels nor entity ids: its rows are documents (the corpus objective, issue 24)."""
    d = cfg.data
    return d.format == "table" and d.label_column is None and d.group_column is None


def read_text_table(cfg: Config, raw_dir: Path) -> RetrievalSet:
    """``format: table`` without labels or entity ids: each row a document (``text_column``; ``corpus_id_column`` and
    ``corpus_title_column`` where the table has them, else the row number and no title), judged by the optional
    pairs file ``data.judged_path`` (its positives name documents by id or by text)."""
    from pipeline.prepare.sources import _table_parts

    d = cfg.data
    if not d.path:
        raise DataError("data.path must name the corpus file (or hf:<dataset>) when data.format is 'table'")
    parts, _, files = _table_parts(cfg, raw_dir)
    df = pd.concat([frame for _, frame in parts], ignore_index=True) if len(parts) > 1 else parts[0][1]
    where = parts[0][0]
    if len(df) == 0:
        raise DataError(f"{where}: the corpus has no documents; the corpus objective needs the documents to train on")
    id_col = d.corpus_id_column if d.corpus_id_column in df.columns else None
    title_col = d.corpus_title_column if d.corpus_title_column and d.corpus_title_column in df.columns else None
    corpus = _frame(df, {"id": id_col, "title": title_col, "text": d.text_column}, where)
    if id_col is None:
        corpus["id"] = [str(i) for i in range(len(df))]
    inputs: dict[str, Path | str] = dict(files)
    queries, qrels = pd.DataFrame(columns=["id", "text"]), pd.DataFrame(columns=["query_id", "doc_id", "score", "split"])
    if d.judged_path:
        queries, qrels, judged_inputs = judged_pairs(cfg, d.judged_path, corpus[~_blank(corpus)])
        inputs.update(judged_inputs)
    return RetrievalSet(corpus, queries, qrels, inputs, where)


def _blank(corpus: pd.DataFrame) -> pd.Series:
    return (corpus["title"].fillna("") + corpus["text"].fillna("")).str.strip() == ""


def drop_blank_documents(rs: RetrievalSet, cfg: Config) -> RetrievalSet:
    """Documents with neither title nor text: one line when every document is blank, or any is and
    ``data.blank_texts=error``; else dropped and counted (``rs.blank_documents_dropped``)."""
    blank = _blank(rs.corpus)
    rs.blank_documents_dropped = int(blank.sum())
    if not blank.any():
        return rs
    if blank.all():
        raise DataError(f"{rs.source}: all {len(rs.corpus):,} documents are blank (no title, no text); there is "
                        f"nothing to search or train on")
    if cfg.data.blank_texts == "error":
        raise DataError(f"{rs.source}: {int(blank.sum())} blank documents (no title, no text), e.g. id "
                        f"'{rs.corpus.loc[blank, 'id'].iloc[0]}'; set data.blank_texts=drop to drop them")
    log.warning("prepare: %s: dropping %d blank documents (data.blank_texts=drop)", rs.source, int(blank.sum()))
    gone = set(rs.corpus.loc[blank, "id"])
    rs.corpus = rs.corpus[~blank].reset_index(drop=True)
    rs.qrels = rs.qrels[~rs.qrels["doc_id"].isin(gone)].reset_index(drop=True)
    return rs


def mirrored_beir(cfg: Config, raw_dir: Path) -> Path:
    """``mirror:<folder>``: the BEIR folder under the data mirror, copied read-only to ``raw_dir`` once."""
    rel = cfg.data.path[len(MIRROR_PREFIX):].strip().strip("/")
    if raw_dir.is_dir() and (raw_dir / "corpus.jsonl").exists():
        return raw_dir
    src = mirror_dir(cfg) / rel
    if not (src / "corpus.jsonl").exists():
        raise DataError(f"data.path {cfg.data.path}: {raw_dir} has no corpus.jsonl and the mirror has no "
                        f"{src / 'corpus.jsonl'} (set DATA_MIRROR or paths.mirror)")
    tmp = raw_dir.with_name(f".{raw_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "qrels").mkdir(parents=True)
    for f in [src / "corpus.jsonl", src / "queries.jsonl", *sorted((src / "qrels").glob("*.tsv"))]:
        dest = tmp / f.relative_to(src)
        shutil.copyfile(f, dest)
        dest.chmod(0o444)
    shutil.rmtree(raw_dir, ignore_errors=True)
    os.replace(tmp, raw_dir)
    return raw_dir


def read(cfg: Config, raw_dir: Path) -> RetrievalSet:
    """The retrieval set ``cfg`` names (format beir, pairs with data.corpus_path, or a table of texts alone), blank
    documents dropped."""
    return drop_blank_documents(_read(cfg, raw_dir), cfg)


def _read(cfg: Config, raw_dir: Path) -> RetrievalSet:
    d = cfg.data
    if is_text_table(cfg):
        return check(read_text_table(cfg, raw_dir))
    if d.format == "pairs":
        return read_pairs_with_corpus(cfg)
    if not d.path:
        raise DataError("data.path must name the BEIR folder (or mirror:<folder>, hf:<dataset>) when data.format "
                        "is 'beir'")
    if d.path.startswith("hf:"):
        return read_beir_hf(cfg)
    folder = mirrored_beir(cfg, raw_dir) if d.path.startswith(MIRROR_PREFIX) else Path(d.path)
    return read_beir_folder(folder, cfg)


def draw_split(n: int, fractions: dict[str, float], seed: int) -> np.ndarray:
    """A seeded split name for each of ``n`` queries, in the given proportions (names in the dict's order)."""
    order = np.random.default_rng(seed).permutation(n)
    cut = np.cumsum(list(fractions.values()))[:-1] * n
    names = np.array(list(fractions), dtype=object)
    where = np.empty(n, dtype=object)
    where[order] = names[np.searchsorted(cut, np.arange(n), side="right")]
    return where
