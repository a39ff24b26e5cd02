"""bench serve part: the random adapters and their merged twins, the load generator against both kinds of
server on 127.0.0.1, the verdict and the report section; the whole part with child servers under -m slow.
Never a timing assertion."""

from __future__ import annotations


import numpy as np
import psutil
import pytest

from tests.conftest import serve_in_thread

from pipeline.bench.serve import load, make_models, markdown, merged_app, run, verdict
from pipeline.core.config import load_config

TEXTS = ["samsung galaxy a123", "lg oled tv", "intel core i7 cpu b456 black", "bosch fridge"]




def test_random_adapters_equal_their_merged_twins_and_the_load_generator_counts_every_request(project, tmp_path):
    from sentence_transformers import SentenceTransformer

    from pipeline.serve.adapters import AdapterSet, build_app
    from pipeline.model.backends import row_cosines

    cfg = load_config(project, [])
    adapters, merged, meta = make_models(cfg, tmp_path, 3)
    aset = AdapterSet(meta)
    for i, folder in enumerate(adapters):
        aset.add_folder(folder, f"a{i}")
    twins = [SentenceTransformer(str(m), device="cpu") for m in merged]
    served = [aset.encode(f"a{i}", TEXTS) for i in range(3)]
    for i, twin in enumerate(twins):  # the comparison is like with like: adapter i and its merge
        assert row_cosines(served[i], twin.encode(TEXTS, normalize_embeddings=True)).min() >= 0.9999
    assert row_cosines(served[0], served[1]).min() < 0.9999  # and the adapters differ

    servers = [serve_in_thread(build_app(aset, window_ms=20)), serve_in_thread(merged_app(twins, meta["max_seq_length"]))]
    try:
        (_, _, a_url), (_, _, m_url) = servers
        spread = load([(a_url, f"a{i}") for i in range(3)], TEXTS, 15, 3, 60)
        assert spread["ok"] == spread["requests"] == 15 and spread["errors"] == 0, spread
        assert spread["requests_per_s"] > 0 and 0 < spread["p50_ms"] <= spread["p99_ms"]
        one = load([(m_url, "a1")], TEXTS, 6, 2, 60)
        assert one["ok"] == 6 and one["errors"] == 0
        bad = load([(m_url, "a7")], TEXTS, 4, 2, 60)  # a failing request is counted, not dropped
        assert bad["ok"] == 0 and bad["errors"] == 4 and bad["p50_ms"] is None
        windows = list(servers[0][0].config.app.state.batcher.windows)
        assert sum(req for w in windows for _, req, _ in w) >= 15
    finally:
        for server, thread, _ in servers:
            server.should_exit = True
            thread.join(timeout=10)


def test_verdict_compares_the_most_adapters_with_three_merged_models():
    memory = [{"mode": "adapters", "models": 1, "rss_mb": 400.0}, {"mode": "adapters", "models": 20, "rss_mb": 438.0},
              {"mode": "merged", "models": 1, "rss_mb": 450.0}, {"mode": "merged", "models": 3, "rss_mb": 630.0},
              {"mode": "merged", "models": 20, "rss_mb": 2160.0}]
    assert verdict(memory) == {"adapters": 20, "adapters_rss_mb": 438.0, "three_merged_rss_mb": 630.0, "below": True,
                               "mb_per_adapter": 2.0, "mb_per_merged_model": 90.0}
    assert verdict(memory[:2]) == {}
    serve = {"base": "b", "lora": {"r": 4, "target_modules": ["query"]}, "threads": 2, "batch_window_ms": 5.0,
             "requests": 10, "concurrency": 2, "memory": [{**r, "uss_mb": 1.0, "load_seconds": 1.0} for r in memory],
             "throughput": [{"scenario": "s", "requests_per_s": 1.0, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0}],
             "add_adapter_seconds": [0.1, 0.2], "add_adapter_seconds_median": 0.15, "verdict": verdict(memory)}
    md = markdown(serve)
    assert "20 adapters on one base: 438.0 MB resident, against 630.0 MB for three merged models (below)" in md
    assert "| s | 1.0 | 1.0 | 2.0 | 0 |" in md and "median 0.150 s" in md and markdown(None) == ""


@pytest.mark.slow
def test_serve_bench_with_child_servers_measures_memory_throughput_and_adds(project, tmp_path):
    cfg = load_config(project, ["bench.serve_adapter_counts=[1,2]", "bench.serve_spread=2", "bench.serve_requests=12",
                                "bench.serve_concurrency=2", "bench.serve_timeout_s=120", "runtime.num_threads=1"])
    serve = run(cfg, tmp_path / "work", TEXTS)

    memory = {(r["mode"], r["models"]): r for r in serve["memory"]}
    assert set(memory) == {("adapters", 1), ("adapters", 2), ("merged", 1), ("merged", 2), ("merged", 3)}
    for r in memory.values():
        assert 50 < r["uss_mb"] <= r["rss_mb"] < 20_000 and r["load_seconds"] >= 0
    v = serve["verdict"]
    assert v["adapters"] == 2 and v["three_merged_rss_mb"] == memory[("merged", 3)]["rss_mb"]
    rows = {r["scenario"]: r for r in serve["throughput"]}
    assert set(rows) == {"one base, 1 adapter", "one base, spread over 2 adapters", "1 merged model, 1 process",
                         "2 merged models, 2 processes of 1 thread(s)"}
    for r in rows.values():
        assert r["ok"] == r["requests"] == 12 and r["errors"] == 0, r
    assert len(serve["add_adapter_seconds"]) == 3 and all(s > 0 for s in serve["add_adapter_seconds"])
    assert not psutil.Process().children(recursive=True)  # every server was stopped
    assert np.isfinite(serve["add_adapter_seconds_median"])
