"""serve: a small HTTP service over one export, bound to 127.0.0.1 only.

``GET /health``, ``POST /embed`` ({"texts": [...]} -> normalised vectors) and
``GET /search?q=...&k=...`` (the k nearest corpus records with cosine scores). Queries are embedded with
the ONNX form by default (onnxruntime + tokenizers, no torch on the request path) or the form named by
``serve.form``; every form was proven equal to the merged model by the export gate, so queries
and index vectors agree whichever form embeds them. ``/search`` embeds ``q`` with the model's query prompt,
``/embed`` with its document prompt unless the request says ``"role": "query"`` (pipeline/model/prompts.py).
``POST /classify`` ({"texts": [...], "k": 1}) answers where the export has a label head (a run that trained one,
pipeline/contracts/label_head.py): each text's most probable labels, read from the same form's document-form
embedding; export gated the head on that form. Run it with ``make serve`` (port ``SERVE_PORT``) or
``python -m pipeline serve --run NAME``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from pipeline.core.artifacts import Layout, require_manifest
from pipeline.core.config import Config

log = logging.getLogger(__name__)
HOST = "127.0.0.1"  # a demo service without authentication: never listen beyond this machine
MAX_TEXTS = 256
MAX_CHARS = 10_000
MAX_K = 100


# At module level: FastAPI resolves the (postponed) annotation of a request body by name from here.
class EmbedRequest(BaseModel):
    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS)
    # which prompt the export's model gets (pipeline/model/prompts.py): search queries are "query"
    role: Literal["query", "document"] = "document"


class ClassifyRequest(BaseModel):
    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS)
    k: int = Field(1, ge=1, le=MAX_K)  # labels returned per text, most probable first


def create_app(export_dir: Path, form: str = "onnx"):
    """A FastAPI app over ``export_dir``; loads the encoder and index once, at creation."""
    from fastapi import FastAPI, HTTPException, Query

    from pipeline.contracts import label_head
    from pipeline.contracts.export_search import ExportSearch

    export = ExportSearch(export_dir, form)
    if export.form != form:
        log.warning("serve: export %s has no %s form; serving the merged model", export_dir, form)
    manifest, form, index = export.manifest, export.form, export.index
    head = label_head.load(Path(export_dir) / "head")  # None: the run trained no label head
    # onnxruntime sessions and torch modules are not documented as safe for concurrent calls; FastAPI
    # runs sync endpoints in a thread pool, so requests take turns on the encoder.
    lock = threading.Lock()

    app = FastAPI(title=f"embedding search: {manifest['run_name']}",
                  description="Embeddings and nearest-neighbour search over an exported, gate-checked encoder.")

    def check(texts: list[str]) -> None:
        if any(len(t) > MAX_CHARS for t in texts):
            raise HTTPException(413, f"each text must have at most {MAX_CHARS} characters")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "run": manifest["run_name"], "form": form, "dim": int(index.meta["dim"]),
                "index": {"type": index.meta["type"], "items": int(index.meta["n"]), "corpus": index.meta["corpus"]},
                "gate": {k: manifest["gate"].get(k) for k in ("merged_vs_reference_min_cos", "onnx_vs_torch_min_cos")},
                "label_head": {"labels": len(head.labels)} if head is not None else None}

    @app.post("/embed")
    def embed_endpoint(req: EmbedRequest) -> dict:
        check(req.texts)
        with lock:
            vectors = export.encode(req.texts, req.role)
        return {"form": form, "role": req.role, "dim": int(vectors.shape[1]), "embeddings": vectors.tolist()}

    @app.post("/classify")
    def classify(req: ClassifyRequest) -> dict:
        if head is None:
            raise HTTPException(404, f"export {manifest['run_name']} has no label head: the run trained none "
                                     "(train.label_loss_weight > 0 trains one)")
        check(req.texts)
        with lock:
            vectors = export.encode(req.texts, label_head.ROLE)
        top = head.top(vectors, req.k)
        return {"form": form, "labels": [t[0]["label"] for t in top], "results": top}

    @app.get("/search")
    def search(q: str = Query(min_length=1, max_length=MAX_CHARS), k: int = Query(10, ge=1, le=MAX_K),
               mode: str | None = Query(None)) -> dict:
        started = time.perf_counter()
        mode = mode or export.default_mode
        if mode not in export.modes:
            if export.documents is None:
                raise HTTPException(400, "this export has no lexical index (only a retrieval set's export has one)")
            raise HTTPException(422, f"mode must be one of {', '.join(export.modes)}")
        with lock:
            hits = export.search(q, k, mode)[0]
        return {"query": q, "k": k, "form": form, "mode": mode, "results": hits,
                "milliseconds": round(1000 * (time.perf_counter() - started), 2)}

    return app


def run(cfg: Config) -> None:
    import uvicorn

    if cfg.serve.adapters:  # one base, many adapters
        from pipeline.serve import adapters as adapters_serve

        return adapters_serve.run(cfg)

    export_dir = Layout(cfg).export()
    require_manifest(export_dir, f"export of run '{cfg.resolved_run_name}'",
                     "run `make export` (or pass --run NAME of an exported run)")
    app = create_app(export_dir, cfg.serve.form)
    log.info("serve: %s on http://%s:%d (try /search?q=...&k=5)", export_dir, HOST, cfg.serve.port)
    uvicorn.run(app, host=HOST, port=cfg.serve.port, log_level="info")
