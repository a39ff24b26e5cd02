"""embed: every prepared text file, with the trained encoder and with the untrained base model.

Reads the prepared data (its manifest lists the text files) and ``runs/<run>/model/``. Writes
``<stem>.npy`` float32 (n, dim) L2-normalised rows, in file order, plus ``labels.npy`` (label names,
for zero-shot classification) and ``manifest.json``. The base model's embeddings are cached under
``cache/embeddings/<base weights>-<data>-<max len>/`` and shared by every run on the same data.

A LoRA model is merged in memory before encoding (faster), but only after the merged and unmerged
model agree on a probe sample; a merge that silently changed nothing, or changed too much, stops here.
The texts are then encoded with the form ``embed.backend`` selects (pipeline/model/backends.py: the fastest
that matches PyTorch fp32 on a probe sample); the choice, its gate and timings go in ``manifest.json``
under ``backend``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

from pipeline.model import backends
from pipeline.model import tokens as encoding
from pipeline.model import prompts
from pipeline.core.artifacts import (MANIFEST, Layout, atomic_dir, clean_stale, digest, is_up_to_date, make_manifest,
                                read_json, require_manifest, write_json_atomic)
from pipeline.core.config import Config
from pipeline.contracts.identity import backend_key, base_embeddings_key
from pipeline.model.encoder import check_base_matches, load_base, load_trained, merge_checked, pick_device, read_model_info
from pipeline.contracts.prepared_data import load_labels, text_files

log = logging.getLogger(__name__)


def label_texts(cfg: Config, processed: Path) -> list[str]:
    return [cfg.pairs.label_template.format(label=l) for l in load_labels(processed)]


def ensure_base_embeddings(cfg: Config, layout: Layout, prep: dict, device, max_seq_length: int) -> Path:
    # Keyed on the texts, not on the whole prepared data: changing only the training pairs (e.g. mined
    # hard negatives) must not re-embed every text with the unchanged base model.
    key = base_embeddings_key(cfg, prep.get("texts_fingerprint", prep.get("splits_fingerprint", prep["fingerprint"])),
                         max_seq_length)
    out = layout.base_embeddings(key)
    if is_up_to_date(out, key):
        return out
    st_model = load_base(cfg.model, device=device, max_seq_length=max_seq_length)
    used = prompts.for_run(cfg, st_model)
    files, labels = text_files(prep), label_texts(cfg, layout.processed)
    encoder, backend = backends.select_for_files(cfg, st_model, layout.processed, files, max_seq_length, used,
                                                 backends.texts_to_embed(layout.processed, files, labels, used))
    with atomic_dir(out) as tmp:
        timing = backends.embed_files(encoder, layout.processed, files, labels, tmp, used, "embed base")
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
    fp = digest([train_manifest["fingerprint"], prep["fingerprint"], cfg.pairs.label_template, backend_key(cfg)])
    if not force and is_up_to_date(out, fp):
        log.info("embed: %s is up to date", out)
        return out
    torch.set_num_threads(cfg.runtime.num_threads or torch.get_num_threads())
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
            files, labels = text_files(prep), label_texts(cfg, layout.processed)
            encoder, extra["backend"] = backends.select_for_files(
                cfg, st_model, layout.processed, files, max_len, used,
                backends.texts_to_embed(layout.processed, files, labels, used))
            extra["timing"] = backends.embed_files(encoder, layout.processed, files, labels, tmp, used,
                                                   f"embed {info['method']}")
        write_json_atomic(tmp / MANIFEST, make_manifest(
            "embed", cfg, fingerprint=fp, inputs={"prepared_data": prep["fingerprint"],
                                                  "model": train_manifest["fingerprint"]}, extra=extra))
    log.info("embed: %s (%s texts/s, %s)", out, extra["timing"].get("texts_per_second"),
             (extra.get("backend") or {}).get("name"))
    return out
