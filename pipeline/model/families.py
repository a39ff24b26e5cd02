"""Which modules LoRA adapts, per model family: presets resolved against the architecture's own names.

Q/K/V have a different name in nearly every family (field note 14), so ``train.lora.target_modules``
takes a preset and this table turns it into the module names PEFT matches (a module is adapted when
its full name equals an entry or ends with "." + entry):

- ``qv``: query and value; ``qkv`` (the default): query, key, value; ``qkvo``: plus the attention output
  projection; ``qkv+ffn``: q, k, v plus the feed-forward block; ``all-linear``: every linear layer of
  the attention and feed-forward blocks (never a pooler or head outside the layers).
- Fused projections (ModernBERT, NomicBERT's remote code: one ``Wqkv``): q, k and v are one weight, so
  ``qv`` and ``qkv`` both adapt the whole ``Wqkv`` (LoRA cannot touch one third of a fused matrix
  without a custom layer); the record says ``fused_qkv: true`` so a sweep over presets shows it.
- An architecture missing from the table is mapped by its module names when they match a row of it
  (e.g. a BERT clone under another ``model_type``); otherwise a preset is a clear error asking for names.

An explicit list of names is used as given, after checking that each one matches a module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.core.config import LORA_PRESETS

PRESETS = LORA_PRESETS  # preset -> roles; the config owns the names a user may give

# An entry is a module-name suffix, or (suffix, excluded suffix): BERT's FFN output ``layer.N.output.dense``
# shares the suffix ``output.dense`` with the attention output ``attention.output.dense``, so it is
# expanded to one ``layer.N.output.dense`` name per layer.
_BERT = {"q": ["query"], "k": ["key"], "v": ["value"], "o": ["attention.output.dense"],
         "ffn": ["intermediate.dense", ("output.dense", "attention.output.dense")]}
_DECODER = {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"],
            "ffn": ["gate_proj", "up_proj", "down_proj"]}
ROLES: dict[str, dict[str, list]] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT, "camembert": _BERT,
    "distilbert": {"q": ["q_lin"], "k": ["k_lin"], "v": ["v_lin"], "o": ["out_lin"], "ffn": ["ffn.lin1", "ffn.lin2"]},
    "mpnet": {"q": ["attn.q"], "k": ["attn.k"], "v": ["attn.v"], "o": ["attn.o"],
              "ffn": ["intermediate.dense", ("output.dense", "attention.output.dense")]},
    "modernbert": {"q": ["Wqkv"], "k": ["Wqkv"], "v": ["Wqkv"], "o": ["attn.Wo"], "ffn": ["mlp.Wi", "mlp.Wo"]},
    # transformers' own NomicBert splits q/k/v; the remote code of nomic-embed fuses them (mapped, untested here)
    "nomic_bert": {"q": ["q_proj", "Wqkv"], "k": ["k_proj", "Wqkv"], "v": ["v_proj", "Wqkv"],
                   "o": ["o_proj", "attn.out_proj"],
                   "ffn": ["gate_proj", "up_proj", "down_proj", "mlp.fc11", "mlp.fc12", "mlp.fc2"]},
    "t5": {"q": ["SelfAttention.q"], "k": ["SelfAttention.k"], "v": ["SelfAttention.v"], "o": ["SelfAttention.o"],
           "ffn": ["DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo"]},
    "qwen2": _DECODER, "qwen3": _DECODER, "llama": _DECODER, "mistral": _DECODER, "gemma": _DECODER,
    "gemma2": _DECODER, "gemma3_text": _DECODER,
}
for _alias in ("mt5", "umt5"):
    ROLES[_alias] = ROLES["t5"]


@dataclass
class Targets:
    """What LoRA adapts: the names handed to PEFT and what they matched."""

    modules: list[str]
    preset: str | None  # None: the config named the modules
    architecture: str
    adapted_modules: int  # modules matched by ``modules``
    fused_qkv: bool
    mapped_by: str  # "table", "module names" or "config"
    modules_to_save: list[str] = field(default_factory=list)  # trained in full beside the adapter

    def record(self) -> dict:
        return asdict(self)


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _linear_names(model) -> list[str]:
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _expand(entry, names: list[str]) -> list[str]:
    """The PEFT entries for one table entry, or [] when no module of ``names`` matches it."""
    if isinstance(entry, str):
        return [entry] if any(_matches(n, entry) for n in names) else []
    suffix, excluded = entry
    hits = [n for n in names if _matches(n, suffix) and not _matches(n, excluded)]
    keep = len(suffix.split(".")) + 2  # e.g. layer.0.output.dense: unique per layer, still readable
    return list(dict.fromkeys(".".join(n.split(".")[-keep:]) for n in hits))


def _resolve_roles(roles: dict[str, list], wanted: tuple[str, ...], names: list[str]) -> list[str] | None:
    out: list[str] = []
    for role in wanted:
        found = [e for entry in roles[role] for e in _expand(entry, names)]
        if not found:
            return None
        out += found
    return list(dict.fromkeys(out))


def count_matched(model, modules: list[str]) -> int:
    return sum(1 for n, _ in model.named_modules() if any(_matches(n, t) for t in modules))


def resolve(model, target_modules: str | list[str]) -> Targets:
    """Resolve ``train.lora.target_modules`` against ``model`` (the Hugging Face model, before LoRA)."""
    from pipeline.core.errors import ConfigError

    arch = str(getattr(getattr(model, "config", None), "model_type", "unknown"))
    names = _linear_names(model)
    if not isinstance(target_modules, str):
        modules = list(target_modules)
        all_names = [n for n, _ in model.named_modules()]
        missing = [t for t in modules if not any(_matches(n, t) for n in all_names)]
        if missing:
            raise ConfigError(f"train.lora.target_modules: {missing} not found in the base model ({arch}); "
                              f"its linear modules are named {sorted({n.rsplit('.', 1)[-1] for n in names})}; "
                              f"or use a preset: {', '.join(PRESETS)}")
        return Targets(modules, None, arch, count_matched(model, modules), _fused(model, modules), "config")
    wanted = PRESETS[target_modules]
    resolved, mapped_by = None, "table"
    if arch in ROLES:
        resolved = _resolve_roles(ROLES[arch], wanted, names)
    else:
        mapped_by = "module names"
        for roles in ROLES.values():
            resolved = _resolve_roles(roles, wanted, names)
            if resolved:
                break
    if not resolved:
        raise ConfigError(
            f"train.lora.target_modules: preset '{target_modules}' has no mapping for architecture '{arch}' "
            f"(mapped: {', '.join(sorted(ROLES))}); name the modules as a list instead; its linear modules "
            f"are named {sorted({n.rsplit('.', 1)[-1] for n in names})}")
    return Targets(resolved, target_modules, arch, count_matched(model, resolved), _fused(model, resolved), mapped_by)


def _fused(model, modules: list[str]) -> bool:
    return any(m.rsplit(".", 1)[-1].lower() == "wqkv" for m in modules)


def lora_block(lora: dict | None) -> dict:
    """metrics.json's ``model.lora``: the contract's r, alpha and (resolved) target_modules, plus the preset,
    the number of adapted modules and the architecture, so a sweep over presets compares like with like."""
    if not lora:
        return {"r": 0, "alpha": 0, "target_modules": []}
    out = {"r": lora["r"], "alpha": lora["alpha"], "target_modules": lora["target_modules"]}
    targets = lora.get("targets") or {}
    out.update({k: targets[k] for k in ("preset", "adapted_modules", "architecture", "fused_qkv") if k in targets})
    return out


def resolve_for_base(resolved_base: str, target_modules: str | list[str], *,
                     trust_remote_code: bool = False) -> list[str] | None:
    """The module names a preset resolves to for a base model, without loading its weights (the model is
    built on the meta device); None when the base's config cannot be read (a hub id not cached here)."""
    if not isinstance(target_modules, str):
        return list(target_modules)
    import torch
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(resolved_base, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError):
        return None
    from pipeline.core.errors import ConfigError

    try:
        return resolve(model, target_modules).modules
    except ConfigError:
        return None
