"""embed-corpus: embed a CSV/Parquet/JSONL file or folder of any size, in shards, locally or on Ray Data.

The input is read with ``pyarrow.dataset`` in record batches, so no more than one shard of rows is held at a
time. Shard ``i`` is rows ``[i * shard_rows, (i + 1) * shard_rows)`` of the files in name order; both
executors cut the same shards and encode each one with the same calls, so they write the same vectors.

Output (``runs/<run>/corpus/`` by default)::

    shards/shard-00000.parquet   id (string), embedding (fixed_size_list<float32>[dim]), L2-normalised rows
    shards/shard-00000.json      rows, first row, ids at both ends, sha256 of the parquet, timing, RSS
    manifest.json                written last: every shard, the encoder, throughput, peak memory
    index/                       the IVF index over the shards (pipeline/scale/index.py)

A shard's parquet is renamed into place before its JSON is written, so a shard with a JSON is complete; a
rerun after a kill skips those shards (same fingerprint) and encodes the rest.

Executors: ``local`` streams the input once with a progress bar; ``ray`` runs a Ray Data job whose actor
pool (one encoder per actor: one actor per GPU or per CPU slice) takes shard numbers, reads that shard's rows,
encodes them and writes the shard. Ray restarts a killed actor and retries its shard, and shard writes are
atomic, so a worker lost mid-run loses no row and duplicates none. Reading shard ``i`` on its own scans past
the rows before it (CSV/JSONL have no row index); that scan is cheap next to encoding.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from pipeline.model import prompts
from pipeline.core.artifacts import (MANIFEST, Layout, digest, clean_stale, make_manifest, read_json, read_manifest,
                                require_manifest, write_json_atomic)
from pipeline.core.config import Config
from pipeline.contracts.identity import backend_key
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.memory import peak_rss_mb
from pipeline.contracts.shards import SHARDS, done_shard, write_shard

log = logging.getLogger(__name__)
SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
ARROW_FORMAT = {"csv": "csv", "parquet": "parquet", "jsonl": "json"}


# ---------------------------------------------------------------------------------------------------------------
# The encoder: built in ONE place so another backend (pipeline/model/backends.py) can be swapped in here.


@dataclass
class Encoder:
    """The corpus encoder (pipeline/model/interface.py): the form pipeline/model/backends.py chose, with the
    identity the vectors depend on and ``backend``, the record of which form and why."""

    form: object  # a pipeline.model.interface.Encoder, prompts included
    identity: dict
    backend: dict

    @property
    def name(self) -> str:
        return self.form.name

    def encode(self, texts: Sequence[str], role: prompts.Role) -> np.ndarray:
        return self.form.encode(texts, role)


def encoder_identity(cfg: Config) -> dict:
    """What the vectors depend on, without loading the model: the trained run's fingerprint or the base weights."""
    from pipeline.model.encoder import base_fingerprint, read_model_info, resolve_base

    if cfg.corpus.encoder == "run":
        layout = Layout(cfg)
        folder = layout.model_dir()
        manifest = require_manifest(folder, f"trained model for run '{cfg.resolved_run_name}'",
                                    "run `make train` first, or set corpus.encoder=base")
        info = read_model_info(folder)
        return {"encoder": "run", "run": cfg.resolved_run_name, "model_fingerprint": manifest["fingerprint"],
                "max_seq_length": info.get("max_seq_length") or cfg.train.max_seq_length,
                "prompts": prompts.of_record(info.get("prompts")).record(), "method": info.get("method")}
    return {"encoder": "base", "base": cfg.model.base,
            "base_fingerprint": base_fingerprint(resolve_base(cfg.model.base)),
            "max_seq_length": cfg.train.max_seq_length, "prompts": prompts.for_run(cfg).record()}


def make_encoder(cfg: Config, *, threads: int | None = None, device: str | None = None, backend: str | None = None,
                 probe_texts: list[str] | None = None, n_texts: int | None = None) -> Encoder:
    """The corpus encoder: the trained run's model (LoRA merged) or the base model, document prompts applied,
    in the form ``backend`` names, or else the fastest form that passes the gate on ``probe_texts``
    (:func:`pipeline.model.backends.select`). The driver selects once and every worker builds the same form, so
    the executors write the same vectors."""
    import torch

    from pipeline.model import backends
    from pipeline.model.encoder import load_base, load_trained, pick_device

    if threads:
        torch.set_num_threads(max(1, int(threads)))
    dev = pick_device(device or cfg.train.device)
    ident = encoder_identity(cfg)
    if ident["encoder"] == "run":
        st = load_trained(Layout(cfg).model_dir(), device=dev, merge=True, expected_base=cfg.model.base)
        used = prompts.Prompts(**ident["prompts"])
    else:
        st = load_base(cfg.model, device=dev, max_seq_length=ident["max_seq_length"])
        used = prompts.for_run(cfg, st)
    max_len, batch = int(ident["max_seq_length"]), cfg.corpus.batch_size
    if backend is not None:
        forms = {c.name: c.build for c in backends.candidates(cfg, st, dev, max_len, batch, used)}
        if backend not in forms:
            raise ConfigError(f"embed-corpus: encoder form '{backend}' is not available here (have {sorted(forms)})")
        form, record = forms[backend](), {"name": backend, "chosen_by": "the driver's gate"}
    else:
        form, record = backends.select(cfg, st, probe_texts or [], used=used, n_texts=n_texts,
                                       max_seq_length=max_len, batch_size=batch)
    return Encoder(form, ident, record)


# ---------------------------------------------------------------------------------------------------------------
# Reading the input in shards


def input_files(cfg: Config) -> tuple[list[Path], str]:
    """The input files in name order and their format; one-line errors for a missing input or a bad format."""
    c = cfg.corpus
    if not c.input:
        raise ConfigError("embed-corpus: corpus.input is not set; give a CSV/Parquet/JSONL file or folder, "
                          "e.g. corpus.input=data/my_corpus.parquet")
    path = Path(c.input)
    if not path.exists():
        raise DataError(f"embed-corpus: corpus.input {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_"))) \
        if path.is_dir() else [path]
    fmt = c.format
    if fmt == "auto":
        kinds = {SUFFIXES.get(p.suffix.lower()) for p in files}
        if not files or None in kinds or len(kinds) != 1:
            odd = next((p.name for p in files if p.suffix.lower() not in SUFFIXES), None)
            raise DataError(f"embed-corpus: cannot tell the format of {path} ("
                            + (f"{odd} is not .csv/.parquet/.jsonl" if odd else
                               "no files" if not files else "mixed formats") + "); set corpus.format")
        fmt = kinds.pop()
    else:
        files = [p for p in files if SUFFIXES.get(p.suffix.lower()) == fmt] if path.is_dir() else files
        if not files:
            raise DataError(f"embed-corpus: no {fmt} files in {path}")
    return files, fmt


def open_dataset(files: list[Path], fmt: str, cfg: Config):
    """A ``pyarrow.dataset`` over the files, checked for the id and text columns."""
    import pyarrow.dataset as pads

    c = cfg.corpus
    try:
        ds = pads.dataset([str(f) for f in files], format=ARROW_FORMAT[fmt])
        names = set(ds.schema.names)
    except Exception as exc:  # pyarrow raises several types for unreadable files; all mean bad input here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"embed-corpus: cannot read {files[0]} as {fmt}: {first}") from None
    for what, col in (("text_column", c.text_column), ("id_column", c.id_column)):
        if col is not None and col not in names:
            raise DataError(f"embed-corpus: column '{col}' (corpus.{what}) not in {files[0].parent if len(files) > 1 else files[0]}"
                            f" (columns: {', '.join(sorted(names))})")
    return ds


def iter_shards(ds, cfg: Config, first: int = 0) -> Iterator[tuple[int, list[str], list[str]]]:
    """(shard index, ids, texts) from shard ``first`` on; rows of earlier shards are skipped unencoded."""
    import pyarrow as pa

    c = cfg.corpus
    cols = [c.text_column] + ([c.id_column] if c.id_column else [])
    skip, row, index = first * c.shard_rows, first * c.shard_rows, first
    buf: list = []
    held = 0
    for batch in ds.to_batches(columns=cols, batch_size=min(c.shard_rows, 65_536)):
        if skip:
            if batch.num_rows <= skip:
                skip -= batch.num_rows
                continue
            batch, skip = batch.slice(skip), 0
        while batch.num_rows:
            take = min(c.shard_rows - held, batch.num_rows)
            buf.append(batch.slice(0, take))
            held, batch = held + take, batch.slice(take)
            if held == c.shard_rows:
                yield index, *_columns(pa.Table.from_batches(buf), cfg, row)
                index, row, buf, held = index + 1, row + held, [], 0
    if held:
        yield index, *_columns(pa.Table.from_batches(buf), cfg, row)


def _columns(table, cfg: Config, first_row: int) -> tuple[list[str], list[str]]:
    import pyarrow.compute as pc

    c = cfg.corpus
    texts = pc.fill_null(table.column(c.text_column).cast("string"), "").to_pylist()
    if c.id_column:
        ids = table.column(c.id_column)
        if ids.null_count:
            raise DataError(f"embed-corpus: id column '{c.id_column}' has empty values (rows {first_row} to "
                            f"{first_row + len(texts) - 1})")
        ids = ids.cast("string").to_pylist()
    else:
        ids = [str(first_row + i) for i in range(len(texts))]
    return ids, texts


def read_shard(ds, cfg: Config, index: int) -> tuple[list[str], list[str]]:
    for i, ids, texts in iter_shards(ds, cfg, index):
        return ids, texts
    raise DataError(f"embed-corpus: shard {index} is past the end of the input (did it change during the run?)")


# ---------------------------------------------------------------------------------------------------------------
# Writing shards


def encode_and_write(encoder, folder: Path, cfg: Config, index: int, ids: list[str], texts: list[str],
                     fingerprint: str) -> dict:
    started, wall = time.perf_counter(), time.time()
    vectors = encoder.encode(texts, "document")  # a corpus is what is searched
    if vectors.shape[0] != len(ids):
        raise RuntimeError(f"encoder returned {vectors.shape[0]} vectors for {len(ids)} texts")
    info = write_shard(folder, index, index * cfg.corpus.shard_rows, ids, vectors, fingerprint=fingerprint,
                       seconds=time.perf_counter() - started)
    return {**info, "started": wall, "ended": time.time()}


# ---------------------------------------------------------------------------------------------------------------
# Executors


EncoderFactory = Callable[..., object]


@dataclass(frozen=True)
class CorpusJob:
    """One embed-corpus job: its input files and their format, the shard folder, how many shards, and the
    fingerprint every finished shard carries (a shard with another one is encoded again)."""

    files: list[Path]
    fmt: str
    folder: Path
    n_shards: int
    fingerprint: str


def run_local(cfg: Config, ds, job: CorpusJob, encoder) -> list[dict]:
    from tqdm.auto import tqdm

    folder, n_shards, fingerprint = job.folder, job.n_shards, job.fingerprint
    infos: dict[int, dict] = {i: {**s, "resumed": True} for i in range(n_shards)
                           if (s := done_shard(folder, i, fingerprint))}
    pending = [i for i in range(n_shards) if i not in infos]
    if infos:
        log.info("embed-corpus: %d of %d shards already done; resuming at shard %d", len(infos), n_shards,
                 pending[0] if pending else n_shards)
    if pending:
        bar = tqdm(total=len(pending), desc="embed-corpus", unit="shard")
        for index, ids, texts in iter_shards(ds, cfg, pending[0]):
            if index in infos:
                continue
            infos[index] = encode_and_write(encoder, folder, cfg, index, ids, texts, fingerprint)
            bar.update(1)
            bar.set_postfix(texts_per_s=infos[index]["texts_per_s"])
        bar.close()
    return [infos[i] for i in range(n_shards)]


class ShardWorker:
    """A Ray Data actor: holds one encoder; each call takes shard numbers, reads, encodes and writes them."""

    def __init__(self, cfg_json: str, files: list[str], fmt: str, folder: str, fingerprint: str,
                 factory: EncoderFactory = make_encoder, backend: str | None = None):
        self.cfg = Config.model_validate_json(cfg_json)
        self.ds = open_dataset([Path(f) for f in files], fmt, self.cfg)
        self.folder, self.fingerprint = Path(folder), fingerprint
        self.encoder = factory(self.cfg, threads=max(1, int(self.cfg.corpus.cpus_per_worker)), backend=backend)

    def __call__(self, batch: dict) -> dict:
        out = []
        for index in batch["shard"].tolist():
            ids, texts = read_shard(self.ds, self.cfg, int(index))
            out.append(encode_and_write(self.encoder, self.folder, self.cfg, int(index), ids, texts,
                                        self.fingerprint))
        return {"shard": np.array([o["index"] for o in out]), "info": np.array([json.dumps(o) for o in out])}


def worker_args(cfg: Config, job: CorpusJob, factory, backend) -> tuple:
    """What each :class:`ShardWorker` is built with. Workers start in a directory of their own, so every
    path is absolute: the config's project folders (``runs/<run>/model``, ``cache/``), the inputs, the output."""
    paths = {k: (str(Path(v).resolve()) if isinstance(v, str) else v) for k, v in cfg.paths.model_dump().items()}
    sent = cfg.model_copy(update={"paths": cfg.paths.model_copy(update=paths)})
    return (sent.model_dump_json(), [str(f.resolve()) for f in job.files], job.fmt, str(job.folder.resolve()),
            job.fingerprint, factory, backend)


def run_ray(cfg: Config, job: CorpusJob, factory: EncoderFactory = make_encoder,
            backend: str | None = None) -> list[dict]:
    """The same shards as a Ray Data job: shard numbers -> map_batches(actor pool of encoders) -> shards."""
    import ray

    c, folder, n_shards, fingerprint = cfg.corpus, job.folder, job.n_shards, job.fingerprint
    infos: dict[int, dict] = {i: {**s, "resumed": True} for i in range(n_shards)
                           if (s := done_shard(folder, i, fingerprint))}
    pending = [i for i in range(n_shards) if i not in infos]
    if not pending:
        return [infos[i] for i in range(n_shards)]
    from pipeline.core import raycluster

    kept = "the shards written so far are kept: rerun the same command to encode the others"
    # an existing cluster, or a loopback-only local one; watched while the job runs
    with raycluster.session(c.ray_address, setting="corpus.ray_address", timeout_s=cfg.services.timeout_s,
                            kept=kept):
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.from_items([{"shard": i} for i in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(ShardWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=c.workers),
                            num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker or None,
                            fn_constructor_args=worker_args(cfg, job, factory, backend))
        for row in ds.iter_rows():
            info = json.loads(row["info"])
            infos[info["index"]] = info
    missing = [i for i in range(n_shards) if i not in infos]
    if missing:
        raise RuntimeError(f"embed-corpus: the Ray job ended without shards {missing[:10]}")
    return [infos[i] for i in range(n_shards)]


# ---------------------------------------------------------------------------------------------------------------
# The stage


def output_folder(cfg: Config) -> Path:
    c = cfg.corpus
    if c.output:
        return Path(c.output)
    if c.encoder == "run":
        return Layout(cfg).run() / "corpus"
    return Path(cfg.paths.runs) / "base-corpus" / Path(c.input or "corpus").stem


def fingerprint_of(cfg: Config, files: list[Path], fmt: str, ident: dict) -> str:
    """Input files (name, size, mtime), columns, shard size and the encoder: what every shard depends on."""
    c = cfg.corpus
    stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return digest([stats, fmt, c.id_column, c.text_column, c.shard_rows, c.batch_size, ident, cfg.train.precision,
                   backend_key(cfg)])


def _drop_stale_shards(folder: Path, n_shards: int) -> None:
    """Shards past the end (a shorter input or a larger shard size than last time) are not part of this run."""
    for p in folder.glob("shard-*.*"):
        stem = p.name.split(".")[0]
        if stem[6:].isdigit() and int(stem[6:]) >= n_shards:
            p.unlink()


def run(cfg: Config, *, force: bool = False, factory: EncoderFactory = make_encoder) -> Path:
    files, fmt = input_files(cfg)
    ds = open_dataset(files, fmt, cfg)
    ident = encoder_identity(cfg)
    out = output_folder(cfg)
    shards = out / SHARDS
    clean_stale(out, shards)
    fp = fingerprint_of(cfg, files, fmt, ident)
    manifest = read_manifest(out)
    if not force and manifest and manifest.get("fingerprint") == fp and manifest.get("stage") == "embed-corpus":
        log.info("embed-corpus: shards in %s are up to date", out)
        return _index(cfg, out, fp)
    if force and shards.exists():
        shutil.rmtree(shards)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the new manifest is written
    rows = ds.count_rows()
    if rows == 0:
        raise DataError(f"embed-corpus: {cfg.corpus.input} has no rows")
    n_shards = -(-rows // cfg.corpus.shard_rows)
    _drop_stale_shards(shards, n_shards)
    log.info("embed-corpus: %d rows of %s in %d shards of %d -> %s (%s executor)", rows, cfg.corpus.input,
             n_shards, cfg.corpus.shard_rows, shards, cfg.corpus.executor)
    started = time.perf_counter()
    # The encoder form is chosen once, here, on the first shard's texts; Ray workers build the same form.
    encoder = factory(cfg, threads=cfg.runtime.num_threads, probe_texts=read_shard(ds, cfg, 0)[1], n_texts=rows)
    backend = encoder.backend
    job = CorpusJob(files, fmt, shards, n_shards, fp)
    if cfg.corpus.executor == "ray":
        del encoder  # the workers hold their own
        infos = run_ray(cfg, job, factory, backend["name"])
    else:
        infos = run_local(cfg, ds, job, encoder)
    seconds = time.perf_counter() - started
    manifest = corpus_manifest(cfg, job, ident, infos, rows, seconds)
    write_json_atomic(out / MANIFEST, {**manifest, "backend": backend})
    log.info("embed-corpus: %d vectors in %s (%.0f texts/s this run, peak RSS %.0f MiB)", rows, out,
             read_json(out / MANIFEST)["throughput"]["texts_per_s_run"] or 0, peak_rss_mb())
    return _index(cfg, out, fp)


def _index(cfg: Config, out: Path, fp: str) -> Path:
    """Build the IVF index unless it is off or already built from these shards with these settings."""
    from pipeline.scale import index as scale_index

    index = read_manifest(out / "index")
    settings = cfg.corpus.index.model_dump(mode="json")
    if cfg.corpus.index.enabled and not (index and index.get("fingerprint") == fp
                                         and index.get("config", {}).get("corpus", {}).get("index") == settings):
        scale_index.build(cfg, out)
    return out


def corpus_manifest(cfg: Config, job: CorpusJob, ident: dict, infos: list[dict], rows: int, seconds: float) -> dict:
    fp, files, fmt = job.fingerprint, job.files, job.fmt
    encoded_now = [i for i in infos if not i.get("resumed")]
    busy = sum(i["seconds"] for i in encoded_now)
    workers = sorted({i["pid"] for i in encoded_now})
    window = (max(i["ended"] for i in encoded_now) - min(i["started"] for i in encoded_now)) if encoded_now else 0
    extra = {
        "rows": rows, "dim": infos[0]["dim"], "format": fmt, "shard_rows": cfg.corpus.shard_rows,
        "executor": cfg.corpus.executor, "workers": cfg.corpus.workers if cfg.corpus.executor == "ray" else 1,
        "encoder": ident,
        "shards": [{k: i[k] for k in ("index", "file", "rows", "first_row", "first_id", "last_id", "sha256")}
                   for i in infos],
        # texts_per_s_run: rows over this command's wall time (resumed shards included, so a resume reads high);
        # per_worker: rows over the seconds the workers spent encoding and writing them.
        "throughput": {"seconds": round(seconds, 2), "texts_per_s_run": round(rows / seconds, 1) if seconds else None,
                       "texts_per_s_per_worker": round(sum(i["rows"] for i in encoded_now) / busy, 1) if busy else None,
                       # total: rows over the span from the first shard's start to the last one's end (no start-up)
                       "texts_per_s_total": round(len(encoded_now) and sum(i["rows"] for i in encoded_now) / window, 1)
                       if window > 0 else None,
                       "worker_pids": len(workers), "resumed_shards": len(infos) - len(encoded_now)},
        "memory": {"driver_peak_rss_mb": round(peak_rss_mb(), 1),
                   "worker_peak_rss_mb": max((i.get("peak_rss_mb") or 0) for i in infos)},
    }
    inputs = {str(f): f"{f.stat().st_size} bytes" for f in files[:100]}
    return make_manifest("embed-corpus", cfg, fingerprint=fp, inputs=inputs, extra=extra)
