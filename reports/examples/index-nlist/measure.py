"""sqrt(rows) against 4 * sqrt(rows) inverted lists, on real embeddings: recall@10 against exact search at the
nprobe values the export (fixed ``export.ivf_nprobe``, 16 by default) and the corpus index's tuner use,
with build and query time. The two rules the project had before pipeline/search/index.py made them one.

    python reports/examples/index-nlist/measure.py <embed-corpus output folder> <out.json>
    python reports/examples/index-nlist/measure.py clustered:<rows> <out.json>

Index: a seeded 90% of the corpus's rows (sizes 5,000, 15,000 and all); queries: the other 10% (up to 2000),
which are not in the index. ``clustered:<rows>``: the bench's synthetic topic-clustered 384-dim vectors
(pipeline/bench/workers.synthetic_vectors) at that size, with its 2000 paraphrase-like queries.
One FAISS thread, so that the times compare on a shared machine (they are still contention figures).
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from pipeline.contracts.shards import iter_corpus  # noqa: E402
from pipeline.search import index as faiss_index  # noqa: E402

K = 10
NPROBES = [1, 2, 4, 8, 16, 32, 64]


def rules(n: int) -> dict[str, int]:
    return {"sqrt": max(1, min(int(math.sqrt(n)), n // 39)), "4sqrt": max(1, min(int(4 * math.sqrt(n)), n // 39))}


def measure(base: np.ndarray, queries: np.ndarray) -> dict:
    exact = faiss_index.build(base, faiss_index.FLAT)
    t0 = time.perf_counter()
    _, truth = exact.search(queries, K)
    flat_ms = (time.perf_counter() - t0) * 1000 / len(queries)
    out = {"rows": len(base), "queries": len(queries), "flat_ms_per_query": round(flat_ms, 4), "rules": {}}
    for name, nlist in rules(len(base)).items():
        t0 = time.perf_counter()
        index = faiss_index.build(base, faiss_index.ivf(nlist))
        build_s = time.perf_counter() - t0
        trials = []
        for nprobe in [p for p in NPROBES if p <= nlist]:
            faiss_index.set_search(index, nprobe=nprobe)
            t0 = time.perf_counter()
            _, found = index.search(queries, K)
            ms = (time.perf_counter() - t0) * 1000 / len(queries)
            recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))
            trials.append({"nprobe": nprobe, "recall@10": round(recall, 4), "ms_per_query": round(ms, 4)})
        out["rules"][name] = {"nlist": nlist, "build_s": round(build_s, 3), "trials": trials}
        del index
    return out


def main(source: str, out_path: str) -> None:
    import faiss

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    if source.startswith("clustered:"):
        from pipeline.bench.workers import synthetic_vectors

        base, queries = synthetic_vectors(rng, int(source.split(":", 1)[1]), 2000, 384, "clustered")
        results = [measure(base, queries)]
        dim = base.shape[1]
    else:
        vectors = np.concatenate([v for _, _, v in iter_corpus(Path(source))]).astype(np.float32)
        order = rng.permutation(len(vectors))
        held = order[: max(1, len(vectors) // 10)]
        base_rows = order[len(held):]
        queries = vectors[held[:2000]]
        results = [measure(vectors[base_rows[:n]], queries)
                   for n in sorted({min(5000, len(base_rows)), min(15000, len(base_rows)), len(base_rows)})]
        dim = vectors.shape[1]
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")),
                 platform.processor())
    record = {"source": source, "dim": int(dim), "k": K, "faiss_threads": 1, "cpu": model, "results": results}
    Path(out_path).write_text(json.dumps(record, indent=1) + "\n")
    for r in results:
        for name, rule in r["rules"].items():
            at16 = next((t for t in rule["trials"] if t["nprobe"] == 16), rule["trials"][-1])
            print(f"rows {r['rows']:6d} {name:5s} nlist {rule['nlist']:4d} build {rule['build_s']:.2f}s "
                  f"nprobe {at16['nprobe']}: recall@10 {at16['recall@10']:.4f}, {at16['ms_per_query']:.3f} ms "
                  f"(flat {r['flat_ms_per_query']:.3f} ms)")


if __name__ == "__main__":
    main(*sys.argv[1:])
