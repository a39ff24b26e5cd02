"""Verdicts: is the adapted model better, on the test split and on validation?

On each headline metric (macro-F1, recall@1, nDCG@10, where the dataset has them) the adapted model is
compared with the base model and with the lexical baseline by a paired bootstrap on the same test items:
better, no measurable difference or worse. The validation rule asks whether the adapted model beat the base
on the validation split (eval's own validation figures, else the train manifest's validation curve); when
it did not, eval warns and export refuses the run without ``--force``.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.core.config import Config
from pipeline.evaluate.scores import Scores
from pipeline.search import metrics as M

log = logging.getLogger(__name__)


def paired_verdicts(mine: Scores, ref: Scores, y_true, cfg: Config) -> dict:
    """Headline metric differences ``mine - ref`` on the same test items, each with a paired bootstrap 95%
    CI and its verdict. A metric is left out unless both sides have it."""
    out = {}
    n, seed = cfg.eval.bootstrap, cfg.seed
    for key in M.headline_keys(cfg.eval.retrieval_k):
        kind, metric = key.split(".", 1)
        if kind == "classification":
            if y_true is None or mine.y_pred is None or ref.y_pred is None:
                continue
            r = M.paired_bootstrap_macro_f1(y_true, mine.y_pred, ref.y_pred, n, seed)
        else:
            a, b = mine.per_query.get(metric), ref.per_query.get(metric)
            if a is None or b is None:
                continue
            r = M.paired_bootstrap_mean(a, b, n, seed)
        out[key] = {"delta": round(r["delta"], 5), "ci": [round(x, 5) for x in r["ci"]], "verdict": r["verdict"]}
    return out


def train_curve(train_manifest: dict) -> dict | None:
    """The validation curve the train stage recorded (``train.validation`` of its manifest), if any."""
    v = (train_manifest.get("train") or {}).get("validation")
    return v if isinstance(v, dict) and v.get("curve") else None


def validation_verdict(method: str, eval_figures: dict, curve: dict | None) -> dict:
    """Is the adapted model better than the base on the validation split?

    eval_figures: ``{metric: (adapted, base)}`` that eval measured on validation (chosen classifier head's
    macro-F1, retrieval recall@1). The metric is the one training validated on when eval has it, else
    macro-F1, else recall@1; without eval figures the train manifest's curve (best vs step-0 value) is
    the source; without either, nothing is claimed (``better`` is None).
    """
    if method == "base":
        return {"metric": None, "adapted": None, "base": None, "better": None, "source": "none",
                "note": "the run is the untrained base model itself"}
    wanted = (curve or {}).get("metric")
    for metric in [wanted, "macro_f1", "recall@1"]:
        if metric in eval_figures:
            adapted, base = eval_figures[metric]
            return {"metric": metric, "adapted": round(float(adapted), 5), "base": round(float(base), 5),
                    "better": bool(adapted > base), "source": "eval (validation split)"}
    if curve and curve.get("best_value") is not None and curve.get("base_value") is not None:
        adapted, base = float(curve["best_value"]), float(curve["base_value"])
        return {"metric": curve.get("metric"), "adapted": round(adapted, 5), "base": round(base, 5),
                "better": bool(adapted > base), "source": "train manifest (validation curve)",
                "best_step": curve.get("best_step")}
    return {"metric": None, "adapted": None, "base": None, "better": None, "source": "none",
            "note": "no validation figures: eval has none for this dataset and the train manifest has no "
                    "validation curve"}


def validation_figures(adapted: Scores, base: Scores) -> dict:
    """``{metric: (adapted, base)}`` of what eval measured on the validation split."""
    out = {}
    if adapted.head is not None and base.head is not None:  # the chosen head's macro-F1, as the choice saw it
        out["macro_f1"] = (adapted.validation_macro_f1[adapted.head], base.validation_macro_f1[base.head])
    ra, rb = adapted.val_retrieval or {}, base.val_retrieval or {}
    for k in ra:
        if k in rb:
            out[k] = (ra[k], rb[k])
    return out


def warn_if_not_better(run_name: str, v: dict) -> None:
    if v.get("better") is False:
        log.warning("WARNING: %s is NOT better than the base model on validation (%s %.4f vs base %.4f, from %s); "
                    "export will refuse it without --force", run_name, v["metric"], v["adapted"], v["base"],
                    v["source"])


def verdict_block(cfg: Config, method: str, models: dict[str, Scores | None], y_true, eval_figures: dict,
                  curve: dict | None) -> dict:
    """metrics.json's ``verdict``: test-split paired verdicts of ``models["adapted"]`` against the base and
    the lexical baseline (when scored), and the validation rule (adapted must beat the base on validation)."""
    adapted = models["adapted"]
    test = {"vs_base": paired_verdicts(adapted, models["base"], y_true, cfg)}
    if models.get("lexical") is not None:
        test["vs_lexical"] = paired_verdicts(adapted, models["lexical"], y_true, cfg)
    validation = validation_verdict(method, eval_figures, curve)
    warn_if_not_better(cfg.resolved_run_name, validation)
    out = {"test": test, "validation": validation}
    if adapted.head is not None and models["base"].head is not None:
        # macro-F1 compares each model's best head on validation: the base's may be logistic regression on
        # its frozen embeddings, a practitioner's first try, and the adapted model must beat that
        out["heads"] = {"adapted": adapted.head, "base": models["base"].head}
    return out


def log_verdict(tracker, verdict: dict) -> None:
    """The verdict as MLflow metrics (difference and CI per headline metric) and tags (the words)."""
    flat, tags = {}, {}
    for ref, block in verdict["test"].items():
        for key, d in block.items():
            name = f"verdict.{ref}.{key.split('.', 1)[1]}".replace("@", "_at_")
            flat[f"{name}.delta"], flat[f"{name}.ci_low"], flat[f"{name}.ci_high"] = d["delta"], *d["ci"]
            tags[name] = d["verdict"]
    tracker.log_metrics({k: v for k, v in flat.items() if v is not None and np.isfinite(v)})
    v = verdict["validation"]
    tags["verdict.validation.better"] = {True: "yes", False: "no", None: "unknown"}[v["better"]]
    tags["verdict.validation.source"] = v["source"]
    tracker.set_tags(tags)


def kept_base_verdict(curve: dict | None) -> dict:
    """The validation rule of a run whose training kept the untrained base (no trained step beat it on validation,
    the base being a candidate): the figures are the train manifest's curve, best trained step against step 0."""
    trained = [c for c in (curve or {}).get("curve", []) if c["step"] > 0]
    best = max(trained, key=lambda c: c["value"]) if trained else None
    return {"metric": (curve or {}).get("metric"), "adapted": best["value"] if best else None,
            "base": (curve or {}).get("base_value"), "better": False, "kept": "base",
            "source": "train manifest (validation curve)", "best_trained_step": best["step"] if best else None,
            "note": "no trained step beat the untrained base on validation, so the run kept the base model"}

