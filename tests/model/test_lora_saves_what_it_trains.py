"""A LoRA run trains exactly what it saves and ships exactly what it validated (issue 22).

Real encoders carry modules after pooling (Dense heads in EmbeddingGemma, LaBSE, distiluse, GTR; Normalize):
PEFT wraps only the transformer, so those stayed trainable, the optimiser trained them, and the adapter save
did not hold them. These tests build tiny models of that shape (tests/families.py: one and two Dense layers,
Normalize, prompts) and check, for each: trainable = saved, reload = the trained model, the merged export
differs from the base only where the run says it trains, and every form (adapter, merged, ONNX, the adapter
server) carries what was trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cli
from tests.families import build
from tests.model.test_families import PROMPTS, family_project

QUIET = ["tracking.enabled=false"]


@pytest.fixture(scope="session")
def head_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("heads")


def _stages(config: Path, *stages: str, extra: tuple[str, ...] = ()) -> None:
    for stage in stages:
        force = ("--force",) if stage == "export" else ()  # a few random steps rarely beat the base
        assert cli(stage, "--config", str(config), *QUIET, *extra, *force) == 0, stage


def _saved_parameters(folder: Path) -> int:
    """Every parameter in the run's saved weight files, counted straight from the safetensors headers."""
    from safetensors import safe_open

    total = 0
    for path in Path(folder).rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    return total


def _dense(st) -> dict[str, np.ndarray]:
    """The weights of the modules after the transformer, by state-dict name."""
    return {n: t.detach().cpu().numpy().copy() for n, t in st.state_dict().items() if not n.startswith("0.")}


@pytest.mark.parametrize("head", ["dense", "dense2"])
def test_a_lora_run_trains_exactly_what_it_saves(head, head_root, tmp_path, monkeypatch):
    """Failed before the fix: the Dense layers after pooling were trained (trainable_params counted them) and
    not saved, so the reloaded run was not the model validation had chosen."""
    from sentence_transformers import SentenceTransformer

    from pipeline.model.encoder import load_trained

    base = build("bert", head_root, head=head, prompts=PROMPTS if head == "dense2" else None)
    monkeypatch.chdir(tmp_path)
    _stages(family_project(tmp_path, base), "prepare", "train")
    info = json.loads(Path("runs/fam/model/model_info.json").read_text())
    assert info["trainable_params"] == _saved_parameters(Path("runs/fam/model"))
    # the heads after pooling are the base's own in the run as it loads from disk
    plain = _dense(SentenceTransformer(str(base), device="cpu"))
    reloaded = _dense(load_trained(Path("runs/fam/model")))
    assert plain.keys() == reloaded.keys() and any(".linear." in n for n in plain)
    for name, value in plain.items():
        np.testing.assert_array_equal(reloaded[name], value, err_msg=name)


def test_the_run_reloads_itself_and_records_it(head_root, tmp_path, monkeypatch):
    base = build("bert", head_root, head="dense")
    monkeypatch.chdir(tmp_path)
    _stages(family_project(tmp_path, base), "prepare", "train")
    manifest = json.loads(Path("runs/fam/model/manifest.json").read_text())
    assert manifest["train"]["reload_min_cos"] >= 0.9999
    assert manifest["model"]["trainable_params"] == manifest["train"]["saved_params"]


@pytest.mark.parametrize("broken, message", [
    ("trained_outer_state", "trained 2,592 parameters but its adapter holds 1,536"),  # the head is not saved
    ("load_outer_modules", "does not reproduce the trained model"),  # saved, but not loaded back
])
def test_a_run_whose_save_loses_a_trained_weight_is_an_error(broken, message, head_root, tmp_path, monkeypatch,
                                                              capsys):
    """Both checks after training: the saved-parameter count, and the reload compared with the trained model on
    a probe. Either failure stops the run and leaves no model folder behind."""
    from pipeline.model import encoder

    base = build("bert", head_root, head="dense")
    monkeypatch.chdir(tmp_path)
    config = family_project(tmp_path, base, **{"train.lora.modules_to_save": ["Dense"]})
    monkeypatch.setattr(encoder, broken, lambda *a: {} if broken == "trained_outer_state" else 0)
    _stages(config, "prepare")
    assert cli("train", "--config", str(config), *QUIET) == 2
    assert message in capsys.readouterr().err
    assert not Path("runs/fam/model/model_info.json").exists()


def test_apply_lora_freezes_every_module_after_the_transformer_unless_named(head_root):
    from pipeline.core.config import LoraSettings
    from pipeline.core.errors import ConfigError
    from pipeline.model.encoder import apply_lora, load_encoder

    folder = str(build("bert", head_root, head="dense2"))
    st = load_encoder(folder, max_seq_length=32)
    targets = apply_lora(st, LoraSettings(r=4, alpha=8))
    trainable = [n for n, p in st.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable) and targets.modules_to_save == []

    st = load_encoder(folder, max_seq_length=32)
    targets = apply_lora(st, LoraSettings(r=4, alpha=8, modules_to_save=["3", "pooler"]))
    outside = {n.split(".")[0] for n, p in st.named_parameters() if p.requires_grad and not n.startswith("0.")}
    assert outside == {"3"} and targets.modules_to_save == ["3:Dense", "pooler"]
    assert any("pooler" in n and "modules_to_save" in n for n, p in st.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="'Denser' names no module.*2: Dense"):
        apply_lora(load_encoder(folder, max_seq_length=32), LoraSettings(r=4, alpha=8, modules_to_save=["Denser"]))


def test_named_modules_are_trained_saved_and_shipped_in_every_form(head_root, tmp_path, monkeypatch):
    """``train.lora.modules_to_save: [Dense]`` on two Dense layers with prompts: the heads train, are saved
    beside the adapter, and the merged folder, the ONNX graph, the adapter form and the adapter server all
    give the trained model's vectors; the merged model differs from the base only in the adapted modules and
    the named heads."""
    from sentence_transformers import SentenceTransformer

    from pipeline.contracts.export_folder import load_form
    from pipeline.model.backends import row_cosines
    from pipeline.model.encoder import load_trained
    from pipeline.serve.adapters import AdapterSet

    base = build("bert", head_root, head="dense2", prompts=PROMPTS)
    monkeypatch.chdir(tmp_path)
    config = family_project(tmp_path, base, **{"train.lora.modules_to_save": ["Dense"], "train.lr": 2e-2})
    _stages(config, "prepare", "train", "embed", "eval", "export")
    info = json.loads(Path("runs/fam/model/model_info.json").read_text())
    assert info["trainable_params"] == _saved_parameters(Path("runs/fam/model"))
    assert info["lora"]["targets"]["modules_to_save"] == ["2:Dense", "3:Dense"]
    assert (Path("runs/fam/model/adapter/st_modules.safetensors")).exists()
    plain, trained = _dense(SentenceTransformer(str(base), device="cpu")), _dense(load_trained(Path("runs/fam/model")))
    assert all(not np.array_equal(plain[n], trained[n]) for n in plain if ".linear.weight" in n)  # the heads moved

    gate = json.loads(Path("exports/fam/manifest.json").read_text())["gate"]
    assert gate["passed"] and gate["changed_outside_adapted"] == [] and gate["changed_weight_tensors"] > 0
    merged = _dense(SentenceTransformer("exports/fam/merged", device="cpu"))
    for name in plain:
        np.testing.assert_allclose(merged[name], trained[name], atol=1e-6, err_msg=name)

    texts = ["apple iphone a123 black", "sony bravia tv 2 year warranty", "x"]
    for role in ("query", "document"):
        want = load_form(Path("exports/fam"), "merged").encode(texts, role)
        for form in ("adapter", "onnx"):
            got = load_form(Path("exports/fam"), form).encode(texts, role)
            assert row_cosines(got, want).min() >= 0.9999, (form, role)
    served = AdapterSet(json.loads(Path("exports/fam/adapter/base_model.json").read_text()))
    served.add(Path("exports/fam"))
    assert row_cosines(served.encode("fam", texts, "query"),
                       load_form(Path("exports/fam"), "merged").encode(texts, "query")).min() >= 0.9999


def test_the_export_gate_refuses_a_merge_that_changed_a_module_the_run_does_not_train():
    from pipeline.export.stage import check_gate, outside_adapted
    from pipeline.core.config import ExportConfig

    info = {"lora": {"target_modules": ["query", "value"], "targets": {"modules_to_save": ["2:Dense", "pooler"]}}}
    changed = ["0.auto_model.encoder.layer.0.attention.self.query.weight", "2.linear.weight",
               "0.auto_model.pooler.dense.bias", "0.auto_model.encoder.layer.0.attention.self.key.weight",
               "3.linear.weight"]
    assert outside_adapted(changed, info) == ["0.auto_model.encoder.layer.0.attention.self.key.weight",
                                              "3.linear.weight"]
    numbers = {"merged_vs_reference_min_cos": 1.0, "merged_vs_base_mean_cos": 0.5, "changed_weight_tensors": 5,
               "changed_outside_adapted": outside_adapted(changed, info)}
    assert any("outside the adapted modules" in f for f in check_gate(numbers, ExportConfig()))
