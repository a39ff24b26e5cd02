"""Reproducibility (same config and seed on the CPU, identical metrics) and security basics (safetensors
only, no pickle loading, no remote code, local-only network binds)."""

import ast
import json
import re
import shutil
from pathlib import Path


from tests.conftest import REPO, RUN, cli, run_stages

SOURCES = sorted((REPO / "pipeline").rglob("*.py"))


def _all_stages(project: Path) -> dict:
    cfg = ["--config", str(project), "tracking.enabled=false"]
    run_stages(*cfg)
    return json.loads((Path("reports") / RUN / "metrics.json").read_text())


def test_same_config_and_seed_give_identical_metrics(project, tmp_path, monkeypatch):
    """Two runs in two fresh project folders (no shared cache): every metric, CI and the base and lexical
    rows are equal, not merely close."""
    first = _all_stages(project)
    second_dir = tmp_path / "again"
    second_dir.mkdir()
    shutil.copy("corpus.csv", second_dir / "corpus.csv")
    monkeypatch.chdir(second_dir)
    second = _all_stages(project)
    for key in ("classification", "retrieval", "baseline", "lexical", "ci", "model", "data_fingerprint",
                "test_items", "retrieval_queries", "classifier"):
        assert first[key] == second[key], key
    assert first["classification"] and first["retrieval"] and first["lexical"]["classification"]
    manifest = json.loads((Path("runs") / RUN / "model" / "manifest.json").read_text())
    # what is needed to reproduce it: library versions, the data fingerprint, the seed and the commit
    assert {"torch", "transformers", "peft", "sentence-transformers"} <= set(manifest["versions"])
    prepared = json.loads(Path("data/processed/synthetic/manifest.json").read_text())
    assert manifest["inputs"]["prepared_data"] == prepared["fingerprint"] and manifest["seed"] == 0
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", manifest["git_commit"])
    assert re.fullmatch(r"[0-9a-f]{64}", prepared["inputs"]["corpus.csv"])  # sha256 of the raw file


# --- security ------------------------------------------------------------------------------------------

def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def _module_constants(path: Path) -> dict:
    """Module-level ``NAME = "literal"`` assignments of a source file."""
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            out.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    return out


def test_nothing_unpickles_artefacts():
    offenders = []
    for path in SOURCES:
        for call, name in _calls(path):
            where = f"{path.name}:{call.lineno} {name}"
            if name == "torch.load" and _keyword(call, "weights_only") is not True:
                offenders.append(where + " without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "joblib.load", "pd.read_pickle", "cloudpickle.load",
                        "dill.load"):
                offenders.append(where)
            if name == "np.load" and _keyword(call, "allow_pickle") not in (None, False):
                offenders.append(where + " with allow_pickle")
            if _keyword(call, "safe_serialization") is False:
                offenders.append(where + " with safe_serialization=False")
    assert offenders == []


def test_remote_code_only_when_the_config_says_so():
    offenders = [f"{p.name}:{c.lineno}" for p in SOURCES for c, _ in _calls(p)
                 if _keyword(c, "trust_remote_code") is True]
    assert offenders == []
    from pipeline.core.config import Config

    assert Config().model.trust_remote_code is False


def test_stages_pass_trust_remote_code_from_the_config(project, monkeypatch):
    import sentence_transformers

    seen = []
    real = sentence_transformers.SentenceTransformer

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", spy)
    cfg = ["--config", str(project), "tracking.enabled=false", "eval.lexical=false"]
    run_stages(*cfg, stages=("prepare", "train", "embed"))
    assert seen and set(seen) == {False}
    seen.clear()
    # turned on in the config, it reaches the loader (the tiny BERT has no remote code, so it still loads)
    assert cli("train", *cfg, "model.trust_remote_code=true", "run_name=remote") == 0
    assert seen and set(seen) == {True}
    info = json.loads(Path("runs/remote/model/model_info.json").read_text())
    assert info["trust_remote_code"] is True


def test_written_weights_are_safetensors_only(project):
    cfg = ["--config", str(project), "tracking.enabled=false"]
    assert cli("prepare", *cfg) == 0 and cli("train", *cfg) == 0
    files = [p.name for p in (Path("runs") / RUN).rglob("*") if p.is_file()]
    assert "adapter_model.safetensors" in files
    assert [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".joblib"))] == []


def test_a_pickled_object_in_a_checkpoint_is_refused_not_run(project, capsys, tmp_path):
    """The optimizer state is read with the restricted unpickler: code hidden in it does not run."""
    import torch
    from safetensors.torch import save_file

    from pipeline.contracts.identity import run_fingerprint
    from pipeline.core.config import load_config

    cfg_args = ["--config", str(project), "tracking.enabled=false"]
    assert cli("prepare", *cfg_args) == 0
    cfg = load_config(project, ["tracking.enabled=false"])
    prep = json.loads(Path("data/processed/synthetic/manifest.json").read_text())
    ckpt = Path("runs") / RUN / "checkpoints"
    ckpt.mkdir(parents=True)
    save_file({}, ckpt / "trainable.safetensors")
    (ckpt / "state.json").write_text(json.dumps({"fingerprint": run_fingerprint(cfg, prep["fingerprint"]),
                                                  "step": 5}))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"optimizer": Payload()}, ckpt / "optimizer.pt")
    capsys.readouterr()
    assert cli("train", *cfg_args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: checkpoint in runs/{RUN}/checkpoints cannot be loaded (optimizer.pt holds "
                      "a reference to getattr, which is not loaded because unpickling it could run code); "
                      "delete that folder or pass --overwrite to train from scratch"]
    assert not marker.exists()
    assert not (Path("runs") / RUN / "model").exists()


def test_network_services_bind_to_localhost_only():
    makefile = (REPO / "Makefile").read_text()
    ui = re.search(r"^ui:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "--host 127.0.0.1" in ui
    texts = [makefile] + [p.read_text() for p in SOURCES]
    assert not any("0.0.0.0" in t for t in texts)
    # every host= in the code is the loopback address: a literal, or a module constant holding one
    binds = [(path, call, name, _keyword(call, "host")) for path in SOURCES for call, name in _calls(path)
             if _keyword(call, "host") is not None]
    assert len(binds) >= 3, "serve, serve-adapters and the serve bench each bind a server"
    for path, call, name, host in binds:
        value = _module_constants(path).get(host.id) if isinstance(host, ast.Name) else host
        assert value in ("127.0.0.1", "localhost"), f"{path.name}:{call.lineno} {name} binds {ast.unparse(host) if isinstance(host, ast.AST) else host}"
