"""The label-head contract: what a run with a trained classification head holds, and how every reader applies it.

The train stage writes the head beside the model (``runs/<run>/model/``) when the run trained one
(``train.label_loss_weight`` > 0, pipeline/train/label_head.py); export copies it to ``exports/<run>/head/``; eval,
serve and the MLflow classifier read it through here, never through the train stage.

- ``label_head.safetensors``: ``prototypes``, float32 (labels, dim), one L2-normalised row per label;
- ``label_head.json``: the label names in row order, the scale, the embedding dimension and what the head reads.

The head is a cosine classifier: ``logits = scale * normalise(embedding) @ prototypes.T``. It reads the
encoder's pooled, L2-normalised sentence embedding of a text in its document form (the form eval's other
heads read and ``/embed`` returns by default), so it applies to any exported form's vectors unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.core.artifacts import read_json, write_json_atomic
from pipeline.core.errors import ArtifactError

WEIGHTS = "label_head.safetensors"
META = "label_head.json"
KIND = "cosine"
ROLE = "document"  # the prompt role of the texts the head classifies (pipeline/model/prompts.py)


@dataclass(frozen=True)
class LabelHead:
    """A trained cosine classifier over sentence embeddings."""

    labels: tuple[str, ...]
    prototypes: np.ndarray  # (len(labels), dim), rows L2-normalised
    scale: float

    @property
    def dim(self) -> int:
        return int(self.prototypes.shape[1])

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, labels) scaled cosines of ``embeddings`` (n, dim) to every label's prototype."""
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ArtifactError(f"the label head reads {self.dim}-dimensional embeddings, got shape {emb.shape}")
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return self.scale * emb @ self.prototypes.T

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        z = self.logits(embeddings)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """The label name of each row (object array)."""
        return np.asarray(self.labels, dtype=object)[np.argmax(self.logits(embeddings), axis=1)]

    def top(self, embeddings: np.ndarray, k: int = 1) -> list[list[dict]]:
        """Per row, the ``k`` most probable labels with their probabilities, most probable first."""
        probs = self.probabilities(embeddings)
        k = max(1, min(k, len(self.labels)))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[{"label": self.labels[j], "probability": float(p[j])} for j in row] for p, row in zip(probs, order)]


def make(labels: Sequence[str], prototypes: np.ndarray, scale: float) -> LabelHead:
    protos = np.asarray(prototypes, dtype=np.float32)
    if protos.ndim != 2 or protos.shape[0] != len(labels):
        raise ArtifactError(f"a label head needs one prototype per label: {len(labels)} labels, shape {protos.shape}")
    protos = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
    return LabelHead(tuple(str(x) for x in labels), protos, float(scale))


def exists(folder: Path) -> bool:
    return (Path(folder) / META).exists() and (Path(folder) / WEIGHTS).exists()


def save(folder: Path, head: LabelHead, extra: dict | None = None) -> None:
    """Write the head into ``folder`` (the caller makes the folder atomic)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    save_file({"prototypes": np.ascontiguousarray(head.prototypes, dtype=np.float32)}, str(folder / WEIGHTS))
    write_json_atomic(folder / META, {"kind": KIND, "labels": list(head.labels), "scale": head.scale,
                                      "dim": head.dim, "reads": f"L2-normalised sentence embedding, {ROLE} form",
                                      **(extra or {})})


def load(folder: Path) -> LabelHead | None:
    """The head saved in ``folder``, or None when the run trained none."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not exists(folder):
        return None
    meta = read_json(folder / META)
    if meta.get("kind") != KIND:
        raise ArtifactError(f"{folder / META}: label head of kind {meta.get('kind')!r}; this version reads '{KIND}'")
    protos = load_file(str(folder / WEIGHTS))["prototypes"]
    head = make(meta["labels"], protos, meta["scale"])
    if head.dim != int(meta["dim"]):
        raise ArtifactError(f"{folder}: the head's prototypes have dimension {head.dim}, its {META} says {meta['dim']}")
    return head


def meta(folder: Path) -> dict:
    return read_json(Path(folder) / META)
