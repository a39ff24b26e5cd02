"""Serving many adapters: one base model in memory, any number of exported LoRA adapters on it, one per request.

``python -m pipeline serve serve.adapters=[all]`` (or ``make serve-adapters``) serves every adapter
export under ``exports/`` trained on the served run's base; ``serve.adapters=[runA,runB]`` (run names
under ``exports/`` or export folders) serves those. Bound to 127.0.0.1 only, like ``serve``.

- ``GET /adapters``: each adapter with its export, base fingerprint, gate numbers and eval metrics.
- ``POST /adapters {"export": "<run name or export folder>", "name": optional}``: adds one at run time;
  an adapter whose recorded base weights differ from the served base is refused (409) with both
  fingerprints, since it would load without complaint and encode garbage (field note 1).
- ``POST /embed {"texts": [...], "adapter": name}`` and ``GET /search?q=...&k=...&adapter=name``: the
  adapter's vectors, and the nearest records of that adapter's own exported index.

The adapters sit side by side in one PEFT model (``PeftModel.load_adapter``) and a request switches to its
adapter with ``set_adapter``. Requests arriving within ``serve.batch_ms`` are collected and grouped
per adapter, so each adapter's texts are encoded together with one switch (see ``Batcher``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Callable, Hashable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, Field

from pipeline.core.artifacts import MANIFEST, Layout, read_json, read_manifest
from pipeline.core.config import Config
from pipeline.core.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)
HOST = "127.0.0.1"  # no authentication: never listen beyond this machine
MAX_TEXTS = 256
MAX_CHARS = 10_000
MAX_K = 100
REQUEST_TIMEOUT_S = 120.0


class ForeignBaseError(ArtifactError):
    """An adapter trained on other base weights than the ones this service holds."""


class EmbedRequest(BaseModel):
    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS)
    adapter: str | None = None
    role: Literal["query", "document"] = "document"  # which of the adapter's prompts (pipeline/model/prompts.py)


class AddRequest(BaseModel):
    export: str = Field(min_length=1)  # a run name under the exports folder, or an export folder
    name: str | None = None


@dataclass
class Adapter:
    name: str
    export_dir: Path
    peft_name: str  # PEFT module keys cannot hold every character a run name may, so adapters get a1, a2, ...
    meta: dict
    max_seq_length: int
    prompts: object  # pipeline.model.prompts.Prompts the adapter was trained and exported with
    outer: dict  # its trained modules after the transformer (st_modules.safetensors), swapped in per switch
    index: object | None  # the export's SearchIndex; None for a bare adapter folder (no /search)
    gate: dict
    metrics: dict | None
    load_seconds: float
    added_at: float = field(default_factory=time.time)

    def describe(self) -> dict:
        return {"name": self.name, "export": str(self.export_dir), "base": self.meta["base"],
                "base_fingerprint": self.meta["base_fingerprint"], "max_seq_length": self.max_seq_length,
                "index_items": int(self.index.meta["n"]) if self.index is not None else None, "gate": self.gate, "metrics": self.metrics,
                "load_seconds": self.load_seconds, "added_at": self.added_at}


def resolve_export(ref: str, exports_root: Path) -> Path:
    """An export folder from a run name (under ``exports_root``) or a path (its ``adapter/`` accepted too)."""
    path = Path(ref)
    if not path.is_dir():
        path = Path(exports_root) / ref
    if path.name == "adapter" and (path.parent / MANIFEST).exists():
        path = path.parent
    if not (path / MANIFEST).exists():
        raise ArtifactError(f"no finished export at {path} (from '{ref}'): run `make export` for that run first")
    if not (path / "adapter" / "base_model.json").exists():
        raise ArtifactError(f"export {path} has no adapter/ (only LoRA runs export one); serve it with `make serve`")
    if not (path / "adapter" / "adapter_model.safetensors").exists():
        raise ArtifactError(f"{path / 'adapter'} has no adapter_model.safetensors; only safetensors weights are loaded")
    return path


class AdapterSet:
    """The base encoder with its adapters; ``encode`` and ``add`` take turns on one lock."""

    def __init__(self, base_meta: dict, reports_dir: Path | None = None):
        from pipeline.model.encoder import load_encoder, require_base_weights

        require_base_weights(base_meta["base"], base_meta["base_fingerprint"], "the adapters", ForeignBaseError)
        self.base, self.fingerprint = base_meta["base"], base_meta["base_fingerprint"]
        self.st = load_encoder(base_meta["base"], revision=base_meta.get("revision"),
                               trust_remote_code=base_meta.get("trust_remote_code", False),
                               max_seq_length=base_meta.get("max_seq_length"))
        self.st.eval()
        # the base's own modules after the transformer: what an adapter that trained none of them runs with
        self.outer_base = {n: t.clone() for n, t in self.st.state_dict().items() if not n.startswith("0.")}
        self._outer_now: str | None = None
        self.peft = None
        self.adapters: dict[str, Adapter] = {}
        self.reports_dir = Path(reports_dir) if reports_dir else None
        self.lock = threading.Lock()
        self._count = 0

    def add(self, export_dir: Path, name: str | None = None) -> Adapter:
        """An exported adapter (``export_dir/adapter``) with the export's index, gate and eval metrics."""
        from pipeline.contracts.export_folder import SearchIndex

        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir) or {}
        name = name or manifest.get("run_name") or export_dir.name
        self._check(export_dir / "adapter", name)
        index = SearchIndex(export_dir / "index")
        gate = {k: manifest.get("gate", {}).get(k) for k in
                ("merged_vs_reference_min_cos", "merged_vs_base_mean_cos", "onnx_vs_torch_min_cos")}
        return self.add_folder(export_dir / "adapter", name, index=index, gate=gate,
                               metrics=self._metrics(manifest.get("run_name")), export_dir=export_dir)

    def _check(self, adapter_dir: Path, name: str) -> dict:
        meta = read_json(Path(adapter_dir) / "base_model.json")
        if meta["base_fingerprint"] != self.fingerprint:
            raise ForeignBaseError(
                f"adapter '{name}' ({adapter_dir}) was trained on base '{meta['base']}' with weights "
                f"{meta['base_fingerprint']}, but this service holds base '{self.base}' with weights "
                f"{self.fingerprint}: serve it from a service started on its own base")
        if name in self.adapters:
            raise ArtifactError(f"an adapter named '{name}' is already served (from {self.adapters[name].export_dir})")
        return meta

    def add_folder(self, adapter_dir: Path, name: str, *, index=None, gate: dict | None = None,
                   metrics: dict | None = None, export_dir: Path | None = None) -> Adapter:
        """A PEFT adapter folder with ``base_model.json`` (as export writes it) put beside the others."""
        from peft import PeftModel
        from safetensors.torch import load_file

        from pipeline.model import prompts
        from pipeline.model.encoder import ST_MODULES_FILE, inner_model, set_inner_model

        started = time.perf_counter()
        with self.lock:  # the check and the insert together: two requests adding one name cannot both pass
            meta = self._check(adapter_dir, name)
            self._count += 1
            peft_name = f"a{self._count}"
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(inner_model(self.st), str(adapter_dir), adapter_name=peft_name)
                set_inner_model(self.st, self.peft)
            else:
                self.peft.load_adapter(str(adapter_dir), adapter_name=peft_name)
            self.st.eval()
            outer_file = Path(adapter_dir) / ST_MODULES_FILE
            outer = load_file(str(outer_file)) if outer_file.exists() else {}
            unknown = sorted(set(outer) - set(self.outer_base))
            if unknown:
                raise ArtifactError(f"{outer_file} holds weights the base model has no place for: {unknown[:5]}")
            adapter = Adapter(name=name, export_dir=Path(export_dir or adapter_dir), peft_name=peft_name, meta=meta,
                              max_seq_length=int(meta["max_seq_length"]), prompts=prompts.of_record(meta.get("prompts")),
                              outer=outer, index=index, gate=gate or {},
                              metrics=metrics, load_seconds=round(time.perf_counter() - started, 3))
            self.adapters[name] = adapter
        log.info("serve: adapter %s from %s (%.2fs)", name, adapter_dir, adapter.load_seconds)
        return adapter

    def _metrics(self, run_name: str | None) -> dict | None:
        path = self.reports_dir / run_name / "metrics.json" if self.reports_dir and run_name else None
        if not path or not path.exists():
            return None
        m = read_json(path)
        return {block: m[block] for block in ("retrieval", "classification") if block in m}

    def get(self, name: str) -> Adapter:
        if name not in self.adapters:
            raise KeyError(f"no adapter '{name}'; served: {sorted(self.adapters)}")
        return self.adapters[name]

    def encode(self, name: str, texts: Sequence[str], role: str = "document") -> np.ndarray:
        """Adapter ``name``'s vectors of ``texts`` in ``role``, its prompts applied."""
        from pipeline.model import tokens as encoding

        adapter = self.get(name)
        with self.lock:
            self.peft.set_adapter(adapter.peft_name)
            self._switch_outer(adapter)
            return encoding.encode_texts(self.st, adapter.prompts.apply(texts, role),
                                         max_seq_length=adapter.max_seq_length, batch_size=64, device="cpu", dtype=None)

    def _switch_outer(self, adapter: Adapter) -> None:
        """The modules after the transformer as ``adapter`` trained them (the base's where it trained none)."""
        import torch

        if self._outer_now == adapter.name:
            return
        own = self.st.state_dict()
        with torch.no_grad():
            for n, t in self.outer_base.items():
                own[n].copy_(adapter.outer.get(n, t))
        self._outer_now = adapter.name

    def encoder(self, name: str) -> "AdapterEncoder":
        return AdapterEncoder(self, name)


class AdapterEncoder:
    """One served adapter as a pipeline.model.interface.Encoder."""

    def __init__(self, adapters: AdapterSet, name: str):
        self.adapters, self.name = adapters, name

    def encode(self, texts: Sequence[str], role: str) -> np.ndarray:
        return self.adapters.encode(self.name, texts, role)


class Batcher:
    """Collects requests for ``window_s`` (at most ``max_texts`` texts), then encodes them grouped per key
    (an adapter, or an adapter and a role): one adapter switch and one padded batch run per key per window,
    not per request. ``windows`` keeps, for the last windows, the (key, requests, texts) of each group."""

    def __init__(self, encode: Callable[[Hashable, list[str]], np.ndarray], window_s: float, max_texts: int = 1024):
        self.encode, self.window_s, self.max_texts = encode, window_s, max_texts
        self.queue: Queue = Queue()
        self.windows: deque = deque(maxlen=1000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="adapter-batcher", daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, texts: list[str]) -> np.ndarray:
        fut: Future = Future()
        self.queue.put((key, texts, fut))
        return fut.result(timeout=REQUEST_TIMEOUT_S)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _collect(self) -> list:
        try:
            pending = [self.queue.get(timeout=0.1)]
        except Empty:
            return []
        deadline, n = time.monotonic() + self.window_s, len(pending[0][1])
        while n < self.max_texts and (left := deadline - time.monotonic()) > 0:
            try:
                pending.append(self.queue.get(timeout=left))
            except Empty:
                break
            n += len(pending[-1][1])
        return pending

    def _loop(self) -> None:
        while not self._stop.is_set():
            groups: dict[str, list] = defaultdict(list)
            for item in self._collect():
                groups[item[0]].append(item)
            if groups:
                self.windows.append([(a, len(items), sum(len(t) for _, t, _ in items)) for a, items in groups.items()])
            for adapter, items in groups.items():
                try:
                    vectors = self.encode(adapter, [t for _, texts, _ in items for t in texts])
                except Exception as exc:  # handed to each waiting request, which reports it
                    for *_, fut in items:
                        fut.set_exception(exc)
                    continue
                start = 0
                for _, texts, fut in items:
                    fut.set_result(vectors[start:start + len(texts)])
                    start += len(texts)


# --------------------------------------------------------------------------------------------- discovery

def discover(cfg: Config) -> list[Path]:
    """The export folders ``serve.adapters`` names; ``[all]``: the served run's export first, then
    every other adapter export under the exports folder on the same base (others are skipped, logged)."""
    root = Path(cfg.paths.exports)
    wanted = cfg.serve.adapters
    if wanted != ["all"]:
        return [resolve_export(ref, root) for ref in wanted]
    own = Layout(cfg).export()
    candidates = ([own] if (own / "adapter").is_dir() else []) + sorted(
        p for p in root.glob("*") if p.is_dir() and p.resolve() != own.resolve() and (p / "adapter").is_dir())
    found = []
    for path in candidates:
        try:
            found.append(resolve_export(str(path), root))
        except ArtifactError as exc:
            log.warning("serve: skipping %s: %s", path, exc)
    if not found:
        raise ArtifactError(f"no adapter exports under {root}: export a LoRA run first (`make export`)")
    fingerprint = read_json(found[0] / "adapter" / "base_model.json")["base_fingerprint"]
    same = [p for p in found if read_json(p / "adapter" / "base_model.json")["base_fingerprint"] == fingerprint]
    for p in found:
        if p not in same:
            log.warning("serve: skipping %s: trained on other base weights than %s", p, found[0])
    return same


# --------------------------------------------------------------------------------------------------- app

def create_app(export_dirs: Sequence[Path], *, reports_dir: Path | None = None, exports_root: Path = Path("exports"),
               window_ms: float = 5.0):
    """A FastAPI app serving the adapters of ``export_dirs`` on their one base (the first one's)."""
    if not export_dirs:
        raise ConfigError("serve: no adapter exports to serve (serve.adapters)")
    first = read_json(Path(export_dirs[0]) / "adapter" / "base_model.json")
    adapters = AdapterSet(first, reports_dir)
    for path in export_dirs:
        adapters.add(Path(path))
    return build_app(adapters, exports_root=exports_root, window_ms=window_ms)


def build_app(adapters: AdapterSet, *, exports_root: Path = Path("exports"), window_ms: float = 5.0):
    """The HTTP service over an ``AdapterSet`` that holds at least one adapter."""
    from fastapi import FastAPI, HTTPException, Query

    default = next(iter(adapters.adapters))
    batcher = Batcher(lambda key, texts: adapters.encode(key[0], texts, key[1]), window_ms / 1000)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="embedding search: one base, many adapters", lifespan=lifespan,
                  description="Per-request LoRA adapters on one base encoder, each with its exported index.")
    app.state.adapters, app.state.batcher = adapters, batcher

    def pick(name: str | None):
        try:
            return adapters.get(name or default)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None

    def embed(adapter: Adapter, texts: list[str], role: str) -> np.ndarray:
        if any(len(t) > MAX_CHARS for t in texts):
            raise HTTPException(413, f"each text must have at most {MAX_CHARS} characters")
        return batcher.submit((adapter.name, role), texts)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "base": adapters.base, "base_fingerprint": adapters.fingerprint,
                "adapters": len(adapters.adapters), "default_adapter": default}

    @app.get("/adapters")
    def list_adapters() -> dict:
        return {"base": adapters.base, "base_fingerprint": adapters.fingerprint,
                "adapters": [a.describe() for a in adapters.adapters.values()]}

    @app.post("/adapters", status_code=201)
    def add_adapter(req: AddRequest) -> dict:
        try:
            return adapters.add(resolve_export(req.export, exports_root), req.name).describe()
        except ForeignBaseError as exc:
            raise HTTPException(409, str(exc)) from None
        except ArtifactError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.post("/embed")
    def embed_endpoint(req: EmbedRequest) -> dict:
        adapter = pick(req.adapter)
        vectors = embed(adapter, req.texts, req.role)
        return {"adapter": adapter.name, "dim": int(vectors.shape[1]), "embeddings": vectors.tolist()}

    @app.get("/search")
    def search(q: str = Query(min_length=1, max_length=MAX_CHARS), k: int = Query(10, ge=1, le=MAX_K),
               adapter: str | None = None) -> dict:
        started = time.perf_counter()
        chosen = pick(adapter)
        if chosen.index is None:
            raise HTTPException(404, f"adapter '{chosen.name}' was added without an index; only /embed serves it")
        hits = chosen.index.search(embed(chosen, [q], "query"), k)[0]
        return {"query": q, "k": k, "adapter": chosen.name, "results": hits,
                "milliseconds": round(1000 * (time.perf_counter() - started), 2)}

    return app


def run(cfg: Config) -> None:
    import uvicorn

    dirs = discover(cfg)
    app = create_app(dirs, reports_dir=Path(cfg.paths.reports), exports_root=Path(cfg.paths.exports),
                     window_ms=cfg.serve.batch_ms)
    log.info("serve: %d adapters on one base on http://%s:%d (GET /adapters)", len(dirs), HOST, cfg.serve.port)
    uvicorn.run(app, host=HOST, port=cfg.serve.port, log_level="info")
