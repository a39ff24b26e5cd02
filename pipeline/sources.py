"""Readers that turn a raw dataset into one table of records: ``text``, ``label``, ``group``, ``split``.

The shipped datasets have readers of their own; any other corpus is a ``table`` named in the config
(CSV, JSONL, Parquet, or a Hugging Face dataset) whose columns the config maps onto these names.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.artifacts import PROJECT_ROOT
from pipeline.config import Config
from pipeline.errors import DataError


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


def _read_csv(path: Path, **kw) -> pd.DataFrame:
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
    if p.stat().st_size == 0:
        raise DataError(f"{p}: the file is empty")
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_csv(p, sep="\t" if suffix == ".tsv" else ",")
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


def _require_columns(df: pd.DataFrame, columns: dict[str, str | None], source: str) -> None:
    for key, col in columns.items():
        if col is not None and col not in df.columns:
            have = ", ".join(map(str, df.columns))
            raise DataError(f"{source}: column '{col}' (data.{key}) not found; the file has: {have}")


def load_pricerunner(raw_dir: Path) -> pd.DataFrame:
    path = raw_dir / "pricerunner_aggregate.csv"
    df = _read_csv(path)
    df.columns = [c.strip() for c in df.columns]  # the header pads columns 3-7 with a space
    _require_columns(df, {"text_column": "Product Title", "label_column": "Category Label",
                          "group_column": "Cluster ID"}, str(path))
    return pd.DataFrame({
        "id": df["Product ID"].astype(str),
        "text": df["Product Title"],
        "label": df["Category Label"],
        "group": df["Cluster ID"].astype(str),
    })


def load_table(cfg: Config) -> pd.DataFrame:
    d = cfg.data
    if not d.path:
        raise DataError("data.path must name the corpus file (or hf:<dataset>) when data.format is 'table'")
    df = read_table(d.path)
    if len(df) == 0:
        raise DataError(f"{d.path}: the file has no rows")
    split_col = "__split__" if d.path.startswith("hf:") and d.split_column is None else d.split_column
    _require_columns(df, {"text_column": d.text_column, "label_column": d.label_column,
                          "group_column": d.group_column, "split_column": split_col}, d.path)
    out = pd.DataFrame({"id": [str(i) for i in range(len(df))], "text": df[d.text_column]})
    out["label"] = df[d.label_column] if d.label_column else None
    out["group"] = df[d.group_column].astype(str) if d.group_column else None
    if split_col:
        out["split"] = df[split_col].astype(str).str.lower().replace({"validation": "val", "valid": "val", "dev": "val"})
    return out


def load_records(cfg: Config, raw_dir: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """Return the records and the input files they came from (path -> sha256 computed by caller)."""
    if cfg.data.format == "pricerunner":
        files = ensure_raw(cfg, raw_dir)
        return load_pricerunner(raw_dir), {str(f): f for f in files}
    if cfg.data.format == "table":
        p = cfg.data.path or ""
        return load_table(cfg), ({p: Path(p)} if not p.startswith("hf:") else {})
    raise DataError(f"data.format '{cfg.data.format}' has no labelled-record reader")
