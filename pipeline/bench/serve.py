"""bench part "serve": what one base with many adapters costs against one merged model per adapter.

- Memory: resident memory (RSS, and USS: the pages no other process shares) of one server process holding
  the base with N adapters, against one holding N merged models, for N in ``bench.serve_adapter_counts``
  (and 3 merged models, the acceptance line). Each figure is read inside the server after every model has
  encoded once.
- Throughput: requests/s and p50/p99 latency over HTTP on 127.0.0.1 for one adapter, and for requests spread
  round-robin over ``bench.serve_spread`` adapters, against one process per merged model (the CPU threads
  split between those processes, so both sides use the same cores). Both kinds of server group the
  requests of one ``serve.batch_ms`` window into one batch per model, so batching is not the difference.
- Adding an adapter at run time: the seconds ``AdapterSet.add_folder`` takes in a serving process.

The adapters are random LoRA weights of the ``train.lora`` shape on ``model.base`` (memory and speed do not
depend on the values); each merged model is the same adapter merged. The load generator sends a bounded
number of requests (``bench.serve_requests``, one text each) from ``bench.serve_concurrency`` threads and
stops at ``bench.serve_timeout_s``. Servers run as child processes (``python -m pipeline.bench.serve``) and
are stopped before the next scenario starts.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.serve.adapters import EmbedRequest  # at module level: FastAPI resolves the body annotation here
from pipeline.core.artifacts import PROJECT_ROOT, write_json_atomic
from pipeline.core.config import Config
from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
EXTRA_ADAPTERS = 3  # adapters added to a running server to time the run-time add
WARM_TEXTS = ["warm-up text", "a second, slightly longer warm-up text for the encoder"]


class ServeBenchError(PipelineError):
    """A bench server did not start or answer."""


# ------------------------------------------------------------------------------------------------- models

def make_models(cfg: Config, folder: Path, n: int) -> tuple[list[Path], list[Path], dict]:
    """``n`` random LoRA adapters on ``model.base`` (folders as export writes them) and each one merged."""
    import copy

    import torch

    from pipeline.model.encoder import apply_lora, base_fingerprint, inner_model, load_base, resolve_base, set_inner_model

    max_len = cfg.train.max_seq_length
    base = load_base(cfg.model, max_seq_length=max_len)
    meta = {"base": cfg.model.base, "base_fingerprint": base_fingerprint(resolve_base(cfg.model.base)),
            "revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code,
            "max_seq_length": max_len, "embedding_dim": int(base.get_embedding_dimension())}
    adapters, merged = [], []
    for i in range(n):
        st = copy.deepcopy(base)
        apply_lora(st, cfg.train.lora)
        peft = inner_model(st)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():  # lora_B starts at zero; a trained adapter's is not, and merging must change weights
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        a_dir, m_dir = folder / "adapters" / f"a{i}", folder / "merged" / f"a{i}"
        peft.save_pretrained(str(a_dir))
        write_json_atomic(a_dir / "base_model.json", meta)
        set_inner_model(st, inner_model(st).merge_and_unload())
        st.save(str(m_dir), safe_serialization=True)
        adapters.append(a_dir)
        merged.append(m_dir)
    return adapters, merged, meta


# ------------------------------------------------------------------------------------------------ servers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A bench server in a child process (``serve_main``), up once it answers ``/bench/info``."""

    def __init__(self, spec: dict, folder: Path, start_timeout_s: float = 600.0):
        import httpx

        folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        spec_path = folder / "spec.json"
        spec_path.write_text(json.dumps({**spec, "port": self.port}), encoding="utf-8")
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = folder / "server.log"
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        # the child must import this checkout's package whatever the working directory is
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        with open(self.log_path, "w", encoding="utf-8") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.bench.serve", str(spec_path)],
                                         stdout=fh, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + start_timeout_s
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-10:]
                self.stop()
                raise ServeBenchError(f"bench server {folder.name} did not start:\n" + "\n".join(tail))
            try:
                self.info = httpx.get(self.url + "/bench/info", timeout=5).json()
                return
            except httpx.HTTPError:
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def _memory() -> dict:
    import psutil

    full = psutil.Process().memory_full_info()
    return {"rss_mb": round(full.rss / 2**20, 1), "uss_mb": round(full.uss / 2**20, 1)}


def merged_app(models: list, max_seq_length: int, window_ms: float = 5.0):
    """``POST /embed`` over merged models (the request's ``adapter`` picks one: a0, a1, ...). Requests go
    through the same ``Batcher`` as the adapter service, so both sides batch concurrent requests alike."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException

    from pipeline.model import tokens as encoding
    from pipeline.serve.adapters import Batcher

    def encode(name: str, texts: list[str]):
        return encoding.encode_texts(models[int(name[1:])], texts, max_seq_length=max_seq_length, batch_size=64,
                                     device="cpu", dtype=None)

    batcher = Batcher(encode, window_ms / 1000)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(lifespan=lifespan)
    app.state.batcher = batcher

    @app.post("/embed")
    def embed(req: EmbedRequest) -> dict:
        name = req.adapter or "a0"
        if not (name[:1] == "a" and name[1:].isdigit() and int(name[1:]) < len(models)):
            raise HTTPException(404, f"no model {req.adapter}")
        vectors = batcher.submit(name, req.texts)
        return {"adapter": name, "dim": int(vectors.shape[1]), "embeddings": vectors.tolist()}

    return app


def serve_main(spec: dict) -> None:
    """Child process: load the models, read memory, time the extra adds, then serve until terminated."""
    import torch
    import uvicorn

    torch.set_num_threads(spec["threads"])
    started = time.perf_counter()
    if spec["mode"] == "adapters":
        from pipeline.serve.adapters import AdapterSet, build_app

        aset = AdapterSet(spec["base_meta"])
        for i, folder in enumerate(spec["dirs"]):
            aset.add_folder(Path(folder), f"a{i}")
        for name in aset.adapters:
            aset.encode(name, WARM_TEXTS)
        info: dict[str, Any] = {"load_seconds": round(time.perf_counter() - started, 2), **_memory()}
        adds = []
        for j, folder in enumerate(spec.get("extra", [])):
            t0 = time.perf_counter()
            aset.add_folder(Path(folder), f"x{j}")
            adds.append(round(time.perf_counter() - t0, 4))
        info["add_seconds"] = adds
        app = build_app(aset, window_ms=spec["window_ms"])
    else:
        from sentence_transformers import SentenceTransformer

        from pipeline.model import tokens as encoding

        models = [SentenceTransformer(folder, device="cpu") for folder in spec["dirs"]]
        for m in models:
            encoding.encode_texts(m, WARM_TEXTS, max_seq_length=spec["max_seq_length"], device="cpu", dtype=None)
        info = {"load_seconds": round(time.perf_counter() - started, 2), **_memory()}
        app = merged_app(models, spec["max_seq_length"], spec["window_ms"])
    app.add_api_route("/bench/info", lambda: info, methods=["GET"])
    uvicorn.run(app, host=HOST, port=spec["port"], log_level="warning")


# ----------------------------------------------------------------------------------------- load generator

def load(targets: list[tuple[str, str]], texts: list[str], n: int, concurrency: int, timeout_s: float) -> dict:
    """``n`` POST /embed requests, round-robin over (url, adapter) ``targets``, from ``concurrency`` threads."""
    import httpx

    lock, latencies, errors = threading.Lock(), [], []
    state = {"next": 0}
    deadline = time.monotonic() + timeout_s

    def worker() -> None:
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < deadline:
                with lock:
                    i = state["next"]
                    state["next"] += 1
                if i >= n:
                    return
                url, adapter = targets[i % len(targets)]
                t0 = time.perf_counter()
                try:
                    r = http.post(url + "/embed", json={"texts": [texts[i % len(texts)]], "adapter": adapter})
                    ok = r.status_code == 200
                except httpx.HTTPError as exc:
                    ok, r = False, exc
                with lock:
                    (latencies if ok else errors).append(time.perf_counter() - t0 if ok else str(r)[:200])

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s + 60)
    seconds = time.perf_counter() - started
    ms = sorted(1000 * x for x in latencies)
    pick = (lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 2)) if ms else (lambda q: None)
    return {"requests": n, "ok": len(ms), "errors": len(errors), "first_error": errors[0] if errors else None,
            "seconds": round(seconds, 2), "requests_per_s": round(len(ms) / seconds, 2) if seconds else None,
            "p50_ms": round(statistics.median(ms), 2) if ms else None, "p99_ms": pick(0.99)}


# -------------------------------------------------------------------------------------------------- parts

def _spec(mode: str, dirs: list[Path], threads: int, cfg: Config, meta: dict, extra: list[Path] = ()) -> dict:
    return {"mode": mode, "dirs": [str(d) for d in dirs], "threads": threads, "base_meta": meta,
            "max_seq_length": meta["max_seq_length"], "window_ms": cfg.serve.batch_ms,
            "extra": [str(d) for d in extra]}


@dataclass(frozen=True)
class Served:
    """The bench's models: adapter folders, the same adapters merged, extra adapters that are added while serving,
    and the base's metadata; ``threads`` per serving process, ``seen`` the servers' readings so far."""

    adapters: list[Path]
    merged: list[Path]
    extra: list[Path]
    meta: dict
    threads: int
    seen: dict


def _memory_rows(cfg: Config, work: Path, models: Served) -> list[dict]:
    """One row per (mode, models); ``models.seen`` holds the readings of the throughput servers of the same shape
    (one process, all threads, read before any load), so those are not started twice."""
    adapters, merged, meta, threads, seen = models.adapters, models.merged, models.meta, models.threads, models.seen
    counts = sorted(set(cfg.bench.serve_adapter_counts))
    rows = []
    for mode, dirs, wanted in (("adapters", adapters, counts), ("merged", merged, sorted(set(counts) | {3}))):
        for n in wanted:
            info = seen.get((mode, n))
            if info is None:
                log.info("bench serve: memory, %d %s ...", n, mode)
                server = Server(_spec(mode, dirs[:n], threads, cfg, meta), work / f"mem-{mode}-{n}")
                server.stop()
                info = server.info
            rows.append({"mode": mode, "models": n, **{k: info[k] for k in ("rss_mb", "uss_mb", "load_seconds")}})
    return rows


def _throughput_rows(cfg: Config, work: Path, models: Served, texts: list[str]) -> tuple[list[dict], list[float]]:
    adapters, merged, extra, meta = models.adapters, models.merged, models.extra, models.meta
    threads, seen = models.threads, models.seen
    b = cfg.bench
    spread = min(b.serve_spread, len(adapters))

    def run_load(name: str, targets: list[tuple[str, str]]) -> dict:
        load(targets, texts, 2 * b.serve_concurrency, b.serve_concurrency, b.serve_timeout_s)  # warm-up
        log.info("bench serve: %s ...", name)
        return {"scenario": name, **load(targets, texts, b.serve_requests, b.serve_concurrency, b.serve_timeout_s)}

    rows = []
    server = Server(_spec("adapters", adapters[:spread], threads, cfg, meta, extra), work / "tp-adapters")
    seen[("adapters", spread)] = server.info
    try:
        add_seconds = server.info["add_seconds"]
        rows.append(run_load("one base, 1 adapter", [(server.url, "a0")]))
        rows.append(run_load(f"one base, spread over {spread} adapters",
                             [(server.url, f"a{i}") for i in range(spread)]))
    finally:
        server.stop()
    for n in sorted({1, spread}):
        per = max(1, threads // n)
        servers = []
        try:
            for i in range(n):
                servers.append(Server(_spec("merged", merged[i:i + 1], per, cfg, meta), work / f"tp-merged-{n}-{i}"))
            if n == 1:
                seen[("merged", 1)] = servers[0].info
            name = "1 merged model, 1 process" if n == 1 else f"{n} merged models, {n} processes of {per} thread(s)"
            rows.append(run_load(name, [(s.url, "a0") for s in servers]))
        finally:
            for s in servers:
                s.stop()
    return rows, add_seconds


def verdict(memory: list[dict]) -> dict:
    """The acceptance line: the most adapters on one base against three merged models, both resident."""
    adapters = {r["models"]: r for r in memory if r["mode"] == "adapters"}
    merged = {r["models"]: r for r in memory if r["mode"] == "merged"}
    if not adapters or 3 not in merged:
        return {}
    most = max(adapters)
    out = {"adapters": most, "adapters_rss_mb": adapters[most]["rss_mb"], "three_merged_rss_mb": merged[3]["rss_mb"],
           "below": adapters[most]["rss_mb"] < merged[3]["rss_mb"]}
    if most in merged and most > 1 and 1 in adapters and 1 in merged:
        out["mb_per_adapter"] = round((adapters[most]["rss_mb"] - adapters[1]["rss_mb"]) / (most - 1), 2)
        out["mb_per_merged_model"] = round((merged[most]["rss_mb"] - merged[1]["rss_mb"]) / (most - 1), 2)
    return out


def run(cfg: Config, work: Path, texts: list[str]) -> dict:
    """The serve part of ``make bench``: memory, throughput and run-time add; every server on 127.0.0.1."""
    b = cfg.bench
    threads = cfg.runtime.num_threads or os.cpu_count() or 1
    most = max(max(b.serve_adapter_counts), 3, b.serve_spread)
    log.info("bench serve: building %d random adapters and their merged models ...", most + EXTRA_ADAPTERS)
    adapters, merged, meta = make_models(cfg, work / "serve-models", most + EXTRA_ADAPTERS)
    extra, adapters, merged = adapters[most:], adapters[:most], merged[:most]
    models = Served(adapters, merged, extra, meta, threads, seen={})
    throughput, add_seconds = _throughput_rows(cfg, work, models, texts)
    memory = _memory_rows(cfg, work, models)
    return {"base": cfg.model.base, "lora": cfg.train.lora.model_dump(mode="json"), "threads": threads,
            "batch_window_ms": cfg.serve.batch_ms, "requests": b.serve_requests,
            "concurrency": b.serve_concurrency, "memory": memory, "throughput": throughput,
            "add_adapter_seconds": add_seconds,
            "add_adapter_seconds_median": statistics.median(add_seconds) if add_seconds else None,
            "verdict": verdict(memory)}


def markdown(serve: dict | None) -> str:
    """The report's serve section ("" when the part did not run)."""
    if not serve:
        return ""
    lines = ["", "## Serving: one base with many adapters vs one merged model per adapter", "",
             f"Base `{serve['base']}`, LoRA r={serve['lora']['r']} on {', '.join(serve['lora']['target_modules'])} "
             f"(random weights of that shape), {serve['threads']} CPU thread(s), batch window "
             f"{serve['batch_window_ms']} ms, {serve['requests']} requests of one text from "
             f"{serve['concurrency']} client threads on 127.0.0.1.", "",
             "| server process | models | RSS MB | USS MB | load s |", "|---|---|---|---|---|"]
    for r in serve["memory"]:
        what = "one base + adapters" if r["mode"] == "adapters" else "merged models"
        lines.append(f"| {what} | {r['models']} | {r['rss_mb']} | {r['uss_mb']} | {r['load_seconds']} |")
    v = serve.get("verdict") or {}
    if v:
        lines += ["", f"{v['adapters']} adapters on one base: {v['adapters_rss_mb']} MB resident, against "
                  f"{v['three_merged_rss_mb']} MB for three merged models "
                  f"({'below' if v['below'] else 'NOT below'})."
                  + (f" Each added adapter {v['mb_per_adapter']} MB, each added merged model "
                     f"{v['mb_per_merged_model']} MB." if "mb_per_adapter" in v else "")]
    lines += ["", "| scenario | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
    for r in serve["throughput"]:
        lines.append(f"| {r['scenario']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} |")
    if serve.get("add_adapter_seconds"):
        lines += ["", f"Adding an adapter to a running server: median {serve['add_adapter_seconds_median']:.3f} s "
                  f"({', '.join(f'{s:.3f}' for s in serve['add_adapter_seconds'])})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    serve_main(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))
