"""Which contrastive objective a corpus gets, decided from its shape (``pairs.objective: auto``).

A corpus comes in one of three shapes, and each has an objective that uses what it knows:

- **group**: texts with entity ids (offers of one product, tickets of one case). Positives are two texts
  of one entity, plus text -> label name where there are labels; two texts of one label but different
  entities stay negatives, because telling entities apart is the task.
- **label**: texts with labels but no entity ids (intents, topics). Positives are two texts of one label,
  plus text -> label name; texts of one label are never each other's negatives (the same-label mask),
  texts of other labels are.
- **pairs**: given query -> positive rows (``data.format: pairs`` and the Walmart-Amazon reader), or a retrieval
  set's judged train queries.
- **corpus**: documents alone (a text column, or a retrieval set without train judgments): pseudo queries built
  from the documents themselves (pipeline/prepare/pseudo.py). Chosen by ``auto`` only where nothing else is
  known; set explicitly on a corpus that has ids, labels or train judgments, it withholds them from training
  (the texts alone are trained on) and keeps the val/test ids or judgments as the judged set.

An explicit ``pairs.objective`` wins over ``auto``; one the data cannot support is an error. The choice
and its reason are written to the prepare manifest, and the train stage reads the resolved mask from
there, so every later artefact records the same decision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.core.config import PAIR_FORMATS, Config
from pipeline.core.errors import DataError


# The label head's loss weight ``auto`` gives each objective (train.label_loss_weight unset): no head anywhere.
# On the staged labels-only and group corpora a head did not beat the pairs alone on validation (and cost
# recall@1 with groups): configs/experiments/README.md, "Label head". The corpus objective withholds labels.
AUTO_LABEL_LOSS = {"group": 0.0, "label": 0.0, "pairs": 0.0, "corpus": 0.0}
# Bump when what auto resolves changes: prepared folders record the resolved objective, so they are prepared
# again (pipeline/contracts/identity.py), and the runs on them train again.
VERSION = 1


@dataclass(frozen=True)
class Objective:
    name: str  # group | label | pairs | corpus
    reason: str
    same_label_pairs: float  # share of train texts paired with another text of their label
    mask_same_label: bool  # same-label texts are never in-batch negatives of each other
    # weight of the label head's cross-entropy beside the pair loss (pipeline/train/label_head.py); 0: no head
    label_loss_weight: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _pick(cfg: Config, has_groups: bool, has_labels: bool) -> tuple[str, str]:
    wanted = cfg.pairs.objective
    if wanted == "corpus":
        return "corpus", "set in the config: the texts alone are trained on (ids, labels and train judgments withheld)"
    if cfg.data.format in PAIR_FORMATS:
        if wanted not in ("auto", "pairs"):
            raise DataError(f"pairs.objective={wanted} needs a labelled corpus; data.format "
                            f"'{cfg.data.format}' gives query -> positive pairs (use auto or pairs)")
        return "pairs", "the corpus is query -> positive pairs"
    if wanted == "pairs":
        raise DataError("pairs.objective=pairs needs data.format: pairs (query and positive columns)")
    if wanted == "group" and not has_groups:
        raise DataError("pairs.objective=group needs entity ids (data.group_column), and the corpus has none")
    if wanted == "label" and not has_labels:
        raise DataError("pairs.objective=label needs labels (data.label_column), and the corpus has none")
    if wanted != "auto":
        return wanted, "set in the config"
    if has_groups:
        return "group", "the corpus has entity ids (groups)"
    if has_labels:
        return "label", "the corpus has labels and no entity ids"
    return "corpus", "the corpus has neither entity ids nor labels: pseudo queries from the texts alone"


def resolve(cfg: Config, *, has_groups: bool, has_labels: bool) -> Objective:
    """The objective for a corpus of this shape under ``cfg`` (explicit settings win over the defaults)."""
    name, reason = _pick(cfg, has_groups, has_labels)
    same_label = cfg.pairs.same_label_pairs
    if same_label is None:
        same_label = 1.0 if name == "label" else 0.0
    mask = cfg.train.mask_same_label
    if mask is None:
        mask = name == "label"
    head = cfg.train.label_loss_weight
    if head is None:
        head = AUTO_LABEL_LOSS[name] if has_labels else 0.0
    if head > 0 and not has_labels:
        raise DataError("train.label_loss_weight needs labels (data.label_column) to train a label head, and the "
                        "corpus has none; set it to 0")
    if head > 0 and name == "corpus":
        raise DataError("train.label_loss_weight trains a label head on the labels, and pairs.objective=corpus "
                        "withholds them from training; set it to 0 or choose another objective")
    return Objective(name=name, reason=reason, same_label_pairs=float(same_label), mask_same_label=bool(mask),
                     label_loss_weight=float(head))


def resolve_retrieval(cfg: Config, *, has_train_judgments: bool) -> Objective:
    """The objective of a retrieval set: its judged train queries (pairs), or the documents alone (corpus) where it
    has none or the config withholds them."""
    wanted = cfg.pairs.objective
    if wanted not in ("auto", "pairs", "corpus"):
        raise DataError(f"pairs.objective={wanted} needs a labelled corpus; a retrieval set trains on judged train "
                        f"queries (pairs) or on its documents alone (corpus)")
    if wanted == "corpus":
        name, reason = "corpus", "set in the config: the documents alone are trained on (train judgments withheld)"
    elif has_train_judgments:
        name, reason = "pairs", "a retrieval set: train query -> judged document"
    elif wanted == "pairs":
        raise DataError("pairs.objective=pairs needs judged train queries, and the retrieval set has none (use auto "
                        "or corpus to train on the documents alone)")
    else:
        name, reason = "corpus", "a retrieval set without train judgments: pseudo queries from the documents alone"
    return Objective(name=name, reason=reason, same_label_pairs=0.0, mask_same_label=False)


def mask_same_label(cfg: Config, prep_manifest: dict) -> bool:
    """The same-label mask a training run uses: the config's explicit value, else the prepared data's
    objective (older prepared folders without one: off, as before objectives existed)."""
    if cfg.train.mask_same_label is not None:
        return cfg.train.mask_same_label
    return bool((prep_manifest.get("objective") or {}).get("mask_same_label", False))


def label_loss_weight(cfg: Config, prep_manifest: dict) -> float:
    """The label head's loss weight a training run uses: the config's explicit value, else the prepared
    data's objective (prepared folders from before label heads: 0, no head)."""
    if cfg.train.label_loss_weight is not None:
        return float(cfg.train.label_loss_weight)
    return float((prep_manifest.get("objective") or {}).get("label_loss_weight", 0.0))
