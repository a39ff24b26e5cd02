"""Choosing the step a run keeps: the validation curve, the best step and patience."""

from __future__ import annotations

from pipeline.train import validation


class Selection:
    """Validation state of one training run: the curve so far, the best step, and patience.

    It travels in the checkpoint's state.json, so a resumed run continues the same curve and keeps the
    same best step; the best step's trainable weights are in ``runs/<run>/best/``.
    """

    def __init__(self, vset: validation.ValidationSet | None, vcfg, state: dict | None = None,
                 base_is_candidate: bool = False):
        self.vset, self.vcfg = vset, vcfg
        # the untrained base (step 0) may be the model kept: a run whose trained steps never beat it keeps the base
        self.base_is_candidate = base_is_candidate
        state = state or {}
        self.curve: list[dict] = state.get("curve", [])
        self.best_step: int | None = state.get("best_step")
        self.best_value: float | None = state.get("best_value")
        self.bad_evals: int = state.get("bad_evals", 0)

    @property
    def active(self) -> bool:
        return self.vset is not None

    def record(self, step: int, epoch: float, value: float, figures: dict | None = None) -> bool:
        """Add one evaluation (``figures``: what the value was taken from, kept in the curve); True when it is
        the new best trained step."""
        self.curve.append({"step": step, "epoch": round(epoch, 4), "value": round(value, 6),
                           **{k: round(v, 6) for k, v in (figures or {}).items()}})
        if step == 0:  # the untrained base: the reference level; the model kept only where it is a candidate
            if self.base_is_candidate:
                self.best_step, self.best_value = 0, value
            return False
        if self.best_value is None or value > self.best_value + self.vcfg.min_delta:
            self.best_step, self.best_value, self.bad_evals = step, value, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def kept_base(self) -> bool:
        """True when the base is a candidate and no trained step beat it: the run keeps the untrained base."""
        return self.active and self.base_is_candidate and self.best_step == 0

    @property
    def exhausted(self) -> bool:
        return self.bad_evals >= self.vcfg.patience

    def state(self) -> dict:
        return {"curve": self.curve, "best_step": self.best_step, "best_value": self.best_value,
                "bad_evals": self.bad_evals}

    def summary(self, last_step: int, total_steps: int) -> dict | None:
        if not self.active:
            return None
        base = next((c["value"] for c in self.curve if c["step"] == 0), None)
        return {"metric": self.vset.metric, "split": "val", "what": self.vset.description, "curve": self.curve,
                "best_step": self.best_step, "best_value": self.best_value, "base_value": base,
                "stopped_early": last_step < total_steps, "last_step": last_step,
                "patience": self.vcfg.patience, "base_is_candidate": self.base_is_candidate,
                "kept": "base" if self.kept_base else "trained"}


def eval_steps(total_steps: int, steps_per_epoch: int, every: int | None) -> set[int]:
    """Steps after which validation is scored: every ``every`` steps (default: each epoch end) and the last."""
    every = every or steps_per_epoch
    return set(range(every, total_steps + 1, every)) | {total_steps}


