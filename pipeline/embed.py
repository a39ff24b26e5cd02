"""embed: every prepared text file, with the trained encoder and with the untrained base model.

Reads the prepared data (its manifest lists the text files) and ``runs/<run>/model/``. Writes
``<stem>.npy`` float32 (n, dim) L2-normalised rows, in file order, plus ``labels.npy`` (label names,
for zero-shot classification) and ``manifest.json``. The base model's embeddings are cached under
``cache/embeddings/<base weights>-<data>-<max len>/`` and shared by every run on the same data.

A LoRA model is merged in memory before encoding (faster), but only after the merged and unmerged
model agree on a probe sample; a merge that silently changed nothing, or changed too much, stops here.
The texts are then encoded with the form ``embed.backend`` selects (pipeline/backends.py: the fastest
that matches PyTorch fp32 on a probe sample); the choice, its gate and timings go in ``manifest.json``
under ``backend``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import backends, encoding, prompts
from pipeline.artifacts import (MANIFEST, Layout, atomic_dir, clean_stale, is_up_to_date, make_manifest,
                                read_json, require_manifest, write_json_atomic)
from pipeline.config import Config
from pipeline.errors import TrainingError
from pipeline.model import (base_fingerprint, check_base_matches, inner_model, load_encoder, load_trained,
                            pick_device, read_model_info, resolve_base, set_inner_model)

log = logging.getLogger(__name__)
MERGE_MIN_COSINE = 0.9999


def text_files(prep_manifest: dict) -> list[str]:
    return prep_manifest.get("text_files", ["train.jsonl", "val.jsonl", "test.jsonl"])


def label_texts(cfg: Config, processed: Path) -> list[str]:
    path = processed / "labels.json"
    labels = read_json(path) if path.exists() else []
    return [cfg.pairs.label_template.format(label=l) for l in labels]


def select_backend(cfg: Config, st_model, processed: Path, files: list[str], device, max_seq_length: int,
                   used: prompts.Prompts):
    """(encoder, record) from pipeline/backends.py, gated on a seeded sample of the first text file."""
    texts = pd.read_json(processed / files[0], lines=True, dtype={"text": str})["text"]
    probe = texts.sample(min(len(texts), cfg.embed.probe_texts), random_state=cfg.seed).tolist()
    return backends.select(cfg, st_model, used.apply(probe, "document"), device=device,
                           max_seq_length=max_seq_length, batch_size=cfg.eval.batch_size)


def _embed_all(encoder, cfg: Config, processed: Path, files: list[str], out: Path, who: str,
               used: prompts.Prompts) -> dict:
    """Each file in its role (pipeline/prompts.py); val/test also as queries when the two forms differ."""
    timings = {}
    n_total, started = 0, time.perf_counter()

    def encode(texts, role, what):
        log.info("embed %s %s: %d texts (%s)", who, what, len(texts), encoder.name)
        return encoder.encode(used.apply(texts, role))

    for name in files:
        texts = pd.read_json(processed / name, lines=True, dtype={"text": str})["text"].tolist()
        np.save(out / f"{Path(name).stem}.npy", encode(texts, prompts.role_of_file(name), name))
        n_total += len(texts)
        copy = prompts.query_copy_name(name)
        if copy and used.differ:
            np.save(out / copy, encode(texts, "query", f"{name} as queries"))
            n_total += len(texts)
    labels = label_texts(cfg, processed)
    if labels:
        np.save(out / "labels.npy", encoder.encode(used.apply(labels, "document")))
    seconds = time.perf_counter() - started
    timings.update({"texts": n_total, "seconds": round(seconds, 2),
                    "texts_per_second": round(n_total / seconds, 1) if seconds else None})
    return timings


def merge_checked(st_model, probe_ids, device) -> float:
    """Merge LoRA into the weights in place; returns the min cosine merged-vs-adapter on the probe."""
    before = encoding.encode_ids(st_model, probe_ids, device=device)
    merged = inner_model(st_model).merge_and_unload()
    set_inner_model(st_model, merged)
    after = encoding.encode_ids(st_model, probe_ids, device=device)
    cos = float(np.min(np.sum(before * after, axis=1)))
    if cos < MERGE_MIN_COSINE:
        raise TrainingError(f"merging the adapter changed the embeddings (min cosine {cos:.6f} < "
                            f"{MERGE_MIN_COSINE}); refusing to embed with a broken merge")
    return cos


def base_cache_key(cfg: Config, prep_fp: str, max_seq_length: int) -> str:
    fp = base_fingerprint(resolve_base(cfg.model.base))
    key = f"{fp}-{prep_fp}-{max_seq_length}-{cfg.pairs.label_template}"
    used = prompts.for_run(cfg)
    if used.any:  # without prompts the key is what it was before they existed, so old caches stay valid
        key += json.dumps(used.record(), sort_keys=True)
    key += backend_key(cfg)
    tail = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{fp}-{prep_fp}-{max_seq_length}-{tail}"


def backend_key(cfg: Config) -> str:
    """What of ``embed`` can change the vectors: a backend change must not be served stale embeddings."""
    e = cfg.embed
    return f"|backend={e.backend}|gate={e.gate_min_cos}|fusion={e.onnx_fusion}"


def ensure_base_embeddings(cfg: Config, layout: Layout, prep: dict, device, max_seq_length: int) -> Path:
    # Keyed on the texts, not on the whole prepared data: changing only the training pairs (e.g. mined
    # hard negatives) must not re-embed every text with the unchanged base model.
    key = base_cache_key(cfg, prep.get("texts_fingerprint", prep.get("splits_fingerprint", prep["fingerprint"])),
                         max_seq_length)
    out = layout.base_embeddings(key)
    if is_up_to_date(out, key):
        return out
    st_model = load_encoder(cfg.model.base, device=device, revision=cfg.model.revision,
                            trust_remote_code=cfg.model.trust_remote_code, max_seq_length=max_seq_length)
    used = prompts.for_run(cfg, st_model)
    encoder, backend = select_backend(cfg, st_model, layout.processed, text_files(prep), device, max_seq_length, used)
    with atomic_dir(out) as tmp:
        timing = _embed_all(encoder, cfg, layout.processed, text_files(prep), tmp, "base", used)
        write_json_atomic(tmp / MANIFEST, make_manifest("embed-base", cfg, fingerprint=key,
                                                        inputs={"prepared_splits": prep.get(
                                                            "splits_fingerprint", prep["fingerprint"])},
                                                        extra={"timing": timing, "backend": backend}))
    return out


def run(cfg: Config, *, force: bool = False) -> Path:
    layout = Layout(cfg)
    prep = require_manifest(layout.processed, "prepared data", "run `make data` first")
    model_dir = layout.model_dir()
    train_manifest = require_manifest(model_dir, f"trained model for run '{cfg.resolved_run_name}'",
                                      "run `make train` with the same CONFIG/ARGS first")
    info = read_model_info(model_dir)
    # Before anything is written (the base-embedding cache included): the run must belong to model.base.
    check_base_matches(model_dir, info, cfg.model.base)
    out = layout.embeddings()
    clean_stale(layout.run(), layout.base_embeddings("-").parent)
    fp = hashlib.sha256(json.dumps([train_manifest["fingerprint"], prep["fingerprint"],
                                    cfg.pairs.label_template, backend_key(cfg)]).encode()).hexdigest()[:16]
    if not force and is_up_to_date(out, fp):
        log.info("embed: %s is up to date", out)
        return out
    torch.set_num_threads(cfg.train.num_threads or torch.get_num_threads())
    device = pick_device(cfg.train.device)
    max_len = info.get("max_seq_length") or cfg.train.max_seq_length
    base_dir = ensure_base_embeddings(cfg, layout, prep, device, max_len)
    extra: dict = {"base_dir": str(base_dir), "mlflow_run_id": train_manifest.get("mlflow_run_id")}
    with atomic_dir(out) as tmp:
        if info["method"] == "base":
            extra["adapted_dir"] = str(base_dir)
            extra["timing"] = read_json(base_dir / MANIFEST)["timing"]
            extra["backend"] = read_json(base_dir / MANIFEST).get("backend")
        else:
            st_model = load_trained(model_dir, device=device, expected_base=cfg.model.base)
            if info["method"] == "lora":
                sample = pd.read_json(layout.processed / text_files(prep)[0], lines=True, dtype={"text": str})
                probe = encoding.tokenize(st_model, sample["text"].head(64).tolist(), max_len)
                extra["merge_min_cosine"] = merge_checked(st_model, probe, device)
            extra["adapted_dir"] = str(out)
            used = prompts.of_record(info.get("prompts"))
            encoder, extra["backend"] = select_backend(cfg, st_model, layout.processed, text_files(prep), device,
                                                       max_len, used)
            extra["timing"] = _embed_all(encoder, cfg, layout.processed, text_files(prep), tmp, info["method"], used)
        write_json_atomic(tmp / MANIFEST, make_manifest(
            "embed", cfg, fingerprint=fp, inputs={"prepared_data": prep["fingerprint"],
                                                  "model": train_manifest["fingerprint"]}, extra=extra))
    log.info("embed: %s (%s texts/s, %s)", out, extra["timing"].get("texts_per_second"),
             (extra.get("backend") or {}).get("name"))
    return out
