"""TSDAE as a pre-step of the corpus objective (``train.pre_step: tsdae``; Wang et al. 2021).

The adapter (or the full model) first learns, on sentences of the training texts, to let a decoder rebuild a
sentence from the embedding of a damaged copy; the contrastive steps on the pseudo pairs then start from there.
The loss is sentence-transformers' ``DenoisingAutoEncoderLoss``; its decoder is a copy of the base model loaded as a
causal LM with cross-attention, not tied to the encoder (tying replaces the encoder's weights, which LoRA wraps) and
dropped afterwards. The damage is our own: ``deletion`` of the whitespace-separated words are dropped, at least one
kept; the example in sentence-transformers' documentation uses nltk's tokenizer, whose data is a download.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.contracts.prepared_data import is_retrieval, load_corpus, load_split
from pipeline.core.config import TsdaeConfig

log = logging.getLogger(__name__)
MIN_WORDS = 4


def sentences(folder, prep: dict, cap: int, seed: int) -> list[str]:
    """Up to ``cap`` sentences (of at least 4 words) of the texts the corpus objective trains on, seeded: a retrieval
    set's documents, or a labelled corpus's train split."""
    from pipeline.search.ir import sentences as split

    if is_retrieval(prep):
        corpus = load_corpus(folder)
        texts = (corpus["title"].fillna("") + ". " + corpus["text"].fillna("")).tolist()
    else:
        texts = load_split(folder, "train")["text"].tolist()
    found = [s.strip() for t in texts for s in split(t) if len(s.split()) >= MIN_WORDS]
    rng = np.random.default_rng(seed + 17)
    return [found[i] for i in rng.permutation(len(found))[:cap]]


def damage(text: str, deletion: float, rng: np.random.Generator) -> str:
    """``text`` with each word deleted with probability ``deletion`` (at least one word kept)."""
    words = text.split()
    kept = [w for w in words if rng.random() >= deletion]
    return " ".join(kept) if kept else words[int(rng.integers(len(words)))]


def run(st_model, texts: list[str], t: TsdaeConfig, base_path: str, device, seed: int) -> dict:
    """``t.steps`` optimiser steps of the denoising loss on ``texts``; returns what the train manifest records."""
    from sentence_transformers.sentence_transformer.losses import DenoisingAutoEncoderLoss

    if not texts:
        log.warning("train: tsdae: no sentence of %d words or more in the training texts; pre-step skipped", MIN_WORDS)
        return {"steps": 0, "sentences": 0}
    loss_fn = DenoisingAutoEncoderLoss(st_model, decoder_name_or_path=base_path, tie_encoder_decoder=False).to(device)
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr)
    rng = np.random.default_rng(seed + 19)
    tok = st_model[0].tokenizer
    losses, started = [], time.perf_counter()
    st_model.train()
    for step in tqdm(range(t.steps), desc="tsdae", unit="step", file=sys.stderr, mininterval=30):
        batch = [texts[i] for i in rng.integers(0, len(texts), t.batch_size)]
        src = tok([damage(x, t.deletion, rng) for x in batch], truncation=True, max_length=t.max_seq_length,
                  padding=True, return_tensors="pt")
        tgt = tok(batch, truncation=True, max_length=t.max_seq_length, padding=True, return_tensors="pt")
        loss = loss_fn([{k: v.to(device) for k, v in src.items()}, {k: v.to(device) for k, v in tgt.items()}], None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.item()))
    del loss_fn, optimizer
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    log.info("train: tsdae pre-step, %d steps on %d sentences, loss %.3f -> %.3f", t.steps, len(texts), first, last)
    return {"steps": t.steps, "sentences": len(texts), "loss_first": round(first, 4), "loss_last": round(last, 4),
            "seconds": round(time.perf_counter() - started, 1), "settings": t.model_dump()}

