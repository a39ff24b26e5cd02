"""Classifier heads on frozen embeddings, and the choice among them on validation.

Logistic regression on standardised train embeddings (its C chosen by validation macro-F1); kNN, a
similarity-weighted vote of the k nearest train items (FAISS inner product; k chosen on validation from
``eval.knn_candidates``); zero-shot, the nearest label-name embedding; and, for a run that trained one, the
label head trained with the encoder (pipeline/contracts/label_head.py). The reported head is the one with the
best validation macro-F1 among ``eval.heads``; the choice never sees the test split. Every candidate's test
macro-F1 is reported beside it (``test_macro_f1``) so heads can be compared, never to choose. The bench scores
its parity runs with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.contracts.label_head import LabelHead
from pipeline.core.config import Config
from pipeline.search import metrics as M


@dataclass
class Classification:
    """One model's classification result on the test split."""

    figures: dict[str, float]  # macro_f1/accuracy of the chosen head, logreg_/knn_/zero_shot_macro_f1 beside it
    ci: dict[str, tuple[float, float]]
    y_pred: np.ndarray  # the chosen head's test predictions (label names)
    head: str  # e.g. "logreg(C=1)", "knn(k=10)", "zero_shot"
    classifier_C: float
    validation_macro_f1: dict[str, float] = field(default_factory=dict)  # every candidate head, as the choice saw it
    test_macro_f1: dict[str, float] = field(default_factory=dict)  # every candidate head on test: reported, not chosen

    @property
    def chosen_validation_macro_f1(self) -> float:
        return self.validation_macro_f1[self.head]


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


def _knn_candidates(emb, y, cfg: Config) -> tuple[dict[str, tuple[float, np.ndarray]], dict[int, np.ndarray]]:
    """kNN at every k of the grid (and at ``eval.knn_k``, reported beside the chosen head)."""
    candidates, test_preds = {}, {}
    for k in sorted(set(cfg.eval.knn_candidates) | {cfg.eval.knn_k}):
        val_pred = M.knn_predict(emb["train"], y["train"], emb["val"], k=k)
        test_preds[k] = M.knn_predict(emb["train"], y["train"], emb["test"], k=k)
        if k in cfg.eval.knn_candidates:
            candidates[f"knn(k={k})"] = (M.classification_scores(y["val"], val_pred)["macro_f1"], test_preds[k])
    return candidates, test_preds


def _zero_shot(query_emb, y, label_emb, label_names) -> tuple[float, np.ndarray] | None:
    """Nearest label name, from the texts' query form; None without label-name embeddings."""
    if label_emb is None or len(label_emb) != len(label_names):
        return None
    names = np.asarray(label_names)
    zero_val = names[np.argmax(query_emb["val"] @ label_emb.T, axis=1)]
    zero_test = names[np.argmax(query_emb["test"] @ label_emb.T, axis=1)]
    return M.classification_scores(y["val"], zero_val)["macro_f1"], zero_test


LABEL_HEAD = "label_head"


def _label_head(emb, y, head: LabelHead | None) -> tuple[float, np.ndarray] | None:
    """The head trained with the encoder, on the texts' document form (the form it was saved for)."""
    if head is None:
        return None
    return M.classification_scores(y["val"], head.predict(emb["val"]))["macro_f1"], head.predict(emb["test"])


def classify(emb: dict[str, np.ndarray], splits: dict[str, pd.DataFrame], label_emb, cfg: Config,
             label_names: list[str], query_emb: dict[str, np.ndarray] | None = None,
             label_head: LabelHead | None = None) -> Classification:
    """Fit every head on train, choose on validation, score the chosen one (and each head beside it) on test.

    Zero-shot reads the texts' query form (``query_emb``, when the model has query prompts;
    pipeline/model/prompts.py), the other heads their document form. ``label_head``: the run's trained head.
    """
    query_emb = query_emb or emb
    y = {s: splits[s]["label"].to_numpy() for s in splits}
    candidates: dict[str, tuple[float, np.ndarray]] = {}  # head -> (val macro-F1, test predictions)
    val_f1, c, clf = _fit_logreg(emb["train"], y["train"], emb["val"], y["val"], cfg.eval.classifier_c, cfg.seed)
    logreg_test = clf.predict(emb["test"])
    candidates[f"logreg(C={c:g})"] = (val_f1, logreg_test)
    knn, knn_test = _knn_candidates(emb, y, cfg)
    candidates.update(knn)
    zero = _zero_shot(query_emb, y, label_emb, label_names)
    if zero is not None:
        candidates["zero_shot"] = zero
    trained = _label_head(emb, y, label_head)
    if trained is not None:
        candidates[LABEL_HEAD] = trained
    allowed = {h: v for h, v in candidates.items() if h.split("(")[0] in cfg.eval.heads}
    head = max(allowed, key=lambda h: allowed[h][0])
    pred = allowed[head][1]
    n, seed = cfg.eval.bootstrap, cfg.seed
    figures = M.classification_scores(y["test"], pred)
    figures["logreg_macro_f1"] = M.classification_scores(y["test"], logreg_test)["macro_f1"]
    figures["knn_macro_f1"] = M.classification_scores(y["test"], knn_test[cfg.eval.knn_k])["macro_f1"]
    ci = {"macro_f1": M.bootstrap_macro_f1_ci(y["test"], pred, n, seed),
          "accuracy": M.bootstrap_mean_ci(pred == y["test"], n, seed),
          "logreg_macro_f1": M.bootstrap_macro_f1_ci(y["test"], logreg_test, n, seed),
          "knn_macro_f1": M.bootstrap_macro_f1_ci(y["test"], knn_test[cfg.eval.knn_k], n, seed)}
    for name, found in (("zero_shot", zero), (LABEL_HEAD, trained)):
        if found is not None:
            figures[f"{name}_macro_f1"] = M.classification_scores(y["test"], found[1])["macro_f1"]
            ci[f"{name}_macro_f1"] = M.bootstrap_macro_f1_ci(y["test"], found[1], n, seed)
    return Classification(figures=figures, ci=ci, y_pred=pred, head=head, classifier_C=c,
                          validation_macro_f1={h: round(v[0], 5) for h, v in candidates.items()},
                          test_macro_f1={h: round(M.classification_scores(y["test"], v[1])["macro_f1"], 5)
                                         for h, v in candidates.items()})


def classify_tfidf(x: dict, splits: dict[str, pd.DataFrame], cfg: Config) -> Classification:
    """The lexical baseline's head: a linear SVM on TF-IDF features, its C chosen by validation macro-F1."""
    from sklearn.svm import LinearSVC

    y = {s: splits[s]["label"].to_numpy() for s in splits}
    best = None
    for c in cfg.eval.classifier_c:
        clf = LinearSVC(C=c, random_state=cfg.seed).fit(x["train"], y["train"])
        score = M.classification_scores(y["val"], clf.predict(x["val"]))["macro_f1"]
        if best is None or score > best[0]:
            best = (score, c, clf)
    pred = best[2].predict(x["test"])
    figures = {**M.classification_scores(y["test"], pred), "svm_C": best[1]}
    ci = {"macro_f1": M.bootstrap_macro_f1_ci(y["test"], pred, cfg.eval.bootstrap, cfg.seed),
          "accuracy": M.bootstrap_mean_ci(pred == y["test"], cfg.eval.bootstrap, cfg.seed)}
    return Classification(figures=figures, ci=ci, y_pred=pred, head=f"svm(C={best[1]:g})", classifier_C=best[1],
                          validation_macro_f1={f"svm(C={best[1]:g})": round(best[0], 5)})
