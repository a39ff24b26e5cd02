"""End to end on the real all-MiniLM-L6-v2 and a small slice of real PriceRunner (a few hundred pairs)."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, SHARED_DATA, run_stages

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "pricerunner").exists(), reason="../shared/data not present")


def test_minilm_lora_on_pricerunner_slice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(REPO / "configs" / "default.yaml"), f"paths.mirror={SHARED_DATA}",
            "data.max_rows=700", "train.batch_size=32", "train.epochs=1", "train.lr=1e-3",
            "eval.bootstrap=100", "eval.classifier_c=[1.0]", "run_name=e2e"]
    run_stages(*args)
    prep = json.loads(Path("data/processed/pricerunner/manifest.json").read_text())
    assert 200 <= prep["pairs"]["total"] <= 1000
    m = json.loads(Path("reports/e2e/metrics.json").read_text())
    assert m["model"]["method"] == "lora"
    assert m["model"]["trainable_params"] / m["model"]["total_params"] < 0.01  # LoRA r16 on q,k,v
    assert m["retrieval"] != m["baseline"]["retrieval"]
    for block in (m, m["baseline"]):
        assert set(block["retrieval"]) >= {"recall@1", "recall@10", "ndcg@10", "mrr@10"}
        assert all(0 <= v <= 1 for v in block["retrieval"].values())

    # Cross-check the pipeline's fast encoder + FAISS against plain SentenceTransformer.encode and
    # brute-force numpy on the base model: same embeddings (bf16 autocast aside), same recall@1.
    from sentence_transformers import SentenceTransformer

    from pipeline.search.metrics import retrieval_per_query
    from pipeline.model.encoder import resolve_base
    from pipeline.contracts.prepared_data import load_split

    test = load_split(Path("data/processed/pricerunner"), "test")
    emb_manifest = json.loads(Path("runs/e2e/embeddings/manifest.json").read_text())
    ours = np.load(Path(emb_manifest["base_dir"]) / "test.npy")
    st = SentenceTransformer(resolve_base("sentence-transformers/all-MiniLM-L6-v2"), device="cpu")
    st.max_seq_length = 64
    ref = st.encode(test["text"].tolist(), normalize_embeddings=True, batch_size=64)
    assert np.min(np.sum(ours * ref, axis=1)) > 0.99
    groups = test["group"].to_numpy()
    sims = ref @ ref.T
    np.fill_diagonal(sims, -np.inf)
    counts = {g: (groups == g).sum() for g in set(groups)}
    queries = [i for i in range(len(groups)) if counts[groups[i]] >= 2]
    top1 = sims[queries].argmax(1)
    rel = (groups[top1] == groups[queries])[:, None]
    expected = retrieval_per_query(rel, np.array([counts[groups[q]] - 1 for q in queries]), ks=(1,))["recall@1"].mean()
    assert m["baseline"]["retrieval"]["recall@1"] == pytest.approx(expected, abs=0.02)
