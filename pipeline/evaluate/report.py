"""Human-readable outputs of eval: report.md tables and the confusion-matrix plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def per_class_table(y_true, y_adapted, y_base, labels: list[str]) -> list[dict]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(y_true, y_adapted, labels=labels, zero_division=0)
    _, _, fb, _ = precision_recall_fscore_support(y_true, y_base, labels=labels, zero_division=0)
    return [{"label": l, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
             "base_f1": float(fb[i]), "support": int(s[i])} for i, l in enumerate(labels)]


def confusion_png(y_true, y_pred, labels: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=labels)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(5, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    if len(labels) <= 20:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def other_runs(reports: Path, current: dict) -> list[dict]:
    """Metrics of other evaluated runs on the same prepared data (e.g. full fine-tuning beside LoRA)."""
    rows = []
    for path in sorted(Path(reports).glob("*/metrics.json")):
        if path.parent.name in ("latest", current["run_name"]) or path.parent.name.startswith("."):
            continue
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if m.get("data_fingerprint") == current.get("data_fingerprint") and m.get("seed") == current.get("seed"):
            rows.append(m)
    return rows


def _fmt(block: dict, ci: dict, key: str) -> str:
    if key not in block:
        return "–"
    v = block[key]
    if key in ci:
        lo, hi = ci[key]
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{v:.3f}"


LABELS = {"classification.macro_f1": "macro-F1", "retrieval.recall@1": "recall@1"}


def _label(key: str) -> str:
    return LABELS.get(key, key.split(".", 1)[1].replace("ndcg", "nDCG"))


def _verdict_cell(d: dict | None) -> str:
    if d is None:
        return "–"
    word = f"**{d['verdict']}**" if d["verdict"] in ("better", "worse") else d["verdict"]
    lo, hi = d["ci"]
    ci = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and np.isfinite(lo) else ""
    return f"{word}: {d['delta']:+.3f}{ci}"


def validation_line(v: dict) -> str:
    """One sentence on the validation rule (the adapted model must beat the base on validation)."""
    if v.get("kept") == "base":
        return (f"Validation **kept the base model**: no trained step beat the untrained base ({v['metric']} "
                f"{v['adapted'] if v['adapted'] is not None else float('nan'):.4f} at best against the base's "
                f"{v['base'] if v['base'] is not None else float('nan'):.4f}, {v['source']}), so this run is the base "
                "model: use the base, there is nothing trained to export.")
    if v.get("better") is None:
        return (f"Validation: nothing claimed ({v.get('note', 'no validation figures')}), so this run is not "
                "shown to be better than the base model.")
    where = f"{v['metric']} {v['adapted']:.4f} against the base model's {v['base']:.4f} (source: {v['source']})"
    if v["better"]:
        return f"Validation: better than the base model, {where}."
    return (f"**WARNING: not better than the base model on validation**, {where}. `make export` refuses this "
            "run unless given `--force`.")


def _heads_sentence(heads: dict | None) -> str:
    if not heads:
        return ""
    return (f" Macro-F1 compares each model's best classifier head on validation: adapted {heads['adapted']}, base "
            f"model {heads['base']} (every head of both models is under \"Classifier heads\").")


def lexical_label(m: dict) -> str:
    """The lexical baseline's name: TF-IDF, or BM25 where metrics.json's ``lexical.method`` says so (retrieval sets)."""
    return "BM25" if str((m.get("lexical") or {}).get("method", "")).startswith("bm25") else "TF-IDF"


def verdict_lines(verdict: dict | None, lexical_name: str = "TF-IDF") -> list[str]:
    """The opening of report.md: a verdict per headline metric against the base model and the lexical baseline."""
    if not verdict:
        return []
    vs_base, vs_lex = verdict["test"].get("vs_base", {}), verdict["test"].get("vs_lexical")
    keys = list(dict.fromkeys([*vs_base, *(vs_lex or {})]))
    lines = ["## Verdict", ""]
    refs = [("vs base model", vs_base)] + ([(f"vs {lexical_name}", vs_lex)] if vs_lex is not None else [])
    if keys:
        lines += ["| headline metric (test) | " + " | ".join(name for name, _ in refs) + " |",
                  "|---" * (len(refs) + 1) + "|"]
        for k in keys:
            lines.append(f"| {_label(k)} | " + " | ".join(_verdict_cell(block.get(k)) for _, block in refs) + " |")
        lines += ["", "Difference adapted minus reference on the same test items, with its 95% CI from a paired "
                      "bootstrap (the items are resampled once per replicate and both models are scored on the same "
                      "draw): *better* when the whole interval is above 0, *worse* when below, else *no measurable "
                      "difference*." + _heads_sentence(verdict.get("heads")), ""]
    return lines + [validation_line(verdict["validation"]), ""]


def curve_png(curve: dict, path: Path, title: str) -> None:
    """The validation metric against the training step, the base model's level dashed, the best step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(curve["curve"], key=lambda p: p["step"])
    steps, values = [p["step"] for p in points], [p["value"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, values, marker="o", ms=3, color="C0", label=f"adapted ({curve.get('split', 'val')})")
    if curve.get("base_value") is not None:
        ax.axhline(curve["base_value"], color="grey", ls="--", lw=1, label="base model (step 0)")
    if curve.get("best_step") is not None and curve.get("best_value") is not None:
        ax.plot([curve["best_step"]], [curve["best_value"]], marker="*", ms=14, color="crimson", ls="none",
                label=f"best (step {curve['best_step']})")
    if curve.get("stopped_early"):
        ax.axvline(steps[-1], color="C1", ls=":", lw=1, label=f"stopped early (patience {curve.get('patience')})")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{curve.get('metric', 'metric')} (validation)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _head_order(name: str) -> tuple:
    kind, _, arg = name.partition("(")
    order = {"logreg": 0, "knn": 1, "zero_shot": 2, "label_head": 3}.get(kind, 4)
    number = arg.rstrip(")").split("=")[-1]
    return order, float(number) if number.replace(".", "", 1).isdigit() else 0.0


def heads_table(heads: dict, classifier: dict) -> list[str]:
    """Every candidate classifier head of both models: validation macro-F1 (which chose the head, marked) and
    test macro-F1 (reported, never used to choose)."""
    adapted, base = heads.get("adapted") or {}, heads.get("base") or {}
    if not adapted and not base:
        return []
    chosen = {"adapted": classifier.get("head"), "base": classifier.get("base_head")}

    def cell(block: dict, name: str, key: str, who: str) -> str:
        v = (block.get(name) or {}).get(key)
        if v is None:
            return "–"
        return f"**{v:.4f}**" if key == "val_macro_f1" and chosen[who] == name else f"{v:.4f}"

    lines = ["## Classifier heads (macro-F1)", "",
             "Each head fitted on the train split; the one with the best validation macro-F1 (bold) is each model's "
             "reported head, and the verdict compares the adapted model's with the base model's. Test figures of the "
             "other heads are shown for comparison only.", "",
             "| head | adapted val | adapted test | base val | base test |", "|---|---|---|---|---|"]
    for name in sorted(set(adapted) | set(base), key=_head_order):
        lines.append(f"| {name} | {cell(adapted, name, 'val_macro_f1', 'adapted')} | "
                     f"{cell(adapted, name, 'test_macro_f1', 'adapted')} | {cell(base, name, 'val_macro_f1', 'base')} | "
                     f"{cell(base, name, 'test_macro_f1', 'base')} |")
    return lines + [""]


def _objective_sentence(objective: dict | None) -> str:
    """The training objective prepare chose (pipeline/contracts/pair_kinds.py), as one sentence of the report."""
    if not objective:
        return ""
    mask = ", same-label mask on" if objective.get("mask_same_label") else ""
    head = (f", label head trained with the encoder (loss weight {objective['label_loss_weight']:g})"
            if objective.get("label_loss_weight") else "")
    return f" Training objective **{objective['name']}** ({objective.get('reason', '')}{mask}{head})."


def markdown(m: dict, per_class: list[dict] | None, others: list[dict], *, curve: bool = False) -> str:
    cls_keys = [k for k in ("macro_f1", "accuracy", "logreg_macro_f1", "knn_macro_f1", "zero_shot_macro_f1",
                            "label_head_macro_f1") if k in m["classification"]]
    ret_keys = [k for k in ("recall@1", "recall@10", "ndcg@10", "mrr@10", "recall_all@10") if k in m["retrieval"]]
    keys = [("classification", k) for k in cls_keys] + [("retrieval", k) for k in ret_keys]
    unverified = [] if m.get("verified", True) else [
        "**UNVERIFIED**: no judged queries, so nothing here measures whether this run is better than the base model "
        "(`make export` refuses it without `--force`).", ""]
    lines = [f"# {m['run_name']}", "", *unverified, *verdict_lines(m.get("verdict"), lexical_label(m)),
             f"Dataset **{m['dataset']}**, base `{m['model']['base']}`, method **{m['model']['method']}**"
             + (f" (r={m['model']['lora']['r']}, alpha={m['model']['lora']['alpha']}, "
                f"targets {', '.join(m['model']['lora']['target_modules'])})" if m["model"]["method"] == "lora" else "")
             + f"; trainable {m['model']['trainable_params']:,} of {m['model']['total_params']:,} parameters"
             f" ({100 * m['model']['trainable_params'] / max(m['model']['total_params'], 1):.2f}%)."
             + _objective_sentence(m.get("objective")), "",
             f"Test split: {m['test_items']:,} items, {m['retrieval_queries']:,} retrieval queries; seed {m['seed']}. "
             "Brackets: bootstrap 95% confidence interval over test items / queries. "
             f"`macro_f1`/`accuracy` use the classifier head chosen on validation: "
             f"{m.get('classifier', {}).get('head')} (base model: {m.get('classifier', {}).get('base_head')}).", "",
             "| model | " + " | ".join(k for _, k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]

    def row(name, block, ci):
        return f"| {name} | " + " | ".join(_fmt(block.get(kind, {}), ci.get(kind, {}), k) for kind, k in keys) + " |"

    if keys:
        lines.append(row("base (untrained)", m["baseline"], m["baseline"].get("ci", {})))
        if m["lexical"].get("classification") or m["lexical"].get("retrieval"):
            lines.append(row(f"lexical {lexical_label(m)}", m["lexical"], m["lexical"].get("ci", {})))
        for o in others:
            lines.append(row(f"{o['run_name']} ({o['model']['method']})", o, o.get("ci", {})))
        lines.append(row(f"**{m['run_name']}** ({m['model']['method']})", m, m.get("ci", {})))
    else:  # nothing was measured (an unverified run): no table of empty cells
        del lines[-2:]
    t = m.get("train", {})
    lines += ["", f"Training: {t.get('seconds', 0):.0f} s, {t.get('pairs_per_second') or 0:.1f} pairs/s, "
                  f"peak RSS {t.get('peak_rss_mb') or 0:.0f} MB, {t.get('device')}/{t.get('precision')}. "
                  f"Embedding: {m.get('embed', {}).get('texts_per_second') or 0:.0f} texts/s.", ""]
    lines += heads_table(m.get("heads") or {}, m.get("classifier") or {})
    if curve:
        lines += ["## Validation during training", "", "![validation curve](curve.png)", ""]
    if per_class:
        heads = m.get("classifier", {})
        lines += [f"## Per class (test split; adapted: {heads.get('head')}, base: {heads.get('base_head')})", "",
                  "| class | precision | recall | F1 | base F1 | support |", "|---|---|---|---|---|---|"]
        for r in per_class:
            lines.append(f"| {r['label']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
                         f"{r['base_f1']:.3f} | {r['support']} |")
        lines += ["", "![confusion matrix](confusion.png)", ""]
    return "\n".join(lines) + "\n"
