"""Bench part "scale" (``bench.scale=true``): embed-corpus and its IVF index at up to a million rows.

1. Memory: ``python -m pipeline embed-corpus`` (local executor, its own process, so ru_maxrss is its own) on
   ``bench.scale_memory_rows`` rows of real titles cycled, with a random-weight encoder of
   ``bench.scale_memory_shape`` (memory does not depend on the weights' values, and the real model would
   take hours on a few cores). Peak RSS per size: flat means it does not grow with the row count.
2. Throughput: the real model (``model.base``, or the trained run when ``corpus.encoder=run``) on
   ``bench.scale_throughput_texts`` real titles, local and on Ray Data with each of ``bench.scale_workers``
   actors (one CPU each). Per worker: rows over the seconds the workers spent on their shards; total: rows
   over the span from the first shard's start to the last shard's end (cluster and model start-up excluded).
3. Index: every real title embedded with the same model, plus perturbed copies up to
   ``bench.scale_index_rows`` (a copy is a real embedding plus N(0, scale_noise^2) per dimension, renormalised:
   perturbed in embedding space, not new texts). Queries are fresh perturbed copies that are not in the index.
   pipeline/scale/index.py picks the smallest IVF candidate reaching ``corpus.index.recall_target``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from pipeline.core.artifacts import MANIFEST, PROJECT_ROOT, make_manifest, read_json, write_json_atomic
from pipeline.core.config import Config

log = logging.getLogger(__name__)


def write_titles(path: Path, titles: list[str], rows: int, chunk: int = 100_000) -> Path:
    """A Parquet corpus of ``rows`` rows cycling ``titles``, written in chunks (never all rows in memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.array(titles, dtype=object)
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("text", pa.string())])) as writer:
        for start in range(0, rows, chunk):
            idx = np.arange(start, min(rows, start + chunk))
            writer.write_table(pa.table({"id": [f"r{i}" for i in idx], "text": arr[idx % len(arr)].tolist()}))
    return path


def run_stage(cfg: Config, work: Path, name: str, overrides: list[str]) -> dict:
    """``python -m pipeline embed-corpus`` in a fresh process; returns the corpus manifest it wrote."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    out = folder / "corpus"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "pipeline", "embed-corpus", "--config", str(cfg_path), "--force",
           f"corpus.output={out}", "tracking.enabled=false", *overrides]
    started = time.perf_counter()
    with open(folder / "stage.log", "w", encoding="utf-8") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
    if proc.returncode != 0:
        from pipeline.bench.common import BenchError

        tail = (folder / "stage.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        raise BenchError(f"embed-corpus ({name}) failed (exit {proc.returncode}):\n" + "\n".join(tail))
    manifest = read_json(out / MANIFEST)
    manifest["wall_s"] = round(time.perf_counter() - started, 1)
    manifest["folder"] = str(out)
    return manifest


def _row(name: str, m: dict) -> dict:
    t, mem = m["throughput"], m["memory"]
    return {"run": name, "rows": m["rows"], "executor": m["executor"], "workers": m["workers"],
            "shards": len(m["shards"]), "texts_per_s_per_worker": t["texts_per_s_per_worker"],
            "texts_per_s_total": t["texts_per_s_total"], "stage_s": t["seconds"], "process_wall_s": m["wall_s"],
            "driver_peak_rss_mb": mem["driver_peak_rss_mb"], "worker_peak_rss_mb": mem["worker_peak_rss_mb"]}


def micro_encoder(tokenizer_from: str, folder: Path) -> Path:
    """A 2-layer, 32-wide BERT with random weights and the base model's tokenizer (as tests/conftest.py builds):
    the row count, not the model, should decide the memory, and this keeps a million rows cheap to encode."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.model.encoder import resolve_base

    tok = AutoTokenizer.from_pretrained(resolve_base(tokenizer_from))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(folder / "hf")
    tok.save_pretrained(folder / "hf")
    transformer = models.Transformer(str(folder / "hf"))
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(str(folder / "st"))
    return folder / "st"


def bench_memory(cfg: Config, work: Path, titles: list[str]) -> list[dict]:
    from pipeline.bench.common import random_encoder

    b = cfg.bench
    folder = work / f"enc-{b.scale_memory_shape}"
    model = (micro_encoder(cfg.model.base, folder) if b.scale_memory_shape == "micro"
             else random_encoder(b.scale_memory_shape, cfg.model.base, folder))
    rows = []
    for n in b.scale_memory_rows:
        data = write_titles(work / f"titles-{n}.parquet", titles, n)
        log.info("bench: scale memory, embed-corpus on %d rows (%s, random weights) ...", n, b.scale_memory_shape)
        m = run_stage(cfg, work, f"memory-{n}", [f"corpus.input={data}", "corpus.encoder=base", f"model.base={model}",
                                                 "corpus.index.enabled=false", "corpus.executor=local",
                                                 # one thread: a tiny model's second thread only spin-waits
                                                 "runtime.num_threads=1"])
        rows.append(_row(f"memory-{n}", m))
        (work / f"titles-{n}.parquet").unlink()
    return rows


def bench_throughput(cfg: Config, work: Path, titles: list[str]) -> list[dict]:
    b = cfg.bench
    n = min(b.scale_throughput_texts, len(titles))
    data = write_titles(work / "throughput.parquet", titles[:n], n)
    # Enough shards that every worker gets several (a shard is the unit a Ray actor takes).
    shard = max(1, -(-n // (4 * max(b.scale_workers))))
    common = [f"corpus.input={data}", f"corpus.shard_rows={shard}", "corpus.index.enabled=false"]
    rows = []
    log.info("bench: scale throughput, local executor on %d real titles ...", n)
    rows.append(_row("local", run_stage(cfg, work, "throughput-local", common + ["corpus.executor=local"])))
    for w in b.scale_workers:
        log.info("bench: scale throughput, Ray Data with %d worker(s) on %d real titles ...", w, n)
        m = run_stage(cfg, work, f"throughput-ray-{w}", common + ["corpus.executor=ray", f"corpus.workers={w}",
                                                                   "corpus.cpus_per_worker=1"])
        rows.append(_row(f"ray-{w}", m))
    return rows


def perturbed(base: np.ndarray, rows: np.ndarray, noise: float, rng) -> np.ndarray:
    """Row r is real embedding r mod len(base); rows past the first copy get noise, then unit length again."""
    out = base[rows % len(base)].copy()
    copy = rows >= len(base)
    out[copy] += rng.normal(0.0, noise, size=(int(copy.sum()), base.shape[1])).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def perturbed_corpus(cfg: Config, folder: Path, base: np.ndarray, rows: int, shard_rows: int = 50_000) -> Path:
    """A corpus folder (shards + manifest, the embed-corpus format) of real and perturbed vectors."""
    from pipeline.contracts.shards import SHARDS, write_shard

    shards = []
    for i, start in enumerate(range(0, rows, shard_rows)):
        idx = np.arange(start, min(rows, start + shard_rows))
        vectors = perturbed(base, idx, cfg.bench.scale_noise, np.random.default_rng([cfg.seed, i]))
        info = write_shard(folder / SHARDS, i, start, [f"v{j}" for j in idx], vectors, fingerprint="bench", seconds=0)
        shards.append({k: info[k] for k in ("index", "file", "rows", "first_row", "first_id", "last_id", "sha256")})
    write_json_atomic(folder / MANIFEST, make_manifest(
        "embed-corpus", cfg, fingerprint=f"bench-perturbed-{rows}", inputs={},
        extra={"rows": rows, "dim": base.shape[1], "shards": shards, "perturbed_from": len(base),
               "noise": cfg.bench.scale_noise}))
    return folder


def bench_index(cfg: Config, work: Path, titles: list[str]) -> dict:
    from pipeline.scale import index as scale_index
    from pipeline.contracts.shards import iter_corpus

    b = cfg.bench
    data = write_titles(work / "all-titles.parquet", titles, len(titles))
    log.info("bench: scale index, embedding all %d real titles ...", len(titles))
    # On Ray with every worker count's largest: on a shared CPU, one thread per process wastes no spin-waiting.
    workers = max(b.scale_workers)
    m = run_stage(cfg, work, "index-embed", [f"corpus.input={data}", "corpus.index.enabled=false",
                                             "corpus.executor=ray", f"corpus.workers={workers}",
                                             "corpus.cpus_per_worker=1",
                                             f"corpus.shard_rows={max(1, -(-len(titles) // (4 * workers)))}"])
    base = np.concatenate([v for _, _, v in iter_corpus(Path(m["folder"]))])
    log.info("bench: scale index, %d real + perturbed vectors, tuning for recall@%d >= %.2f ...",
             b.scale_index_rows, cfg.corpus.index.k, cfg.corpus.index.recall_target)
    folder = perturbed_corpus(cfg, work / "index-corpus", base, b.scale_index_rows)
    rng = np.random.default_rng(cfg.seed + 7)
    picks = rng.choice(len(base), size=min(cfg.corpus.index.queries, len(base)), replace=False)
    # Queries: new perturbed copies (row numbers past the index, so each gets noise) of real embeddings.
    queries = perturbed(base, picks + len(base) * (b.scale_index_rows // len(base) + 1), b.scale_noise, rng)
    started = time.perf_counter()
    record = scale_index.tune(cfg, folder, queries, folder / "index",
                              query_note=f"{len(queries)} fresh perturbed copies of real title embeddings, not in the index")
    cos = float(np.mean(np.sum(perturbed(base, np.arange(len(base), 2 * len(base)), b.scale_noise,
                                         np.random.default_rng(1)) * base, axis=1)))
    return {"real_vectors": len(base), "rows": b.scale_index_rows, "noise": b.scale_noise,
            "mean_cosine_copy_to_original": round(cos, 4), "encoder": m["encoder"],
            "embed_throughput": _row("index-embed", m), "tune_s": round(time.perf_counter() - started, 1),
            **{k: record[k] for k in ("k", "recall_target", "reached", "chosen", "flat", "candidates",
                                      "train_rows", "queries", "query_note", "quantizer_train_s")}}


def run(cfg: Config, work: Path, titles: list[str]) -> dict:
    """The three measurements; ``titles`` are the real texts (the prepared splits' texts)."""
    from pipeline.core.artifacts import Layout, read_manifest

    work = Path(work) / "scale"
    if cfg.corpus.encoder == "run" and read_manifest(Layout(cfg).model_dir()) is None:
        log.info("bench: scale, no trained run '%s' at hand: the real-model parts use the base model %s",
                 cfg.resolved_run_name, cfg.model.base)
        cfg = cfg.model_copy(update={"corpus": cfg.corpus.model_copy(update={"encoder": "base"})})
    out = {"titles": len(titles), "encoder": cfg.corpus.encoder}
    # Each part is saved as it finishes, so a long run that is stopped still leaves what it measured.
    partial = Path(cfg.paths.reports) / "bench" / f"{time.strftime('%Y-%m-%d')}-scale.partial.json"
    for part, fn in (("throughput", bench_throughput), ("memory", bench_memory), ("index", bench_index)):
        if part not in cfg.bench.scale_parts:
            continue
        out[part] = fn(cfg, work, titles)
        write_json_atomic(partial, out)
    return out


def markdown(block: dict | None) -> str:
    if not block:
        return ""
    lines = ["", "## Scale (embed-corpus, IVF index)", "",
             "| run | rows | executor | workers | texts/s per worker | texts/s total | peak RSS MiB (driver / worker) |",
             "|---|---|---|---|---|---|---|"]
    for r in block.get("memory", []) + block.get("throughput", []):
        lines.append(f"| {r['run']} | {r['rows']:,} | {r['executor']} | {r['workers']} | {r['texts_per_s_per_worker']} "
                     f"| {r['texts_per_s_total']} | {r['driver_peak_rss_mb']} / {r['worker_peak_rss_mb']} |")
    ix = block.get("index")
    if not ix:
        return "\n".join(lines + [""])
    c, f = ix["chosen"], ix["flat"]
    lines += ["", f"Index on {ix['rows']:,} vectors ({ix['real_vectors']:,} real title embeddings + perturbed copies, "
              f"noise {ix['noise']}/dim, mean cosine copy-to-original {ix['mean_cosine_copy_to_original']}); "
              f"{ix['query_note']}.", "",
              "| index | nprobe | recall@%d | ms/query | size MiB |" % ix["k"], "|---|---|---|---|---|",
              f"| {c['factory']} | {c['nprobe']} | {c['recall']} | {c['query_ms']} | {c['index_bytes'] / 2**20:.1f} |",
              f"| flat (exact) | - | 1.0 | {f['query_ms']} | {f['index_bytes'] / 2**20:.1f} |", "",
              "Candidates tried: " + "; ".join(
                  f"{r['spec']}: " + ", ".join(f"nprobe {t['nprobe']} -> {t['recall']}" for t in r["trials"])
                  for r in ix["candidates"]), ""]
    return "\n".join(lines)
