"""Batch order for training: seeded, optionally grouped by length, resumable by step.

Length grouping sorts pairs by length inside windows of ``window_batches`` batches and then shuffles
the batches, so each batch pads to a similar length while the negatives a pair meets stay random
across the corpus (the window is wide: 50 batches). The order depends only on (seed, epoch), so a
resumed run replays it exactly and skips what it has done.
"""

from __future__ import annotations

import numpy as np


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  length_grouping: bool = True, window_batches: int = 50) -> list[np.ndarray]:
    """Indices of each batch of one epoch. Incomplete last batch is dropped when it is tiny (<2)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if length_grouping:
        window = batch_size * window_batches
        chunks = []
        for start in range(0, len(order), window):
            part = order[start:start + window]
            chunks.append(part[np.argsort(lengths[part], kind="stable")])
        order = np.concatenate(chunks) if chunks else order
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches = [b for b in batches if len(b) >= 2]
    if length_grouping:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
