"""The bad-input matrix (issue 7): every row through the CLI, as a user meets it.

Each row asserts the exact one-line message (naming the problem and the file or key), a non-zero exit,
no traceback, and that the working folder holds exactly what it held before: no partial artefact.
"""

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import RUN, cli, make_corpus

OFF = "tracking.enabled=false"


def _snapshot(root: Path = Path(".")) -> dict[str, int]:
    """Every file and folder below ``root`` with its mtime: a changed, added or removed path shows."""
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _one_error_line(err: str) -> str:
    """The CLI's stderr for a user error: exactly one line, ``error: ...``, and no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0][len("error: "):]


def _fails_cleanly(capsys, *args: str, code: int = 2) -> str:
    capsys.readouterr()
    before = _snapshot()
    assert cli(*args) == code
    message = _one_error_line(capsys.readouterr().err)
    assert _snapshot() == before, "a failed command left or changed files"
    return message


@pytest.fixture(scope="session")
def other_tiny_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """Same architecture and tokenizer as ``tiny_model_dir``, other random weights."""
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tiny_model_dir), device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in st.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("other-tiny") / "st"
    st.save(str(out))
    return out


def _write_config(path: Path, **changes) -> None:
    cfg = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(cfg))


# --- configuration -----------------------------------------------------------------------------------

def test_unknown_config_key_in_the_file(project, capsys):
    _write_config(project, **{"train.lora.rank": 8})
    msg = _fails_cleanly(capsys, "prepare", "--config", str(project), OFF)
    assert msg == f"{project}: unknown key 'train.lora.rank'"


def test_unknown_config_key_on_the_command_line(project, capsys):
    msg = _fails_cleanly(capsys, "prepare", "--config", str(project), OFF, "data.text_colum=title")
    assert msg == f"{project}: unknown key 'data.text_colum' (from the command line)"


def test_wrong_type(project, capsys):
    msg = _fails_cleanly(capsys, "train", "--config", str(project), OFF, "train.epochs=many")
    assert msg == (f"{project}: 'train.epochs' (from the command line): Input should be a valid number, "
                   "unable to parse string as a number (got 'many')")
    _write_config(project, **{"train.batch_size": "large"})
    msg = _fails_cleanly(capsys, "train", "--config", str(project), OFF)
    assert msg == (f"{project}: 'train.batch_size': Input should be a valid integer, unable to parse string as "
                   "an integer (got 'large')")


def test_broken_yaml_is_one_line(project, capsys):
    project.write_text("seed: [1\n")
    msg = _fails_cleanly(capsys, "prepare", "--config", str(project))
    assert msg == f"{project}: not valid YAML (line 2, column 1: expected ',' or ']', but got '<stream end>')"


def test_config_file_that_is_not_utf8(project, capsys):
    project.write_bytes(b"seed: 0\n# caf\xe9\n")
    msg = _fails_cleanly(capsys, "prepare", "--config", str(project))
    assert msg == f"{project}: not UTF-8 text (line 2, byte 13: invalid continuation byte)"


# --- data files ----------------------------------------------------------------------------------------

def test_misspelled_text_column(project, capsys):
    msg = _fails_cleanly(capsys, "prepare", "--config", str(project), OFF, "data.text_column=titel")
    assert msg == "corpus.csv: column 'titel' (data.text_column) not found; the file has: title, category, cluster"


def test_missing_label_column(project, capsys):
    make_corpus().drop(columns=["category"]).to_csv("corpus.csv", index=False)
    msg = _fails_cleanly(capsys, "prepare", "--config", str(project), OFF)
    assert msg == "corpus.csv: column 'category' (data.label_column) not found; the file has: title, cluster"


def test_missing_data_file(project, capsys):
    msg = _fails_cleanly(capsys, "prepare", "--config", str(project), OFF, "data.path=corpus.tsv")
    assert msg == "data file corpus.tsv does not exist"


def test_empty_file(project, capsys):
    Path("corpus.csv").write_text("")
    assert _fails_cleanly(capsys, "prepare", "--config", str(project), OFF) == "corpus.csv: the file is empty"
    Path("corpus.csv").write_text("title,category,cluster\n")
    assert _fails_cleanly(capsys, "prepare", "--config", str(project), OFF) == "corpus.csv: the file has no rows"
    Path("corpus.jsonl").write_text("\n  \n")
    msg = _fails_cleanly(capsys, "prepare", "--config", str(project), OFF, "data.path=corpus.jsonl")
    assert msg == "corpus.jsonl: the file has no rows"


def _with_blanks(n: int = 3) -> pd.DataFrame:
    df = make_corpus()
    df.loc[[2, 5, 9][:n], "title"] = ["", "   ", "\t"][:n]
    df.to_csv("corpus.csv", index=False)
    return df


def test_blank_texts_are_dropped_with_a_count(project, capsys, caplog):
    _with_blanks()
    with caplog.at_level("WARNING"):
        assert cli("prepare", "--config", str(project), OFF) == 0
    assert "prepare: corpus.csv: dropping 3 blank or whitespace-only texts (data.blank_texts=drop" in caplog.text
    manifest = json.loads(Path("data/processed/synthetic/manifest.json").read_text())
    assert manifest["counts"]["blank_texts_dropped"] == 3
    texts = pd.concat([pd.read_json(f"data/processed/synthetic/{s}.jsonl", lines=True) for s in ("train", "val",
                                                                                                  "test")])["text"]
    assert texts.str.strip().ne("").all()


def test_blank_labels_are_dropped_with_a_count(project, caplog):
    df = make_corpus()
    df["category"] = df["category"].astype(object)
    df.loc[[3, 7], "category"] = ["  ", None]
    df.to_csv("corpus.csv", index=False)
    with caplog.at_level("WARNING"):
        assert cli("prepare", "--config", str(project), OFF) == 0
    assert "prepare: corpus.csv: dropping 2 rows with a blank or missing label" in caplog.text
    manifest = json.loads(Path("data/processed/synthetic/manifest.json").read_text())
    assert manifest["counts"]["missing_label_dropped"] == 2 and "" not in manifest["labels"]


def test_blank_texts_are_an_error_when_strict(project, capsys):
    _with_blanks()
    msg = _fails_cleanly(capsys, "prepare", "--config", str(project), OFF, "data.blank_texts=error")
    assert msg == ("corpus.csv: 3 blank or whitespace-only texts (first at row 2); "
                   "set data.blank_texts=drop to drop them")


def test_label_with_a_single_member(project, capsys):
    lonely = pd.DataFrame([{"title": "a singular gadget", "category": "gadgets", "cluster": 999}])
    pd.concat([make_corpus(), lonely]).to_csv("corpus.csv", index=False)
    msg = _fails_cleanly(capsys, "prepare", "--config", str(project), OFF)
    assert msg == ("corpus.csv: labels with a single example (column 'category'): 'gadgets' (1 row); a label needs "
                   "examples in train and in test (3 groups when prepare draws the splits): add examples, merge the "
                   "label into another, or remove its row")


def test_non_utf8_bytes(project, capsys):
    data = Path("corpus.csv").read_bytes()
    offset = data.index(b"\n", data.index(b"\n") + 1) + 1  # start of the third line
    Path("corpus.csv").write_bytes(data[:offset] + b"caf\xe9 " + data[offset:])
    msg = _fails_cleanly(capsys, "prepare", "--config", str(project), OFF)
    assert msg == (f"corpus.csv: not UTF-8 text (line 3, byte {offset + 3}: invalid continuation byte, 0xe9); "
                   "re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8")
    make_corpus().to_json("corpus.jsonl", orient="records", lines=True)
    Path("corpus.jsonl").write_bytes(Path("corpus.jsonl").read_bytes().replace(b"nokia", b"nok\xefa", 1))
    msg = _fails_cleanly(capsys, "prepare", "--config", str(project), OFF, "data.path=corpus.jsonl")
    assert re.fullmatch(r"corpus\.jsonl: not UTF-8 text \(line \d+, byte \d+: invalid continuation byte, 0xef\); "
                        r"re-save it as UTF-8, e\.g\. iconv -f latin1 -t utf-8", msg)


def test_missing_raw_data_names_the_files_and_their_source(project, capsys, tmp_path):
    mirror = tmp_path / "empty-mirror"
    mirror.mkdir()
    msg = _fails_cleanly(capsys, "prepare", "--config", str(project), OFF, "data.format=pricerunner",
                         "data.name=pricerunner", f"paths.mirror={mirror}")
    assert msg == (
        f"raw data for 'pricerunner' is missing: pricerunner_aggregate.csv not in data/raw/pricerunner nor in the "
        f"mirror {mirror}/pricerunner (set DATA_MIRROR or paths.mirror). Source: UCI dataset 837 'Product "
        "Classification and Clustering' (Akritidis 2020); see ../shared/data/pricerunner/SOURCE.md")


# --- runs and models -----------------------------------------------------------------------------------

def test_existing_run_with_another_config_is_refused_unless_overwrite(project, capsys):
    cfg = ["--config", str(project), OFF]
    assert cli("prepare", *cfg) == 0 and cli("train", *cfg) == 0
    old = (Path("runs") / RUN / "model" / "adapter" / "adapter_model.safetensors").read_bytes()
    msg = _fails_cleanly(capsys, "train", *cfg, "train.lr=0.01")
    assert msg == (f"run '{RUN}' already exists at runs/{RUN} with another config or data; pass --overwrite, "
                   "or choose another run_name=...")
    assert cli("train", *cfg, "train.lr=0.01", "--overwrite") == 0
    assert (Path("runs") / RUN / "model" / "adapter" / "adapter_model.safetensors").read_bytes() != old


def test_checkpoint_of_another_config_is_refused_unless_overwrite(project, capsys):
    """A crashed run is an existing run too: its checkpoint is not silently thrown away."""
    cfg = ["--config", str(project), OFF]
    assert cli("prepare", *cfg) == 0
    ckpt = Path("runs") / RUN / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"fingerprint": "0123456789abcdef", "step": 40}))
    msg = _fails_cleanly(capsys, "train", *cfg)
    assert msg == (f"run '{RUN}' has a checkpoint at step 40 from another config or data in runs/{RUN}/checkpoints; "
                   "rerun with the config it started with to resume it, pass --overwrite to discard it, "
                   "or choose another run_name=...")
    assert cli("train", *cfg, "--overwrite") == 0
    assert not ckpt.exists() and (Path("runs") / RUN / "model" / "manifest.json").exists()


def test_adapter_on_another_base_is_refused_at_embed_and_eval(project, capsys, tiny_model_dir, other_tiny_model_dir):
    cfg = ["--config", str(project), OFF, "eval.lexical=false"]
    assert cli("prepare", *cfg) == 0 and cli("train", *cfg) == 0
    info = json.loads((Path("runs") / RUN / "model" / "model_info.json").read_text())
    from pipeline.model.encoder import base_fingerprint

    other = base_fingerprint(str(other_tiny_model_dir))
    assert other != info["base_fingerprint"]
    expected = (f"adapter in runs/{RUN}/model was trained on base '{tiny_model_dir}' (weights "
                f"{info['base_fingerprint']}), but the config names model.base='{other_tiny_model_dir}' (weights "
                f"{other}); set model.base back, or train this base under another run_name")
    wrong = f"model.base={other_tiny_model_dir}"
    assert _fails_cleanly(capsys, "embed", *cfg, wrong) == expected
    assert not Path("cache").exists() and not (Path("runs") / RUN / "embeddings").exists()
    assert cli("embed", *cfg) == 0
    assert _fails_cleanly(capsys, "eval", *cfg, wrong) == expected
    assert not Path("reports").exists()


def test_run_trained_by_a_live_process_is_refused(project, capsys):
    cfg = ["--config", str(project), OFF]
    assert cli("prepare", *cfg) == 0
    import socket

    run_dir = Path("runs") / RUN
    run_dir.mkdir(parents=True)
    (run_dir / "attempt.json").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                      "started": "2026-01-01T00:00:00Z"}))
    msg = _fails_cleanly(capsys, "train", *cfg)
    assert msg == (f"run '{RUN}' is being trained right now by process {os.getppid()} (since 2026-01-01T00:00:00Z); "
                   "wait for it, or stop it and rerun to resume")


# --- errors nobody anticipated ---------------------------------------------------------------------------

def test_unexpected_exception_is_one_line_with_the_traceback_saved(project, capsys, monkeypatch):
    from pipeline.prepare import labelled as prepare

    def broken(*a, **k):
        raise ValueError("pairs went sideways\nsecond line")

    monkeypatch.setattr(prepare, "build_pairs", broken)
    msg = _fails_cleanly(capsys, "prepare", "--config", str(project), OFF, code=1)
    m = re.fullmatch(r"unexpected ValueError in prepare: pairs went sideways second line \(a bug, not a problem "
                     r"with your input; traceback saved to (\S+)\)", msg)
    assert m, msg
    saved = Path(m.group(1))
    try:
        text = saved.read_text()
        assert "Traceback" in text and "in broken" in text and "pairs went sideways" in text
    finally:
        saved.unlink()
    # --debug: the real traceback, raised as is
    with pytest.raises(ValueError, match="pairs went sideways"):
        cli("prepare", "--config", str(project), OFF, "--debug")


def test_user_error_with_debug_shows_the_traceback(project, capsys):
    assert cli("prepare", "--config", str(project), OFF, "data.text_column=titel", "--debug") == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("the file has: title, category, cluster")
