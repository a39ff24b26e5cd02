"""embed: every prepared text file, with the trained encoder and with the untrained base model.

Reads the prepared data (its manifest lists the text files) and ``runs/<run>/model/``. Writes
``<stem>.npy`` float32 (n, dim) L2-normalised rows, in file order, plus ``labels.npy`` (label names,
for zero-shot classification) and ``manifest.json``. The base model's embeddings are cached under
``cache/embeddings/<base weights>-<data>-<max len>/`` and shared by every run on the same data.

A LoRA model is merged in memory before encoding (faster), but only after the merged and unmerged
model agree on a probe sample; a merge that silently changed nothing, or changed too much, stops here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import encoding, prompts
from pipeline.artifacts import (MANIFEST, Layout, atomic_dir, clean_stale, digest, is_up_to_date, make_manifest,
                                read_json, require_manifest, write_json_atomic)
from pipeline.config import Config
from pipeline.identity import base_embeddings_key
from pipeline.prepared import load_labels, text_files
from pipeline.model import (check_base_matches, load_base, load_trained, merge_checked, pick_device, pick_dtype,
                            read_model_info)

log = logging.getLogger(__name__)


def label_texts(cfg: Config, processed: Path) -> list[str]:
    return [cfg.pairs.label_template.format(label=l) for l in load_labels(processed)]


def _embed_all(st_model, cfg: Config, processed: Path, files: list[str], out: Path, device, dtype,
               max_seq_length: int, who: str, used: prompts.Prompts) -> dict:
    """Each file in its role (pipeline/prompts.py); val/test also as queries when the two forms differ."""
    timings = {}
    n_total, started = 0, time.perf_counter()

    def encode(texts, role, what):
        return encoding.encode_texts(st_model, used.apply(texts, role), max_seq_length=max_seq_length,
                                     batch_size=cfg.eval.batch_size, device=device, dtype=dtype,
                                     progress=f"embed {who} {what}")

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
        np.save(out / "labels.npy", encoding.encode_texts(st_model, used.apply(labels, "document"),
                                                          max_seq_length=max_seq_length, device=device, dtype=dtype))
    seconds = time.perf_counter() - started
    timings.update({"texts": n_total, "seconds": round(seconds, 2),
                    "texts_per_second": round(n_total / seconds, 1) if seconds else None})
    return timings


def ensure_base_embeddings(cfg: Config, layout: Layout, prep: dict, device, dtype, max_seq_length: int) -> Path:
    # Keyed on the texts, not on the whole prepared data: changing only the training pairs (e.g. mined
    # hard negatives) must not re-embed every text with the unchanged base model.
    key = base_embeddings_key(cfg, prep.get("texts_fingerprint", prep.get("splits_fingerprint", prep["fingerprint"])),
                         max_seq_length)
    out = layout.base_embeddings(key)
    if is_up_to_date(out, key):
        return out
    st_model = load_base(cfg.model, device=device, max_seq_length=max_seq_length)
    with atomic_dir(out) as tmp:
        timing = _embed_all(st_model, cfg, layout.processed, text_files(prep), tmp, device, dtype,
                            max_seq_length, "base", prompts.for_run(cfg, st_model))
        write_json_atomic(tmp / MANIFEST, make_manifest("embed-base", cfg, fingerprint=key,
                                                        inputs={"prepared_splits": prep.get(
                                                            "splits_fingerprint", prep["fingerprint"])},
                                                        extra={"timing": timing}))
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
    fp = digest([train_manifest["fingerprint"], prep["fingerprint"], cfg.pairs.label_template])
    if not force and is_up_to_date(out, fp):
        log.info("embed: %s is up to date", out)
        return out
    torch.set_num_threads(cfg.train.num_threads or torch.get_num_threads())
    device = pick_device(cfg.train.device)
    dtype = pick_dtype(cfg.train.precision, device)
    max_len = info.get("max_seq_length") or cfg.train.max_seq_length
    base_dir = ensure_base_embeddings(cfg, layout, prep, device, dtype, max_len)
    extra: dict = {"base_dir": str(base_dir), "mlflow_run_id": train_manifest.get("mlflow_run_id")}
    with atomic_dir(out) as tmp:
        if info["method"] == "base":
            extra["adapted_dir"] = str(base_dir)
            extra["timing"] = read_json(base_dir / MANIFEST)["timing"]
        else:
            st_model = load_trained(model_dir, device=device, expected_base=cfg.model.base)
            if info["method"] == "lora":
                sample = pd.read_json(layout.processed / text_files(prep)[0], lines=True, dtype={"text": str})
                probe = encoding.tokenize(st_model, sample["text"].head(64).tolist(), max_len)
                extra["merge_min_cosine"] = merge_checked(st_model, probe, device)
            extra["adapted_dir"] = str(out)
            extra["timing"] = _embed_all(st_model, cfg, layout.processed, text_files(prep), tmp, device, dtype,
                                         max_len, info["method"], prompts.of_record(info.get("prompts")))
        write_json_atomic(tmp / MANIFEST, make_manifest(
            "embed", cfg, fingerprint=fp, inputs={"prepared_data": prep["fingerprint"],
                                                  "model": train_manifest["fingerprint"]}, extra=extra))
    log.info("embed: %s (%s texts/s)", out, extra["timing"].get("texts_per_second"))
    return out
