"""Every model family through the pipeline: Q/K/V presets resolved per architecture, prompts applied the
same way everywhere, pooling and padding kept through training, the merge, ONNX and serving."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import cli, make_corpus
from tests.families import FAMILIES, build

QUIET = ["tracking.enabled=false"]


@pytest.fixture(scope="session")
def family_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


def family_project(tmp_path: Path, base: Path, **overrides) -> Path:
    """A project folder with a few hundred synthetic offers and a short training run on ``base``."""
    make_corpus(n_clusters_per_brand=4).to_csv(tmp_path / "corpus.csv", index=False)
    cfg = {
        "seed": 0, "run_name": "fam",
        "model": {"base": str(base)},
        "data": {"name": "synthetic", "format": "table", "path": "corpus.csv", "text_column": "title",
                 "label_column": "category", "group_column": "cluster",
                 "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
        "train": {"method": "lora", "batch_size": 16, "max_steps": 4, "lr": 5e-3, "max_seq_length": 32,
                  "lora": {"r": 4, "alpha": 8}, "num_threads": 1},
        "eval": {"bootstrap": 20, "classifier_c": [1.0], "knn_candidates": [5], "batch_size": 64},
        "export": {"quantize_int8": False, "mlflow_model": False, "sample_texts": 24},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "family.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
