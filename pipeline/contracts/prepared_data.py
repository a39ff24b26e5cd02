"""The prepared-data contract: what ``prepare`` writes under ``data/processed/<dataset>/`` and how every
later stage reads it. A leaf module: stages read their inputs through it, never through ``prepare``.

Labelled corpora (``manifest.json`` ``kind: labelled``):

- ``train.jsonl``, ``val.jsonl``, ``test.jsonl``: one record per text (id, text, group, label);
- ``labels.json``: the sorted label names (empty when the corpus has none);
- ``pairs.jsonl``: training pairs built from the train split (anchor, positive, kind, group, label, and
  negative columns when negatives were mined).

Pair corpora (``kind: pairs``):

- ``queries.jsonl``: the test queries (id, text, relevant: gallery ids); ``val_queries.jsonl`` the same
  for the val split; ``gallery.jsonl``: the whole search space (id, text);
- ``pairs.jsonl`` as above, without labels.

Retrieval sets (``kind: retrieval``; a BEIR folder or ``hf:`` dataset, or pairs with a document table). The
folder is itself in BEIR layout, so BEIR tools read it:

- ``corpus.jsonl``: every document (id, title, text): the whole search space of every split;
- ``queries.jsonl``: every query kept (id, text, split: train/val/test), one split per query;
- ``qrels/{train,val,test}.tsv``: graded judgments (``query-id``, ``corpus-id``, ``score``); a split may have
  none (a corpus without train judgments, issue 24: then ``pairs.jsonl`` is empty);
- ``passages.jsonl``: what is embedded and indexed for the documents (id, doc: the document's id, text);
  a document longer than the document length is several overlapping passages, otherwise one;
- ``pairs.jsonl``: train query -> judged document pairs with ``query_id``, ``positive_id`` and, where mined,
  ``negative_id``; the train stage masks every judged-relevant document of an anchor's query
  (:func:`load_relevant`);
- the manifest's ``lengths``: the query, document and encoder token lengths (``encoder`` is what train, embed
  and export truncate at), the truncated shares and the passage counts.

The manifest lists ``text_files`` (what embed encodes) and ``texts_fingerprint`` (their hash: the key of
the base model's embedding cache).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.core.artifacts import digest, read_json, sha256_file

SPLITS = ("train", "val", "test")
LABELLED_TEXT_FILES = [f"{s}.jsonl" for s in SPLITS]
PAIR_TEXT_FILES = ["queries.jsonl", "gallery.jsonl"]
VAL_QUERIES = "val_queries.jsonl"
RETRIEVAL_TEXT_FILES = ["passages.jsonl", "queries.jsonl"]
CORPUS, QUERIES, PASSAGES, QRELS_DIR = "corpus.jsonl", "queries.jsonl", "passages.jsonl", "qrels"
QRELS_HEADER = ("query-id", "corpus-id", "score")  # queries of the val split: training chooses its checkpoint on them
PAIRS = "pairs.jsonl"
LABELS = "labels.json"
PAIR_COLUMNS = {"anchor": str, "positive": str, "group": str, "label": str, "kind": str,
                "negative": str, "negative_group": str, "negative_label": str, "negative_kind": str,
                # document and query ids stay strings (a numeric id read as a number would miss its judgments)
                "query_id": str, "positive_id": str, "negative_id": str, "source_id": str}
# A text without an entity id is its own group: prepare writes this prefix + the text as its group, so
# duplicates of one text stay together and "same group" means "same text". Readers ask the helpers below.
TEXT_GROUP_PREFIX = "t:"


def text_groups(texts: pd.Series) -> pd.Series:
    """The group of each text of a corpus without entity ids: the text itself, marked as such."""
    return TEXT_GROUP_PREFIX + texts


def is_text_group(groups: pd.Series) -> pd.Series:
    """Per row: is this group a text standing in for a missing entity id?"""
    return groups.astype(str).str.startswith(TEXT_GROUP_PREFIX)


def has_groups(split: pd.DataFrame) -> bool:
    """Does the split carry entity ids (so same-group retrieval can be scored)?"""
    return not is_text_group(split["group"]).all()


def has_labels(split: pd.DataFrame) -> bool:
    """Is every text of the split labelled, with at least two labels (so classification can be scored)?"""
    return bool(split["label"].notna().all() and split["label"].nunique() >= 2)


def is_pairs(manifest: dict) -> bool:
    """True for a pair corpus (queries and a gallery), False for a labelled one (three splits)."""
    return manifest.get("kind") == "pairs"


def is_retrieval(manifest: dict) -> bool:
    """True for a retrieval set (a document corpus, queries per split and graded judgments)."""
    return manifest.get("kind") == "retrieval"


def encoder_length(manifest: dict) -> int | None:
    """The token length a retrieval set's texts are encoded at (prepare chose it from the texts and the
    model); None for other corpora, which use ``train.max_seq_length``."""
    return int(manifest["lengths"]["encoder"]) if is_retrieval(manifest) and manifest.get("lengths") else None


def with_encoder_length(cfg, manifest: dict):
    """``cfg`` with ``train.max_seq_length`` set to a retrieval set's encoder length (unchanged otherwise), so
    train, the model info it writes, embed and export all truncate where prepare measured."""
    length = encoder_length(manifest)
    if length is None or length == cfg.train.max_seq_length:
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_seq_length": length})})


def text_files(manifest: dict) -> list[str]:
    """The files embed encodes, in the order it encodes them."""
    return manifest.get("text_files", LABELLED_TEXT_FILES)


def dataset_files(folder: Path, manifest: dict) -> dict[str, Path]:
    """The prepared files a run reads, by split: what MLflow records as the run's dataset inputs. Labelled:
    the three splits and the training pairs built from train; pairs: the training pairs, the val and test
    queries and the gallery they search."""
    folder = Path(folder)
    names = ({"train": PAIRS, "val": VAL_QUERIES, "test": "queries.jsonl", "gallery": "gallery.jsonl"}
             if is_pairs(manifest) else {**{s: f"{s}.jsonl" for s in SPLITS}, "pairs": PAIRS})
    return {split: folder / name for split, name in names.items() if (folder / name).exists()}


def texts_fingerprint(folder: Path, names: list[str]) -> str:
    """Hash of the files whose texts embed encodes (not the pairs): the base-embedding cache key."""
    return digest([[name, sha256_file(Path(folder) / name)] for name in names])


def load_split(folder: Path, split: str) -> pd.DataFrame:
    """One split of a labelled corpus: columns id, text, group, label (label None where unknown)."""
    return pd.read_json(Path(folder) / f"{split}.jsonl", lines=True,
                        dtype={"id": str, "group": str, "label": str, "text": str})


def load_pairs(folder: Path) -> pd.DataFrame:
    """The training pairs: one row per (anchor, positive[, negative])."""
    return pd.read_json(Path(folder) / PAIRS, lines=True, dtype=PAIR_COLUMNS)


def load_labels(folder: Path) -> list[str]:
    path = Path(folder) / LABELS
    return read_json(path) if path.exists() else []


def load_queries(folder: Path, name: str = "queries.jsonl") -> pd.DataFrame:
    """Queries of a pair corpus: id, text, relevant (a list of gallery ids)."""
    return pd.read_json(Path(folder) / name, lines=True, dtype={"id": str, "text": str})


def load_gallery(folder: Path) -> pd.DataFrame:
    return pd.read_json(Path(folder) / "gallery.jsonl", lines=True, dtype={"id": str, "text": str})


# ------------------------------------------------------------------------------------------ retrieval sets

def load_corpus(folder: Path) -> pd.DataFrame:
    """The documents of a retrieval set: id, title, text (title may be empty)."""
    return pd.read_json(Path(folder) / CORPUS, lines=True, dtype={"id": str, "title": str, "text": str})


def load_passages(folder: Path) -> pd.DataFrame:
    """What is embedded for the documents: id, doc (the document id), text; in document order."""
    return pd.read_json(Path(folder) / PASSAGES, lines=True, dtype={"id": str, "doc": str, "text": str})


def load_retrieval_queries(folder: Path, split: str | None = None) -> pd.DataFrame:
    """Queries (id, text, split), all of them in file order (the order embed writes), or one split's."""
    path = Path(folder) / QUERIES
    if not path.read_text(encoding="utf-8").strip():  # no judged query at all (the corpus objective, unverified)
        return pd.DataFrame({"id": pd.Series(dtype=str), "text": pd.Series(dtype=str), "split": pd.Series(dtype=str)})
    df = pd.read_json(path, lines=True, dtype={"id": str, "text": str, "split": str})
    return df if split is None else df[df["split"] == split]


def load_qrels(folder: Path, split: str) -> dict[str, dict[str, int]]:
    """One split's judgments as ``{query id: {document id: grade}}`` (pytrec_eval's form); empty if none."""
    path = Path(folder) / QRELS_DIR / f"{split}.tsv"
    if not path.exists():
        return {}
    df = pd.read_csv(path, sep="\t", dtype={QRELS_HEADER[0]: str, QRELS_HEADER[1]: str}, keep_default_na=False)
    out: dict[str, dict[str, int]] = {}
    for q, d, s in zip(df[QRELS_HEADER[0]], df[QRELS_HEADER[1]], df[QRELS_HEADER[2]].astype(int)):
        out.setdefault(q, {})[d] = int(s)
    return out


def load_relevant(folder: Path, split: str = "train") -> dict[str, set[str]]:
    """``{query id: ids of its judged-relevant documents (grade > 0)}``: what training never uses as a negative."""
    return {q: {d for d, s in docs.items() if s > 0} for q, docs in load_qrels(folder, split).items()}
