import re
from pathlib import Path

import pytest

from pipeline.core.config import Config, load_config, parse_override
from pipeline.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.resolved_run_name


def test_default_config_is_lora_on_qkv():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg.train.method == "lora"
    # the qkv preset, which resolves to query,key,value on MiniLM (tests/model/test_families.py)
    assert cfg.train.lora.target_modules == "qkv"
    # the validation-chosen default (configs/experiments/README.md): r16, rsLoRA, no dropout
    assert (cfg.train.lora.r, cfg.train.lora.alpha, cfg.train.lora.dropout, cfg.train.lora.use_rslora) == (16, 32, 0.0, True)
    assert cfg.train.epochs == 3
    assert cfg.data.name == "pricerunner"


def test_a_config_with_only_a_data_section_trains_like_the_default_run(tmp_path):
    """One set of defaults: configs/default.yaml holds only PriceRunner's data section, so a user's config
    with only its own data section gets exactly the default run's pairs, training and eval settings."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("data: {name: mine, format: table, path: corpus.csv, text_column: t, label_column: y}\n")
    ours, theirs = load_config(REPO / "configs" / "default.yaml"), load_config(mine)
    for section in ("model", "pairs", "train", "eval", "export", "tracking", "seed"):
        assert getattr(theirs, section) == getattr(ours, section), section
    assert Config().train == ours.train and Config().pairs == ours.pairs


def test_dotted_overrides_are_typed():
    cfg = load_config(REPO / "configs" / "default.yaml",
                      ["train.lora.r=8", "train.epochs=2", "train.lora.target_modules=[query,value]", "seed=3"])
    assert cfg.train.lora.r == 8 and cfg.train.epochs == 2.0 and cfg.seed == 3
    assert cfg.train.lora.target_modules == ["query", "value"]
    assert cfg.resolved_run_name == "pricerunner-lora-r8-a32-s3"


def test_target_modules_take_a_preset_or_a_list():
    cfg = load_config(REPO / "configs" / "default.yaml", ["train.lora.target_modules=qkv+ffn"])
    assert cfg.train.lora.target_modules == "qkv+ffn"
    with pytest.raises(ConfigError, match=r"'query' is not a preset .*as a list"):
        load_config(REPO / "configs" / "default.yaml", ["train.lora.target_modules=query"])


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'train.lora.rank'"):
        load_config(REPO / "configs" / "default.yaml", ["train.lora.rank=8"])


def test_unknown_top_level_key_in_file_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 1\ntrian: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian'"):
        load_config(p)


@pytest.mark.parametrize("override, said", [
    ("train.num_threads=2", "'train.num_threads' is now 'runtime.num_threads'"),
    ("export.serve_port=8001", "'export.serve_port' is now 'serve.port'"),
    ("export.targets=[qdrant]", "'export.targets' is now 'targets.engines'"),
    ("export.target_options.qdrant_url=http://127.0.0.1:1", "'export.target_options' is now 'targets' (same keys")])
def test_a_key_that_moved_to_its_own_section_says_where(override, said):
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_config(REPO / "configs" / "default.yaml", [override])


def test_serving_engines_and_threads_are_their_own_sections_outside_the_export_identity():
    cfg = load_config(REPO / "configs" / "default.yaml",
                      ["serve.port=8001", "targets.engines=[qdrant]", "runtime.num_threads=1"])
    assert (cfg.serve.port, cfg.targets.engines, cfg.runtime.num_threads) == (8001, ["qdrant"], 1)
    assert set(cfg.export.model_dump()).isdisjoint({"serve_port", "targets", "target_options", "serve_form"})
    assert "num_threads" not in cfg.train.model_dump()


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"'train.lora.r'.*integer.*'sixteen'"):
        load_config(REPO / "configs" / "default.yaml", ["train.lora.r=sixteen"])


def test_wrong_choice_is_named():
    with pytest.raises(ConfigError, match=r"'train.method'"):
        load_config(REPO / "configs" / "default.yaml", ["train.method=adapterz"])


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="not a section"):
        load_config(REPO / "configs" / "default.yaml", ["data.name.value=1"])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.epochs")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(REPO / "configs" / "default.yaml", ["data.split.test=0.3"])


def test_section_hash_tracks_only_named_sections():
    a = load_config(REPO / "configs" / "default.yaml")
    b = load_config(REPO / "configs" / "default.yaml", ["eval.bootstrap=5"])
    c = load_config(REPO / "configs" / "default.yaml", ["train.lr=0.001"])
    assert a.section_hash("train") == b.section_hash("train")
    assert a.section_hash("train") != c.section_hash("train")


SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")
@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "template.yaml"),
                         ids=lambda p: p.name)
def test_every_shipped_config_finds_its_data_from_the_mirror(path, tmp_path):
    """A clean checkout with ../shared beside it needs no copying by hand: each shipped dataset's files
    reach data/raw/<name>/ from the mirror (the template names the user's own file instead)."""
    from pipeline.core.artifacts import Layout
    from pipeline.prepare.sources import MIRROR_PREFIX, RAW_SPECS, ensure_raw, mirrored_path

    cfg = load_config(path, [f"paths.mirror={SHARED_DATA}", f"paths.data={tmp_path}"])
    raw = Layout(cfg).raw
    if cfg.data.format in RAW_SPECS:
        assert all(f.is_file() for f in ensure_raw(cfg, raw))
    else:
        assert cfg.data.path and cfg.data.path.startswith(MIRROR_PREFIX), "a shipped config reads the mirror"
        copied = mirrored_path(cfg, raw)  # a file, or a folder (a BEIR retrieval set) with its files
        assert copied.is_file() or (copied.is_dir() and any(copied.iterdir()))
