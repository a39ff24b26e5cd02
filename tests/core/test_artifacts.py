"""Atomic artefacts: a stage that fails midway leaves no folder, no manifest, and the previous good output
untouched; what killed processes leave behind is tidied when the next stage starts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.artifacts import atomic_dir, clean_stale_temporaries, hash_tree
from tests.conftest import RUN, cli, run_stages

OFF = "tracking.enabled=false"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftovers(root: Path = Path(".")) -> list[str]:
    return sorted(str(p) for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


class Boom(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _tracebacks_elsewhere(tmp_path_factory, monkeypatch):
    """The CLI saves the traceback of an unexpected error in the temp dir; keep those out of /tmp."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("tracebacks")))


def _boom(*args, **kwargs):
    raise Boom("injected failure")


def test_atomic_dir_leaves_nothing_on_error_and_keeps_the_old_folder(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("good")
    with pytest.raises(Boom):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("half")
            _boom()
    assert (final / "a.txt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_prepare_keeps_the_previous_output(project, monkeypatch):
    cfg = ["--config", str(project), OFF]
    processed = Path("data/processed/synthetic")
    # first attempt fails before anything is complete: no folder at all
    from pipeline.prepare import labelled as prepare

    with monkeypatch.context() as m:
        m.setattr(prepare, "make_manifest", _boom)  # called inside atomic_dir, after the split files
        assert cli("prepare", *cfg) == 1
    assert not processed.exists() and _leftovers() == []
    assert cli("prepare", *cfg) == 0
    good = hash_tree(processed)
    monkeypatch.setattr(prepare, "make_manifest", _boom)
    assert cli("prepare", *cfg, "seed=1") == 1  # another seed would rewrite every split
    assert hash_tree(processed) == good and _leftovers() == []


def test_failed_train_keeps_the_previous_model(project, monkeypatch):
    cfg = ["--config", str(project), OFF]
    assert cli("prepare", *cfg) == 0
    from pipeline.train import stage as train

    model = Path("runs") / RUN / "model"
    with monkeypatch.context() as m:
        m.setattr(train, "write_model_info", _boom)  # inside atomic_dir, after the adapter is saved
        assert cli("train", *cfg) == 1
    assert not model.exists() and _leftovers() == []
    assert cli("train", *cfg) == 0
    good = hash_tree(model)
    monkeypatch.setattr(train, "write_model_info", _boom)
    assert cli("train", *cfg, "train.lr=0.01", "--overwrite") == 1
    assert hash_tree(model) == good and _leftovers() == []
    assert not (Path("runs") / RUN / "attempt.json").exists()


def test_failed_embed_and_eval_keep_the_previous_outputs(project, monkeypatch):
    cfg = ["--config", str(project), OFF, "eval.lexical=false"]
    assert cli("prepare", *cfg) == 0 and cli("train", *cfg) == 0
    from pipeline.embed import stage as embed
    from pipeline.evaluate import report

    emb = Path("runs") / RUN / "embeddings"
    with monkeypatch.context() as m:
        m.setattr(embed, "merge_checked", _boom)  # inside atomic_dir, before any embedding is saved
        assert cli("embed", *cfg) == 1
    assert not emb.exists() and _leftovers() == []
    assert cli("embed", *cfg) == 0
    good_emb = hash_tree(emb)
    with monkeypatch.context() as m:
        m.setattr(embed, "merge_checked", _boom)
        assert cli("embed", *cfg, "--force") == 1
    assert hash_tree(emb) == good_emb

    reports = Path("reports") / RUN
    with monkeypatch.context() as m:
        m.setattr(report, "markdown", _boom)  # after metrics.json is written into the temporary folder
        assert cli("eval", *cfg) == 1
    assert not reports.exists() and not Path("reports/latest").exists() and _leftovers() == []
    assert cli("eval", *cfg) == 0
    good_report, good_latest = hash_tree(reports), hash_tree(Path("reports/latest"))
    monkeypatch.setattr(report, "markdown", _boom)
    assert cli("eval", *cfg, "eval.classifier_c=[3.0]") == 1
    assert hash_tree(reports) == good_report and hash_tree(Path("reports/latest")) == good_latest
    assert _leftovers() == []


def test_clean_stale_temporaries_removes_the_dead_and_restores_a_moved_aside_output(tmp_path):
    dead = _dead_pid()
    import os

    alive = os.getpid()
    (tmp_path / f".model.tmp-{dead}").mkdir()  # unfinished output of a killed process
    (tmp_path / f".model.tmp-{dead}" / "x").write_text("partial")
    (tmp_path / f".metrics.json.tmp-{dead}").write_text("{")  # unfinished write_json_atomic
    (tmp_path / f".embeddings.old-{dead}").mkdir()  # killed between the two renames of atomic_dir
    (tmp_path / f".embeddings.old-{dead}" / "train.npy").write_text("good")
    (tmp_path / "reports").mkdir()
    (tmp_path / f".reports.old-{dead}").mkdir()  # killed after both renames: the old copy is garbage
    (tmp_path / f".other.tmp-{alive}").mkdir()  # belongs to a live process: not touched
    clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".other.tmp-{alive}", "embeddings", "reports"])
    assert (tmp_path / "embeddings" / "train.npy").read_text() == "good"


def test_stages_clean_up_after_killed_processes_when_they_start(project):
    cfg = ["--config", str(project), OFF, "eval.lexical=false"]
    dead = _dead_pid()
    stale = [Path("data/processed") / f".synthetic.tmp-{dead}", Path("runs") / RUN / f".model.tmp-{dead}",
             Path("runs") / RUN / f".checkpoints.tmp-{dead}", Path("runs") / RUN / f".embeddings.tmp-{dead}",
             Path("cache/embeddings") / f".abc.tmp-{dead}", Path("reports") / f".{RUN}.tmp-{dead}"]
    for p in stale:
        p.mkdir(parents=True)
        (p / "partial").write_text("x")
    run_stages(*cfg)
    assert [p for p in stale if p.exists()] == []
    assert _leftovers() == []
    manifest = json.loads((Path("reports") / RUN / "metrics.json").read_text())
    assert manifest["run_name"] == RUN


def test_a_corrupt_manifest_is_an_error_not_an_absent_output(project, capsys):
    """A manifest that cannot be read stops the stage with one line; only --force replaces the folder."""
    cfg = ["--config", str(project), OFF]
    assert cli("prepare", *cfg) == 0
    manifest = Path("data/processed/synthetic/manifest.json")
    manifest.write_text('{"fingerprint": "abc", "trunc')
    before = hash_tree(manifest.parent)
    capsys.readouterr()
    assert cli("prepare", *cfg) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "manifest.json cannot be read" in err and "\n" not in err
    assert hash_tree(manifest.parent) == before  # nothing overwritten
    assert cli("prepare", *cfg, "--force") == 0
    assert json.loads(manifest.read_text())["stage"] == "prepare"
