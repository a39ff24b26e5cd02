"""Tokenise once, pad only to each batch's longest text, run the encoder: the fast path shared by
train and embed.

Why not ``SentenceTransformer.encode``: it re-tokenises every call and sorts only inside one call;
training needs the same padded features with gradients. Here texts are tokenised once into id lists,
batches are padded to their own maximum (padding side taken from the base tokenizer), and the
forward goes through the sentence-transformers modules so the base model's pooling is kept.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


def tokenize(st_model, texts: Sequence[str], max_seq_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_seq_length`` (special tokens included)."""
    tok = st_model[0].tokenizer
    out = tok(list(texts), truncation=True, max_length=max_seq_length, add_special_tokens=True,
              return_attention_mask=False, return_token_type_ids=False)
    return out["input_ids"]


def collate(ids: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch of id lists to its own longest member. Shapes: (batch, longest)."""
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, row in enumerate(ids):
        n = len(row)
        if padding_side == "left":
            input_ids[i, longest - n:] = torch.as_tensor(row)
            mask[i, longest - n:] = 1
        else:
            input_ids[i, :n] = torch.as_tensor(row)
            mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def pad_info(st_model) -> tuple[int, str]:
    tok = st_model[0].tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return pad, getattr(tok, "padding_side", "right") or "right"


def forward(st_model, features: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings (batch, dim) through every module of the sentence-transformers model."""
    return st_model(dict(features))["sentence_embedding"]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# On the CPU a batch is also capped at this many padded tokens, so its activations stay in cache. Measured
# on 2,000 PriceRunner titles (MiniLM, bf16, 2 cores, interleaved repeats): 1,055 texts/s against 798 with
# 256-row batches; budgets of 1024 and 4096 gave 1,006 and 942. `make bench` times it on/off ("levers off").
CPU_TOKEN_BUDGET = 2048


def _batch_bounds(sorted_lengths: Sequence[int], batch_size: int, token_budget: int | None) -> list[tuple[int, int]]:
    """(start, stop) of each batch over lengths sorted longest first: at most ``batch_size`` rows and,
    with a budget, at most ``token_budget`` padded tokens (the first row sets the batch's width)."""
    bounds, start, n = [], 0, len(sorted_lengths)
    while start < n:
        rows = batch_size
        if token_budget:
            rows = max(1, min(batch_size, token_budget // max(1, sorted_lengths[start])))
        bounds.append((start, min(n, start + rows)))
        start += rows
    return bounds


batch_bounds = _batch_bounds  # the public name: pipeline/model/backends.py batches ONNX runs the same way


@torch.inference_mode()
def encode_ids(st_model, ids: Sequence[Sequence[int]], *, batch_size: int = 256,
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               progress: str | None = None, normalize: bool = True) -> np.ndarray:
    """Embed pre-tokenised texts; returns float32 (n, dim), rows in the input order.

    Texts are processed longest first so each batch carries little padding; on the CPU a batch also
    holds at most ``CPU_TOKEN_BUDGET`` padded tokens.
    """
    device = torch.device(device)
    st_model.eval()
    pad, side = pad_info(st_model)
    order = np.argsort([-len(x) for x in ids], kind="stable")
    out: np.ndarray | None = None
    bounds = _batch_bounds([len(ids[i]) for i in order], batch_size,
                           CPU_TOKEN_BUDGET if device.type == "cpu" else None)
    bar = tqdm(bounds, desc=progress, unit="batch", disable=progress is None, leave=False,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    for start, stop in bar:
        idx = order[start:stop]
        feats = {k: v.to(device) for k, v in collate([ids[i] for i in idx], pad, side).items()}
        with autocast(device, dtype):
            emb = forward(st_model, feats)
        emb = emb.float()
        if normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        emb = emb.cpu().numpy()
        if out is None:
            out = np.empty((len(ids), emb.shape[1]), dtype=np.float32)
        out[idx] = emb
    if out is None:
        dim = st_model.get_embedding_dimension() or 0
        return np.zeros((0, dim), dtype=np.float32)
    return out


def encode_texts(st_model, texts: Sequence[str], *, max_seq_length: int = 64, **kw) -> np.ndarray:
    return encode_ids(st_model, tokenize(st_model, texts, max_seq_length), **kw)
