"""The one training loop: pairs tokenised once, batches, one optimiser step with the masked in-batch
loss, the optimiser and the schedule. The train stage drives it with its bookkeeping (validation,
checkpoints, MLflow) around each step; the bench drives the same generator to time it, so what the bench
measures is what training runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch

from pipeline.core.config import TrainConfig
from pipeline.core.errors import TrainingError
from pipeline.model import prompts
from pipeline.model import tokens as encoding
from pipeline.train import distributed
from pipeline.train.batching import epoch_batches
from pipeline.train.label_head import CosineHead, classes_of, head_loss
from pipeline.train.losses import Tagged, contrastive_loss_with_negatives, false_negative_mask, hard_negative_mask


class PairTensors:
    """Training pairs as token ids and integer codes, tokenised once."""

    def __init__(self, pairs, st_model, max_seq_length: int, used_prompts: prompts.Prompts | None = None,
                 label_names: list[str] | None = None, document_length: int | None = None):
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
        # train.document_length: the document side (positives, negatives) tokenised shorter than the queries, in
        # the same text-id space, so that masks still see a text used on both sides as one text
        self.document_ids = self.ids
        if document_length is not None and document_length < max_seq_length:
            used = sorted({*self.positive.tolist(), *self.negative[self.negative >= 0].tolist()})
            cut = dict(zip(used, encoding.tokenize(st_model, [texts[i] for i in used], document_length)))
            self.document_ids = [cut.get(i, row) for i, row in enumerate(self.ids)]
        n = len(pairs)
        # Pair and negative metadata share one code space so that "same group" compares across them.
        none = pd.Series([None] * n, dtype=object)
        groups = _codes(pd.concat([pairs["group"], pairs.get("negative_group", none)], ignore_index=True))
        labels = _codes(pd.concat([pairs["label"], pairs.get("negative_label", none)], ignore_index=True))
        self.group, self.negative_group = groups[:n], groups[n:]
        self.label, self.negative_label = labels[:n], labels[n:]
        self.positive_is_label = (pairs["kind"] == "label").to_numpy()
        self.negative_is_label = (pairs.get("negative_kind", none) == "label").to_numpy()
        docs = self.document_ids
        self.lengths = np.array([len(self.ids[a]) + len(docs[p]) for a, p in zip(self.anchor, self.positive)])
        self.lengths += np.array([len(docs[k]) if k >= 0 else 0 for k in self.negative], dtype=self.lengths.dtype)
        self.real_tokens = int(self.lengths.sum())
        # The label head's targets (index into label_names, -1: none): the anchor's label, and the positive's
        # where the positive is another text of the corpus (a label-name positive is not a text to classify).
        self.anchor_class = classes_of(pairs["label"], label_names or [])
        self.positive_class = np.where(self.positive_is_label, -1, self.anchor_class)
        # retrieval sets: document id -> text id of its training text, for the judged-relevant mask
        self.doc_text_id = {d: text_id[t] for col, texts in (("positive_id", positives), ("negative_id", negs))
                            if col in pairs for d, t in zip(pairs[col], texts) if isinstance(d, str) and t is not None}
        # set by the train stage for a retrieval set (pipeline/train/retrieval.py): judged-relevant texts per query
        self.relevant = None

    def __len__(self) -> int:
        return len(self.anchor)


def _codes(series) -> np.ndarray:
    values = series.fillna("").astype(str)
    uniques = {v: i for i, v in enumerate(sorted(set(values)))}
    return np.array([uniques[v] if v else -1 for v in values])


def make_optimizer(st_model, t, head: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable weights (and the label head's, in a group of its own); with
    ``train.lora.loraplus_lr_ratio``, PEFT's LoRA+ groups (lora_B at ratio x train.lr, lora_A at train.lr)."""
    if t.method == "lora" and t.lora.loraplus_lr_ratio:
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(st_model, torch.optim.AdamW, lr=t.lr,
                                        loraplus_lr_ratio=t.lora.loraplus_lr_ratio, weight_decay=t.weight_decay)
    else:
        opt = torch.optim.AdamW([p for p in st_model.parameters() if p.requires_grad], lr=t.lr,
                                weight_decay=t.weight_decay)
    if head is not None:
        opt.add_param_group({"params": list(head.parameters()), "lr": t.lr, "weight_decay": 0.0})
    return opt


@dataclass
class Stepper:
    """What every optimiser step works with: the model, the tokenised pairs, the training settings, the
    optimiser and its schedule, where it runs, and (under torchrun) the process group."""

    model: torch.nn.Module
    data: PairTensors
    t: TrainConfig
    optimizer: torch.optim.Optimizer
    scheduler: object
    device: torch.device
    dtype: torch.dtype | None = None
    dist: distributed.Dist | None = None
    head: CosineHead | None = None  # the label head trained with the encoder (train.label_loss_weight > 0)

    @property
    def label_weight(self) -> float:
        return float(self.t.label_loss_weight or 0.0) if self.head is not None else 0.0


def _embed_batch(sp: Stepper, idx: np.ndarray, anchors_only: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Anchor, positive and mined-negative embeddings of the pairs ``idx`` (anchors alone when the pair loss
    is off). Under torchrun this process embeds only its shard and the embeddings of every shard are gathered."""
    st_model, data, dist = sp.model, sp.data, sp.dist
    pad, side = encoding.pad_info(st_model)
    local = dist.shard(idx) if dist else idx

    def embed(text_ids, rows):
        if len(text_ids) == 0:  # a shard with no negatives (or no rows) still takes part in the gather
            return torch.zeros((0, st_model.get_embedding_dimension()), device=sp.device)
        feats = {k: v.to(sp.device) for k, v in encoding.collate([rows[i] for i in text_ids], pad, side).items()}
        return encoding.forward(st_model, feats)

    with_neg = local[data.negative[local] >= 0]
    with encoding.autocast(sp.device, sp.dtype):
        a_emb = embed(data.anchor[local], data.ids)
        if anchors_only:
            return (dist.gather(a_emb, dist.shard_sizes(len(idx))) if dist else a_emb), None, None
        p_emb = embed(data.positive[local], data.document_ids)
        n_emb = embed(data.negative[with_neg], data.document_ids)
    if dist:
        sizes = dist.shard_sizes(len(idx))
        a_emb, p_emb = dist.gather(a_emb, sizes), dist.gather(p_emb, sizes)
        n_emb = dist.gather(n_emb, [int((data.negative[part] >= 0).sum()) for part in np.array_split(idx, dist.world)])
    return a_emb, p_emb, n_emb


def batch_loss(sp: Stepper, idx: np.ndarray) -> torch.Tensor:
    """The loss of the pairs ``idx``: ``train.pair_loss_weight`` x the masked in-batch contrastive loss, plus
    ``train.label_loss_weight`` x the label head's cross-entropy on the batch's texts when a head is trained."""
    data, t = sp.data, sp.t
    if t.pair_loss_weight == 0:
        a_emb, _, _ = _embed_batch(sp, idx, anchors_only=True)
        ce = head_loss(sp.head, [a_emb], [data.anchor_class[idx]])
        if ce is None:  # no labelled anchor in this batch: a zero loss that still reaches every weight
            return a_emb.sum() * 0.0
        return sp.label_weight * ce
    a_emb, p_emb, n_emb = _embed_batch(sp, idx)
    loss = t.pair_loss_weight * _pair_loss(sp, idx, a_emb, p_emb, n_emb)
    if sp.label_weight:
        ce = head_loss(sp.head, [a_emb, p_emb], [data.anchor_class[idx], data.positive_class[idx]])
        if ce is not None:
            loss = loss + sp.label_weight * ce
    return loss


def _pair_loss(sp: Stepper, idx: np.ndarray, a_emb, p_emb, n_emb) -> torch.Tensor:
    """The masked in-batch contrastive loss of the pairs ``idx`` (with their mined negatives): two pairs of
    one group, identical texts, a label that is right for another anchor, or (retrieval sets) a document judged
    relevant to the anchor's query never count as negatives."""
    data, t = sp.data, sp.t
    a_ids, p_ids = data.anchor[idx], data.positive[idx]
    mask = false_negative_mask(
        torch.as_tensor(data.group[idx]), torch.as_tensor(data.label[idx]), torch.as_tensor(p_ids),
        torch.as_tensor(a_ids), torch.as_tensor(data.positive_is_label[idx]), t.mask_same_label,
    ).to(sp.device)
    if data.relevant is not None:  # a retrieval set: no judged-relevant document of the anchor's query
        mask = mask | data.relevant(idx, p_ids).to(sp.device)
        mask.fill_diagonal_(False)
    neg_rows = idx[data.negative[idx] >= 0]
    positives = Tagged(torch.as_tensor(data.group[idx]), torch.as_tensor(data.label[idx]), torch.as_tensor(p_ids),
                       torch.as_tensor(data.positive_is_label[idx]))
    negatives = Tagged(torch.as_tensor(data.negative_group[neg_rows]), torch.as_tensor(data.negative_label[neg_rows]),
                       torch.as_tensor(data.negative[neg_rows]), torch.as_tensor(data.negative_is_label[neg_rows]))
    neg_mask = hard_negative_mask(positives, torch.as_tensor(a_ids), negatives, t.mask_same_label).to(sp.device)
    if data.relevant is not None:
        neg_mask = neg_mask | data.relevant(idx, data.negative[neg_rows]).to(sp.device)
    return contrastive_loss_with_negatives(a_emb, p_emb, n_emb if len(neg_rows) else None, scale=t.scale,
                                           mask=mask, negative_mask=neg_mask, symmetric=t.symmetric)


def training_step(sp: Stepper, idx: np.ndarray, step: int = 0) -> float:
    """One optimiser step on the pairs ``idx``. Under torchrun the loss and the summed gradient are those
    of the whole batch (embeddings gathered, gradients all-reduced)."""
    loss = batch_loss(sp, idx)
    if not torch.isfinite(loss):
        raise TrainingError(f"loss became {loss.item()} at step {step}; lower train.lr")
    sp.optimizer.zero_grad(set_to_none=True)
    if loss.requires_grad:  # false only for a torchrun rank whose shard of a tiny last batch is empty
        loss.backward()
    params = [p for g in sp.optimizer.param_groups for p in g["params"]]
    if sp.dist:
        sp.dist.all_reduce_grads(params)
        if sp.head is not None:
            # Every process computes the head's whole gradient from the gathered batch (the head is not
            # sharded), so the sum over processes is world x the single-process gradient.
            for p in sp.head.parameters():
                p.grad /= sp.dist.world
    if sp.t.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, sp.t.grad_clip)
    sp.optimizer.step()
    sp.scheduler.step()
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


def run_steps(sp: Stepper, steps: Iterable[int], batch_of: Callable[[int], np.ndarray]
              ) -> Iterator[tuple[int, np.ndarray, float]]:
    """The training loop: for each step, its batch and one :func:`training_step`; yields (step, batch, loss)."""
    sp.model.train()
    for step in steps:
        idx = batch_of(step)
        yield step, idx, training_step(sp, idx, step)
