"""export, the label head: a run that trained one ships it in ``exports/<run>/head/``, gated like the encoder.

The head (pipeline/contracts/label_head.py) reads a form's normalised document-form embedding, so every
exported form classifies with the same two files. The gate classifies the fixed sample with the trained
model (the reference the encoder gate uses) and with each form: the merged model and the ONNX model must
give every label the same probability within ``export.head_max_prob_diff``; the int8 model is measured and
reported only, as its embeddings are. A form whose embeddings pass the encoder gate can still move a
near-tie, so the agreement of the top label is reported beside the probabilities.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipeline.contracts import label_head as contract

FOLDER = "head"
GATED = ("merged", "onnx")  # forms whose classifications must match; the others are reported


def copy_head(model_dir: Path, export_dir: Path) -> contract.LabelHead | None:
    """Copy the run's head into ``export_dir/head/``; None (and nothing written) when the run has none."""
    head = contract.load(model_dir)
    if head is None:
        return None
    out = Path(export_dir) / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    for name in (contract.WEIGHTS, contract.META):
        shutil.copy2(Path(model_dir) / name, out / name)
    if contract.load(out) is None:  # pragma: no cover - the copy is read back like any reader would
        raise FileNotFoundError(out)
    return head


def gate(head: contract.LabelHead, reference: np.ndarray, forms: dict[str, np.ndarray]) -> dict:
    """Per form: the largest probability difference to the reference over the sample and every label, and
    the share of sample texts whose top label agrees. ``reference`` and ``forms`` hold document-form
    embeddings of the same sample texts."""
    ref_p = head.probabilities(reference)
    ref_top = np.argmax(ref_p, axis=1)
    out = {}
    for form, emb in forms.items():
        p = head.probabilities(emb)
        out[form] = {"max_prob_diff": float(np.abs(p - ref_p).max()),
                     "top1_agreement": float(np.mean(np.argmax(p, axis=1) == ref_top))}
    return {"labels": len(head.labels), "sample_size": int(len(reference)), "forms": out}


def failures(numbers: dict | None, max_prob_diff: float) -> list[str]:
    """The head gate's failures, as sentences (empty: it passes or there is no head)."""
    if not numbers:
        return []
    return [f"the label head on the {form} form gives probabilities up to {v['max_prob_diff']:.5f} away from the "
            f"trained model's (> export.head_max_prob_diff {max_prob_diff})"
            for form, v in numbers["forms"].items() if form in GATED and v["max_prob_diff"] > max_prob_diff]


def card_lines(numbers: dict | None, max_prob_diff: float) -> list[str]:
    if not numbers:
        return []
    lines = ["", f"Label head ({numbers['labels']} labels) on the same {numbers['sample_size']} texts, against the "
                 "trained model:", "", "| form | max probability difference | top-1 agreement | required |",
             "|---|---|---|---|"]
    for form, v in numbers["forms"].items():
        need = f"<= {max_prob_diff}" if form in GATED else "reported only"
        lines.append(f"| {form} | {v['max_prob_diff']:.6f} | {v['top1_agreement']:.3f} | {need} |")
    return lines


def file_lines(numbers: dict | None) -> list[str]:
    if not numbers:
        return []
    return [f"- `head/`: the label head trained with the encoder ({numbers['labels']} labels): "
            f"`{contract.WEIGHTS}` (one L2-normalised prototype per label) and `{contract.META}` (label names in "
            "row order, scale). Probabilities are `softmax(scale * embedding @ prototypes.T)` of a text's normalised "
            "document-form embedding from any form above; `make serve` answers `POST /classify`, and "
            "`pipeline.contracts.label_head.load(\"head\")` loads it in Python."]
