"""The one encoder interface every form implements: PyTorch (fp32, bf16 weights, a merged or adapter model),
ONNX (traced here or exported), a plain ``SentenceTransformer`` folder, one adapter of the adapter server, the
MLflow adapter model and the corpus job.

    vectors = encoder.encode(texts, "query")   # float32 (len(texts), dim), rows L2-normalised, input order

``role`` is the side of the search the texts are on (pipeline/model/prompts.py): the encoder prepends the
prompt of that role itself, so a caller passes the texts as users wrote them and can never apply a prompt
twice or forget it. ``name`` says which form runs (``torch-fp32``, ``onnx-fp32``, ``merged``, ...).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from pipeline.model.prompts import Role

__all__ = ["Encoder", "Role"]


@runtime_checkable
class Encoder(Protocol):
    name: str

    def encode(self, texts: Sequence[str], role: Role) -> np.ndarray:
        """float32 (len(texts), dim), rows L2-normalised, in input order; ``role``'s prompt prepended."""
        ...
