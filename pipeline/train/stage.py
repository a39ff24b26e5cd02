"""train: LoRA on the bi-encoder (or full fine-tuning) with in-batch negatives and a false-negative mask.

Reads ``data/processed/<dataset>/pairs.jsonl``; writes ``runs/<run>/model/`` holding ``adapter/``
(PEFT format) or the full sentence-transformers model, ``model_info.json`` (method, base model id,
resolved path and weight hash, LoRA settings) and ``manifest.json`` (config, data fingerprint, seed,
versions, MLflow run id, throughput, peak memory). While training, ``runs/<run>/checkpoints/`` holds
the last checkpoint; rerunning the same command after a crash resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import shutil
import sys
import time
from typing import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.train import distributed
from pipeline.model import tokens as encoding
from pipeline.contracts import pair_kinds as objectives
from pipeline.model import prompts
from pipeline.core import recovery
from pipeline.train import speed
from pipeline.core import tracking
from pipeline.train import validation
from pipeline.core.artifacts import (MANIFEST, Layout, atomic_dir, clean_stale, make_manifest,
                                require_manifest, skip_or_refuse, write_json_atomic)
from pipeline.train.batching import epoch_batches
from pipeline.core.config import Config
from pipeline.core.errors import ArtifactError, TrainingError
from pipeline.train.losses import contrastive_loss_with_negatives, false_negative_mask, hard_negative_mask
from pipeline.core.memory import current_rss_mb, peak_rss_mb
from pipeline.model.encoder import (apply_lora, base_fingerprint, count_parameters, enable_gradient_checkpointing, inner_model,
                            load_base, lora_b_norm, pick_device, pick_dtype, resolve_base, training_model_kwargs,
                            write_model_info)
from pipeline.contracts.identity import run_fingerprint
from pipeline.contracts.prepared_data import load_pairs, with_encoder_length
from pipeline.train import retrieval as retrieval_sets

log = logging.getLogger(__name__)
PROBE_TEXTS = 32


class PairTensors:
    """Training pairs as token ids and integer codes, tokenised once."""

    def __init__(self, pairs, st_model, max_seq_length: int, used_prompts: prompts.Prompts | None = None):
        # Optional mined hard negatives (pipeline/prepare/hard_negatives.py): a third text per pair, -1 where none.
        negatives = pairs["negative"] if "negative" in pairs else pd.Series([None] * len(pairs), dtype=object)
        # Anchors are queries, positives and negatives documents (pipeline/model/prompts.py); texts are keyed with
        # their prompt, so one text used on both sides is tokenised once per form (once without prompts).
        p = used_prompts or prompts.Prompts()
        anchors, positives = p.apply(list(pairs["anchor"]), "query"), p.apply(list(pairs["positive"]), "document")
        negs = [p.document + t if isinstance(t, str) else None for t in negatives]
        texts = list(dict.fromkeys(anchors + positives + [t for t in negs if t is not None]))
        text_id = {t: i for i, t in enumerate(texts)}
        self.ids = encoding.tokenize(st_model, texts, max_seq_length)
        self.anchor = np.array([text_id[t] for t in anchors])
        self.positive = np.array([text_id[t] for t in positives])
        self.negative = np.array([text_id[t] if t is not None else -1 for t in negs], dtype=np.int64)
        n = len(pairs)
        # Pair and negative metadata share one code space so that "same group" compares across them.
        none = pd.Series([None] * n, dtype=object)
        groups = _codes(pd.concat([pairs["group"], pairs.get("negative_group", none)], ignore_index=True))
        labels = _codes(pd.concat([pairs["label"], pairs.get("negative_label", none)], ignore_index=True))
        self.group, self.negative_group = groups[:n], groups[n:]
        self.label, self.negative_label = labels[:n], labels[n:]
        self.positive_is_label = (pairs["kind"] == "label").to_numpy()
        self.negative_is_label = (pairs.get("negative_kind", none) == "label").to_numpy()
        self.lengths = np.array([len(self.ids[a]) + len(self.ids[p]) for a, p in zip(self.anchor, self.positive)])
        self.lengths += np.array([len(self.ids[k]) if k >= 0 else 0 for k in self.negative], dtype=self.lengths.dtype)
        self.real_tokens = int(self.lengths.sum())
        # retrieval sets: document id -> text id of its training text, for the judged-relevant mask
        self.doc_text_id = {d: text_id[t] for col, texts in (("positive_id", positives), ("negative_id", negs))
                            if col in pairs for d, t in zip(pairs[col], texts) if isinstance(d, str) and t is not None}
        self.relevant: retrieval_sets.RelevantMask | None = None

    def __len__(self) -> int:
        return len(self.anchor)


def _codes(series) -> np.ndarray:
    values = series.fillna("").astype(str)
    uniques = {v: i for i, v in enumerate(sorted(set(values)))}
    return np.array([uniques[v] if v else -1 for v in values])


def make_optimizer(st_model, t) -> torch.optim.Optimizer:
    """AdamW over the trainable weights; with ``train.lora.loraplus_lr_ratio``, PEFT's LoRA+ groups
    (lora_B at ratio x train.lr, lora_A at train.lr)."""
    if t.method == "lora" and t.lora.loraplus_lr_ratio:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(st_model, torch.optim.AdamW, lr=t.lr,
                                         loraplus_lr_ratio=t.lora.loraplus_lr_ratio, weight_decay=t.weight_decay)
    return torch.optim.AdamW([p for p in st_model.parameters() if p.requires_grad], lr=t.lr,
                             weight_decay=t.weight_decay)


def save_trainable(path: Path, st_model) -> None:
    """The trainable weights (LoRA, or all of them) as one safetensors file."""
    from safetensors.torch import save_file

    save_file({n: p.detach().cpu().contiguous() for n, p in st_model.named_parameters() if p.requires_grad}, path)


def load_trainable(path: Path, st_model) -> None:
    """Copy weights written by :func:`save_trainable` back into the model, in place."""
    from safetensors.torch import load_file

    params = dict(st_model.named_parameters())
    with torch.no_grad():
        for n, t in load_file(path).items():
            params[n].copy_(t.to(params[n].device))


def save_checkpoint(folder: Path, *, step: int, st_model, optimizer, scheduler, state: dict) -> None:
    """Trainable weights as safetensors; optimizer/scheduler/RNG as tensors loaded with weights_only."""
    with atomic_dir(folder) as tmp:
        save_trainable(tmp / "trainable.safetensors", st_model)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / "optimizer.pt")
        write_json_atomic(tmp / "state.json", {**state, "step": step})


def load_checkpoint(folder: Path, *, st_model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG (dropout draws continue exactly where they were)."""
    try:
        load_trainable(folder / "trainable.safetensors", st_model)
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


def training_step(st_model, data: PairTensors, idx: np.ndarray, t, *, optimizer, scheduler,
                  device: torch.device, dtype: torch.dtype | None, step: int = 0,
                  dist: distributed.Dist | None = None) -> float:
    """One optimiser step on the pairs ``idx``: forward anchors, positives and any mined negatives,
    masked in-batch loss. Under torchrun (``dist``) this process embeds only its shard of ``idx`` and
    the embeddings are gathered, so the loss and the summed gradient are those of the whole batch."""
    pad, side = encoding.pad_info(st_model)
    local = dist.shard(idx) if dist else idx

    def embed(text_ids):
        if len(text_ids) == 0:  # a shard with no negatives (or no rows) still takes part in the gather
            return torch.zeros((0, st_model.get_embedding_dimension()), device=device)
        feats = {k: v.to(device) for k, v in encoding.collate([data.ids[i] for i in text_ids], pad, side).items()}
        return encoding.forward(st_model, feats)

    with_neg = local[data.negative[local] >= 0]
    with encoding.autocast(device, dtype):
        a_emb, p_emb = embed(data.anchor[local]), embed(data.positive[local])
        n_emb = embed(data.negative[with_neg])
    if dist:
        sizes = dist.shard_sizes(len(idx))
        a_emb, p_emb = dist.gather(a_emb, sizes), dist.gather(p_emb, sizes)
        n_emb = dist.gather(n_emb, [int((data.negative[part] >= 0).sum()) for part in np.array_split(idx, dist.world)])
    a_ids, p_ids = data.anchor[idx], data.positive[idx]
    mask = false_negative_mask(
        torch.as_tensor(data.group[idx]), torch.as_tensor(data.label[idx]), torch.as_tensor(p_ids),
        torch.as_tensor(a_ids), torch.as_tensor(data.positive_is_label[idx]), t.mask_same_label,
    ).to(device)
    if data.relevant is not None:  # a retrieval set: no judged-relevant document of the anchor's query
        mask = mask | data.relevant(idx, p_ids).to(device)
        mask.fill_diagonal_(False)
    neg_rows = idx[data.negative[idx] >= 0]
    neg_mask = hard_negative_mask(
        torch.as_tensor(data.group[idx]), torch.as_tensor(data.label[idx]), torch.as_tensor(a_ids),
        torch.as_tensor(p_ids), torch.as_tensor(data.negative_group[neg_rows]),
        torch.as_tensor(data.negative_label[neg_rows]), torch.as_tensor(data.negative[neg_rows]),
        torch.as_tensor(data.negative_is_label[neg_rows]), t.mask_same_label,
    ).to(device)
    if data.relevant is not None:
        neg_mask = neg_mask | data.relevant(idx, data.negative[neg_rows]).to(device)
    loss = contrastive_loss_with_negatives(a_emb, p_emb, n_emb if len(neg_rows) else None, scale=t.scale,
                                           mask=mask, negative_mask=neg_mask, symmetric=t.symmetric)
    if not torch.isfinite(loss):
        raise TrainingError(f"loss became {loss.item()} at step {step}; lower train.lr")
    optimizer.zero_grad(set_to_none=True)
    if loss.requires_grad:  # false only for a torchrun rank whose shard of a tiny last batch is empty
        loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if dist:
        dist.all_reduce_grads(params)
    if t.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.item()


def make_scheduler(optimizer, t, total_steps: int):
    """Linear warm-up over ``t.warmup_ratio`` of the steps, then linear decay to zero."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, int(t.warmup_ratio * total_steps), total_steps)


class Batches:
    """The batches of a run: epoch ``e`` is :func:`pipeline.train.batching.epoch_batches` with the run's seed,
    built when first asked for (one epoch kept at a time). ``batches(step)`` -> the pair indices of that step."""

    def __init__(self, lengths: np.ndarray, t, seed: int):
        self.lengths, self.t, self.seed = lengths, t, seed
        self._cache: dict[int, list[np.ndarray]] = {}
        self.steps_per_epoch = len(self.epoch(0))

    def epoch(self, e: int) -> list[np.ndarray]:
        if e not in self._cache:
            self._cache = {e: epoch_batches(self.lengths, self.t.batch_size, self.seed, e, self.t.length_grouping)}
        return self._cache[e]

    def at(self, epoch: int, within: int) -> np.ndarray:
        return self.epoch(epoch)[within]

    def __call__(self, step: int) -> np.ndarray:
        return self.at(*divmod(step, self.steps_per_epoch))


def run_steps(st_model, data: PairTensors, t, steps: Iterable[int], batch_of: Callable[[int], np.ndarray], *,
              optimizer, scheduler, device: torch.device, dtype: torch.dtype | None,
              dist: distributed.Dist | None = None) -> Iterator[tuple[int, np.ndarray, float]]:
    """The training loop: for each step, its batch and one :func:`training_step`; yields (step, batch, loss).

    The train stage drives it with its bookkeeping (validation, checkpoints, MLflow) around each step;
    the bench drives the same generator to time it, so what the bench measures is what training runs.
    """
    st_model.train()
    for step in steps:
        idx = batch_of(step)
        yield step, idx, training_step(st_model, data, idx, t, optimizer=optimizer, scheduler=scheduler,
                                       device=device, dtype=dtype, step=step, dist=dist)


def run(cfg: Config, *, overwrite: bool = False) -> Path:
    """Train; under ``torchrun --nproc_per_node=N`` every process runs this and rank 0 writes."""
    dist = distributed.init_from_env(cfg.train.device)
    try:
        out = _run(cfg, overwrite=overwrite, dist=dist)
        if dist:
            dist.barrier()  # the other ranks wait until rank 0 has written the model
        return out
    finally:
        if dist:
            dist.close()


def _run(cfg: Config, *, overwrite: bool, dist: distributed.Dist | None) -> Path:
    main = dist is None or dist.is_main
    layout = Layout(cfg)
    prep = require_manifest(layout.processed, "prepared data", "run `make data` (python -m pipeline prepare) first")
    cfg = with_encoder_length(cfg, prep)  # a retrieval set: the length prepare chose from its texts
    fp = run_fingerprint(cfg, prep["fingerprint"])
    run_dir, model_dir, ckpt_dir = layout.run(), layout.model_dir(), layout.checkpoints()
    clean_stale(run_dir)
    if skip_or_refuse(model_dir, fp, overwrite=overwrite, stage="train", refusal=(
            f"run '{cfg.resolved_run_name}' already exists at {run_dir} with another config or data; "
            "pass --overwrite, or choose another run_name=...")):
        return model_dir
    ckpt_state = None
    if (ckpt_dir / "state.json").exists():
        ckpt_state = json.loads((ckpt_dir / "state.json").read_text())
        if ckpt_state.get("fingerprint") != fp:
            # A crashed run of another config is still an existing run: its progress is not thrown away
            # unless asked, exactly like a finished one.
            if not overwrite:
                raise ArtifactError(
                    f"run '{cfg.resolved_run_name}' has a checkpoint at step {ckpt_state.get('step')} from another "
                    f"config or data in {ckpt_dir}; rerun with the config it started with to resume it, pass "
                    "--overwrite to discard it, or choose another run_name=...")
            log.info("train: discarding checkpoint of another config at %s", ckpt_dir)
            if main:
                shutil.rmtree(ckpt_dir)
            ckpt_state = None
    if dist:
        dist.barrier()
    # With --overwrite the previous model stays in place until the new one replaces it (atomic_dir), so a
    # crash of the new training leaves the old result intact. Only rank 0 talks to MLflow and the run dir.
    previous_attempt = None
    if main:
        cfg = tracking.preflight(cfg)  # an unreachable MLflow server stops us here, before any training
        previous_attempt = recovery.claim(run_dir, cfg.resolved_run_name)
    try:
        return _train(cfg, layout, prep, fp, model_dir, ckpt_dir, ckpt_state, previous_attempt, dist)
    finally:
        if main:
            recovery.release(run_dir)


class Selection:
    """Validation state of one training run: the curve so far, the best step, and patience.

    It travels in the checkpoint's state.json, so a resumed run continues the same curve and keeps the
    same best step; the best step's trainable weights are in ``runs/<run>/best/``.
    """

    def __init__(self, vset: validation.ValidationSet | None, vcfg, state: dict | None = None):
        self.vset, self.vcfg = vset, vcfg
        state = state or {}
        self.curve: list[dict] = state.get("curve", [])
        self.best_step: int | None = state.get("best_step")
        self.best_value: float | None = state.get("best_value")
        self.bad_evals: int = state.get("bad_evals", 0)

    @property
    def active(self) -> bool:
        return self.vset is not None

    def record(self, step: int, epoch: float, value: float) -> bool:
        """Add one evaluation; True when it is the new best trained step."""
        self.curve.append({"step": step, "epoch": round(epoch, 4), "value": round(value, 6)})
        if step == 0:
            return False  # the untrained base: the reference level, never the model kept
        if self.best_value is None or value > self.best_value + self.vcfg.min_delta:
            self.best_step, self.best_value, self.bad_evals = step, value, 0
            return True
        self.bad_evals += 1
        return False

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
                "patience": self.vcfg.patience}


def eval_steps(total_steps: int, steps_per_epoch: int, every: int | None) -> set[int]:
    """Steps after which validation is scored: every ``every`` steps (default: each epoch end) and the last."""
    every = every or steps_per_epoch
    return set(range(every, total_steps + 1, every)) | {total_steps}


def _validate(st_model, vset: validation.ValidationSet, ids: tuple, device) -> float:
    """Score the current weights on the validation set (eval mode, no gradients), then back to train mode."""
    st_model.eval()
    q = encoding.encode_ids(st_model, ids[0], device=device)
    d = encoding.encode_ids(st_model, ids[1], device=device) if ids[1] is not None else None
    st_model.train()
    return vset.score(q, d)


def _save_best(folder: Path, st_model, step: int, value: float) -> None:
    with atomic_dir(folder) as tmp:
        save_trainable(tmp / "trainable.safetensors", st_model)
        write_json_atomic(tmp / "state.json", {"step": step, "value": value})


def _restore_best(folder: Path, st_model, step: int) -> None:
    state = json.loads((folder / "state.json").read_text()) if (folder / "state.json").exists() else {}
    if state.get("step") != step:
        raise ArtifactError(f"the best checkpoint in {folder} is from step {state.get('step')}, but validation chose "
                            f"step {step}; pass --overwrite to train again")
    load_trainable(folder / "trainable.safetensors", st_model)


class _Setup:
    """What one training run works with: model, pairs, optimiser, schedule and validation."""

    def __init__(self, cfg: Config, layout: Layout, prep: dict, dist):
        t = cfg.train
        self.device = pick_device(t.device)
        self.dtype = pick_dtype(t.precision, self.device)
        self.model = load_base(cfg.model, device=self.device, max_seq_length=t.max_seq_length,
                               model_kwargs=training_model_kwargs(t, self.device))
        self.prompts = prompts.for_run(cfg, self.model)
        pairs = load_pairs(layout.processed)
        self.data = PairTensors(pairs, self.model, t.max_seq_length, self.prompts)
        self.data.relevant = retrieval_sets.relevant_mask(layout.processed, pairs, self.data.doc_text_id)
        self.probe_ids = self.data.ids[:PROBE_TEXTS]
        self.base_probe = encoding.encode_ids(self.model, self.probe_ids, device=self.device)
        self.vset = (validation.load(layout.processed, prep, max_texts=t.validation.max_texts, seed=cfg.seed)
                     if t.validation.enabled else None)
        self.val_ids = self._validation_ids(t.max_seq_length)
        self.targets = apply_lora(self.model, t.lora) if t.method == "lora" else None
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        if t.quantization == "none":  # a quantised model is placed by bitsandbytes and cannot be moved
            self.model.to(self.device)
        self.levers = speed.for_training(self.model, self.device)  # measured by `make bench`; see speed.py
        self.trainable, self.total = count_parameters(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model, t)
        self.batches = Batches(self.data.lengths, t, cfg.seed)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch))
        self.scheduler = make_scheduler(self.optimizer, t, self.total_steps)
        self.mask_same_label = objectives.mask_same_label(cfg, prep)
        self.t = t.model_copy(update={"mask_same_label": self.mask_same_label})

    def _validation_ids(self, max_seq_length: int) -> tuple | None:
        """Validation texts tokenised once, with the query prompt on the query side and the document prompt
        on the gallery side (pipeline/model/prompts.py); a set that is its own gallery is embedded as queries."""
        if self.vset is None:
            return None
        queries = encoding.tokenize(self.model, self.prompts.apply(self.vset.queries, "query"), max_seq_length)
        docs = self.vset.documents
        return queries, (encoding.tokenize(self.model, self.prompts.apply(docs, "document"), max_seq_length)
                         if docs else None)


def _train(cfg: Config, layout: Layout, prep: dict, fp: str, model_dir: Path, ckpt_dir: Path,
           ckpt_state: dict | None, previous_attempt: dict | None, dist: distributed.Dist | None) -> Path:
    main = dist is None or dist.is_main
    t = cfg.train
    if t.method == "base":
        return _write_base_reference(cfg, model_dir, fp, prep) if main else model_dir
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if t.num_threads or dist:
        torch.set_num_threads(t.num_threads or distributed.default_threads())
    su = _Setup(cfg, layout, prep, dist)
    start_step, seconds_before, mlflow_run_id, sel_state = 0, 0.0, None, None
    if ckpt_state is not None:
        state = load_checkpoint(ckpt_dir, st_model=su.model, optimizer=su.optimizer, scheduler=su.scheduler)
        start_step, seconds_before = state["step"], state.get("seconds", 0.0)
        mlflow_run_id, sel_state = state.get("mlflow_run_id"), state.get("selection")
        log.info("train: resuming %s from step %d of %d", cfg.resolved_run_name, start_step, su.total_steps)
    if dist:
        dist.broadcast_params(su.params)
    sel = Selection(su.vset, t.validation, sel_state)

    tags = {"method": t.method, "dataset": cfg.data.name, "stage": "train", "run_name": cfg.resolved_run_name}
    with (tracking.run(cfg, run_name=cfg.resolved_run_name, run_id=mlflow_run_id, tags=tags) if main
          else contextlib.nullcontext(tracking.Tracker(None, False))) as tracker:
        if main:
            recovery.record_tracking(layout.run(), tracker.run_id, tracker.uri)
            recovery.settle_previous(previous_attempt, tracker.run_id)
        if start_step:
            tracker.set_tags({"pipeline.resumed_from_step": start_step})
        if ckpt_state is None or tracker.run_id != mlflow_run_id:  # a new MLflow run gets the params
            _log_params(tracker, cfg, prep, su)
        stats = _loop(cfg, layout, su, sel, tracker, fp, ckpt_dir, start_step, seconds_before, dist)
        if not main:
            return model_dir
        info = _model_info(cfg, su, stats)
        _write_model(model_dir, cfg, su, info, stats, fp, prep, tracker)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    shutil.rmtree(layout.run() / "best", ignore_errors=True)
    log.info("train: %s done in %.0fs (%.1f pairs/s), saved to %s", cfg.resolved_run_name, stats["seconds"],
             stats["pairs_per_second"] or 0, model_dir)
    return model_dir


def _log_params(tracker, cfg: Config, prep: dict, su: _Setup) -> None:
    tracker.log_params(tracking.flatten(cfg.model_dump(mode="json")))
    tracker.log_params({"data_fingerprint": prep["fingerprint"], "trainable_params": su.trainable,
                        "total_params": su.total, "trainable_pct": round(100 * su.trainable / su.total, 4),
                        "n_pairs": len(su.data), "device": su.device.type,
                        "precision": "bf16" if su.dtype is not None else "fp32",
                        "objective": (prep.get("objective") or {}).get("name", "unknown"),
                        "mask_same_label": su.mask_same_label,
                        "validation_metric": su.vset.metric if su.vset else "none",
                        **({"prompt_query": su.prompts.query, "prompt_document": su.prompts.document}
                           if su.prompts.any else {}),
                        **({"resolved_target_modules": ",".join(su.targets.modules),
                            "adapted_modules": su.targets.adapted_modules, "architecture": su.targets.architecture}
                           if su.targets else {})})


def _evaluate_at(step: int, su: _Setup, sel: Selection, tracker, best_dir: Path, main: bool) -> None:
    value = _validate(su.model, su.vset, su.val_ids, su.device)
    if sel.record(step, step / su.steps_per_epoch, value) and main:
        _save_best(best_dir, su.model, step, value)
    tracker.log_metrics({f"val_{su.vset.metric}": value}, step=step)
    log.info("train: step %d, validation %s %.4f (best %s at step %s)", step, su.vset.metric, value,
             f"{sel.best_value:.4f}" if sel.best_value is not None else "-", sel.best_step)


def _loop(cfg: Config, layout: Layout, su: _Setup, sel: Selection, tracker, fp: str, ckpt_dir: Path,
          start_step: int, seconds_before: float, dist) -> dict:
    """The training steps, validation scoring and checkpoints; returns the run's stats with the best
    step's weights loaded into ``su.model``."""
    main = dist is None or dist.is_main
    t, data, best_dir = su.t, su.data, layout.run() / "best"
    checks = eval_steps(su.total_steps, su.steps_per_epoch, t.validation.every_steps) if sel.active else set()
    if sel.active and start_step == 0:
        _evaluate_at(0, su, sel, tracker, best_dir, main)
    rss_before = current_rss_mb()
    started = time.perf_counter()
    losses: list[float] = []
    pairs_done = tokens_done = 0
    done = start_step
    bar = tqdm(range(start_step, su.total_steps), initial=start_step, total=su.total_steps, desc="train",
               unit="step", file=sys.stderr, disable=not main, mininterval=0.5 if sys.stderr.isatty() else 30)
    for step, idx, loss in run_steps(su.model, data, t, bar, su.batches, optimizer=su.optimizer,
                                     scheduler=su.scheduler, device=su.device, dtype=su.dtype, dist=dist):
        losses.append(loss)
        pairs_done += len(idx)
        tokens_done += int(data.lengths[idx].sum())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
        done = step + 1
        if done % 10 == 0 or done == su.total_steps:
            tracker.log_metrics({"train_loss": float(np.mean(losses[-10:])),
                                 "lr": su.scheduler.get_last_lr()[0]}, step=done)
        if done in checks:
            _evaluate_at(done, su, sel, tracker, best_dir, main)
        stop = sel.active and sel.exhausted
        if (done % t.checkpoint_every == 0 or done in checks) and done < su.total_steps and not stop and main:
            save_checkpoint(ckpt_dir, step=done, st_model=su.model, optimizer=su.optimizer, scheduler=su.scheduler,
                            state={"fingerprint": fp, "mlflow_run_id": tracker.run_id, "selection": sel.state(),
                                   "seconds": seconds_before + time.perf_counter() - started})
        if stop:
            log.info("train: validation %s has not improved for %d evaluations; stopping at step %d of %d",
                     su.vset.metric, t.validation.patience, done, su.total_steps)
            break
    bar.close()
    run_seconds = time.perf_counter() - started
    if sel.active and sel.best_step is not None and sel.best_step != done:
        if main:
            _restore_best(best_dir, su.model, sel.best_step)
        log.info("train: keeping step %d (validation %s %.4f), the best of %d evaluations", sel.best_step,
                 su.vset.metric, sel.best_value, len(sel.curve))
    elif not sel.active:
        log.info("train: no validation set to choose a step with; keeping the last step")
    stats = _finish_stats(su, sel, losses, done, seconds_before + run_seconds, run_seconds, pairs_done,
                          tokens_done, rss_before, dist)
    return {**stats, "resumed_from_step": start_step}


def _finish_stats(su: _Setup, sel: Selection, losses, done, seconds, run_seconds, pairs_done, tokens_done,
                  rss_before, dist) -> dict:
    """The trust checks on the kept weights (field notes 2 and 5) and the run's figures."""
    t = su.t
    su.model.eval()
    moved = lora_b_norm(su.model) if t.method == "lora" else None
    new_probe = encoding.encode_ids(su.model, su.probe_ids, device=su.device)
    probe_cos = float(np.mean(np.sum(su.base_probe * new_probe, axis=1)))
    if t.method == "lora" and not moved:
        raise TrainingError("training finished but every lora_B weight is still zero: the adapter did not "
                            "learn (check train.lr and that the target modules are used)")
    if probe_cos > 0.999999:
        raise TrainingError(f"training finished but embeddings are unchanged (mean cosine to base "
                            f"{probe_cos:.7f}); the trained model equals the base")
    return {
        "seconds": round(seconds, 2),
        "steps": done,
        "planned_steps": su.total_steps,
        "pairs_per_second": round(pairs_done / run_seconds, 2) if run_seconds > 0 else None,
        "real_tokens_per_second": round(tokens_done / run_seconds, 1) if run_seconds > 0 else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        # model, data and runtime loaded; the rest of the peak is what the training steps add
        "rss_before_train_mb": round(rss_before, 1) if rss_before is not None else None,
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if su.device.type == "cuda" else None,
        "final_loss": round(float(np.mean(losses[-20:])), 5) if losses else None,
        "lora_b_abs_sum": moved,
        "probe_cosine_to_base": round(probe_cos, 6),
        "device": su.device.type,
        "precision": "bf16" if su.dtype is not None else "fp32",
        "processes": dist.world if dist else 1,
        "cpu_levers": su.levers,
        "mask_same_label": su.mask_same_label,
        "validation": sel.summary(done, su.total_steps),
        "embedding_dim": int(new_probe.shape[1]),
    }


def _model_info(cfg: Config, su: _Setup, stats: dict) -> dict:
    resolved = resolve_base(cfg.model.base)
    t = cfg.train
    return {
        "method": t.method,
        "base": cfg.model.base,
        "base_resolved": resolved,
        "base_fingerprint": base_fingerprint(resolved),
        "revision": cfg.model.revision,
        "trust_remote_code": cfg.model.trust_remote_code,
        "max_seq_length": t.max_seq_length,
        "lora": {**t.lora.model_dump(), "target_modules": su.targets.modules, "targets": su.targets.record()}
        if su.targets else None,
        "prompts": su.prompts.record(),
        "trainable_params": su.trainable,
        "total_params": su.total,
        "embedding_dim": stats.pop("embedding_dim"),
    }


def _write_model(model_dir: Path, cfg: Config, su: _Setup, info: dict, stats: dict, fp: str, prep: dict,
                 tracker) -> None:
    with atomic_dir(model_dir) as tmp:
        if cfg.train.method == "lora":
            inner_model(su.model).save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        else:
            su.model.save(str(tmp), safe_serialization=True)
        write_model_info(tmp, info)
        write_json_atomic(tmp / MANIFEST, make_manifest(
            "train", cfg, fingerprint=fp, inputs={"prepared_data": prep["fingerprint"]},
            extra={"mlflow_run_id": tracker.run_id, "train": stats, "model": info,
                   "objective": prep.get("objective")}))
    tracker.log_metrics({f"train_{k}": v for k, v in stats.items() if isinstance(v, (int, float))
                         and not isinstance(v, bool)})
    tracker.log_artifact(model_dir / MANIFEST)
    if cfg.train.method == "lora":
        tracker.log_artifact(model_dir / "adapter", "adapter")


def _write_base_reference(cfg: Config, model_dir: Path, fp: str, prep: dict) -> Path:
    """method=base: no training; the model folder only records which base model the run evaluates."""
    resolved = resolve_base(cfg.model.base)
    st_model = load_base(cfg.model)
    _, total = count_parameters(st_model)
    info = {"method": "base", "base": cfg.model.base, "base_resolved": resolved,
            "prompts": prompts.for_run(cfg, st_model).record(),
            "base_fingerprint": base_fingerprint(resolved), "revision": cfg.model.revision,
            "trust_remote_code": cfg.model.trust_remote_code, "max_seq_length": cfg.train.max_seq_length,
            "lora": None, "trainable_params": 0, "total_params": total,
            "embedding_dim": st_model.get_embedding_dimension()}
    tags = {"method": "base", "dataset": cfg.data.name, "stage": "train", "run_name": cfg.resolved_run_name}
    with tracking.run(cfg, run_name=cfg.resolved_run_name, tags=tags) as tracker:
        tracker.log_params(tracking.flatten(cfg.model_dump(mode="json")))
        with atomic_dir(model_dir) as tmp:
            write_model_info(tmp, info)
            write_json_atomic(tmp / MANIFEST, make_manifest(
                "train", cfg, fingerprint=fp, inputs={"prepared_data": prep["fingerprint"]},
                extra={"mlflow_run_id": tracker.run_id, "train": {"seconds": 0.0, "steps": 0,
                       "pairs_per_second": None, "peak_rss_mb": round(peak_rss_mb(), 1)}, "model": info}))
    return model_dir
