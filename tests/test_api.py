"""The public API a notebook imports (pipeline/__init__.py): load a run, encode, search an export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, RUN, cli, split_texts, trained


def test_importing_the_package_loads_no_model_library():
    # `python -m pipeline` imports the package first: the API is imported on first use, not at import time
    code = "import sys, pipeline; print(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_run_loads_encodes_and_its_export_searches_like_the_pipeline(project, trained_cache):
    import pipeline
    from pipeline.core.errors import ConfigError

    cfg = trained(project, trained_cache)
    assert cli("embed", *cfg) == 0
    encoder = pipeline.load_run(RUN)
    assert isinstance(encoder, pipeline.Encoder)
    texts = split_texts("test")
    vectors = encoder.encode(texts, "document")
    embedded = np.load(Path("runs") / RUN / "embeddings" / "test.npy")  # what the embed stage wrote
    assert vectors.dtype == np.float32 and vectors.shape == embedded.shape
    base = np.load(Path(json.loads((Path("runs") / RUN / "embeddings" / "manifest.json").read_text())["base_dir"])
                   / "test.npy")
    off_run, off_base = np.abs(vectors - embedded).max(), np.abs(vectors - base).max()
    assert np.min(np.sum(vectors * embedded, axis=1)) >= 0.999 and off_run < off_base / 10  # the run, not the base
    assert pipeline.load_run(Path("runs") / RUN).encode(texts[:2], "query").shape == (2, vectors.shape[1])

    assert cli("export", *cfg, "--force", "export.quantize_int8=false") == 0
    export = pipeline.open_export(Path("exports") / RUN)
    hits = export.search(texts[:2], k=3)
    test = [json.loads(line) for line in open("data/processed/synthetic/test.jsonl")]
    assert [h["rank"] for h in hits[0]] == [1, 2, 3] and hits[0][0]["id"] == test[0]["id"]
    assert export.search(texts[0], k=1)[0][0]["id"] == test[0]["id"]  # one query as a string
    with pytest.raises(ConfigError, match="lexical index"):
        export.search("tv", mode="lexical")


def test_a_missing_run_is_one_clear_error(tmp_path, monkeypatch):
    import pipeline
    from pipeline.core.errors import ArtifactError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactError, match="no trained run at 'nothing-here'"):
        pipeline.load_run("nothing-here")
    with pytest.raises(AttributeError):
        pipeline.no_such_thing
