"""The label head trained with the encoder: a cosine classifier over the pooled, normalised embedding.

Why a cosine head (scaled cosine to one learnt prototype per label) rather than a free linear layer: its
cross-entropy pulls each text towards its label's prototype on the unit sphere, the geometry that kNN,
logistic regression and retrieval read from the same embeddings, so the encoder is trained for the labels
without learning a second, head-only geometry; and the head applies to any exported form's normalised
vectors unchanged (pipeline/contracts/label_head.py). Prototypes start at the base model's class centroids
(weight imprinting, Qi et al. 2018), so the first steps already classify as a nearest-centroid head and the
encoder is not pushed by a random head.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.contracts import label_head as contract
from pipeline.model import prompts
from pipeline.model import tokens as encoding

CENTROID_TEXTS = 5000  # train texts embedded to place the prototypes (a stratified, seeded sample)


class CosineHead(torch.nn.Module):
    def __init__(self, prototypes: np.ndarray, labels: list[str], scale: float):
        super().__init__()
        self.labels = list(labels)
        self.scale = float(scale)
        self.weight = torch.nn.Parameter(torch.as_tensor(np.asarray(prototypes, dtype=np.float32)).clone())

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(n, labels) logits of (n, dim) embeddings."""
        return self.scale * F.normalize(embeddings.float(), dim=-1) @ F.normalize(self.weight, dim=-1).T

    def to_contract(self) -> contract.LabelHead:
        return contract.make(self.labels, self.weight.detach().cpu().numpy(), self.scale)


def stratified(train: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """At most about ``cap`` labelled rows with every label's share kept and every label present."""
    train = train[train["label"].notna()]
    if len(train) <= cap:
        return train
    rng = np.random.default_rng(seed)
    frac = cap / len(train)
    return pd.concat([g.iloc[rng.permutation(len(g))[: max(1, int(round(frac * len(g))))]]
                      for _, g in train.groupby("label")])


def centroids(st_model, train: pd.DataFrame, label_names: list[str], used: prompts.Prompts, max_seq_length: int,
              device, seed: int) -> np.ndarray:
    """(labels, dim) normalised mean embedding of each label's train texts (document form) under ``st_model``."""
    sample = stratified(train, CENTROID_TEXTS, seed)
    ids = encoding.tokenize(st_model, used.apply(sample["text"].tolist(), contract.ROLE), max_seq_length)
    emb = encoding.encode_ids(st_model, ids, device=device)
    where = {name: i for i, name in enumerate(label_names)}
    rows = np.array([where[x] for x in sample["label"]])
    sums = np.zeros((len(label_names), emb.shape[1]), dtype=np.float64)
    np.add.at(sums, rows, emb)
    missing = np.flatnonzero(np.bincount(rows, minlength=len(label_names)) == 0)
    if len(missing):  # a label absent from train (only possible with labels outside train): a random start
        sums[missing] = np.random.default_rng(seed).standard_normal((len(missing), emb.shape[1]))
    return (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32)


def classes_of(labels: pd.Series, label_names: list[str]) -> np.ndarray:
    """Index of each label in ``label_names`` (-1 for a missing or unknown label)."""
    where = {name: i for i, name in enumerate(label_names)}
    return np.array([where.get(x, -1) if isinstance(x, str) else -1 for x in labels], dtype=np.int64)


def head_loss(head: CosineHead, embeddings: list[torch.Tensor], classes: list[np.ndarray]) -> torch.Tensor | None:
    """Mean cross-entropy of the head over the rows of ``embeddings`` whose class is known (>= 0); None if none."""
    rows, targets = [], []
    for emb, cls in zip(embeddings, classes):
        keep = np.flatnonzero(cls >= 0)
        if len(keep):
            rows.append(emb[torch.as_tensor(keep, device=emb.device)])
            targets.append(torch.as_tensor(cls[keep], device=emb.device))
    if not rows:
        return None
    return F.cross_entropy(head(torch.cat(rows)), torch.cat(targets))
