"""The shard-by-shard IVF index: exact top-k streamed over shards equals brute force, the recall it records is
the recall of the index it writes, and the candidate chosen is the smallest one that reaches the target."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import load_config


def _vectors(n: int, dim: int = 32, topics: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, dim))
    x = centres[rng.integers(topics, size=n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _corpus_folder(cfg, folder: Path, vectors: np.ndarray, shard_rows: int) -> Path:
    from pipeline.core.artifacts import make_manifest, write_json_atomic
    from pipeline.contracts.shards import SHARDS, write_shard

    shards = []
    for i, start in enumerate(range(0, len(vectors), shard_rows)):
        part = vectors[start:start + shard_rows]
        info = write_shard(folder / SHARDS, i, start, [f"v{start + j}" for j in range(len(part))], part,
                           fingerprint="t", seconds=0)
        shards.append({k: info[k] for k in ("index", "file", "rows", "first_row", "first_id", "last_id", "sha256")})
    write_json_atomic(folder / "manifest.json", make_manifest("embed-corpus", cfg, fingerprint="t", inputs={},
                                                              extra={"rows": len(vectors), "dim": vectors.shape[1],
                                                                     "shards": shards}))
    return folder


@pytest.fixture
def setup(tmp_path):
    cfg = load_config(None, ["corpus.index.train_rows=1500", "corpus.index.queries=50", "corpus.index.nlist=16",
                             "corpus.index.candidates=[sq8,pq4,pq16]", "corpus.index.recall_target=0.9",
                             "runtime.num_threads=1"]) if Path("configs/default.yaml").exists() else None
    if cfg is None:
        pytest.skip("run from the repository root")
    vectors = _vectors(3000)
    return cfg, _corpus_folder(cfg, tmp_path / "corpus", vectors, shard_rows=700), vectors


def test_exact_topk_over_shards_is_brute_force(setup):
    from pipeline.scale.index import exact_topk

    cfg, folder, vectors = setup
    queries = vectors[::97]
    rows, _ = exact_topk(folder, queries, 10)
    brute = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    scores = np.take_along_axis(queries @ vectors.T, rows, axis=1)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, brute, axis=1), atol=1e-6)


def test_recorded_recall_is_the_written_index_recall(setup):
    from pipeline.scale.index import code_bytes, recall_at_k, search, tune

    cfg, folder, vectors = setup
    queries = vectors[1::61]
    record = tune(cfg, folder, queries, folder / "index", query_note="test")
    chosen = record["chosen"]
    manifest = json.loads((folder / "index" / "manifest.json").read_text())
    assert manifest["chosen"] == chosen
    _, found = search(folder, queries, 10)
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    assert recall_at_k(found, truth) == pytest.approx(chosen["recall"], abs=1e-3)
    # smallest first: pq4 (4 B) before pq16 (16 B) before sq8 (32 B); the winner is the first to reach 0.9
    specs = [r["spec"] for r in record["candidates"]]
    assert specs == sorted(specs, key=lambda s: code_bytes(s, 32, 8))
    assert record["reached"] == (chosen["recall"] >= 0.9)
    assert all(not r["reached"] for r in record["candidates"][:-1])
    assert record["flat"]["index_bytes"] == 3000 * 32 * 4


def test_bad_candidate_is_a_config_error(setup):
    from pipeline.core.errors import ConfigError
    from pipeline.scale.index import usable_candidates

    with pytest.raises(ConfigError, match="ivf"):
        usable_candidates(["ivf"], 32, 8)
    with pytest.raises(ConfigError, match="fits"):
        usable_candidates(["pq5"], 32, 8)
    assert usable_candidates(["sq8", "pq5", "pq8"], 32, 8) == ["pq8", "sq8"]
    assert usable_candidates(["sq8", "pq8"], 32, 8, train_rows=255) == ["sq8"]  # k-means needs 256 points


def test_bench_perturbed_copies_are_unit_vectors_near_their_original(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.bench.scale import perturbed, write_titles

    base = _vectors(50)
    out = perturbed(base, np.arange(200), 0.02, np.random.default_rng(0))
    np.testing.assert_allclose(out[:50], base, atol=1e-6)  # the first copy is the real embedding itself
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    cos = np.sum(out[50:] * base[np.arange(50, 200) % 50], axis=1)
    assert np.all(cos < 1.0 - 1e-4) and np.all(cos > 0.5)  # moved, but still closest to their original
    table = pq.read_table(write_titles(tmp_path / "t.parquet", ["a", "b", "c"], 7, chunk=3))
    assert table.column("text").to_pylist() == ["a", "b", "c", "a", "b", "c", "a"]
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(7)]
