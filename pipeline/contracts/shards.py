"""The embedding-shard contract: how ``embed-corpus`` writes a corpus's vectors and how the index builder
and the bench read them back. A leaf module, so the stage and the index builder do not import each other.

``<folder>/shards/shard-00000.parquet``: id (string), embedding (fixed_size_list<float32>[dim]), rows
L2-normalised; ``shard-00000.json`` beside it (rows, first row, ids at both ends, sha256, timing, RSS) is
written after the parquet is in place, so a shard with a JSON is complete. ``<folder>/manifest.json`` lists
every shard and the dimension.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.core.artifacts import read_json, require_manifest, sha256_file, write_json_atomic
from pipeline.core.memory import current_rss_mb, peak_rss_mb

log = logging.getLogger(__name__)
SHARDS = "shards"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_shard(folder: Path, index: int, first_row: int, ids: list[str], vectors: np.ndarray, *,
                fingerprint: str, seconds: float) -> dict:
    """Parquet renamed into place, then its JSON: a shard with a JSON is complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    table = pa.table({"id": pa.array(ids, type=pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)})
    final = folder / f"{shard_name(index)}.parquet"
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    info = {"index": index, "file": final.name, "rows": len(ids), "first_row": first_row, "dim": dim,
            "first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None,
            "sha256": sha256_file(final), "fingerprint": fingerprint, "seconds": round(seconds, 3),
            "texts_per_s": round(len(ids) / seconds, 1) if seconds > 0 else None,
            "rss_mb": current_rss_mb(), "peak_rss_mb": round(peak_rss_mb(), 1), "pid": os.getpid()}
    write_json_atomic(folder / f"{shard_name(index)}.json", info)
    return info


def done_shard(folder: Path, index: int, fingerprint: str) -> dict | None:
    """The shard's JSON when the shard is complete and of this fingerprint, else None."""
    meta, data = folder / f"{shard_name(index)}.json", folder / f"{shard_name(index)}.parquet"
    if not (meta.exists() and data.exists()):
        return None
    try:
        info = read_json(meta)
    except (OSError, ValueError) as exc:  # a JSON cut short by a kill: the shard is encoded again
        log.warning("shard %s: unreadable %s (%s); encoding it again", index, meta.name, exc)
        return None
    return info if info.get("fingerprint") == fingerprint else None


def read_vectors(folder: Path, info: dict) -> tuple[list[str], np.ndarray]:
    """(ids, float32 (rows, dim)) of one shard."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(folder) / info["file"])
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table.column("id").to_pylist(), flat.astype(np.float32, copy=False).reshape(-1, info["dim"])


def iter_corpus(folder: Path) -> Iterator[tuple[dict, list[str], np.ndarray]]:
    """(shard info, ids, vectors) for every shard of a finished corpus folder, in row order."""
    manifest = require_manifest(folder, "embedded corpus", "run `make embed-corpus` first")
    for info in manifest["shards"]:
        full = {**info, "dim": manifest["dim"]}
        ids, vectors = read_vectors(Path(folder) / SHARDS, full)
        yield full, ids, vectors
