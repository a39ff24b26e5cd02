"""eval: classification and retrieval metrics for the trained encoder, the base model and TF-IDF, on
the same test split, with bootstrap 95% confidence intervals.

Reads the embed stage's outputs and the prepared data (:mod:`pipeline.contracts.prepared_data`); writes
``reports/<run>/metrics.json`` (the contract's schema plus ``ci``, ``verdict``, ``validation`` and
``recall_all@k`` keys), ``report.md`` (with the per-class table where there are labels),
``confusion.png`` and ``curve.png``, copies them to ``reports/latest/``, and logs all of it to the run's
MLflow run. Labelled and pair corpora share the payload, the report, ``latest/`` and the MLflow code;
only their scoring differs (pair retrieval: :mod:`pipeline.search.scoring`).

Protocol. Classification: logistic regression on standardised train embeddings, its C chosen by
validation macro-F1, scored once on test; kNN: similarity-weighted vote of the k nearest train items
(FAISS inner product; k from ``eval.knn_candidates`` on validation); zero-shot: nearest label-name
embedding. The reported head is the one with the best validation macro-F1 among ``eval.heads``. Retrieval: every test item
whose group has >= 2 test items is a query, the other members are relevant, the gallery is every other
test item (FAISS exact inner product on normalised embeddings). Which texts carry the query prompt and
which the document prompt of models that have them is stated once, in pipeline/model/prompts.py.

Verdict (``verdict`` in metrics.json, the opening of report.md). On each headline metric (macro-F1,
recall@1, nDCG@10, where the dataset has them) the adapted model is compared with the base model and with
TF-IDF by a paired bootstrap on the same test items: better, no measurable difference or worse. The
validation rule asks whether the adapted model beat the base on the validation split (eval's own
validation figures, else the train manifest's validation curve); when it did not, eval warns and export
refuses the run without ``--force``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.search import metrics as M
from pipeline.evaluate import report
from pipeline.search import scoring
from pipeline.core import tracking
from pipeline.core.artifacts import (Layout, atomic_dir, clean_stale, digest, read_json, require_manifest,
                                write_json_atomic)
from pipeline.core.config import Config
from pipeline.core.errors import DataError
from pipeline.model.families import lora_block
from pipeline.model.encoder import check_base_matches, read_model_info
from pipeline.contracts.prepared_data import SPLITS, VAL_QUERIES, is_pairs, is_retrieval, load_gallery, load_labels, load_queries, load_split

log = logging.getLogger(__name__)



def _fit_logreg(x_train, y_train, x_val, y_val, grid, seed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = None
    for c in grid:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=300, random_state=seed))
        clf.fit(x_train, y_train)
        score = M.classification_scores(y_val, clf.predict(x_val))["macro_f1"]
        if best is None or score > best[0]:
            best = (score, c, clf)
    return best


def classification_block(emb: dict[str, np.ndarray], splits: dict[str, pd.DataFrame], label_emb, cfg: Config,
                         label_names: list[str],
                         query_emb: dict[str, np.ndarray] | None = None) -> tuple[dict, dict, dict]:
    """Returns (metrics, ci, details) for one set of embeddings.

    The reported ``macro_f1``/``accuracy`` come from the head with the best validation macro-F1 among
    logistic regression (C grid), kNN (k grid) and nearest label name; the test split only scores the
    chosen head. ``logreg_macro_f1``, ``knn_macro_f1`` (k = eval.knn_k) and ``zero_shot_macro_f1`` are
    reported beside it so heads can be compared. Zero-shot reads the texts' query form (``query_emb``, when
    the model has query prompts; pipeline/model/prompts.py), the other heads their document form.
    """
    query_emb = query_emb or emb
    y = {s: splits[s]["label"].to_numpy() for s in splits}
    candidates: dict[str, tuple[float, np.ndarray]] = {}  # head -> (val macro-F1, test predictions)
    val_f1, c, clf = _fit_logreg(emb["train"], y["train"], emb["val"], y["val"], cfg.eval.classifier_c, cfg.seed)
    logreg_test = clf.predict(emb["test"])
    candidates[f"logreg(C={c:g})"] = (val_f1, logreg_test)
    knn_test = {}
    for k in sorted(set(cfg.eval.knn_candidates) | {cfg.eval.knn_k}):
        val_pred = M.knn_predict(emb["train"], y["train"], emb["val"], k=k)
        knn_test[k] = M.knn_predict(emb["train"], y["train"], emb["test"], k=k)
        if k in cfg.eval.knn_candidates:
            candidates[f"knn(k={k})"] = (M.classification_scores(y["val"], val_pred)["macro_f1"], knn_test[k])
    zero_test = None
    if label_emb is not None and len(label_emb) == len(label_names):
        names = np.asarray(label_names)
        zero_val = names[np.argmax(query_emb["val"] @ label_emb.T, axis=1)]
        zero_test = names[np.argmax(query_emb["test"] @ label_emb.T, axis=1)]
        candidates["zero_shot"] = (M.classification_scores(y["val"], zero_val)["macro_f1"], zero_test)
    allowed = {h: v for h, v in candidates.items() if h.split("(")[0] in cfg.eval.heads}
    head = max(allowed, key=lambda h: allowed[h][0])
    pred = allowed[head][1]
    n, seed = cfg.eval.bootstrap, cfg.seed
    out = M.classification_scores(y["test"], pred)
    out["logreg_macro_f1"] = M.classification_scores(y["test"], logreg_test)["macro_f1"]
    out["knn_macro_f1"] = M.classification_scores(y["test"], knn_test[cfg.eval.knn_k])["macro_f1"]
    ci = {"macro_f1": M.bootstrap_macro_f1_ci(y["test"], pred, n, seed),
          "accuracy": M.bootstrap_mean_ci(pred == y["test"], n, seed),
          "logreg_macro_f1": M.bootstrap_macro_f1_ci(y["test"], logreg_test, n, seed),
          "knn_macro_f1": M.bootstrap_macro_f1_ci(y["test"], knn_test[cfg.eval.knn_k], n, seed)}
    if zero_test is not None:
        out["zero_shot_macro_f1"] = M.classification_scores(y["test"], zero_test)["macro_f1"]
        ci["zero_shot_macro_f1"] = M.bootstrap_macro_f1_ci(y["test"], zero_test, n, seed)
    details = {"y_pred": pred, "head": head, "classifier_C": c,
               "validation_macro_f1": {h: round(v[0], 5) for h, v in candidates.items()}}
    return out, ci, details


def retrieval_block(test_emb: np.ndarray, groups: np.ndarray, cfg: Config, search_fn=None,
                    query_emb: np.ndarray | None = None) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """(means, CIs, per-query arrays) of same-group retrieval; the arrays feed the paired verdicts."""
    per_query = M.group_retrieval(test_emb, groups, k=cfg.eval.retrieval_k, search_fn=search_fn,
                                  query_embeddings=query_emb)
    if not per_query:
        return {}, {}, {}
    out = {k: float(v.mean()) for k, v in per_query.items()}
    ci = {k: M.bootstrap_mean_ci(v, cfg.eval.bootstrap, cfg.seed) for k, v in per_query.items()}
    return out, ci, per_query


def has_groups(test: pd.DataFrame) -> bool:
    return not test["group"].astype(str).str.startswith("t:").all()


def has_labels(test: pd.DataFrame) -> bool:
    return test["label"].notna().all() and test["label"].nunique() >= 2


def evaluate_embeddings(emb_dir: Path, splits: dict[str, pd.DataFrame], cfg: Config,
                        label_names: list[str]) -> dict:
    emb = {s: np.load(Path(emb_dir) / f"{s}.npy") for s in splits}
    # The query form of a split, where the embed stage wrote one (a model with query prompts).
    query_emb = {s: np.load(Path(emb_dir) / f"{s}.query.npy") if (Path(emb_dir) / f"{s}.query.npy").exists()
                 else emb[s] for s in splits}
    label_path = Path(emb_dir) / "labels.npy"
    label_emb = np.load(label_path) if label_path.exists() else None
    result: dict = {"classification": {}, "retrieval": {}, "ci": {"classification": {}, "retrieval": {}}}
    if has_labels(splits["test"]):
        cls, ci, details = classification_block(emb, splits, label_emb, cfg, label_names, query_emb)
        result["classification"], result["ci"]["classification"] = cls, ci
        result["_details"] = details
    if has_groups(splits["test"]):
        ret, ci, per_query = retrieval_block(emb["test"], splits["test"]["group"].to_numpy(), cfg,
                                             query_emb=query_emb["test"])
        result["retrieval"], result["ci"]["retrieval"] = ret, ci
        result["retrieval_queries"] = len(next(iter(per_query.values()), []))
        result["_items"] = {"retrieval": per_query}
        val_ret, _, _ = retrieval_block(emb["val"], splits["val"]["group"].to_numpy(), cfg.model_copy(
            update={"eval": cfg.eval.model_copy(update={"bootstrap": 0})}), query_emb=query_emb["val"])
        result["validation"] = {"retrieval": val_ret}
    if "_details" in result:
        result.setdefault("validation", {})["classification"] = result["_details"]["validation_macro_f1"]
    return result


def lexical_baseline(splits: dict[str, pd.DataFrame], cfg: Config) -> dict:
    """TF-IDF word 1-2 grams + char_wb 2-5 grams; linear SVM (C on val); cosine retrieval."""
    from sklearn.svm import LinearSVC

    vec = scoring.tfidf(splits["train"]["text"])
    x = {s: vec(splits[s]["text"]) for s in splits}
    result: dict = {"classification": {}, "retrieval": {}, "ci": {"classification": {}, "retrieval": {}}}
    test = splits["test"]
    if has_labels(test):
        y = {s: splits[s]["label"].to_numpy() for s in splits}
        best = None
        for c in cfg.eval.classifier_c:
            clf = LinearSVC(C=c, random_state=cfg.seed).fit(x["train"], y["train"])
            score = M.classification_scores(y["val"], clf.predict(x["val"]))["macro_f1"]
            if best is None or score > best[0]:
                best = (score, c, clf)
        pred = best[2].predict(x["test"])
        result["classification"] = M.classification_scores(y["test"], pred)
        result["classification"]["svm_C"] = best[1]
        result["_details"] = {"y_pred": pred}
        result["ci"]["classification"] = {
            "macro_f1": M.bootstrap_macro_f1_ci(y["test"], pred, cfg.eval.bootstrap, cfg.seed),
            "accuracy": M.bootstrap_mean_ci(pred == y["test"], cfg.eval.bootstrap, cfg.seed)}
    if has_groups(test):
        ret, ci, per_query = retrieval_block(x["test"], test["group"].to_numpy(), cfg, search_fn=M.sparse_search)
        result["retrieval"], result["ci"]["retrieval"] = ret, ci
        result["_items"] = {"retrieval": per_query}
    return result


# Bump when a baseline, a classifier head, a metric definition or what the cache keeps changes, so cached
# scores are recomputed. 3: per-query retrieval arrays and test predictions are kept for paired verdicts.
SCORES_VERSION = 3


def _to_storable(result: dict) -> dict:
    """JSON form of a scoring result: CI tuples, per-item arrays and predictions as lists."""
    out = {**result, "ci": {k: {m: list(v) for m, v in d.items()} for k, d in result["ci"].items()}}
    if "_details" in result:
        out["_details"] = {**result["_details"], "y_pred": [str(x) for x in result["_details"]["y_pred"]]}
    if "_items" in result:
        out["_items"] = {"retrieval": {k: np.asarray(v, dtype=float).tolist()
                                       for k, v in result["_items"]["retrieval"].items()}}
    return out


def _from_storable(stored: dict) -> dict:
    if "_details" in stored:
        stored["_details"]["y_pred"] = np.asarray(stored["_details"]["y_pred"], dtype=object)
    if "_items" in stored:
        stored["_items"]["retrieval"] = {k: np.asarray(v, dtype=float) for k, v in stored["_items"]["retrieval"].items()}
    return stored


def cached_lexical(cfg: Config, layout: Layout, prep_fp: str, splits) -> dict:
    key = digest([SCORES_VERSION, prep_fp, cfg.eval.model_dump(mode="json"), cfg.seed])
    path = Path(cfg.paths.cache) / "lexical" / f"{key}.json"
    if path.exists():
        return _from_storable(read_json(path))
    result = lexical_baseline(splits, cfg)
    write_json_atomic(path, _to_storable(result))
    return result


def _embeddings_digest(emb_dir: Path, names) -> str:
    from pipeline.core.artifacts import sha256_file

    return digest([[name, sha256_file(Path(emb_dir) / name) if (Path(emb_dir) / name).exists() else "-"]
                   for name in names], 64)


def cached_base_scores(cfg: Config, emb_dir: Path, splits: dict[str, pd.DataFrame], label_names: list[str]) -> dict:
    """The untrained model's scores, shared by every run on the same splits and eval settings.

    They depend only on the base embeddings (themselves cached by embed), the splits and the eval
    settings, yet fitting the classifier heads and bootstrapping take a minute or more per run; a sweep
    would otherwise repeat that once per child. The key hashes the embedding files themselves, so a
    rebuilt base cache can never be scored from stale results.
    """
    names = [f"{s}.npy" for s in splits] + ["labels.npy"]
    names += [f"{s}.query.npy" for s in splits if (Path(emb_dir) / f"{s}.query.npy").exists()]
    splits_digest = digest({s: [df["text"].tolist(), df["label"].astype(str).tolist(),
                                df["group"].astype(str).tolist()] for s, df in splits.items()}, 64)
    key = digest([SCORES_VERSION, _embeddings_digest(emb_dir, names), splits_digest, label_names,
                  cfg.eval.model_dump(mode="json"), cfg.seed])
    path = Path(cfg.paths.cache) / "base-scores" / f"{key}.json"
    if path.exists():
        return _from_storable(read_json(path))
    result = evaluate_embeddings(emb_dir, splits, cfg, label_names)
    write_json_atomic(path, _to_storable(result))
    return result


def _ci_lists(ci: dict) -> dict:
    return {block: {k: [round(v[0], 5), round(v[1], 5)] for k, v in vals.items()} for block, vals in ci.items()}


def _rounded(block: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in block.items()}


def _rounded_tree(tree: dict) -> dict:
    return {k: (_rounded_tree(v) if isinstance(v, dict) else round(v, 5) if isinstance(v, float) else v)
            for k, v in tree.items()}


# ------------------------------------------------------------------------------------------- verdicts

def paired_verdicts(mine: dict, ref: dict, y_true, cfg: Config) -> dict:
    """Headline metric differences ``mine - ref`` on the same test items, each with a paired bootstrap 95%
    CI and its verdict. ``mine``/``ref``: ``{"y_pred": test predictions or None, "retrieval": {metric:
    per-query array}}``; a metric is left out unless both sides have it."""
    out = {}
    n, seed = cfg.eval.bootstrap, cfg.seed
    for key in M.headline_keys(cfg.eval.retrieval_k):
        kind, metric = key.split(".", 1)
        if kind == "classification":
            if y_true is None or mine.get("y_pred") is None or ref.get("y_pred") is None:
                continue
            r = M.paired_bootstrap_macro_f1(y_true, mine["y_pred"], ref["y_pred"], n, seed)
        else:
            a, b = mine.get("retrieval", {}).get(metric), ref.get("retrieval", {}).get(metric)
            if a is None or b is None:
                continue
            r = M.paired_bootstrap_mean(a, b, n, seed)
        out[key] = {"delta": round(r["delta"], 5), "ci": [round(x, 5) for x in r["ci"]], "verdict": r["verdict"]}
    return out


def items_of(result: dict | None) -> dict | None:
    """The per-item part of a scoring result, as :func:`paired_verdicts` takes it."""
    if result is None:
        return None
    return {"y_pred": result.get("_details", {}).get("y_pred"),
            "retrieval": result.get("_items", {}).get("retrieval", {})}


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


def eval_validation_figures(adapted: dict, base: dict) -> dict:
    """``{metric: (adapted, base)}`` of what eval measured on the validation split."""
    out = {}
    da, db = adapted.get("_details"), base.get("_details")
    if da and db:  # the chosen head's validation macro-F1, as the head choice saw it
        out["macro_f1"] = (da["validation_macro_f1"][da["head"]], db["validation_macro_f1"][db["head"]])
    ra = adapted.get("validation", {}).get("retrieval", {})
    rb = base.get("validation", {}).get("retrieval", {})
    for k in ra:
        if k in rb:
            out[k] = (ra[k], rb[k])
    return out


def warn_if_not_better(run_name: str, v: dict) -> None:
    if v.get("better") is False:
        log.warning("WARNING: %s is NOT better than the base model on validation (%s %.4f vs base %.4f, from %s); "
                    "export will refuse it without --force", run_name, v["metric"], v["adapted"], v["base"],
                    v["source"])


def verdict_block(cfg: Config, method: str, adapted: dict, base: dict, lexical: dict | None, y_true,
                  eval_figures: dict, curve: dict | None) -> dict:
    """metrics.json's ``verdict``: test-split paired verdicts against the base and TF-IDF, and the
    validation rule (adapted must beat the base on validation)."""
    test = {"vs_base": paired_verdicts(adapted, base, y_true, cfg)}
    if lexical is not None:
        test["vs_lexical"] = paired_verdicts(adapted, lexical, y_true, cfg)
    validation = validation_verdict(method, eval_figures, curve)
    warn_if_not_better(cfg.resolved_run_name, validation)
    return {"test": test, "validation": validation}


def write_curve(curve: dict | None, folder: Path, title: str) -> bool:
    """curve.png in ``folder`` from the train manifest's validation curve; False when there is none."""
    if curve is None:
        return False
    report.curve_png(curve, folder / "curve.png", title)
    return True


def run(cfg: Config) -> Path:
    """Score the run's embeddings, the base model's and TF-IDF on the test split; write the report."""
    layout = Layout(cfg)
    prep = require_manifest(layout.processed, "prepared data", "run `make data` first")
    emb_manifest = require_manifest(layout.embeddings(), f"embeddings for run '{cfg.resolved_run_name}'",
                                    "run `python -m pipeline embed` (make eval does both)")
    train_manifest = require_manifest(layout.model_dir(), "trained model", "run `make train` first")
    info = read_model_info(layout.model_dir())
    check_base_matches(layout.model_dir(), info, cfg.model.base)
    clean_stale(layout.report().parent, Path(cfg.paths.cache) / "lexical", Path(cfg.paths.cache) / "base-scores")
    cfg = tracking.preflight(cfg)  # fail (or fall back) before scoring, not after the report is written
    score = _score_retrieval if is_retrieval(prep) else _score_pairs if is_pairs(prep) else _score_labelled
    scored = score(cfg, layout, prep, emb_manifest, train_manifest, info)
    payload = {**_common_payload(cfg, info, prep, emb_manifest, train_manifest), **scored.pop("payload")}
    out = _write_outputs(cfg, layout, payload, scored, train_manifest)
    _log_to_mlflow(cfg, train_manifest, payload, out)
    log.info("eval: wrote %s", out / "metrics.json")
    return out


def _common_payload(cfg: Config, info: dict, prep: dict, emb_manifest: dict, train_manifest: dict) -> dict:
    """The part of metrics.json that does not depend on the kind of corpus."""
    t = train_manifest.get("train", {})
    return {
        "run_name": cfg.resolved_run_name,
        "dataset": cfg.data.name,
        "mlflow_run_id": train_manifest.get("mlflow_run_id") or "",
        "model": {"base": info["base"], "method": info["method"], "lora": lora_block(info.get("lora")),
                  "trainable_params": info["trainable_params"], "total_params": info["total_params"]},
        "train": {"seconds": t.get("seconds", 0.0), "pairs_per_second": t.get("pairs_per_second"),
                  "peak_rss_mb": t.get("peak_rss_mb"), "rss_before_train_mb": t.get("rss_before_train_mb"),
                  "real_tokens_per_second": t.get("real_tokens_per_second"), "steps": t.get("steps"),
                  "device": t.get("device"), "precision": t.get("precision")},
        "embed": emb_manifest.get("timing", {}),
        "backend": emb_manifest.get("backend"),  # the encoder form embed chose (pipeline/model/backends.py)
        "objective": prep.get("objective"),  # the objective the training pairs were built for
        "seed": cfg.seed,
        # the splits' identity for labelled corpora (pairs settings do not change what is scored)
        "data_fingerprint": prep.get("splits_fingerprint", prep["fingerprint"]),
        "model_fingerprint": train_manifest["fingerprint"],  # ties these metrics to the model they score
    }


def _score_labelled(cfg: Config, layout: Layout, prep: dict, emb_manifest: dict, train_manifest: dict,
                    info: dict) -> dict:
    """Classification and same-group retrieval on the three splits: the payload's scores, plus what the
    report adds (the per-class table and the confusion matrix)."""
    splits = {s: load_split(layout.processed, s) for s in SPLITS}
    label_names = load_labels(layout.processed)
    log.info("eval: scoring %s and the base model on %d test items", cfg.resolved_run_name, len(splits["test"]))
    adapted = evaluate_embeddings(Path(emb_manifest["adapted_dir"]), splits, cfg, label_names)
    base = cached_base_scores(cfg, Path(emb_manifest["base_dir"]), splits, label_names)
    lexical = (cached_lexical(cfg, layout, prep.get("splits_fingerprint", prep["fingerprint"]), splits)
               if cfg.eval.lexical else None)
    y_test = splits["test"]["label"].to_numpy()
    payload = {
        "classification": _rounded(adapted["classification"]),
        "retrieval": _rounded(adapted["retrieval"]),
        "baseline": {"classification": _rounded(base["classification"]), "retrieval": _rounded(base["retrieval"]),
                     "ci": _ci_lists(base["ci"])},
        "lexical": ({"classification": _rounded(lexical["classification"]), "retrieval": _rounded(lexical["retrieval"]),
                     "ci": _ci_lists({k: {m: tuple(v) for m, v in d.items()} for k, d in lexical["ci"].items()})}
                    if lexical else {"classification": {}, "retrieval": {}}),
        "ci": _ci_lists(adapted["ci"]),
        "test_items": int(len(splits["test"])),
        "retrieval_queries": adapted.get("retrieval_queries", 0),
        "classifier": {"head": adapted.get("_details", {}).get("head"),
                       "base_head": base.get("_details", {}).get("head")},
        # Model selection happens on these validation figures, never on test.
        "validation": {"adapted": _rounded_tree(adapted.get("validation", {})),
                       "base": _rounded_tree(base.get("validation", {}))},
        "verdict": verdict_block(cfg, info["method"], items_of(adapted), items_of(base), items_of(lexical),
                                 y_test if "_details" in adapted else None,
                                 eval_validation_figures(adapted, base), train_curve(train_manifest)),
    }
    scored = {"payload": payload}
    if "_details" in adapted:
        scored["confusion"] = (y_test, adapted["_details"]["y_pred"], label_names)
        scored["per_class"] = report.per_class_table(y_test, adapted["_details"]["y_pred"],
                                                     base["_details"]["y_pred"], label_names)
    return scored


def _score_pairs(cfg: Config, layout: Layout, prep: dict, emb_manifest: dict, train_manifest: dict,
                 info: dict) -> dict:
    """Retrieval of the test queries against the whole gallery; no classification (the manifest's
    ``notes`` say why). The report adds the paired-change table and the corpus's notes."""
    queries, gallery = load_queries(layout.processed), load_gallery(layout.processed)
    relevant = scoring.relevance_rows(queries, gallery)
    if any(len(r) == 0 for r in relevant):
        raise DataError("a prepared query has no relevant item in the gallery; rerun prepare --force")
    log.info("eval: %d queries against %d gallery records", len(queries), len(gallery))
    adapted = scoring.score_embeddings(Path(emb_manifest["adapted_dir"]), queries, gallery, relevant, cfg)
    base = scoring.score_embeddings(Path(emb_manifest["base_dir"]), queries, gallery, relevant, cfg)
    (ret, ci), (base_ret, base_ci) = scoring.summarize(adapted, cfg), scoring.summarize(base, cfg)
    lexical, lex_items = {"classification": {}, "retrieval": {}}, None
    if cfg.eval.lexical:
        lex_items = {"retrieval": scoring.lexical_retrieval(queries, gallery, relevant, cfg)}
        lex_ret, lex_ci = scoring.summarize(lex_items["retrieval"], cfg)
        lexical = {"classification": {}, "retrieval": lex_ret, "ci": {"retrieval": lex_ci}}
    val_figures = pair_validation_figures(layout.processed, emb_manifest, gallery, cfg)
    notes = prep.get("notes", {})
    payload = {
        "classification": {}, "retrieval": ret, "ci": {"retrieval": ci},
        "baseline": {"classification": {}, "retrieval": base_ret, "ci": {"retrieval": base_ci}},
        "lexical": lexical,
        "delta_vs_base": {"retrieval": scoring.paired_deltas(adapted, base, cfg)},
        "verdict": verdict_block(cfg, info["method"], {"retrieval": adapted}, {"retrieval": base}, lex_items, None,
                                 val_figures, train_curve(train_manifest)),
        **({"validation": {"adapted": {"retrieval": {k: round(a, 5) for k, (a, _) in val_figures.items()}},
                           "base": {"retrieval": {k: round(b, 5) for k, (_, b) in val_figures.items()}}}}
           if val_figures else {}),
        "notes": {"classification": notes.get("classification", ""), "retrieval": notes.get("retrieval", "")},
        "test_items": int(len(queries)), "gallery_items": int(len(gallery)), "retrieval_queries": int(len(queries)),
    }
    return {"payload": payload, "report_tail": _pairs_report_tail(payload)}


def _score_retrieval(cfg: Config, layout: Layout, prep: dict, emb_manifest: dict, train_manifest: dict,
                     info: dict) -> dict:
    """A retrieval set: the test queries against the whole corpus (pipeline/evaluate/retrieval.py), adapted,
    base, BM25 and the hybrid, with the verdicts of the other corpora."""
    from pipeline.evaluate import retrieval

    scored = retrieval.score_models(cfg, layout.processed, emb_manifest)
    t = scored["test"]
    payload = retrieval.payload_parts(cfg, scored, prep)
    val_figures = retrieval.validation_figures(scored)
    payload["verdict"] = verdict_block(cfg, info["method"], {"retrieval": t["adapted"]}, {"retrieval": t["base"]},
                                       {"retrieval": t["lexical"]}, None, val_figures, train_curve(train_manifest))
    notes = prep.get("notes", {})
    payload["notes"] = {"classification": notes.get("classification", ""), "retrieval": notes.get("retrieval", "")}
    return {"payload": payload, "report_tail": retrieval.report_tail(payload)}


def _pairs_report_tail(payload: dict) -> str:
    note = payload["notes"]["classification"]
    return "\n".join([
        f"Gallery: {payload['gallery_items']:,} records. {payload['notes']['retrieval']}.", "",
        "## Change vs the base model (same queries)", "", *delta_table(payload["delta_vs_base"]["retrieval"]),
        "", "## Notes", "", f"- {note[:1].upper()}{note[1:]}.",
        "- recall@k is success@k (a relevant record in the top k); unlabelled true matches count as misses, "
        "so every figure is a lower bound.", ""])


def pair_validation_figures(processed: Path, emb_manifest: dict, gallery: pd.DataFrame, cfg: Config) -> dict:
    """``{metric: (adapted, base)}`` of retrieval on the validation queries, where prepare wrote
    ``val_queries.jsonl`` and embed embedded it for both models; else empty (the validation rule then
    falls back to the training curve)."""
    path = Path(processed) / VAL_QUERIES
    dirs = [Path(emb_manifest["adapted_dir"]), Path(emb_manifest["base_dir"])]
    if not path.exists() or not all((d / "val_queries.npy").exists() for d in dirs):
        return {}
    queries = load_queries(processed, VAL_QUERIES)
    relevant = scoring.relevance_rows(queries, gallery)
    keep = np.array([len(r) > 0 for r in relevant], dtype=bool)
    if not keep.all():
        log.warning("eval: %d of %d validation queries have no relevant item in the gallery; scored without them",
                    int((~keep).sum()), len(keep))
    if not keep.any():
        return {}
    scores = []
    for d in dirs:
        q, g = np.load(d / "val_queries.npy"), np.load(d / "gallery.npy")
        if len(q) != len(queries):
            raise DataError(f"embeddings in {d} do not match {path}; rerun embed --force")
        per_query = scoring.retrieval_scores(q[keep], g, [r for r, k in zip(relevant, keep) if k],
                                             cfg.eval.retrieval_k)
        scores.append({k: float(v.mean()) for k, v in per_query.items()})
    return {k: (scores[0][k], scores[1][k]) for k in scores[0]}


def delta_table(deltas: dict) -> list[str]:
    lines = ["| metric | adapted - base | 95% CI (paired bootstrap) | verdict |", "|---|---|---|---|"]
    for k, d in deltas.items():
        lines.append(f"| {k} | {d['delta']:+.3f} | [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] | {d.get('verdict', '–')} |")
    return lines


def _write_outputs(cfg: Config, layout: Layout, payload: dict, scored: dict, train_manifest: dict) -> Path:
    """metrics.json, report.md and the plots in ``reports/<run>/``, then the same in ``reports/latest/``."""
    out = layout.report()
    with atomic_dir(out) as tmp:
        write_json_atomic(tmp / "metrics.json", payload)
        curve = write_curve(train_curve(train_manifest), tmp, f"{cfg.resolved_run_name}: validation during training")
        if "confusion" in scored:
            y_true, y_pred, label_names = scored["confusion"]
            report.confusion_png(y_true, y_pred, label_names, tmp / "confusion.png",
                                 title=f"{cfg.resolved_run_name} (test)")
        others = report.other_runs(Path(cfg.paths.reports), payload)
        md = report.markdown(payload, scored.get("per_class"), others, curve=curve) + scored.get("report_tail", "")
        (tmp / "report.md").write_text(md, encoding="utf-8")
    with atomic_dir(layout.latest_report) as tmp:
        for f in out.iterdir():
            shutil.copy2(f, tmp / f.name)
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


def _log_to_mlflow(cfg: Config, train_manifest: dict, payload: dict, out: Path) -> None:
    """Every headline figure of the three models, the CIs, the paired changes and the verdict, on the
    training run's MLflow run; the report files as its artefacts."""
    with tracking.run(cfg, run_name=cfg.resolved_run_name, run_id=train_manifest.get("mlflow_run_id")) as tracker:
        flat = {}
        for prefix, block in (("", payload), ("base.", payload["baseline"]), ("lexical.", payload["lexical"])):
            for kind in ("classification", "retrieval"):
                for k, v in block.get(kind, {}).items():
                    if isinstance(v, (int, float)) and not k.endswith("_C"):
                        flat[f"{prefix}{k}"] = v
        for kind, vals in payload["ci"].items():
            for k, (lo, hi) in vals.items():
                flat[f"{k}.ci_low"], flat[f"{k}.ci_high"] = lo, hi
        for kind, deltas in payload.get("delta_vs_base", {}).items():
            flat.update({f"delta.{k}": d["delta"] for k, d in deltas.items()})
        tracker.log_metrics(flat)
        tags = {"evaluated": "true"}
        if not payload["classification"] and payload.get("notes", {}).get("classification"):
            tags["classification"] = "absent (pair dataset)"
        tracker.set_tags(tags)
        log_verdict(tracker, payload["verdict"])
        for f in ("metrics.json", "report.md", "confusion.png", "curve.png"):
            tracker.log_artifact(out / f, "report")
