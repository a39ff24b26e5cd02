"""Query and document prompts: which text gets which prefix, decided in this one place.

Models such as E5, BGE, nomic-embed and Qwen3-Embedding were trained with a prefix on their queries
and/or documents and ship it in ``config_sentence_transformers.json`` (``prompts``); sentence-transformers
applies it only when asked, and a pipeline that tokenises texts itself drops it silently (field note 13).
Here the prompts come from the base model, and ``model.prompts.query`` / ``model.prompts.document`` win
when set ("" switches one off). The query prompt is the model's ``query`` prompt; the document prompt is
the first non-empty of its ``document``, ``passage`` and ``corpus`` prompts (the names
``SentenceTransformer.encode_document`` looks for). A prompt is prepended to the text before tokenising and
truncation, exactly as ``SentenceTransformer.encode(..., prompt_name=...)`` does.

Which texts are queries and which are documents, everywhere a text is embedded:

- **query** -- the side that searches: the anchor of every training pair; a retrieval query (``queries.jsonl``
  of a pair dataset; for within-split retrieval on a labelled dataset, the query copy of the val and test
  texts, ``<split>.query.npy``); the text the zero-shot head classifies (it searches the label names); the
  anchors when mining hard negatives; ``/search?q=`` in serve, ``/embed`` with ``role: query``, and the
  export's neighbour queries.
- **document** -- what is searched or stored: positives and mined negatives of training pairs; the retrieval
  gallery; label names; the export's index corpus and the gate's sample; ``/embed`` by default; and every
  text the logistic-regression and kNN heads fit on and classify. Those heads compare stored vectors with
  stored vectors, so one form is used on both sides of them, and the stored form is the document form.

With no prompts (the default all-MiniLM-L6-v2) both forms are the text itself, nothing is embedded twice,
and every output is what it was before prompts existed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

Role = Literal["query", "document"]
DOCUMENT_NAMES = ("document", "passage", "corpus")
# the files of retrieval queries: a pair dataset's test and val queries, a retrieval set's queries of every split
QUERY_FILES = {"queries.jsonl", "val_queries.jsonl"}
QUERY_COPY_SPLITS = ("val", "test")  # labelled datasets: splits whose texts are also queries
ST_CONFIG = "config_sentence_transformers.json"


@dataclass(frozen=True)
class Prompts:
    query: str = ""
    document: str = ""

    def prefix(self, role: Role) -> str:
        if role not in ("query", "document"):
            raise ValueError(f"role must be 'query' or 'document', not {role!r}")
        return self.query if role == "query" else self.document

    def apply(self, texts: Sequence[str], role: Role) -> list[str]:
        prefix = self.prefix(role)
        return [prefix + t for t in texts] if prefix else list(texts)

    @property
    def differ(self) -> bool:
        """True when a query and a document of the same text embed differently."""
        return self.query != self.document

    @property
    def any(self) -> bool:
        return bool(self.query or self.document)

    def record(self) -> dict[str, str]:
        return {"query": self.query, "document": self.document}


def from_saved(saved: dict | None, override=None) -> Prompts:
    """Prompts from a sentence-transformers ``prompts`` dict, then ``override`` (``model.prompts``) on top."""
    saved = saved or {}
    query = saved.get("query") or ""
    document = next((saved[n] for n in DOCUMENT_NAMES if saved.get(n)), "")
    if override is not None:
        query = override.query if override.query is not None else query
        document = override.document if override.document is not None else document
    return Prompts(query, document)


def of_model(st_model, override=None) -> Prompts:
    return from_saved(getattr(st_model, "prompts", None), override)


def of_folder(folder: str | Path, override=None) -> Prompts:
    """Prompts of a local sentence-transformers folder without loading it (none if it has no config)."""
    path = Path(folder) / ST_CONFIG
    saved = json.loads(path.read_text(encoding="utf-8")).get("prompts") if path.is_file() else None
    return from_saved(saved, override)


def of_record(record: dict | None) -> Prompts:
    """Prompts as a model_info / onnx_config record holds them (absent: none)."""
    record = record or {}
    return Prompts(record.get("query") or "", record.get("document") or "")


def for_run(cfg, st_model=None) -> Prompts:
    """The prompts a run uses: the loaded base model's (or, unloaded, its folder's) with ``model.prompts``
    on top. Stages that load a trained run use the prompts its model_info.json recorded instead."""
    if st_model is not None:
        return of_model(st_model, cfg.model.prompts)
    from pipeline.model.encoder import resolve_base

    return of_folder(resolve_base(cfg.model.base), cfg.model.prompts)


def role_of_file(name: str) -> Role:
    return "query" if Path(name).name in QUERY_FILES else "document"


def query_copy_name(name: str) -> str | None:
    """``<split>.query.npy`` for a labelled split whose texts are also retrieval queries, else None."""
    stem = Path(name).stem
    return f"{stem}.query.npy" if stem in QUERY_COPY_SPLITS and name not in QUERY_FILES else None


def for_sentence_transformers(prompts: Prompts, saved: dict | None) -> dict[str, str]:
    """The ``prompts`` to save with a model so ``encode_query``/``encode_document`` apply ours: the model's
    own names kept, ``query`` and ``document`` set to what this pipeline used."""
    out = {k: v for k, v in (saved or {}).items() if isinstance(v, str)}
    out.update(query=prompts.query, document=prompts.document)
    return out
