"""The one index builder (pipeline/search/index.py): one nlist rule that the export, embed-corpus's index and
the bench all take, FAISS factory strings, and indexes equal to the ones built by hand before."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.search import index as faiss_index


def _unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_nlist_rule():
    assert faiss_index.nlist_for(1_000_000, 100_000) == 1000  # sqrt(rows)
    assert faiss_index.nlist_for(100_000) == 316
    assert faiss_index.nlist_for(1_000_000, 20_000) == 512  # 39 training rows per list at least
    assert faiss_index.nlist_for(400) == 10
    assert faiss_index.nlist_for(20) == 1


def test_factory_strings():
    assert faiss_index.ivf(100) == "IVF100,Flat"
    assert faiss_index.ivf(100, faiss_index.ivf_code("pq48", 8)) == "IVF100,PQ48x8np"
    assert [faiss_index.ivf_code(s, 8) for s in ("sq8", "sq4", "fp16")] == ["SQ8", "SQ4", "SQfp16"]
    assert faiss_index.hnsw(32) == "HNSW32,Flat"
    with pytest.raises(ValueError, match="is not pq<m>"):
        faiss_index.ivf_code("pq", 8)


@pytest.mark.parametrize("code", ["PQ4x4np", "SQ8"])
def test_a_factory_index_on_shared_centroids_equals_the_hand_built_one(code):
    """embed-corpus trains one k-means and builds each candidate on it: through the factory the index must
    be the one its former hand-built IndexIVFPQ / IndexIVFScalarQuantizer was."""
    import faiss

    x, dim, nlist = _unit(2000, 16), 16, 8
    km = faiss.Kmeans(dim, nlist, niter=10, seed=0, spherical=True, verbose=False)
    km.train(x)
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(km.centroids)
    ip = faiss.METRIC_INNER_PRODUCT
    if code.startswith("PQ"):
        by_hand = faiss.IndexIVFPQ(quantizer, dim, nlist, 4, 4, ip)
    else:
        by_hand = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, ip)
    built = faiss_index.new(dim, faiss_index.ivf(nlist, code), centroids=km.centroids)
    for index in (by_hand, built):
        index.train(x)
        index.add(x)
        index.nprobe = 3
    inner = faiss.downcast_index(faiss.extract_index_ivf(built))
    assert type(inner) is type(by_hand) and inner.by_residual == by_hand.by_residual
    if code.startswith("PQ"):  # the factory's default polysemous training would only cost time
        assert inner.do_polysemous_training == by_hand.do_polysemous_training
    centroids = inner.quantizer.reconstruct_n(0, nlist)
    assert np.array_equal(centroids, km.centroids)  # train kept the shared centroids
    d_hand, i_hand = by_hand.search(x[:50], 10)
    d_built, i_built = built.search(x[:50], 10)
    assert np.array_equal(i_hand, i_built) and np.allclose(d_hand, d_built)


def test_the_export_the_corpus_index_and_the_bench_all_take_the_one_rule(monkeypatch, project):
    """Replace the rule: every builder must follow (none keeps a rule of its own)."""
    from pipeline.bench import workers
    from pipeline.contracts.export_folder import build_index
    from pipeline.core.config import ExportConfig

    asked = []

    def rule(rows, train_rows=None):
        asked.append((rows, train_rows))
        return 3

    monkeypatch.setattr(faiss_index, "nlist_for", rule)
    _, meta = build_index(_unit(300, 8), ExportConfig(index_type="ivf"))
    assert meta["factory"] == "IVF3,Flat" and meta["params"]["nlist"] == 3

    out = workers.task_faiss({"n": 300, "dim": 8, "queries": 10, "k": 5, "nprobes": [1, 2], "hnsw_max_n": 1,
                              "single_queries": 1, "data": "uniform"}, project.parent)
    assert {r["params"]["nlist"] for r in out["rows"] if r["index"] == "ivf"} == {3}

    from tests.conftest import cli

    args = ["--config", str(project), "corpus.input=corpus.csv", "corpus.text_column=title", "corpus.encoder=base",
            "corpus.shard_rows=40", "corpus.index.candidates=[sq8]", "corpus.index.train_rows=100",
            "corpus.index.queries=20", "tracking.enabled=false", "embed.backend=torch"]
    assert cli("embed-corpus", *args) == 0
    chosen = json.loads((project.parent.parent / "runs" / "base-corpus" / "corpus" / "index" / "manifest.json")
                        .read_text())["chosen"]
    assert chosen["nlist"] == 3 and chosen["factory"] == "IVF3,SQ8"
    rows = sum(1 for _ in open(project.parent.parent / "corpus.csv")) - 1
    assert asked == [(300, None), (300, None), (rows, 100)]
