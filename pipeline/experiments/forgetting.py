"""probe: score a trained encoder on *another* dataset, against the base model, as a forgetting check.

Adapting to one domain can cost quality elsewhere (FIELD-NOTES: LoRA and full fine-tuning of MiniLM
scored below the base model out of domain). ``python -m pipeline probe --config A.yaml
eval.probe_config=B.yaml`` takes run A's trained model and dataset B's prepared data (prepared here if
needed, with A's base model and paths), embeds B's evaluation texts with A's model and with the base
model, and reports B's retrieval metrics (and zero-shot category F1 where B has labels) for both, with
the paired change and its bootstrap CI. Only the texts the scores need are embedded: a pair dataset's
queries and gallery, a labelled dataset's test split and category names (no classifier is trained, so
its train split is not needed).

Writes ``reports/probes/<run>--on--<dataset>/probe.json`` and ``probe.md`` and logs
``probe.<dataset>.*`` metrics to the run's MLflow run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pipeline.model import tokens as encoding
from pipeline.model import prompts
from pipeline.core import tracking
from pipeline.search import metrics as M
from pipeline import stages
from pipeline.model import backends
from pipeline.search import scoring
from pipeline.core.artifacts import (MANIFEST, Layout, atomic_dir, digest, is_up_to_date, make_manifest, read_manifest,
                                require_manifest, write_json_atomic)
from pipeline.core.config import Config, load_config
from pipeline.core.errors import ConfigError
from pipeline.contracts.prepared_data import PAIR_TEXT_FILES, is_pairs, load_gallery, load_labels, load_queries, load_split

log = logging.getLogger(__name__)


def probe_config(cfg: Config) -> Config:
    """The probe dataset's config, with the run's base model, paths, seed, tracking and eval settings."""
    if not cfg.eval.probe_config:
        raise ConfigError("probe needs eval.probe_config=<config of the other dataset>, "
                          "e.g. eval.probe_config=configs/walmart_amazon.yaml")
    other = load_config(cfg.eval.probe_config)
    if other.data.name == cfg.data.name:
        raise ConfigError(f"eval.probe_config names the run's own dataset '{cfg.data.name}'; a probe is another one")
    return other.model_copy(update={"model": cfg.model, "paths": cfg.paths, "seed": cfg.seed,
                                    "tracking": cfg.tracking, "eval": cfg.eval})


def _needed(prep: dict, processed: Path, pcfg: Config) -> tuple[list[str], list[str]]:
    """(text files, label texts) the probe scores need."""
    if is_pairs(prep):
        return list(PAIR_TEXT_FILES), []
    labels = load_labels(processed)
    return ["test.jsonl"], [pcfg.pairs.label_template.format(label=l) for l in labels]


@dataclass(frozen=True)
class ProbeTexts:
    """What the probe embeds: the probe corpus's prepared folder, its text files, the label texts and the length."""

    processed: Path
    files: list[str]
    label_texts: list[str]
    max_len: int


@dataclass(frozen=True)
class _Encoder:
    """One side of the probe: how to load its model and its prompts, and the stage its cache manifest names."""

    stage: str
    load: Callable
    prompts_of: Callable


def _cached_embeddings(folder: Path, key: str, pcfg: Config, texts: ProbeTexts, side: _Encoder) -> Path:
    """The probe corpus's files embedded as the embed stage writes them (pipeline/model/backends.py), cached by key."""
    if is_up_to_date(folder, key):
        return folder
    processed, files, label_texts, max_len, stage = (texts.processed, texts.files, texts.label_texts, texts.max_len,
                                                     side.stage)
    st_model = side.load()
    used = side.prompts_of(st_model)
    encoder, backend = backends.select_for_files(pcfg, st_model, processed, files, max_len, used,
                                                 backends.texts_to_embed(processed, files, label_texts, used))
    with atomic_dir(folder) as tmp:
        timing = backends.embed_files(encoder, processed, files, label_texts, tmp, used, stage)
        write_json_atomic(tmp / MANIFEST, make_manifest(stage, pcfg, fingerprint=key, inputs={"files": files},
                                                        extra={"timing": timing, "backend": backend}))
    return folder


def score(prep: dict, processed: Path, pcfg: Config, adapted_dir: Path, base_dir: Path,
          label_names: list[str]) -> dict:
    """Metrics of both encoders on the probe dataset, with paired changes."""
    result: dict = {"adapted": {}, "base": {}, "ci": {}, "base_ci": {}, "delta_vs_base": {}}
    if is_pairs(prep):
        queries, gallery = load_queries(processed), load_gallery(processed)
        relevant = scoring.relevance_rows(queries, gallery)
        per_a = scoring.score_embeddings(adapted_dir, queries, gallery, relevant, pcfg)
        per_b = scoring.score_embeddings(base_dir, queries, gallery, relevant, pcfg)
        result["queries"] = int(len(queries))
    else:
        test = load_split(processed, "test")
        ea, eb = np.load(adapted_dir / "test.npy"), np.load(base_dir / "test.npy")
        # the query form of the test texts where the model has query prompts (pipeline/model/prompts.py)
        qa, qb = (np.load(d / "test.query.npy") if (d / "test.query.npy").exists() else e
                  for d, e in ((adapted_dir, ea), (base_dir, eb)))
        per_a = M.group_retrieval(ea, test["group"].to_numpy(), k=pcfg.eval.retrieval_k, query_embeddings=qa)
        per_b = M.group_retrieval(eb, test["group"].to_numpy(), k=pcfg.eval.retrieval_k, query_embeddings=qb)
        result["queries"] = int(len(next(iter(per_a.values())))) if per_a else 0
        if label_names and (adapted_dir / "labels.npy").exists():
            y = test["label"].to_numpy()
            names = np.asarray(label_names)
            za = names[np.argmax(qa @ np.load(adapted_dir / "labels.npy").T, axis=1)]
            zb = names[np.argmax(qb @ np.load(base_dir / "labels.npy").T, axis=1)]
            for key, pred in (("adapted", za), ("base", zb)):
                result[key]["zero_shot_macro_f1"] = round(M.classification_scores(y, pred)["macro_f1"], 5)
                ci = M.bootstrap_macro_f1_ci(y, pred, pcfg.eval.bootstrap, pcfg.seed)
                result["ci" if key == "adapted" else "base_ci"]["zero_shot_macro_f1"] = [round(c, 5) for c in ci]
            r = M.paired_bootstrap_macro_f1(y, za, zb, pcfg.eval.bootstrap, pcfg.seed)
            result["delta_vs_base"]["zero_shot_macro_f1"] = {"delta": round(r["delta"], 5),
                                                             "ci": [round(x, 5) for x in r["ci"]]}
    if per_a:
        ra, ca = scoring.summarize(per_a, pcfg)
        rb, cb = scoring.summarize(per_b, pcfg)
        result["adapted"].update(ra)
        result["base"].update(rb)
        result["ci"].update(ca)
        result["base_ci"].update(cb)
        result["delta_vs_base"].update(scoring.paired_deltas(per_a, per_b, pcfg))
    return result


def run(cfg: Config) -> Path:
    import torch

    from pipeline.contracts.identity import backend_key, base_embeddings_key
    from pipeline.model.encoder import load_base, load_trained, merge_checked, pick_device, read_model_info

    layout = Layout(cfg)
    model_dir = layout.model_dir()
    train_manifest = require_manifest(model_dir, f"trained model for run '{cfg.resolved_run_name}'",
                                      "run `make train` with the same CONFIG/ARGS first")
    info = read_model_info(model_dir)
    pcfg = probe_config(cfg)
    player = Layout(pcfg)
    processed = stages.prepare(pcfg)
    prep = read_manifest(processed)
    files, label_texts = _needed(prep, processed, pcfg)
    label_names = load_labels(processed) if label_texts else []
    max_len = info.get("max_seq_length") or cfg.train.max_seq_length
    torch.set_num_threads(cfg.runtime.num_threads or torch.get_num_threads())
    device = pick_device(cfg.train.device)
    texts = ProbeTexts(processed, files, label_texts, max_len)

    # The base model's embeddings: reuse the probe dataset's own eval cache when it holds them.
    key = base_embeddings_key(pcfg, prep.get("texts_fingerprint", prep["fingerprint"]), max_len)
    base_dir = player.base_embeddings(key)
    if not (is_up_to_date(base_dir, key) and all((base_dir / f"{Path(f).stem}.npy").exists() for f in files)
            and (not label_texts or (base_dir / "labels.npy").exists())):
        fkey = digest([key, files, label_texts])
        base_dir = _cached_embeddings(
            Path(cfg.paths.cache) / "probe-embeddings" / f"{key}-{fkey}", fkey, pcfg, texts,
            _Encoder("probe-embed-base", lambda: load_base(cfg.model, device=device, max_seq_length=max_len),
                     lambda st: prompts.for_run(cfg, st)))

    def trained():
        st_model = load_trained(model_dir, device=device, expected_base=cfg.model.base)
        if info["method"] == "lora":
            sample = pd.read_json(processed / files[0], lines=True, dtype={"text": str})["text"].head(64).tolist()
            merge_checked(st_model, encoding.tokenize(st_model, sample, max_len), device)
        return st_model

    if info["method"] == "base":
        adapted_dir = base_dir
    else:
        akey = digest([train_manifest["fingerprint"], prep["fingerprint"], files, label_texts, backend_key(cfg)])
        adapted_dir = _cached_embeddings(layout.run() / f"probe-{pcfg.data.name}", akey, pcfg, texts,
                                         _Encoder("probe-embed", trained, lambda st: prompts.of_record(info.get("prompts"))))

    result = score(prep, processed, pcfg, adapted_dir, base_dir, label_names)
    payload = {"run_name": cfg.resolved_run_name, "trained_on": cfg.data.name, "probe_dataset": pcfg.data.name,
               "probe_kind": prep.get("kind", "labelled"), "method": info["method"],
               "mlflow_run_id": train_manifest.get("mlflow_run_id") or "", "seed": cfg.seed,
               "probe_data_fingerprint": prep["fingerprint"], **result}
    out = Path(cfg.paths.reports) / "probes" / f"{cfg.resolved_run_name}--on--{pcfg.data.name}"
    with atomic_dir(out) as tmp:
        write_json_atomic(tmp / "probe.json", payload)
        (tmp / "probe.md").write_text(markdown(payload), encoding="utf-8")
    with tracking.run(cfg, run_name=cfg.resolved_run_name, run_id=train_manifest.get("mlflow_run_id")) as tracker:
        p = f"probe.{pcfg.data.name}"
        flat = {f"{p}.{k}": v for k, v in result["adapted"].items()}
        flat.update({f"{p}.base.{k}": v for k, v in result["base"].items()})
        flat.update({f"{p}.delta.{k}": d["delta"] for k, d in result["delta_vs_base"].items()})
        tracker.log_metrics(flat)
        tracker.log_artifact(out / "probe.json", "probe")
    log.info("probe: %s on %s -> %s", cfg.resolved_run_name, pcfg.data.name, out / "probe.json")
    return out


def markdown(p: dict) -> str:
    lines = [f"# Out-of-domain probe: {p['run_name']} on {p['probe_dataset']}", "",
             f"Trained on **{p['trained_on']}** ({p['method']}); scored on **{p['probe_dataset']}** "
             f"({p['probe_kind']}, {p['queries']:,} retrieval queries) against the untrained base model. "
             "Brackets: bootstrap 95% CI; the change is a paired bootstrap over the same queries / items.", "",
             "| metric | base | adapted | change | change 95% CI |", "|---|---|---|---|---|"]
    for k, d in p["delta_vs_base"].items():
        b, a = p["base"][k], p["adapted"][k]
        lines.append(f"| {k} | {b:.3f} | {a:.3f} | {d['delta']:+.3f} | [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |")
    worse = [k for k, d in p["delta_vs_base"].items() if d["ci"][1] < 0]
    lines += ["", ("Forgetting: significantly below the base model on " + ", ".join(worse) + ".") if worse else
              "No metric is significantly below the base model (no change has its whole 95% CI below 0).", ""]
    return "\n".join(lines)
