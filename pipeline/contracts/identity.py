"""What identifies each artefact: the fingerprints that decide whether a stage's output is up to date.

A library module, so that an orchestrator (sweep, suite) can ask whether a child's model is current
without importing the stage that trains it.
"""

from __future__ import annotations

from pipeline.contracts import pair_kinds
from pipeline.model import families
from pipeline.model import prompts
from pipeline.core.artifacts import digest
from pipeline.core.config import Config, CorpusPairsConfig, TsdaeConfig
from pipeline.model.encoder import base_fingerprint, resolve_base


def prepared_fingerprint(cfg: Config, input_hashes: dict[str, str], *, splits_only: bool = False) -> str:
    """Identity of the prepared data; ``splits_only`` leaves out the pairs settings, so outputs that
    depend only on the splits (base-model embeddings, the lexical baseline) survive a change of pairs."""
    sections = ("data",) if splits_only else ("data", "pairs")
    payload = {"cfg": _sections_hash(cfg, sections), "seed": cfg.seed, "in": input_hashes}
    if pair_kinds.VERSION > 1 and not splits_only:  # what auto resolves changed: prepare again (version 1: as before)
        payload["objectives"] = pair_kinds.VERSION
    if (cfg.pairs.hard_negatives.enabled or cfg.pairs.objective == "corpus") and not splits_only:
        # mined negatives and pseudo labels (the corpus objective's neighbours) come from the base encoder
        payload["miner"] = [base_fingerprint(resolve_base(cfg.model.base)), cfg.train.max_seq_length,
                            cfg.train.mask_same_label]
    return digest(payload)


def _sections_hash(cfg: Config, sections: tuple[str, ...]) -> str:
    """``cfg.section_hash`` without ``pairs.corpus`` while it holds its defaults, so that data prepared before the
    corpus objective existed keeps its identity (and its trained runs theirs)."""
    if "pairs" not in sections or cfg.pairs.corpus != CorpusPairsConfig():
        return cfg.section_hash(*sections)
    import hashlib
    import json

    dump = cfg.model_dump(mode="json")
    payload = {s: dump[s] for s in sections}
    del payload["pairs"]["corpus"]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run_fingerprint(cfg: Config, data_fingerprint: str) -> str:
    """Identity of a trained model: base, training settings, seed, prompts and the prepared data."""
    # Knobs that change how fast a run goes but not what it computes stay out of its identity, so a
    # run resumed with another checkpoint interval or checkpointing setting continues (threads: runtime.num_threads).
    train = cfg.train.model_dump(mode="json", exclude={"checkpoint_every", "gradient_checkpointing"})
    for key, default in (("weights_dtype", "fp32"), ("quantization", "none"), ("pre_step", "none"),
                         ("label_loss_weight", None), ("pair_loss_weight", 1.0)):
        if train[key] == default:  # at their defaults, runs keep the identity they had before these existed
            del train[key]
    if "pre_step" not in train and cfg.train.tsdae == TsdaeConfig():
        del train["tsdae"]
    if train["validation"]["base_is_candidate"] is None:
        del train["validation"]["base_is_candidate"]
    if not train["lora"]["modules_to_save"]:
        del train["lora"]["modules_to_save"]
    base = resolve_base(cfg.model.base)
    # A preset is identified by the names it resolves to for this base: what is trained.
    resolved = families.resolve_for_base(base, cfg.train.lora.target_modules,
                                         trust_remote_code=cfg.model.trust_remote_code)
    train["lora"]["target_modules"] = resolved or train["lora"]["target_modules"]
    identity = {"model": cfg.model.model_dump(mode="json", exclude={"prompts"}), "train": train, "seed": cfg.seed,
                "data": data_fingerprint}
    used = prompts.for_run(cfg)
    if used.any:
        identity["prompts"] = used.record()
    return digest(identity)


def base_embeddings_key(cfg: Config, texts_fp: str, max_seq_length: int) -> str:
    """Key of the base model's embedding cache (``cache/embeddings/<key>/``): base weights, the prepared
    texts, max length, label template, encoder backend and prompts."""
    fp = base_fingerprint(resolve_base(cfg.model.base))
    parts = [fp, texts_fp, max_seq_length, cfg.pairs.label_template, backend_key(cfg)]
    used = prompts.for_run(cfg)
    if used.any:
        parts.append(used.record())
    return f"{fp}-{texts_fp}-{max_seq_length}-{digest(parts, 8)}"


def backend_key(cfg: Config) -> str:
    """What of ``embed`` can change the vectors: a backend change must not be served stale embeddings."""
    e = cfg.embed
    return f"|backend={e.backend}|gate={e.gate_min_cos}|fusion={e.onnx_fusion}"
