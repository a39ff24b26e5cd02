"""CPU speed lever for the training loop, kept because `make bench` measured it to help
(reports/examples/bench/, part "profile").

Profiling the train step on the CPU put a large share of it in ``aten::bernoulli_``: torch draws every
dropout mask one float per element from a serial generator (the embeddings' and each layer's dropout,
and PEFT's LoRA dropout when ``train.lora.dropout`` is above 0). :class:`FastDropout` draws the same
Bernoulli(1 - p) keep-mask from 16-bit slices of 64-bit random words (four masks per draw; p is exact to
1/65536) and scales by 1 / (1 - p) like ``nn.Dropout``. It uses torch's default generator, so seeds and
checkpointed RNG state still make runs repeatable. A dropout of 0 (the LoRA default) costs nothing either way.

Attention dropout is the other serial draw. PyTorch's scaled_dot_product_attention has no CPU kernel that drops
attention probabilities, so a model in training mode with attention dropout above 0 takes SDPA's math fallback,
which on this CPU cost twice the model's own eager attention (the same softmax, the same dropout of the
probabilities, the same result in eval mode): :func:`eager_attention` switches to it for training where that was
measured to pay, from 128 tokens (reports/examples/bench/attention-dropout.md). Shorter texts keep SDPA, so runs
on titles keep their figures. Validation encodes in eval mode, where nothing is dropped and SDPA's fused kernel is
the faster one, so :func:`sdpa_for_inference` switches back for its duration.

Tried and dropped (no measurable gain, see the bench report): glibc ``mallopt`` to keep freed
activation buffers mapped.
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.model.encoder import inner_model


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


EAGER_FROM_TOKENS = 128  # below it the eager path gained 14% at 64 tokens: not worth moving every title run's figures


def _attention_dropout(config) -> float:
    return float(max((getattr(config, k, 0.0) or 0.0) for k in ("attention_probs_dropout_prob", "attention_dropout")))


def eager_attention(st_model, max_seq_length: int) -> bool:
    """Train with the model's eager attention instead of SDPA where SDPA would drop attention probabilities on
    the CPU's math path: an SDPA model with attention dropout, training sequences of ``EAGER_FROM_TOKENS`` or more.
    True when switched. Nothing is saved differently: the attention implementation is not part of a saved config."""
    inner = inner_model(st_model)
    config = getattr(inner, "config", None)
    if (config is None or getattr(config, "_attn_implementation", None) != "sdpa"
            or not hasattr(inner, "set_attn_implementation") or _attention_dropout(config) == 0
            or max_seq_length < EAGER_FROM_TOKENS):
        return False
    inner.set_attn_implementation("eager")
    st_model.eager_for_training = True
    return True


@contextlib.contextmanager
def sdpa_for_inference(st_model):
    """SDPA while encoding in eval mode (validation) for a model :func:`eager_attention` switched; no-op otherwise."""
    if not getattr(st_model, "eager_for_training", False):
        yield
        return
    inner = inner_model(st_model)
    inner.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        inner.set_attn_implementation("eager")


def for_training(st_model, device: torch.device, max_seq_length: int = 0) -> dict:
    """Apply the CPU levers to a model about to train; returns what was applied (for the run's manifest)."""
    if device.type != "cpu":
        return {}
    levers = {"fast_dropout_layers": use_fast_dropout(st_model)}
    if eager_attention(st_model, max_seq_length):
        levers["attention"] = "eager"
    return levers
