"""The project's two hashes, in a leaf module: ``config`` needs ``digest`` and ``artifacts`` imports ``config``,
so they live below both (``pipeline.core.artifacts`` re-exports them; callers use it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def digest(payload: Any, length: int = 16) -> str:
    """Short identity of a JSON-able value: the first ``length`` hex digits of its sha256 (keys sorted,
    so two dicts with the same items give the same digest). Every fingerprint and cache key uses this."""
    text = payload if isinstance(payload, str) else json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
