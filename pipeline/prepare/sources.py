"""Readers that turn a raw dataset into one table of records: ``text``, ``label``, ``group``, ``split``.

The shipped datasets have readers of their own; any other corpus is a ``table`` named in the config
(CSV, JSONL, Parquet, a folder of split files, or a Hugging Face dataset) whose columns the config maps
onto these names. Given split names are mapped onto ``train``/``val``/``test`` here (``canonical_splits``);
what prepare does with a missing val or test split is in ``pipeline/prepare/stage.py``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.core.artifacts import PROJECT_ROOT
from pipeline.core.config import Config
from pipeline.core.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawSpec:
    files: tuple[str, ...]
    origin: str


RAW_SPECS = {
    "pricerunner": RawSpec(
        ("pricerunner_aggregate.csv",),
        "UCI dataset 837 'Product Classification and Clustering' (Akritidis 2020); "
        "see ../shared/data/pricerunner/SOURCE.md",
    ),
    "walmart_amazon": RawSpec(
        ("tableA.csv", "tableB.csv", "train.csv", "valid.csv", "test.csv"),
        "Magellan/DeepMatcher Structured/Walmart-Amazon (Mudgal et al., SIGMOD 2018); "
        "see ../shared/data/walmart_amazon/SOURCE.md",
    ),
}


SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "val": ("val", "validation", "valid", "dev", "eval", "development"),
    "test": ("test", "testing"),
}
ACCEPTED_SPLIT_NAMES = "; ".join("/".join(names) for names in SPLIT_ALIASES.values())
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
MIRROR_PREFIX = "mirror:"
# Hugging Face exports shard a split as train-00000-of-00003.parquet; the shards are one split.
_SHARD = re.compile(r"-\d+-of-\d+$")


def split_name_map(cfg: Config) -> dict[str, str]:
    """Lower-cased given name -> train / val / test / drop: the usual names, then data.split_names."""
    names = {alias: split for split, aliases in SPLIT_ALIASES.items() for alias in aliases}
    names.update({k.strip().lower(): v for k, v in cfg.data.split_names.items()})
    return names


def canonical_splits(values: pd.Series, cfg: Config, where: str) -> pd.Series:
    """Given split names as train / val / test / drop; any other value (or a blank) is an error naming it."""
    stripped = values.astype("string").str.strip()
    mapped = stripped.str.lower().map(split_name_map(cfg))
    unknown = mapped.isna()
    if unknown.any():
        counts = stripped[unknown].fillna("").value_counts()
        listed = ", ".join(f"{repr(v) if v else '<blank>'} ({n} row{'s' * (n != 1)})"
                           for v, n in list(counts.items())[:8])
        more = f" and {len(counts) - 8} more" if len(counts) > 8 else ""
        raise DataError(f"{where} has split names the pipeline does not know: {listed}{more}; accepted, in any "
                        f"case: {ACCEPTED_SPLIT_NAMES}; rename them or map them with data.split_names "
                        f"(e.g. data.split_names={{holdout: test}}, or drop to leave rows out)")
    return mapped.astype(object)


def mirror_dir(cfg: Config) -> Path:
    if cfg.paths.mirror:
        return Path(cfg.paths.mirror)
    env = os.environ.get("DATA_MIRROR")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"


def ensure_raw(cfg: Config, raw_dir: Path) -> list[Path]:
    """Make sure ``data/raw/<dataset>/`` holds the dataset's files, copying them from the mirror."""
    spec = RAW_SPECS[cfg.data.format]
    files = [raw_dir / f for f in spec.files]
    missing = [f for f in files if not f.exists()]
    if not missing:
        return files
    mirror = mirror_dir(cfg) / cfg.data.format
    if all((mirror / f.name).exists() for f in missing):
        raw_dir.mkdir(parents=True, exist_ok=True)
        for f in missing:
            tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
            shutil.copyfile(mirror / f.name, tmp)
            os.replace(tmp, f)
        return files
    names = ", ".join(f.name for f in missing)
    raise DataError(
        f"raw data for '{cfg.data.name}' is missing: {names} not in {raw_dir} nor in the mirror {mirror} "
        f"(set DATA_MIRROR or paths.mirror). Source: {spec.origin}"
    )


def not_utf8_error(path: Path) -> DataError:
    """Where the first invalid byte is: pandas reports an offset inside its read buffer, not the file."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return DataError(f"{path}: not UTF-8 text (line {line}, byte {exc.start}: {exc.reason}, "
                         f"0x{data[exc.start]:02x}); re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8")
    return DataError(f"{path}: not UTF-8 text")


def read_csv(path: Path, **kw) -> pd.DataFrame:
    try:
        return pd.read_csv(path, encoding="utf-8", keep_default_na=False, na_values=[""], **kw)
    except UnicodeDecodeError:
        raise not_utf8_error(path) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: cannot parse as CSV ({str(exc).strip()})") from None


def read_table(path: str) -> pd.DataFrame:
    """Read a CSV / JSONL / Parquet file, or ``hf:<name or path>`` through ``datasets``."""
    if path.startswith("hf:"):
        return _read_hf(path[3:])
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {p} does not exist")
    if p.is_dir():
        raise DataError(f"{p} is a folder; name a {'/'.join(TABLE_SUFFIXES)} file (data.format 'table' also reads "
                        f"a folder of split files: train.csv, dev.csv, test.csv ...)")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: the file is empty")
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return read_csv(p, sep="\t" if suffix == ".tsv" else ",")
    if suffix in (".jsonl", ".json"):
        try:
            raw = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise not_utf8_error(p) from None
        try:
            import io

            return pd.read_json(io.StringIO(raw), lines=suffix == ".jsonl")
        except ValueError as exc:
            raise DataError(f"{p}: cannot parse as JSON lines ({exc})") from None
    if suffix == ".parquet":
        try:
            return pd.read_parquet(p)
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"{p}: cannot read as Parquet ({exc})") from None
    raise DataError(f"{p}: unsupported file type '{suffix}' (use .csv, .tsv, .jsonl, .json or .parquet)")


def _read_hf(name: str) -> pd.DataFrame:
    import datasets

    try:
        ds = datasets.load_dataset(name)
    except Exception as exc:  # the hub client raises many types; the message is what the user needs
        raise DataError(f"cannot load Hugging Face dataset '{name}': {exc}") from None
    frames = []
    for split_name, part in ds.items():
        df = part.to_pandas()
        df["__split__"] = split_name
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def frame_digest(df: pd.DataFrame) -> str:
    """Hash of a frame's content: the input identity of a source that is not a file (``hf:`` datasets),
    so a changed dataset makes prepare run again instead of reading as up to date."""
    import hashlib

    h = hashlib.sha256("\x1f".join(map(str, df.columns)).encode())
    h.update(pd.util.hash_pandas_object(df.astype(str), index=False).to_numpy().tobytes())
    return h.hexdigest()


def read_source(path: str) -> tuple[pd.DataFrame, dict[str, Path | str]]:
    """A file or ``hf:`` dataset and its inputs for :func:`hash_inputs` (a path, or a content hash)."""
    df = read_table(path)
    return df, ({path: frame_digest(df)} if path.startswith("hf:") else {path: Path(path)})


def hash_inputs(files: dict[str, Path | str]) -> dict[str, str]:
    """name -> sha256 of each input: a file's bytes, or the content hash a reader already computed."""
    from pipeline.core.artifacts import sha256_file

    return {name: f if isinstance(f, str) else sha256_file(f) for name, f in files.items()}


def _require_columns(df: pd.DataFrame, columns: dict[str, str | None], source: str) -> None:
    for key, col in columns.items():
        if col is not None and col not in df.columns:
            have = ", ".join(map(str, df.columns))
            raise DataError(f"{source}: column '{col}' (data.{key}) not found; the file has: {have}")


def load_pricerunner(raw_dir: Path) -> pd.DataFrame:
    path = raw_dir / "pricerunner_aggregate.csv"
    df = read_csv(path)
    df.columns = [c.strip() for c in df.columns]  # the header pads columns 3-7 with a space
    _require_columns(df, {"text_column": "Product Title", "label_column": "Category Label",
                          "group_column": "Cluster ID"}, str(path))
    return pd.DataFrame({
        "id": df["Product ID"].astype(str),
        "text": df["Product Title"],
        "label": df["Category Label"],
        "group": df["Cluster ID"].astype(str),
    })


def mirrored_path(cfg: Config, raw_dir: Path) -> Path:
    """``mirror:<path>``: the file or folder under the data mirror, as a read-only copy in ``raw_dir``.

    An existing copy is used as it is, like the shipped datasets' (ensure_raw), so a run never depends on
    the mirror staying unchanged once the copy is made.
    """
    rel = cfg.data.path[len(MIRROR_PREFIX):].strip().strip("/")
    if not rel:
        raise DataError(f"data.path '{cfg.data.path}' names no file: write mirror:<folder>/<file>")
    dest = raw_dir / Path(rel).name
    if dest.exists():
        return dest
    src = mirror_dir(cfg) / rel
    if not src.exists():
        raise DataError(f"data.path {cfg.data.path}: {dest} does not exist and the mirror has no {src} "
                        f"(set DATA_MIRROR or paths.mirror)")
    raw_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if src.is_dir():
        tmp.mkdir()
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix.lower() in TABLE_SUFFIXES:
                shutil.copyfile(f, tmp / f.name)
                (tmp / f.name).chmod(0o444)
    else:
        shutil.copyfile(src, tmp)
        tmp.chmod(0o444)
    os.replace(tmp, dest)
    return dest


def split_files(folder: Path, cfg: Config) -> list[tuple[Path, str]]:
    """The (file, split) pairs of a folder of split files, named train.csv, dev.jsonl, test.parquet ..."""
    names = split_name_map(cfg)
    found = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                   and f.suffix.lower() in TABLE_SUFFIXES)
    chosen: dict[str, list[Path]] = {}
    ignored = []
    for f in found:
        split = names.get(_SHARD.sub("", f.stem.strip().lower()))
        if split is None:
            ignored.append(f.name)
        elif split != "drop":
            chosen.setdefault(split, []).append(f)
    if "train" not in chosen:
        listed = ", ".join(f.name for f in found) or f"no {'/'.join(TABLE_SUFFIXES)} file"
        raise DataError(f"{folder}: no train file among the split files (found: {listed}); name the files by "
                        f"split, in any case: {ACCEPTED_SPLIT_NAMES}, with a {'/'.join(TABLE_SUFFIXES)} suffix "
                        f"(e.g. train.csv, dev.csv, test.csv), or map a name with data.split_names")
    for split, files in chosen.items():
        if len(files) > 1 and not all(_SHARD.search(f.stem) for f in files):
            raise DataError(f"{folder}: several files for the {split} split ({', '.join(f.name for f in files)}); "
                            f"keep one per split")
    if ignored:
        log.warning("prepare: %s: ignoring %s (not a split name; accepted: %s)", folder, ", ".join(ignored),
                    ACCEPTED_SPLIT_NAMES)
    order = {s: i for i, s in enumerate(SPLIT_ALIASES)}
    return [(f, split) for split in sorted(chosen, key=order.get) for f in chosen[split]]


def _table_parts(cfg: Config, raw_dir: Path) -> tuple[list[tuple[str, pd.DataFrame]], str | None, dict[str, Path]]:
    """The frames to read (with where each came from), the split column among them, and the input files."""
    d = cfg.data
    if d.path.startswith("hf:"):
        df = _read_hf(d.path[3:])
        return [(d.path, df)], d.split_column or "__split__", {d.path: frame_digest(df)}
    path = mirrored_path(cfg, raw_dir) if d.path.startswith(MIRROR_PREFIX) else Path(d.path)
    if not path.is_dir():
        return [(str(path), read_table(str(path)))], d.split_column, {str(path): path}
    if d.split_column:
        raise DataError(f"{path} is a folder of split files, whose names give the splits; set "
                        f"data.split_column=null (it is '{d.split_column}') or point data.path at one file")
    parts = []
    for f, split in split_files(path, cfg):
        frame = read_table(str(f))
        parts.append((str(f), frame.assign(__split__=split)))
    return parts, "__split__", {where: Path(where) for where, _ in parts}


def load_table(cfg: Config, raw_dir: Path) -> tuple[pd.DataFrame, dict[str, Path | str]]:
    d = cfg.data
    if not d.path:
        raise DataError("data.path must name the corpus file (or hf:<dataset>) when data.format is 'table'")
    parts, split_col, files = _table_parts(cfg, raw_dir)
    for where, frame in parts:
        if len(frame) == 0:
            raise DataError(f"{where}: the file has no rows")
        _require_columns(frame, {"text_column": d.text_column, "label_column": d.label_column,
                                 "group_column": d.group_column, "split_column": split_col}, where)
    df = pd.concat([frame for _, frame in parts], ignore_index=True) if len(parts) > 1 else parts[0][1]
    out = pd.DataFrame({"id": [str(i) for i in range(len(df))], "text": df[d.text_column]})
    out["label"] = df[d.label_column] if d.label_column else None
    out["group"] = df[d.group_column].astype(str) if d.group_column else None
    if split_col:
        where = (f"{parts[0][0]}: column '{split_col}' (data.split_column)" if split_col != "__split__"
                 else f"{d.path} (the split names)")
        out["split"] = canonical_splits(df[split_col], cfg, where)
    return out, files


def load_records(cfg: Config, raw_dir: Path) -> tuple[pd.DataFrame, dict[str, Path | str]]:
    """Return the records and their inputs (name -> file, or a content hash; see :func:`hash_inputs`)."""
    if cfg.data.format == "pricerunner":
        files = ensure_raw(cfg, raw_dir)
        return load_pricerunner(raw_dir), {str(f): f for f in files}
    if cfg.data.format == "table":
        return load_table(cfg, raw_dir)
    raise DataError(f"data.format '{cfg.data.format}' has no labelled-record reader")
