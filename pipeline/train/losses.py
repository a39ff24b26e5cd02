"""In-batch-negatives contrastive loss with a false-negative mask.

Why our own instead of sentence-transformers' MultipleNegativesRankingLoss: MNRL treats every other
positive in the batch as a negative. With product titles that is wrong in three ways (field note 10):
two pairs of the same product cluster, two texts that are the same string, and a category-name
positive ("fridges") that is the right answer for every fridge in the batch. MNRL has no hook for
per-pair metadata, so the mask is built here from the pairs' group, label and kind and applied to the
score matrix before the softmax. With an all-False mask this is exactly MNRL (tested).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Tagged(NamedTuple):
    """Texts of a batch with what makes two of them the same thing: integer group and label codes (-1: none),
    text ids (equal strings, equal ids), and whether each is a label name."""

    groups: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    is_label: torch.Tensor


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
    return contrastive_loss_with_negatives(anchors, positives, None, scale=scale, mask=mask, symmetric=symmetric)


def hard_negative_mask(positives: Tagged, anchor_ids: torch.Tensor, negatives: Tagged,
                       mask_same_label: bool = False) -> torch.Tensor:
    """(B, N) bool: True where extra negative n must not count as a negative for anchor i.

    ``positives`` and ``anchor_ids`` describe the B pairs (a pair's group and label are its positive's),
    ``negatives`` the N extra negatives of the batch (every pair's mined negative is offered to every anchor,
    as MNRL does with a third column). Same rules as :func:`false_negative_mask`: same group, same text as the
    anchor or its positive, a label name that is the right answer for the anchor, and (optionally) same label.
    """
    groups, labels, neg_ids = positives.groups, positives.labels, negatives.ids
    same_group = (groups[:, None] == negatives.groups[None, :]) & (groups[:, None] >= 0)
    same_label = (labels[:, None] == negatives.labels[None, :]) & (labels[:, None] >= 0)
    same_text = (neg_ids[None, :] == positives.ids[:, None]) | (neg_ids[None, :] == anchor_ids[:, None])
    label_answer = negatives.is_label[None, :] & same_label
    mask = same_group | same_text | label_answer
    if mask_same_label:
        mask = mask | same_label
    return mask


def contrastive_loss_with_negatives(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None,
                                    *, scale: float = 20.0, mask: torch.Tensor | None = None,
                                    negative_mask: torch.Tensor | None = None,
                                    symmetric: bool = False) -> torch.Tensor:
    """:func:`in_batch_contrastive_loss` with extra candidates: anchor i is scored against all B
    positives and all N negatives of the batch, its target still positive i.

    anchors, positives: (B, dim); negatives: (N, dim) or None; mask: (B, B); negative_mask: (B, N).
    With no negatives this is exactly :func:`in_batch_contrastive_loss`. The symmetric term (positive ->
    anchors) does not use the negatives: they are candidates for anchors only.
    """
    a = F.normalize(anchors.float(), dim=-1)
    p = F.normalize(positives.float(), dim=-1)
    scores = a @ p.T * scale
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    if negatives is not None and len(negatives):
        n = F.normalize(negatives.float(), dim=-1)
        neg_scores = a @ n.T * scale
        if negative_mask is not None:
            neg_scores = neg_scores.masked_fill(negative_mask, float("-inf"))
        scores = torch.cat([scores, neg_scores], dim=1)
    target = torch.arange(len(a), device=a.device)
    loss = F.cross_entropy(scores, target)
    if symmetric:
        scores_t = (p @ a.T) * scale
        if mask is not None:
            scores_t = scores_t.masked_fill(mask.T, float("-inf"))
        loss = (loss + F.cross_entropy(scores_t, target)) / 2
    return loss
