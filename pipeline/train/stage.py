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
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.contracts import label_head as head_contract
from pipeline.contracts import pair_kinds as objectives
from pipeline.contracts.identity import run_fingerprint
from pipeline.contracts.prepared_data import dataset_files, load_labels, load_pairs, load_split, with_encoder_length
from pipeline.train import retrieval as retrieval_sets
from pipeline.core import recovery, tracking
from pipeline.core.artifacts import (MANIFEST, Layout, atomic_dir, clean_stale, make_manifest, require_manifest,
                                     skip_or_refuse, write_json_atomic)
from pipeline.core.config import Config
from pipeline.core.errors import ArtifactError, ConfigError, TrainingError
from pipeline.core.memory import current_rss_mb, peak_rss_mb
from pipeline.model import prompts
from pipeline.model import tokens as encoding
from pipeline.model.encoder import (apply_lora, base_fingerprint, count_parameters, enable_gradient_checkpointing,
                                    load_base, lora_b_norm, pick_device, pick_dtype, resolve_base, save_lora,
                                    saved_parameters, training_model_kwargs, verify_reload, write_model_info)
from pipeline.search import metrics as M
from pipeline.train import distributed, label_head, speed, validation
from pipeline.train.checkpoints import load_checkpoint, restore_best, save_best, save_checkpoint
from pipeline.train.loop import Batches, PairTensors, Stepper, make_optimizer, make_scheduler, run_steps
from pipeline.train.selection import Selection, eval_steps

log = logging.getLogger(__name__)
PROBE_TEXTS = 32


@dataclass
class Job:
    """One train invocation: the config, where it reads and writes, and what an earlier attempt left."""

    cfg: Config
    layout: Layout
    prep: dict  # the prepare manifest
    fp: str  # the run's fingerprint
    dist: distributed.Dist | None = None
    ckpt_state: dict | None = None  # state.json of the checkpoint to resume from
    previous_attempt: dict | None = None  # what a killed earlier process left (pipeline/core/recovery.py)

    @property
    def main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @property
    def model_dir(self) -> Path:
        return self.layout.model_dir()

    @property
    def ckpt_dir(self) -> Path:
        return self.layout.checkpoints()

    @property
    def best_dir(self) -> Path:
        return self.layout.run() / "best"


@dataclass
class Progress:
    """What this process's steps did: losses, pairs and tokens, and where the time went. Throughput is
    measured over the optimiser steps alone; validation scorings are timed apart."""

    start_step: int = 0
    seconds_before: float = 0.0  # wall seconds of the attempts before a resume
    done: int = 0
    losses: list[float] = field(default_factory=list)
    pairs: int = 0
    tokens: int = 0
    step_seconds: float = 0.0
    validation_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    rss_before: float | None = None
    pre_step: dict | None = None  # what the pre-step (train.pre_step) did

    @property
    def seconds(self) -> float:
        """Wall seconds of the whole training, earlier attempts included."""
        return self.seconds_before + time.perf_counter() - self.started

    def per_step_second(self, amount: float, digits: int) -> float | None:
        return round(amount / self.step_seconds, digits) if self.step_seconds > 0 else None


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
        return _train(Job(cfg, layout, prep, fp, dist, ckpt_state, previous_attempt))
    finally:
        if main:
            recovery.release(run_dir)


def _validate(st_model, vset: validation.ValidationSet, ids: tuple, device, head=None) -> tuple[float, dict]:
    """Score the current weights on the validation set (eval mode, no gradients), then back to train mode.

    With a label head, its macro-F1 on the val texts is measured too; on a labels-only corpus (metric
    macro_f1) the score is the better of the kNN vote and the head, as eval chooses among its heads.
    Returns (score, the figures behind it)."""
    st_model.eval()
    q = encoding.encode_ids(st_model, ids[0], device=device)
    d = encoding.encode_ids(st_model, ids[1], device=device) if ids[1] is not None else None
    st_model.train()
    value = vset.score(q, d)
    if head is None or vset.labels is None:
        return value, {}
    head_f1 = M.classification_scores(vset.labels, head.to_contract().predict(q))["macro_f1"]
    figures = {f"{vset.metric}_without_head": value, "label_head_macro_f1": head_f1}
    return (max(value, head_f1) if vset.metric == "macro_f1" else value), figures


class _Setup:
    """What one training run works with: model, pairs, optimiser, schedule and validation."""

    def __init__(self, cfg: Config, layout: Layout, prep: dict, dist):
        t = cfg.train
        self.device = pick_device(t.device)
        self.dtype = pick_dtype(t.precision, self.device)
        self.model = load_base(cfg.model, device=self.device, max_seq_length=t.max_seq_length,
                               model_kwargs=training_model_kwargs(t, self.device))
        self.prompts = prompts.for_run(cfg, self.model)
        self.label_names = load_labels(layout.processed)
        self.head = self._label_head(cfg, layout, prep)
        pairs = load_pairs(layout.processed)
        self.data = PairTensors(pairs, self.model, t.max_seq_length, self.prompts,
                                self.label_names if self.head is not None else None, t.document_length)
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
        # measured by `make bench` and reports/examples/bench/attention-dropout.md; see speed.py
        self.levers = speed.for_training(self.model, self.device, t.max_seq_length)
        self.trainable, self.total = count_parameters(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.params += list(self.head.parameters()) if self.head is not None else []
        self.optimizer = make_optimizer(self.model, t, self.head)
        self.batches = Batches(self.data.lengths, t, cfg.seed)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch))
        self.scheduler = make_scheduler(self.optimizer, t, self.total_steps)
        self.mask_same_label = objectives.mask_same_label(cfg, prep)
        self.t = t.model_copy(update={"mask_same_label": self.mask_same_label,
                                      "label_loss_weight": self.label_loss_weight})
        self.stepper = Stepper(self.model, self.data, self.t, self.optimizer, self.scheduler, self.device,
                               self.dtype, dist, self.head)

    def _label_head(self, cfg: Config, layout: Layout, prep: dict) -> label_head.CosineHead | None:
        """The label head this run trains (None: none), its prototypes at the base model's class centroids."""
        self.label_loss_weight = objectives.label_loss_weight(cfg, prep)
        if self.label_loss_weight == 0:
            if cfg.train.pair_loss_weight == 0:
                raise ConfigError("train.pair_loss_weight=0 leaves nothing to train without a label head; set "
                                  "train.label_loss_weight above 0 or the pair loss weight above 0")
            return None
        if len(self.label_names) < 2:
            raise ConfigError(f"train.label_loss_weight={self.label_loss_weight:g} trains a label head, but the "
                              "prepared corpus has fewer than two labels (data.label_column); set it to 0")
        protos = label_head.centroids(self.model, load_split(layout.processed, "train"), self.label_names,
                                      self.prompts, cfg.train.max_seq_length, self.device, cfg.seed)
        return label_head.CosineHead(protos, self.label_names, cfg.train.scale).to(self.device)

    def _validation_ids(self, max_seq_length: int) -> tuple | None:
        """Validation texts tokenised once, with the query prompt on the query side and the document prompt
        on the gallery side (pipeline/model/prompts.py); a set that is its own gallery is embedded as queries."""
        if self.vset is None:
            return None
        queries = encoding.tokenize(self.model, self.prompts.apply(self.vset.queries, "query"), max_seq_length)
        docs = self.vset.documents
        return queries, (encoding.tokenize(self.model, self.prompts.apply(docs, "document"), max_seq_length)
                         if docs else None)


def _train(job: Job) -> Path:
    cfg, t = job.cfg, job.cfg.train
    if t.method == "base":
        return _write_base_reference(cfg, job.model_dir, job.fp, job.prep) if job.main else job.model_dir
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.runtime.num_threads or job.dist:
        torch.set_num_threads(cfg.runtime.num_threads or distributed.default_threads())
    su = _Setup(cfg, job.layout, job.prep, job.dist)
    progress, mlflow_run_id, sel_state = Progress(), None, None
    if job.ckpt_state is not None:
        state = load_checkpoint(job.ckpt_dir, st_model=su.model, optimizer=su.optimizer, scheduler=su.scheduler,
                                head=su.head)
        progress = Progress(start_step=state["step"], seconds_before=state.get("seconds", 0.0), done=state["step"])
        mlflow_run_id, sel_state = state.get("mlflow_run_id"), state.get("selection")
        log.info("train: resuming %s from step %d of %d", cfg.resolved_run_name, progress.start_step, su.total_steps)
    if job.dist:
        job.dist.broadcast_params(su.params)
    sel = Selection(su.vset, t.validation, sel_state, base_is_candidate=base_is_candidate(cfg, job.prep))

    tags = {"method": t.method, "dataset": cfg.data.name, "stage": "train", "run_name": cfg.resolved_run_name}
    with (tracking.run(cfg, run_name=cfg.resolved_run_name, run_id=mlflow_run_id, tags=tags) if job.main
          else contextlib.nullcontext(tracking.Tracker(None, False))) as tracker:
        if job.main:
            recovery.record_tracking(job.layout.run(), tracker.run_id, tracker.uri)
            recovery.settle_previous(job.previous_attempt, tracker.run_id)
        if progress.start_step:
            tracker.set_tags({"pipeline.resumed_from_step": progress.start_step})
        if job.ckpt_state is None or tracker.run_id != mlflow_run_id:  # a new MLflow run gets the params
            _log_params(tracker, cfg, job.prep, su)
            tracker.log_datasets(cfg.data.name, dataset_files(job.layout.processed, job.prep))
        stats = _loop(job, su, sel, tracker, progress)
        if not job.main:
            return job.model_dir
        if sel.kept_base:
            _write_kept_base(job, su, stats, tracker)
        else:
            _write_model(job, su, _model_info(cfg, su, stats), stats, tracker)
    shutil.rmtree(job.ckpt_dir, ignore_errors=True)
    shutil.rmtree(job.best_dir, ignore_errors=True)
    log.info("train: %s done in %.0fs (%.1f pairs/s in the steps, %.0fs validating), saved to %s",
             cfg.resolved_run_name, stats["seconds"], stats["pairs_per_second"] or 0, stats["validation_seconds"],
             job.model_dir)
    return job.model_dir


def base_is_candidate(cfg: Config, prep: dict) -> bool:
    """Is the untrained base a model the run may keep? The config's ``train.validation.base_is_candidate``, else yes
    for the corpus objective (pseudo pairs may not help a base that saw a billion pairs), no otherwise."""
    if cfg.train.validation.base_is_candidate is not None:
        return cfg.train.validation.base_is_candidate
    return (prep.get("objective") or {}).get("name") == "corpus"


def _corpus_params(cfg: Config, prep: dict) -> dict:
    """MLflow params of the corpus objective: the pseudo-pair counts per method and the pre-step."""
    pseudo = prep.get("pseudo")
    if not pseudo:
        return {}
    out = {"pseudo_pairs": pseudo.get("pairs"), "pseudo_methods": ",".join(pseudo.get("methods", [])),
           "pseudo_with_negative": (pseudo.get("negatives") or {}).get("with_negative", 0),
           "pre_step": cfg.train.pre_step}
    out.update({f"pseudo_pairs.{k}": v for k, v in (pseudo.get("by_method") or {}).items()})
    return out


def _log_params(tracker, cfg: Config, prep: dict, su: _Setup) -> None:
    tracker.log_params(tracking.flatten(cfg.model_dump(mode="json")))
    tracker.log_params({"data_fingerprint": prep["fingerprint"], "trainable_params": su.trainable,
                        "total_params": su.total, "trainable_pct": round(100 * su.trainable / su.total, 4),
                        "n_pairs": len(su.data), "device": su.device.type,
                        "precision": "bf16" if su.dtype is not None else "fp32",
                        "objective": (prep.get("objective") or {}).get("name", "unknown"),
                        "mask_same_label": su.mask_same_label, "label_loss_weight": su.label_loss_weight,
                        "validation_metric": su.vset.metric if su.vset else "none",
                        **_corpus_params(cfg, prep),
                        **({"prompt_query": su.prompts.query, "prompt_document": su.prompts.document}
                           if su.prompts.any else {}),
                        **({"resolved_target_modules": ",".join(su.targets.modules),
                            "adapted_modules": su.targets.adapted_modules, "architecture": su.targets.architecture}
                           if su.targets else {})})


def _evaluate_at(step: int, su: _Setup, sel: Selection, tracker, job: Job, progress: Progress) -> None:
    started = time.perf_counter()
    with speed.sdpa_for_inference(su.model):
        value, figures = _validate(su.model, su.vset, su.val_ids, su.device, su.head)
    if sel.record(step, step / su.steps_per_epoch, value, figures) and job.main:
        save_best(job.best_dir, su.model, step, value, su.head)
    progress.validation_seconds += time.perf_counter() - started
    tracker.log_metrics({f"val_{su.vset.metric}": value, **{f"val_{k}": v for k, v in figures.items()}}, step=step)
    log.info("train: step %d, validation %s %.4f (best %s at step %s)", step, su.vset.metric, value,
             f"{sel.best_value:.4f}" if sel.best_value is not None else "-", sel.best_step)


def _after_step(job: Job, su: _Setup, sel: Selection, tracker, progress: Progress, checks: set[int]) -> bool:
    """Bookkeeping after a step: MLflow, validation, a checkpoint; True when validation says stop."""
    t, done = su.t, progress.done
    if done % 10 == 0 or done == su.total_steps:
        tracker.log_metrics({"train_loss": float(np.mean(progress.losses[-10:])),
                             "lr": su.scheduler.get_last_lr()[0]}, step=done)
    if done in checks:
        _evaluate_at(done, su, sel, tracker, job, progress)
    stop = sel.active and sel.exhausted
    if (done % t.checkpoint_every == 0 or done in checks) and done < su.total_steps and not stop and job.main:
        save_checkpoint(job.ckpt_dir, step=done, st_model=su.model, optimizer=su.optimizer, scheduler=su.scheduler,
                        state={"fingerprint": job.fp, "mlflow_run_id": tracker.run_id, "selection": sel.state(),
                               "seconds": progress.seconds}, head=su.head)
    if stop:
        log.info("train: validation %s has not improved for %d evaluations; stopping at step %d of %d",
                 su.vset.metric, t.validation.patience, done, su.total_steps)
    return stop


def _loop(job: Job, su: _Setup, sel: Selection, tracker, progress: Progress) -> dict:
    """The training steps, validation scoring and checkpoints; returns the run's stats with the best
    step's weights loaded into ``su.model``."""
    checks = eval_steps(su.total_steps, su.steps_per_epoch, su.t.validation.every_steps) if sel.active else set()
    progress.started = time.perf_counter()
    if sel.active and progress.start_step == 0:
        _evaluate_at(0, su, sel, tracker, job, progress)
    if progress.start_step == 0 and job.cfg.train.pre_step == "tsdae":
        progress.pre_step = _tsdae(job, su, tracker)
    progress.rss_before = current_rss_mb()
    bar = tqdm(range(progress.start_step, su.total_steps), initial=progress.start_step, total=su.total_steps,
               desc="train", unit="step", file=sys.stderr, disable=not job.main,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    tick = time.perf_counter()
    for step, idx, loss in run_steps(su.stepper, bar, su.batches):
        progress.step_seconds += time.perf_counter() - tick
        progress.losses.append(loss)
        progress.pairs += len(idx)
        progress.tokens += int(su.data.lengths[idx].sum())
        progress.done = step + 1
        bar.set_postfix(loss=f"{np.mean(progress.losses[-20:]):.4f}", refresh=False)
        if _after_step(job, su, sel, tracker, progress, checks):
            break
        tick = time.perf_counter()
    bar.close()
    if sel.kept_base:
        log.info("train: no trained step beat the untrained base on validation (%s %.4f at step 0); keeping the base",
                 su.vset.metric, sel.best_value)
    elif sel.active and sel.best_step is not None and sel.best_step != progress.done:
        if job.main:
            restore_best(job.best_dir, su.model, sel.best_step, su.head)
        log.info("train: keeping step %d (validation %s %.4f), the best of %d evaluations", sel.best_step,
                 su.vset.metric, sel.best_value, len(sel.curve))
    elif not sel.active:
        log.info("train: no validation set to choose a step with; keeping the last step")
    return {**_finish_stats(su, sel, progress, job.dist), "resumed_from_step": progress.start_step,
            **({"pre_step": progress.pre_step} if progress.pre_step else {})}


def _tsdae(job: Job, su: _Setup, tracker) -> dict:
    """The TSDAE pre-step (pipeline/train/tsdae.py) on the model being trained, before the contrastive steps."""
    from pipeline.train import tsdae

    t = job.cfg.train.tsdae
    texts = tsdae.sentences(job.layout.processed, job.prep, t.max_sentences, job.cfg.seed)
    stats = {"name": "tsdae", **tsdae.run(su.model, texts, t, resolve_base(job.cfg.model.base), su.device,
                                          job.cfg.seed)}
    tracker.log_metrics({f"tsdae_{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
    return stats


def _trust_checks(su: _Setup) -> tuple[float | None, float, int]:
    """Field notes 2 and 5 on the kept weights: lora_B moved and the embeddings changed. Returns the
    lora_B norm, the probe's mean cosine to the base and the embedding width."""
    su.model.eval()
    moved = lora_b_norm(su.model) if su.t.method == "lora" else None
    new_probe = encoding.encode_ids(su.model, su.probe_ids, device=su.device)
    probe_cos = float(np.mean(np.sum(su.base_probe * new_probe, axis=1)))
    if su.t.method == "lora" and not moved:
        raise TrainingError("training finished but every lora_B weight is still zero: the adapter did not "
                            "learn (check train.lr and that the target modules are used)")
    if probe_cos > 0.999999:
        raise TrainingError(f"training finished but embeddings are unchanged (mean cosine to base "
                            f"{probe_cos:.7f}); the trained model equals the base")
    return moved, probe_cos, int(new_probe.shape[1])


def _finish_stats(su: _Setup, sel: Selection, progress: Progress, dist) -> dict:
    """The run's figures, after the trust checks."""
    moved, probe_cos, dim = _trust_checks(su)
    return {
        "seconds": round(progress.seconds, 2),
        "steps": progress.done,
        "planned_steps": su.total_steps,
        # throughput of the optimiser steps alone; validation is timed apart
        "pairs_per_second": progress.per_step_second(progress.pairs, 2),
        "real_tokens_per_second": progress.per_step_second(progress.tokens, 1),
        "step_seconds": round(progress.step_seconds, 2),
        "validation_seconds": round(progress.validation_seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        # model, data and runtime loaded; the rest of the peak is what the training steps add
        "rss_before_train_mb": round(progress.rss_before, 1) if progress.rss_before is not None else None,
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if su.device.type == "cuda" else None,
        "final_loss": round(float(np.mean(progress.losses[-20:])), 5) if progress.losses else None,
        "lora_b_abs_sum": moved,
        "probe_cosine_to_base": round(probe_cos, 6),
        "device": su.device.type,
        "precision": "bf16" if su.dtype is not None else "fp32",
        "processes": dist.world if dist else 1,
        "cpu_levers": su.levers,
        "mask_same_label": su.mask_same_label,
        "label_loss_weight": su.label_loss_weight,
        "pair_loss_weight": su.t.pair_loss_weight,
        "validation": sel.summary(progress.done, su.total_steps),
        "embedding_dim": dim,
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
        "label_head": ({"labels": len(su.head.labels), "scale": su.head.scale, "files": [head_contract.WEIGHTS,
                                                                                          head_contract.META]}
                       if su.head is not None else None),
    }


def _write_model(job: Job, su: _Setup, info: dict, stats: dict, tracker) -> None:
    cfg = job.cfg
    with atomic_dir(job.model_dir) as tmp:
        if cfg.train.method == "lora":
            _save_lora_checked(tmp, su, info, stats)
        else:
            su.model.save(str(tmp), safe_serialization=True)
        write_model_info(tmp, info)
        if su.head is not None:
            head_contract.save(tmp, su.head.to_contract(), {"loss_weight": su.label_loss_weight})
        if cfg.train.method == "lora" and cfg.train.quantization == "none" and cfg.train.weights_dtype == "fp32":
            # the run as it loads from disk must be the model validation chose (before the folder is committed)
            stats["reload_min_cos"] = round(verify_reload(tmp, su.model, su.probe_ids, su.device), 6)
        elif cfg.train.method == "lora":  # the base reloads in fp32, so it cannot equal 4/8-bit or bf16 weights
            stats["reload_min_cos"] = None
        write_json_atomic(tmp / MANIFEST, make_manifest(
            "train", cfg, fingerprint=job.fp, inputs={"prepared_data": job.prep["fingerprint"]},
            extra={"mlflow_run_id": tracker.run_id, "train": stats, "model": info,
                   "objective": job.prep.get("objective")}))
    tracker.log_metrics({f"train_{k}": v for k, v in stats.items() if isinstance(v, (int, float))
                         and not isinstance(v, bool)})
    tracker.log_artifact(job.model_dir / MANIFEST)
    if su.head is not None:
        tracker.log_artifact(job.model_dir / head_contract.WEIGHTS, "label_head")
        tracker.log_artifact(job.model_dir / head_contract.META, "label_head")
    if cfg.train.method == "lora":
        tracker.log_artifact(job.model_dir / "adapter", "adapter")


def _write_kept_base(job: Job, su: _Setup, stats: dict, tracker) -> None:
    """Validation kept the untrained base: the model folder records the base (as ``train.method=base`` does) with
    the training that did not beat it, so embed, eval and export treat the run as the base model and say why."""
    cfg, t = job.cfg, job.cfg.train
    resolved = resolve_base(cfg.model.base)
    info = {"method": "base", "kept_base": True, "trained_method": t.method, "base": cfg.model.base,
            "base_resolved": resolved, "base_fingerprint": base_fingerprint(resolved), "revision": cfg.model.revision,
            "trust_remote_code": cfg.model.trust_remote_code, "max_seq_length": t.max_seq_length, "lora": None,
            "prompts": su.prompts.record(), "trainable_params": 0, "total_params": su.total,
            "embedding_dim": stats.pop("embedding_dim")}
    with atomic_dir(job.model_dir) as tmp:
        write_model_info(tmp, info)
        write_json_atomic(tmp / MANIFEST, make_manifest(
            "train", cfg, fingerprint=job.fp, inputs={"prepared_data": job.prep["fingerprint"]},
            extra={"mlflow_run_id": tracker.run_id, "train": stats, "model": info, "kept": "base",
                   "objective": job.prep.get("objective")}))
    tracker.log_metrics({f"train_{k}": v for k, v in stats.items() if isinstance(v, (int, float))
                         and not isinstance(v, bool)})
    tracker.set_tags({"kept": "base"})
    tracker.log_artifact(job.model_dir / MANIFEST)


def _save_lora_checked(folder: Path, su: _Setup, info: dict, stats: dict) -> None:
    """The adapter (and any named heads) in ``folder``; what was saved must be what was trained."""
    stats["saved_params"] = saved_parameters(save_lora(su.model, folder))
    if stats["saved_params"] != su.trainable:
        raise TrainingError(f"the run trained {su.trainable:,} parameters but its adapter holds "
                            f"{stats['saved_params']:,}: a trained module is not saved")
    info["saved_params"] = stats["saved_params"]


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
        tracker.log_datasets(cfg.data.name, dataset_files(Layout(cfg).processed, prep))
        with atomic_dir(model_dir) as tmp:
            write_model_info(tmp, info)
            write_json_atomic(tmp / MANIFEST, make_manifest(
                "train", cfg, fingerprint=fp, inputs={"prepared_data": prep["fingerprint"]},
                extra={"mlflow_run_id": tracker.run_id, "train": {"seconds": 0.0, "steps": 0,
                       "pairs_per_second": None, "peak_rss_mb": round(peak_rss_mb(), 1)}, "model": info}))
    return model_dir
