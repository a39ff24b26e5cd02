"""The export contract: what an export folder (``exports/<run>/``) holds and how to load each form.

A library module: the export stage writes these forms; serve, targets, the adapter server and the MLflow
adapter flavour read them through here, never through the export stage.

- ``merged/``: a sentence-transformers folder; ``adapter/`` with ``base_model.json`` (LoRA runs);
- ``onnx/model.onnx`` (and ``model_qint8.onnx``) with ``onnx_config.json``;
- ``index/``: ``index.faiss`` (inner product on normalised vectors), ``records.jsonl`` (line i is row i),
  ``index.json`` (factory and search parameters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.model import prompts
from pipeline.model.backends import (ONNX_FILE, ONNX_INT8_FILE, OnnxEncoder, TorchEncoder,  # noqa: F401  (the contract's
                                     row_cosines)  # forms and their comparison)
from pipeline.core.artifacts import read_json, write_json_atomic
from pipeline.core.errors import ArtifactError
from pipeline.model.encoder import load_adapter
from pipeline.model.interface import Encoder

BASE_META = "base_model.json"
# Texts that exercise what a random sample of product titles rarely does: a one-character input,
# non-ASCII punctuation and accents, and an input far beyond max_seq_length (truncation).
EDGE_TEXTS = ("a", "Ünïcödé café – 4K 55\" TV (2024) ÷ 50% off!", " ".join(["waterproof"] * 300))
FORMS = ("merged", "adapter", "onnx", "onnx_int8")


def fixed_sample(texts: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` distinct texts for the gate: seeded random corpus texts first (they double as the
    neighbour queries), then the four longest corpus texts and the edge cases."""
    unique = list(dict.fromkeys(t for t in texts if t))
    longest = sorted(unique, key=len, reverse=True)[:4]
    fixed = list(dict.fromkeys(longest + list(EDGE_TEXTS)))
    rng = np.random.default_rng(seed)
    pool = [t for t in unique if t not in set(fixed)]
    n_random = max(1, min(len(pool), n - len(fixed)))
    picked = [pool[i] for i in sorted(rng.choice(len(pool), size=n_random, replace=False))] if pool else []
    return picked + fixed


# ---------------------------------------------------------------------------------------------- encoders
# Every form loads as a pipeline.model.interface.Encoder: encode(texts, role) -> normalised float32 rows.

class STEncoder:
    """A plain ``SentenceTransformer``, called the way a user calls it: ``encode`` with the folder's own
    ``query`` / ``document`` prompt, as ``encode_query`` / ``encode_document`` apply them."""

    def __init__(self, st_model, batch_size: int = 64, name: str = "merged"):
        self.name, self.model, self.batch_size = name, st_model, batch_size

    def encode(self, texts: Sequence[str], role: prompts.Role) -> np.ndarray:
        out = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False, prompt_name=role)
        return np.asarray(out, dtype=np.float32)


def load_adapter_form(folder: Path, device: str = "cpu"):
    """The exported adapter on its recorded base (the trained modules after the transformer included);
    refuses a base whose weights changed."""
    return load_adapter(Path(folder), read_json(Path(folder) / BASE_META), device=device)


def adapter_prompts(folder: Path) -> prompts.Prompts:
    return prompts.of_record(read_json(Path(folder) / BASE_META).get("prompts"))


def load_form(export_dir: Path, form: str, *, batch_size: int = 64) -> Encoder:
    """The encoder (pipeline/model/interface.py) of one exported form."""
    export_dir = Path(export_dir)
    if form == "merged":
        from sentence_transformers import SentenceTransformer

        return STEncoder(SentenceTransformer(str(export_dir / "merged"), device="cpu"), batch_size)
    if form == "adapter":
        if not (export_dir / "adapter" / BASE_META).exists():
            raise ArtifactError(f"{export_dir} has no adapter form (only LoRA runs export one)")
        meta = read_json(export_dir / "adapter" / BASE_META)
        return TorchEncoder(load_adapter_form(export_dir / "adapter"), max_seq_length=meta["max_seq_length"],
                            batch_size=batch_size, used=adapter_prompts(export_dir / "adapter"), name="adapter")
    if form in ("onnx", "onnx_int8"):
        file = ONNX_FILE if form == "onnx" else ONNX_INT8_FILE
        if not (export_dir / "onnx" / file).exists():
            raise ArtifactError(f"{export_dir} has no {form} form ({_why_missing(export_dir, form)})")
        return OnnxEncoder.from_folder(export_dir / "onnx", file, batch_size=batch_size, name=form)
    raise ValueError(f"unknown form {form!r}; one of {FORMS}")


def _why_missing(export_dir: Path, form: str) -> str:
    """The reason the export manifest records for a form it left out, else the settings that turn it off."""
    manifest = read_json(export_dir / "manifest.json") if (export_dir / "manifest.json").exists() else {}
    reason = ((manifest.get("forms") or {}).get(form) or {}).get("left_out")
    return f"left out: {reason}" if reason else "export.onnx / export.quantize_int8 were off"


# ------------------------------------------------------------------------------------------------- index

def build_index(vectors: np.ndarray, ecfg) -> tuple[object, dict]:
    """FAISS inner-product index over normalised ``vectors`` (n, dim); returns (index, its settings).
    Built by the search library's one index builder (pipeline/search/index.py), with its list-count rule."""
    from pipeline.search import index as faiss_index

    n, dim = vectors.shape
    params: dict = {}
    if ecfg.index_type == "flat":
        factory = faiss_index.FLAT
    elif ecfg.index_type == "ivf":
        nlist = min(ecfg.ivf_nlist or faiss_index.nlist_for(n), n)
        factory = faiss_index.ivf(nlist)
        params = {"nlist": nlist, "nprobe": min(ecfg.ivf_nprobe, nlist)}
    else:
        factory = faiss_index.hnsw(ecfg.hnsw_m)
        params = {"M": ecfg.hnsw_m, "efSearch": ecfg.hnsw_ef_search}
    index = faiss_index.build(vectors, factory)
    _apply_search_params(index, ecfg.index_type, params)
    return index, {"type": ecfg.index_type, "factory": factory, "metric": "inner_product", "params": params,
                   "n": int(n), "dim": int(dim)}


def _apply_search_params(index, index_type: str, params: dict) -> None:
    from pipeline.search import index as faiss_index

    if index_type == "ivf":
        faiss_index.set_search(index, nprobe=params["nprobe"])
    elif index_type == "hnsw":
        faiss_index.set_search(index, ef_search=params["efSearch"])


class SearchIndex:
    """An exported ``index/`` folder: FAISS index + row -> record mapping."""

    def __init__(self, folder: Path):
        import faiss

        folder = Path(folder)
        self.meta = read_json(folder / "index.json")
        self.index = faiss.read_index(str(folder / "index.faiss"))
        _apply_search_params(self.index, self.meta["type"], self.meta["params"])
        with open(folder / "records.jsonl", encoding="utf-8") as fh:
            self.records = [json.loads(line) for line in fh]
        if len(self.records) != self.index.ntotal:
            raise ArtifactError(f"{folder}: {self.index.ntotal} vectors but {len(self.records)} records")

    def search_ids(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (n_queries, k); rows are -1 where fewer than k hits exist."""
        k = min(k, self.index.ntotal)
        return self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)

    def search(self, vectors: np.ndarray, k: int) -> list[list[dict]]:
        scores, rows = self.search_ids(vectors, k)
        return [[{"rank": r + 1, "score": float(s), **self.records[i]}
                 for r, (s, i) in enumerate(zip(srow, irow)) if i >= 0] for srow, irow in zip(scores, rows)]


def write_index(folder: Path, records: list[dict], vectors: np.ndarray, ecfg, extra: dict) -> dict:
    import faiss

    folder.mkdir(parents=True, exist_ok=True)
    index, meta = build_index(vectors, ecfg)
    faiss.write_index(index, str(folder / "index.faiss"))
    with open(folder / "records.jsonl", "w", encoding="utf-8") as fh:
        for i, rec in enumerate(records):
            fh.write(json.dumps({"row": i, **rec}, ensure_ascii=False) + "\n")
    meta.update(extra)
    write_json_atomic(folder / "index.json", meta)
    return meta
