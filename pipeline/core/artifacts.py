"""Artefact layout, manifests and atomic writes shared by every stage.

A stage never writes into its final folder directly: it fills ``<folder>.tmp-<pid>`` and renames it
into place when everything, manifest included, is written. So a folder with a manifest is complete,
and a crash leaves the previous good output where it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.core.config import Config
from pipeline.core.errors import ArtifactError
from pipeline.core.hashing import digest, sha256_file  # noqa: F401  (re-exported: the one digest)

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Layout:
    """Where each stage's outputs live, from ``paths`` in the config (relative to the working dir)."""

    cfg: Config

    @property
    def raw(self) -> Path:
        return Path(self.cfg.paths.data) / "raw" / self.cfg.data.name

    @property
    def processed(self) -> Path:
        return Path(self.cfg.paths.data) / "processed" / self.cfg.data.name

    def run(self, name: str | None = None) -> Path:
        return Path(self.cfg.paths.runs) / (name or self.cfg.resolved_run_name)

    def model_dir(self, name: str | None = None) -> Path:
        return self.run(name) / "model"

    def checkpoints(self, name: str | None = None) -> Path:
        return self.run(name) / "checkpoints"

    def embeddings(self, name: str | None = None) -> Path:
        return self.run(name) / "embeddings"

    def base_embeddings(self, key: str) -> Path:
        return Path(self.cfg.paths.cache) / "embeddings" / key

    def report(self, name: str | None = None) -> Path:
        return Path(self.cfg.paths.reports) / (name or self.cfg.resolved_run_name)

    @property
    def latest_report(self) -> Path:
        return Path(self.cfg.paths.reports) / "latest"

    def export(self, name: str | None = None) -> Path:
        return Path(self.cfg.paths.exports) / (name or self.cfg.resolved_run_name)


def hash_tree(path: Path) -> str:
    """Hash of every file below ``path`` (names and bytes), or of the file itself."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def library_versions() -> dict[str, str]:
    from importlib import metadata

    names = ["torch", "transformers", "peft", "sentence-transformers", "faiss-cpu", "scikit-learn", "mlflow", "numpy"]
    versions = {"python": platform.python_version()}
    for n in names:
        try:
            versions[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that a reader sees the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def make_manifest(stage: str, cfg: Config, *, fingerprint: str, inputs: dict[str, str],
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a folder needs to explain itself: stage, config, input hashes, seed, versions, commit."""
    return {
        "stage": stage,
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": cfg.seed,
        "inputs": inputs,
        "config": cfg.model_dump(mode="json"),
        "versions": library_versions(),
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
        **(extra or {}),
    }


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest; None when it has none. A manifest that exists but cannot be read is an
    error, never "absent": treated as absent, the folder would be overwritten as if nothing were there."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} cannot be read ({type(exc).__name__}: {exc}); the folder's outputs are of "
                            "unknown origin: move it aside, or rerun with --force/--overwrite to replace it") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a manifest (a JSON object); move the folder aside, or rerun with "
                            "--force/--overwrite to replace it")
    return manifest


def require_manifest(folder: Path, what: str, hint: str) -> dict[str, Any]:
    manifest = read_manifest(folder)
    if manifest is None:
        raise ArtifactError(f"{what} not found at {folder} (no {MANIFEST}); {hint}")
    return manifest


def skip_or_refuse(folder: Path, fingerprint: str, *, overwrite: bool, stage: str, refusal: str) -> bool:
    """True when ``folder`` already holds this fingerprint's output (the stage can skip); raises
    ``ArtifactError(refusal)`` when it holds another output and ``overwrite`` is off; else False."""
    if overwrite:
        return False
    existing = read_manifest(folder)
    if existing is None:
        return False
    if existing.get("fingerprint") == fingerprint:
        import logging

        logging.getLogger(__name__).info("%s: %s is up to date; nothing to do", stage, folder)
        return True
    raise ArtifactError(refusal)


def is_up_to_date(folder: Path, fingerprint: str) -> bool:
    manifest = read_manifest(folder)
    return manifest is not None and manifest.get("fingerprint") == fingerprint


@contextlib.contextmanager
def atomic_dir(final: Path, *, keep_tmp_on_error: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; on success it replaces ``final`` whole."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        if not keep_tmp_on_error:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def clean_stale_temporaries(parent: Path) -> list[Path]:
    """Tidy what killed processes (pid no longer running) left in ``parent``; returns what it touched.

    ``.<name>.tmp-<pid>`` is an unfinished output: removed. ``.<name>.old-<pid>`` is a previous good
    output that ``atomic_dir`` had moved aside; if the kill came before the new output took its place
    (so ``<name>`` is missing) it is put back, else it is removed.
    """
    parent = Path(parent)
    touched: list[Path] = []
    if not parent.is_dir():
        return touched
    for kind in ("old", "tmp"):  # restore first: a restored folder is never mistaken for a temporary
        for p in sorted(parent.glob(f".*.{kind}-*")):
            stem, _, pid = p.name.rpartition(f".{kind}-")
            if not pid.isdigit() or pid_alive(int(pid)) or not stem.startswith("."):
                continue
            final = parent / stem[1:]
            if kind == "old" and not final.exists():
                os.replace(p, final)
                log.warning("restored %s, which a killed process had moved aside", final)
            elif p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            touched.append(p)
    return touched


def clean_stale(*parents: Path) -> None:
    """Call at the start of a stage for every folder it writes into."""
    for parent in parents:
        clean_stale_temporaries(parent)


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
