"""CPU speed lever for the training loop, kept because `make bench` measured it to help
(reports/examples/bench/, part "profile").

Profiling the train step on the CPU put a large share of it in ``aten::bernoulli_``: torch draws every
dropout mask one float per element from a serial generator (the embeddings' and each layer's dropout,
and PEFT's LoRA dropout when ``train.lora.dropout`` is above 0). :class:`FastDropout` draws the same
Bernoulli(1 - p) keep-mask from 16-bit slices of 64-bit random words (four masks per draw; p is exact to
1/65536) and scales by 1 / (1 - p) like ``nn.Dropout``. It uses torch's default generator, so seeds and
checkpointed RNG state still make runs repeatable. Attention-probability dropout happens inside SDPA
and is unchanged. A dropout of 0 (the LoRA default) costs nothing either way.

Tried and dropped (no measurable gain, see the bench report): glibc ``mallopt`` to keep freed
activation buffers mapped.
"""

from __future__ import annotations

import torch


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of ``x`` (any shape) with drop probability ``p``; same distribution as F.dropout."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), 2**63 - 1)
    draws = words.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
    keep = draws >= (round(p * 65536) - 32768)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


class FastDropout(torch.nn.Module):
    """Drop-in for ``nn.Dropout`` (keeps ``.p``, which attention code reads) with cheaper CPU masks."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return fast_dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Replace every ``nn.Dropout`` with p > 0 below ``model`` by :class:`FastDropout`; returns how many.

    Only worth it on the CPU: CUDA dropout draws its masks in parallel already.
    """
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout and child.p > 0:
                fast = FastDropout(child.p)
                fast.train(child.training)  # a new module starts in training mode whatever its parent is in
                setattr(module, name, fast)
                swapped += 1
    return swapped


def for_training(st_model, device: torch.device) -> dict:
    """Apply the CPU levers to a model about to train; returns what was applied (for the run's manifest)."""
    if device.type != "cpu":
        return {}
    return {"fast_dropout_layers": use_fast_dropout(st_model)}
