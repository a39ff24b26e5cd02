"""Searching an export folder: its gate-checked encoder and its index, as ``serve`` answers ``/search`` and as a
notebook would (``pipeline.open_export``).

A labelled or pair corpus's export indexes records (one vector each); a retrieval set's export indexes
passages and finds documents by their best passage, by BM25, or by the validation-chosen hybrid
(:mod:`pipeline.contracts.document_index`). Queries are embedded with the query prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.contracts.document_index import MODES, DocumentSearch, is_document_index
from pipeline.contracts.export_folder import SearchIndex, load_form
from pipeline.core.artifacts import require_manifest
from pipeline.core.errors import ArtifactError, ConfigError
from pipeline.model.interface import Encoder, Role


def pick_form(manifest: dict, wanted: str) -> str:
    """The wanted form if the export has it, else the merged model (always present)."""
    return wanted if manifest.get("forms", {}).get(wanted) else "merged"


class ExportSearch:
    """One export folder, loaded once: ``encode(texts, role)`` and ``search(queries, k, mode)``."""

    def __init__(self, export_dir: Path | str, form: str = "onnx"):
        self.folder = Path(export_dir)
        self.manifest = require_manifest(self.folder, "export", "run `make export` first")
        self.form = pick_form(self.manifest, form)
        self.encoder: Encoder = load_form(self.folder, self.form)
        self.index = SearchIndex(self.folder / "index")
        self.documents = (DocumentSearch(self.folder / "index", self.index)
                          if is_document_index(self.folder / "index") else None)

    @property
    def modes(self) -> tuple[str, ...]:
        """The search modes this export answers: a retrieval set's export has a lexical index and the hybrid."""
        return MODES if self.documents is not None else ("dense",)

    @property
    def default_mode(self) -> str:
        return "hybrid" if self.documents is not None else "dense"

    def encode(self, texts: Sequence[str], role: Role = "document") -> np.ndarray:
        return self.encoder.encode(list(texts), role)

    def search(self, queries: str | Sequence[str], k: int = 10, mode: str | None = None) -> list[list[dict]]:
        """Per query, the top ``k`` hits (rank, score and the record's or document's fields), best first."""
        texts = [queries] if isinstance(queries, str) else list(queries)
        mode = mode or self.default_mode
        if mode not in self.modes:
            raise ConfigError(f"search mode '{mode}' is not one this export answers ({', '.join(self.modes)})"
                              + ("" if self.documents is not None else
                                 "; only a retrieval set's export has a lexical index"))
        if not texts:
            raise ArtifactError("search needs at least one query")
        vectors = self.encode(texts, "query") if mode != "lexical" else None
        if self.documents is None:
            return self.index.search(vectors, k)
        return self.documents.search(vectors, texts, k, mode)


def open_export(export_dir: Path | str, form: str = "onnx") -> ExportSearch:
    """An export folder ready to search: ``open_export("exports/<run>").search("4k tv", k=5)``."""
    return ExportSearch(export_dir, form)
