"""embed-corpus on the tiny in-code model: shards that match direct encoding, resume after a failure at shard
granularity, every input format, one-line errors; and the Ray Data executor on a local 127.0.0.1 cluster with
two CPU workers, which must write exactly the local vectors, also when a worker dies mid-run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import cli, make_corpus

# One encoder form (torch fp32), so that vectors compare at 0.9999; choosing among forms is tests/model/test_backends.py's.
BASE = ["corpus.encoder=base", "corpus.text_column=title", "corpus.id_column=pid", "corpus.shard_rows=40",
        "corpus.index.enabled=false", "tracking.enabled=false", "embed.backend=torch", "train.precision=fp32"]


def _corpus(tmp: Path) -> pd.DataFrame:
    df = make_corpus(n_clusters_per_brand=4)
    df["pid"] = [f"p{i:04d}" for i in range(len(df))]
    df.to_csv(tmp / "offers.csv", index=False)
    return df


def _cfg(project: Path, *extra: str):
    from pipeline.core.config import load_config

    return load_config(project, [*BASE, *extra])


def _read(folder: Path) -> tuple[list[str], np.ndarray, dict]:
    from pipeline.contracts.shards import iter_corpus

    ids, vecs = [], []
    for _, i, v in iter_corpus(folder):
        ids += i
        vecs.append(v)
    return ids, np.concatenate(vecs), json.loads((folder / "manifest.json").read_text())


class FailAfter:
    """An encoder factory whose encoder raises on its third shard: a run that dies part-way."""

    def __init__(self, shards: int):
        self.shards = shards

    def __call__(self, cfg, **kw):
        from pipeline.scale.stage import make_encoder

        inner, budget = make_encoder(cfg, **kw), [self.shards]

        class Failing:
            backend = inner.backend

            def encode(self, texts, role):
                if budget[0] == 0:
                    raise RuntimeError("simulated crash")
                budget[0] -= 1
                return inner.encode(texts, role)

        return Failing()


class CrashOnce:
    """An encoder factory for Ray actors: the first encode anywhere kills its worker process (a lost worker)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, cfg, **kw):
        from pipeline.scale.stage import make_encoder

        inner, marker = make_encoder(cfg, **kw), self.marker

        class Crashing:
            backend = inner.backend

            def encode(self, texts, role):
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return inner.encode(texts, role)
                os.close(fd)
                os._exit(1)

        return Crashing()


def test_local_shards_match_direct_encoding_and_resume(project):
    from pipeline.scale import stage as corpus

    df = _corpus(project.parent.parent)
    cfg = _cfg(project, "corpus.input=offers.csv")
    assert cli("embed-corpus", "--config", str(project), *BASE, "corpus.input=offers.csv") == 0
    out = corpus.output_folder(cfg)
    ids, vecs, manifest = _read(out)
    assert ids == df["pid"].tolist()  # every row once, in file order
    assert manifest["rows"] == len(df) and len(manifest["shards"]) == -(-len(df) // 40)
    assert [s["first_row"] for s in manifest["shards"]] == list(range(0, len(df), 40))
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    direct = corpus.make_encoder(cfg, probe_texts=df["title"].tolist()[:8]).encode(df["title"].tolist()[:40],
                                                                                  "document")
    assert np.min(np.sum(direct * vecs[:40], axis=1)) >= 0.9999
    assert manifest["backend"]["name"] == "torch-fp32"  # the form the gate chose is recorded

    # A run that dies after two shards leaves two complete shards and no manifest; the rerun encodes the rest.
    cfg2 = _cfg(project, "corpus.input=offers.csv", "corpus.output=again")
    with pytest.raises(RuntimeError, match="simulated crash"):
        corpus.run(cfg2, factory=FailAfter(2))
    done = sorted(p.name for p in (Path("again") / "shards").glob("*.json"))
    assert done == ["shard-00000.json", "shard-00001.json"] and not (Path("again") / "manifest.json").exists()
    first = (Path("again") / "shards" / "shard-00000.parquet").stat().st_mtime_ns
    corpus.run(cfg2)
    ids2, vecs2, manifest2 = _read(Path("again"))
    assert manifest2["throughput"]["resumed_shards"] == 2
    assert (Path("again") / "shards" / "shard-00000.parquet").stat().st_mtime_ns == first  # not redone
    assert ids2 == ids and np.min(np.sum(vecs2 * vecs, axis=1)) >= 0.9999


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "folder"])
def test_every_input_format_gives_the_same_vectors(project, fmt):
    from pipeline.scale import stage as corpus

    df = _corpus(project.parent.parent)
    if fmt == "parquet":
        df.to_parquet("offers.parquet")
        path = "offers.parquet"
    elif fmt == "jsonl":
        df.to_json("offers.jsonl", orient="records", lines=True)
        path = "offers.jsonl"
    else:  # a folder of parts, read in name order
        Path("parts").mkdir()
        df.iloc[:70].to_csv("parts/a.csv", index=False)
        df.iloc[70:].to_csv("parts/b.csv", index=False)
        path = "parts"
    ref = corpus.run(_cfg(project, "corpus.input=offers.csv", "corpus.output=ref"))
    got = corpus.run(_cfg(project, f"corpus.input={path}", f"corpus.output=out-{fmt}"))
    ids_ref, v_ref, _ = _read(ref)
    ids, v, _ = _read(got)
    assert ids == ids_ref and np.min(np.sum(v * v_ref, axis=1)) >= 0.9999


def test_bad_inputs_are_one_line_errors(project, capsys):
    _corpus(project.parent.parent)
    Path("notes.txt").write_text("hello\n")
    cases = [("corpus.input=missing.csv", "does not exist"),
             ("corpus.input=offers.csv corpus.text_column=body", "column 'body'"),
             ("corpus.input=offers.csv corpus.id_column=sku", "column 'sku'"),
             ("corpus.input=notes.txt", "cannot tell the format"),
             ("corpus.input=offers.csv corpus.format=parquet", "cannot read")]
    for overrides, message in cases:
        assert cli("embed-corpus", "--config", str(project), *BASE, *overrides.split()) == 2, overrides
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_index_is_built_and_searchable(project):
    from pipeline.scale import stage as corpus
    from pipeline.scale import index as scale_index

    df = _corpus(project.parent.parent)
    extra = ["corpus.index.enabled=true", "corpus.index.train_rows=100", "corpus.index.queries=20",
             "corpus.index.candidates=[pq8,sq8]", "corpus.index.recall_target=0.5"]
    assert cli("embed-corpus", "--config", str(project), *BASE, "corpus.input=offers.csv", *extra) == 0
    out = corpus.output_folder(_cfg(project, "corpus.input=offers.csv"))
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    assert manifest["rows"] == len(df) and manifest["chosen"]["index_bytes"] > 0
    assert [c["spec"] for c in manifest["candidates"]] == ["sq8"]  # PQ needs 256 training rows: skipped
    _, vecs, _ = _read(out)
    _, rows = scale_index.search(out, vecs[:5], 3)
    assert rows.shape == (5, 3) and rows.min() >= 0 and rows.max() < len(df)


# ---------------------------------------------------------------------------------------------------------------
# Ray Data executor: one local cluster for the module, loopback only, two CPUs.


@pytest.mark.slow
def test_ray_writes_the_local_vectors_even_when_a_worker_dies(project, ray_cluster, tmp_path):
    from pipeline.scale import stage as corpus

    df = _corpus(project.parent.parent)
    local = corpus.run(_cfg(project, "corpus.input=offers.csv", "corpus.output=local"))
    ray_cfg = ["corpus.input=offers.csv", "corpus.executor=ray", "corpus.workers=2", "corpus.cpus_per_worker=1"]
    clean = corpus.run(_cfg(project, *ray_cfg, "corpus.output=ray"))
    marker = tmp_path / "crashed"
    crashed = corpus.run(_cfg(project, *ray_cfg, "corpus.output=ray-crash"), factory=CrashOnce(str(marker)))
    assert marker.exists()  # a worker really died mid-run
    ids_l, v_l, _ = _read(local)
    for folder in (clean, crashed):
        ids, v, manifest = _read(folder)
        assert ids == ids_l == df["pid"].tolist()  # same ids, none lost or duplicated
        assert np.min(np.sum(v * v_l, axis=1)) >= 0.9999
        assert manifest["executor"] == "ray"


def test_ray_workers_find_the_project_folders_from_their_own_directory(project, monkeypatch, tmp_path):
    """Workers start in a directory of their own: the config they get names the run and cache folders absolutely."""
    from pipeline.scale import stage as corpus
    from pipeline.core.artifacts import Layout

    from pipeline.core.config import Config

    cfg = _cfg(project, "corpus.encoder=run")
    here = Layout(cfg).model_dir().resolve()
    job = corpus.CorpusJob([Path("offers.csv")], "csv", Path("out/shards"), 1, "fp")
    args = corpus.worker_args(cfg, job, corpus.make_encoder, None)
    sent = Config.model_validate_json(args[0])
    monkeypatch.chdir(tmp_path)
    assert Layout(sent).model_dir() == here and Path(sent.paths.cache).is_absolute()
    assert all(Path(p).is_absolute() for p in args[1]) and Path(args[3]).is_absolute()
