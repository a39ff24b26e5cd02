"""Data-parallel training under ``torchrun --nproc_per_node=N``: the train stage runs unchanged.

Every process reads the same pairs and computes the same batch order (it depends only on seed and
epoch), so no data has to be sent around: each global batch of ``train.batch_size`` pairs is cut into
N contiguous shards, process r embeds shard r, and the embeddings are all-gathered so that every
anchor meets the whole global batch as in-batch negatives (what a single process with the same batch
would see).

Gradients. Each process computes the *full* loss of the global batch (the score matrix is tiny next
to the encoder), with its own shard's embeddings carrying gradient and the other shards' copies
detached. So process r's backward yields exactly the part of the full gradient that flows through
its own embeddings, and the SUM over processes is the single-process gradient. Why not DDP's
wrapper: DDP averages gradients, which would scale this sum by 1/N (and grad clipping with it), and
it would need the model wrapped and called through the wrapper; an all-reduce of the few trainable
tensors (LoRA) is one line and exact.

Only rank 0 writes artefacts (checkpoints, the model folder) and logs to MLflow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard_sizes(self, n: int) -> list[int]:
        """Sizes of the N contiguous shards of a batch of n (np.array_split: they differ by <= 1)."""
        return [len(part) for part in np.array_split(np.arange(n), self.world)]

    def shard(self, idx: np.ndarray) -> np.ndarray:
        """This process's contiguous part of a global batch; concatenating all parts in rank order
        gives ``idx`` back."""
        return np.array_split(np.asarray(idx), self.world)[self.rank]

    def gather(self, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """All-gather (n_r, dim) rows from every rank into (sum n_r, dim), in rank order.

        ``sizes`` are every rank's row counts (known to all, see :meth:`shard_sizes`). The local rows
        keep their autograd graph; the other ranks' rows are detached copies.
        """
        import torch.distributed as td

        longest = max(sizes)
        dim = local.shape[1]
        padded = torch.zeros((longest, dim), dtype=torch.float32, device=local.device)
        padded[: len(local)] = local.detach().float()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        td.all_gather(parts, padded)
        parts = [p[:n] for p, n in zip(parts, sizes)]
        parts[self.rank] = local.float()
        return torch.cat(parts, dim=0)

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum gradients over ranks in one flat buffer (a rank without a gradient contributes zeros)."""
        import torch.distributed as td

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        td.all_reduce(flat, op=td.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n

    def broadcast_params(self, params: list[torch.nn.Parameter]) -> None:
        """Make every rank start from rank 0's weights (LoRA's random init, a resumed checkpoint)."""
        import torch.distributed as td

        with torch.no_grad():
            for p in params:
                td.broadcast(p.data, src=0)

    def barrier(self) -> None:
        import torch.distributed as td

        td.barrier()

    def close(self) -> None:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device_pref: str = "auto") -> Dist | None:
    """Join the process group that torchrun describes in the environment; None for a plain run.

    Backend: NCCL when training on CUDA (each process on GPU ``LOCAL_RANK``), gloo on CPU.
    """
    if world_size() <= 1:
        return None
    import torch.distributed as td

    from pipeline.model.encoder import pick_device

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=td.get_world_size(), local_rank=local_rank)


def default_threads() -> int:
    """CPU threads per process: the cores shared among the processes on this node."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // max(per_node, 1))
