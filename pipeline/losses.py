"""In-batch-negatives contrastive loss with a false-negative mask.

Why our own instead of sentence-transformers' MultipleNegativesRankingLoss: MNRL treats every other
positive in the batch as a negative. With product titles that is wrong in three ways (field note 10):
two pairs of the same product cluster, two texts that are the same string, and a category-name
positive ("fridges") that is the right answer for every fridge in the batch. MNRL has no hook for
per-pair metadata, so the mask is built here from the pairs' group, label and kind and applied to the
score matrix before the softmax. With an all-False mask this is exactly MNRL (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def false_negative_mask(groups: torch.Tensor, labels: torch.Tensor, positive_ids: torch.Tensor,
                        anchor_ids: torch.Tensor, positive_is_label: torch.Tensor,
                        mask_same_label: bool = False) -> torch.Tensor:
    """(B, B) bool: True where positive j must not count as a negative for anchor i (diagonal False).

    All inputs have shape (B,). ``groups``/``labels`` are integer codes, -1 meaning none.
    ``positive_ids``/``anchor_ids`` are text ids, so equal strings have equal ids.
    """
    same_group = (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
    same_label = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    same_text = positive_ids[:, None] == positive_ids[None, :]
    anchor_is_candidate = anchor_ids[:, None] == positive_ids[None, :]
    label_answer = positive_is_label[None, :] & same_label  # "fridges" is right for every fridge
    mask = same_group | same_text | anchor_is_candidate | label_answer
    if mask_same_label:
        mask = mask | same_label
    mask.fill_diagonal_(False)
    return mask


def in_batch_contrastive_loss(anchors: torch.Tensor, positives: torch.Tensor, *, scale: float = 20.0,
                              mask: torch.Tensor | None = None, symmetric: bool = False) -> torch.Tensor:
    """Cross-entropy over cosine similarities; anchor i's target is positive i.

    anchors, positives: (B, dim). mask: (B, B) bool from :func:`false_negative_mask`.
    """
    a = F.normalize(anchors.float(), dim=-1)
    p = F.normalize(positives.float(), dim=-1)
    scores = a @ p.T * scale
    target = torch.arange(len(a), device=a.device)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    loss = F.cross_entropy(scores, target)
    if symmetric:
        scores_t = (p @ a.T) * scale
        if mask is not None:
            scores_t = scores_t.masked_fill(mask.T, float("-inf"))
        loss = (loss + F.cross_entropy(scores_t, target)) / 2
    return loss
