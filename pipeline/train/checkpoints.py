"""Checkpoints of a training run: the trainable weights as safetensors, the optimiser, scheduler and RNG
as tensors loaded with ``weights_only`` (no arbitrary unpickling), and the best step's weights that
validation chose (``runs/<run>/best/``)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from pipeline.core.artifacts import atomic_dir, write_json_atomic
from pipeline.core.errors import ArtifactError


HEAD_PREFIX = "label_head."  # the label head's weights (pipeline/train/label_head.py) beside the encoder's


def _trainable(st_model, head=None) -> dict:
    params = {n: p for n, p in st_model.named_parameters() if p.requires_grad}
    if head is not None:
        params.update({HEAD_PREFIX + n: p for n, p in head.named_parameters()})
    return params


def save_trainable(path: Path, st_model, head=None) -> None:
    """The trainable weights (LoRA, or all of them, and the label head's) as one safetensors file."""
    from safetensors.torch import save_file

    save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(st_model, head).items()}, path)


def load_trainable(path: Path, st_model, head=None) -> None:
    """Copy weights written by :func:`save_trainable` back into the model (and head), in place."""
    from safetensors.torch import load_file

    params = dict(st_model.named_parameters())
    if head is not None:
        params.update({HEAD_PREFIX + n: p for n, p in head.named_parameters()})
    saved = load_file(path)
    if head is not None and not any(n.startswith(HEAD_PREFIX) for n in saved):
        raise ArtifactError(f"{path} holds no label head, but this run trains one")
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t.to(params[n].device))


def save_checkpoint(folder: Path, *, step: int, st_model, optimizer, scheduler, state: dict, head=None) -> None:
    """Trainable weights as safetensors; optimizer/scheduler/RNG as tensors loaded with weights_only."""
    with atomic_dir(folder) as tmp:
        save_trainable(tmp / "trainable.safetensors", st_model, head)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / "optimizer.pt")
        write_json_atomic(tmp / "state.json", {**state, "step": step})


def load_checkpoint(folder: Path, *, st_model, optimizer, scheduler, head=None) -> dict:
    """Restore weights, optimizer, scheduler and RNG (dropout draws continue exactly where they were)."""
    try:
        load_trainable(folder / "trainable.safetensors", st_model, head)
        blob = torch.load(folder / "optimizer.pt", weights_only=True)  # no arbitrary unpickling
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        if blob.get("cuda_rng") and torch.cuda.is_available() and len(blob["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        return json.loads((folder / "state.json").read_text())
    except Exception as exc:  # safetensors, the restricted unpickler and torch raise unrelated types
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if isinstance(exc, pickle.UnpicklingError):
            # torch's message is a page of advice to turn the safety off; keep the line that says what was found
            found = next((line.split("error:", 1)[1].split(" was not an allowed")[0].strip()
                          for line in lines if "WeightsUnpickler error:" in line), "objects other than tensors")
            found = found.replace("Unsupported global: GLOBAL ", "a reference to ")
            reason = f"optimizer.pt holds {found}, which is not loaded because unpickling it could run code"
        else:
            reason = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        raise ArtifactError(f"checkpoint in {folder} cannot be loaded ({reason}); delete that folder or pass "
                            "--overwrite to train from scratch") from None


def save_best(folder: Path, st_model, step: int, value: float, head=None) -> None:
    with atomic_dir(folder) as tmp:
        save_trainable(tmp / "trainable.safetensors", st_model, head)
        write_json_atomic(tmp / "state.json", {"step": step, "value": value})


def restore_best(folder: Path, st_model, step: int, head=None) -> None:
    state = json.loads((folder / "state.json").read_text()) if (folder / "state.json").exists() else {}
    if state.get("step") != step:
        raise ArtifactError(f"the best checkpoint in {folder} is from step {state.get('step')}, but validation chose "
                            f"step {step}; pass --overwrite to train again")
    load_trainable(folder / "trainable.safetensors", st_model, head)


