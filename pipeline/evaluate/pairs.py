"""Scoring a pair corpus: retrieval of the test queries against the whole gallery, no classification
(the prepare manifest's ``notes`` say why). Pair retrieval itself lives in :mod:`pipeline.search.scoring`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.contracts.prepared_data import VAL_QUERIES, load_gallery, load_queries
from pipeline.core.artifacts import Layout
from pipeline.core.config import Config
from pipeline.core.errors import DataError
from pipeline.evaluate.scores import Scored, Scores
from pipeline.evaluate.verdicts import train_curve, verdict_block
from pipeline.search import scoring

log = logging.getLogger(__name__)


def score(cfg: Config, layout: Layout, prep: dict, emb_manifest: dict, train_manifest: dict,
          info: dict) -> Scored:
    """The payload's scores for a pair corpus, and the report's tail (the paired-change table and the
    corpus's notes)."""
    queries, gallery = load_queries(layout.processed), load_gallery(layout.processed)
    relevant = scoring.relevance_rows(queries, gallery)
    if any(len(r) == 0 for r in relevant):
        raise DataError("a prepared query has no relevant item in the gallery; rerun prepare --force")
    log.info("eval: %d queries against %d gallery records", len(queries), len(gallery))
    adapted = scoring.score_embeddings(Path(emb_manifest["adapted_dir"]), queries, gallery, relevant, cfg)
    base = scoring.score_embeddings(Path(emb_manifest["base_dir"]), queries, gallery, relevant, cfg)
    (ret, ci), (base_ret, base_ci) = scoring.summarize(adapted, cfg), scoring.summarize(base, cfg)
    lexical, lex_scores = {"classification": {}, "retrieval": {}}, None
    if cfg.eval.lexical:
        lex_scores = Scores(per_query=scoring.lexical_retrieval(queries, gallery, relevant, cfg))
        lex_ret, lex_ci = scoring.summarize(lex_scores.per_query, cfg)
        lexical = {"classification": {}, "retrieval": lex_ret, "ci": {"retrieval": lex_ci}}
    val_figures = validation_figures(layout.processed, emb_manifest, gallery, cfg)
    notes = prep.get("notes", {})
    models = {"adapted": Scores(per_query=adapted), "base": Scores(per_query=base), "lexical": lex_scores}
    payload = {
        "classification": {}, "retrieval": ret, "ci": {"retrieval": ci},
        "baseline": {"classification": {}, "retrieval": base_ret, "ci": {"retrieval": base_ci}},
        "lexical": lexical,
        "delta_vs_base": {"retrieval": scoring.paired_deltas(adapted, base, cfg)},
        "verdict": verdict_block(cfg, info["method"], models, None, val_figures, train_curve(train_manifest)),
        **({"validation": {"adapted": {"retrieval": {k: round(a, 5) for k, (a, _) in val_figures.items()}},
                           "base": {"retrieval": {k: round(b, 5) for k, (_, b) in val_figures.items()}}}}
           if val_figures else {}),
        "notes": {"classification": notes.get("classification", ""), "retrieval": notes.get("retrieval", "")},
        "test_items": int(len(queries)), "gallery_items": int(len(gallery)), "retrieval_queries": int(len(queries)),
    }
    return Scored(payload, report_tail=report_tail(payload))


def report_tail(payload: dict) -> str:
    note = payload["notes"]["classification"]
    return "\n".join([
        f"Gallery: {payload['gallery_items']:,} records. {payload['notes']['retrieval']}.", "",
        "## Change vs the base model (same queries)", "", *delta_table(payload["delta_vs_base"]["retrieval"]),
        "", "## Notes", "", f"- {note[:1].upper()}{note[1:]}.",
        "- recall@k is success@k (a relevant record in the top k); unlabelled true matches count as misses, "
        "so every figure is a lower bound.", ""])


def validation_figures(processed: Path, emb_manifest: dict, gallery: pd.DataFrame, cfg: Config) -> dict:
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
