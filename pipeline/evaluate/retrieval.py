"""eval, retrieval sets: the test queries against the whole corpus, for the adapted encoder, the base model,
BM25 and the hybrid (BM25 + adapted dense), with trec_eval's measures (pipeline/search/ir.py).

- Dense: every passage embed wrote (``passages.npy``), a document scored by its best passage, the top
  ``ir.DEPTH`` documents per query; queries are embedded as queries (pipeline/model/prompts.py).
- Lexical: BM25 over ``title + " " + text`` (the lexical baseline of a retrieval set; the issue that asks for
  it allows it in place of TF-IDF, and ``lexical.method`` says which).
- Hybrid: weighted RRF of the adapted dense list and BM25's (each ``ir.FUSION_DEPTH`` deep), its ``k`` and dense
  weight chosen on the validation queries; the test queries are scored once with the chosen setting.
- CIs are the bootstrap over test queries; paired differences resample the same queries for both sides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.contracts.prepared_data import load_corpus, load_passages, load_qrels, load_retrieval_queries
from pipeline.core.artifacts import Layout
from pipeline.core.config import Config
from pipeline.core.errors import DataError
from pipeline.evaluate.scores import Scored, Scores
from pipeline.evaluate.verdicts import train_curve, verdict_block
from pipeline.search import ir, scoring

log = logging.getLogger(__name__)


@dataclass
class RetrievalSetData:
    """What scoring a retrieval set reads: documents, passages, queries per split and their judgments."""

    doc_ids: list[str]
    doc_texts: list[str]
    doc_of: np.ndarray  # (n_passages,) document row of each passage
    query_ids: dict[str, list[str]]  # split -> query ids
    query_texts: dict[str, list[str]]
    query_rows: dict[str, np.ndarray]  # split -> rows of queries.npy
    qrels: dict[str, dict[str, dict[str, int]]]  # split -> pytrec_eval qrels

    @classmethod
    def load(cls, folder: Path) -> "RetrievalSetData":
        corpus, passages, queries = load_corpus(folder), load_passages(folder), load_retrieval_queries(folder)
        row = {d: i for i, d in enumerate(corpus["id"])}
        doc_of = passages["doc"].map(row)
        if doc_of.isna().any():
            raise DataError(f"{folder}: passages.jsonl names documents that corpus.jsonl lacks; rerun prepare --force")
        splits = ("val", "test")
        return cls(doc_ids=corpus["id"].tolist(),
                   doc_texts=(corpus["title"].fillna("") + " " + corpus["text"].fillna("")).str.strip().tolist(),
                   doc_of=doc_of.to_numpy(dtype=np.int64),
                   query_ids={s: queries.loc[queries["split"] == s, "id"].tolist() for s in splits},
                   query_texts={s: queries.loc[queries["split"] == s, "text"].tolist() for s in splits},
                   query_rows={s: np.flatnonzero((queries["split"] == s).to_numpy()) for s in splits},
                   qrels={s: load_qrels(folder, s) for s in splits})

    def measures(self, split: str, run: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        return ir.per_query(self.qrels[split], self.query_ids[split], self.doc_ids, *run)


def dense_runs(emb_dir: Path, data: RetrievalSetData, depth: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split (val, test): the best-passage search of that split's queries in ``emb_dir``'s embeddings."""
    passages = np.load(Path(emb_dir) / "passages.npy")
    queries = np.load(Path(emb_dir) / "queries.npy")
    if len(passages) != len(data.doc_of) or len(queries) < max(int(r.max(initial=-1)) + 1 for r in data.query_rows.values()):
        raise DataError(f"embeddings in {emb_dir} do not match the prepared retrieval set; rerun embed --force")
    return {s: ir.dense_search(passages, data.doc_of, queries[rows], depth) if len(rows) else None
            for s, rows in data.query_rows.items()}


def _cut(run, depth: int):
    return run[0][:, :depth], run[1][:, :depth]


def score_models(cfg: Config, folder: Path, emb_manifest: dict) -> dict:
    """Per-query measures on test (and means on val) of adapted, base, BM25 and the hybrid; the fusion chosen."""
    data = RetrievalSetData.load(folder)
    log.info("eval: %d test queries against %d documents (%d passages)", len(data.query_ids["test"]),
             len(data.doc_ids), len(data.doc_of))
    adapted = dense_runs(Path(emb_manifest["adapted_dir"]), data, ir.FUSION_DEPTH)
    base = dense_runs(Path(emb_manifest["base_dir"]), data, ir.DEPTH)
    bm25 = ir.BM25.fit(data.doc_texts)
    lexical = {s: bm25.search(data.query_texts[s], ir.FUSION_DEPTH) if data.query_ids[s] else None
               for s in ("val", "test")}
    out = {"test": {"adapted": data.measures("test", _cut(adapted["test"], ir.DEPTH)),
                    "base": data.measures("test", base["test"]),
                    "lexical": data.measures("test", _cut(lexical["test"], ir.DEPTH))},
           "data": data}
    if adapted["val"] is not None:
        fusion, tried = ir.choose_fusion(adapted["val"], lexical["val"], data.qrels["val"], data.query_ids["val"],
                                         data.doc_ids)
        out["val"] = {"adapted": data.measures("val", _cut(adapted["val"], ir.DEPTH)),
                      "base": data.measures("val", base["val"]),
                      "lexical": data.measures("val", _cut(lexical["val"], ir.DEPTH)),
                      "hybrid": data.measures("val", ir.fuse([adapted["val"], lexical["val"]],
                                                             [fusion.dense_weight, 1.0], fusion.k, ir.DEPTH))}
        chosen = {**fusion.record(), "chosen_on": "validation ndcg@10", "tried": tried}
    else:  # no validation queries: the fusion's defaults, said so
        fusion, chosen = ir.Fusion(), {**ir.Fusion().record(), "chosen_on": "none (no validation queries)"}
    out["test"]["hybrid"] = data.measures("test", ir.fuse([adapted["test"], lexical["test"]],
                                                          [fusion.dense_weight, 1.0], fusion.k, ir.DEPTH))
    out["fusion"] = chosen
    return out


UNVERIFIED = ("no judged queries: the set has no test queries with judgments, so nothing measures whether the "
              "adapted encoder is better than the base; give a few judged queries (BEIR qrels, or data.judged_path: "
              "50-300 queries) to verify it")


def unverified(prep: dict) -> Scored:
    """metrics.json and report.md of a run with no judged test query: it trained, and nothing verified it."""
    empty = {"classification": {}, "retrieval": {}, "ci": {}}
    sizes = prep.get("sizes", {})
    payload = {"classification": {}, "retrieval": {}, "ci": {}, "baseline": dict(empty),
               "lexical": {**empty, "method": "bm25 (not run: no judged queries)"},
               "verified": False, "unverified_reason": UNVERIFIED, "test_items": 0, "retrieval_queries": 0,
               "verdict": {"status": "unverified", "test": {"vs_base": {}},
                           "validation": {"metric": None, "adapted": None, "base": None, "better": None,
                                          "source": "none", "note": UNVERIFIED}},
               "corpus": {"documents": sizes.get("documents"), "passages": sizes.get("passages"),
                          "lengths": prep.get("lengths")},
               "notes": {"retrieval": UNVERIFIED, "classification": NOTES_CLASSIFICATION}}
    tail = ["## Unverified", "", f"**UNVERIFIED**: {UNVERIFIED}. `make export` refuses this run unless given "
            "`--force`.", ""]
    return Scored(payload, report_tail="\n".join(tail))


NOTES_CLASSIFICATION = "no classification metrics: a retrieval set has queries and documents, no label space"


def score(cfg: Config, layout: Layout, prep: dict, emb_manifest: dict, train_manifest: dict, info: dict) -> Scored:
    """A retrieval set's payload (adapted, base, BM25, hybrid, the verdicts) and its report section; a set without
    judged test queries (the corpus objective) is reported unverified."""
    if not (prep.get("sizes", {}).get("queries", {}).get("test")):
        return unverified(prep)
    scored = score_models(cfg, layout.processed, emb_manifest)
    t = scored["test"]
    payload = payload_parts(cfg, scored, prep)
    models = {name: Scores(per_query=t[name]) for name in ("adapted", "base", "lexical")}
    payload["verdict"] = verdict_block(cfg, info["method"], models, None, validation_figures(scored),
                                       train_curve(train_manifest))
    notes = prep.get("notes", {})
    payload["notes"] = {"classification": notes.get("classification", ""), "retrieval": notes.get("retrieval", "")}
    return Scored(payload, report_tail=report_tail(payload))


def block(per_query: dict[str, np.ndarray], cfg: Config) -> dict:
    means, ci = scoring.summarize(per_query, cfg)
    return {"retrieval": means, "ci": {"retrieval": ci}}


def validation_figures(scored: dict) -> dict:
    """``{metric: (adapted, base)}`` on the validation queries (the validation rule's input)."""
    val = scored.get("val")
    if not val:
        return {}
    return {k: (float(val["adapted"][k].mean()), float(val["base"][k].mean())) for k in val["adapted"]}


def payload_parts(cfg: Config, scored: dict, prep: dict) -> dict:
    """metrics.json's retrieval-set blocks: adapted, baseline, lexical (BM25), hybrid, deltas, validation."""
    t = scored["test"]
    val = scored.get("val") or {}
    lexical = {**block(t["lexical"], cfg), "classification": {},
               "method": "bm25 (bm25s lucene, k1 1.2, b 0.75, English stop words and Snowball stemmer)"}
    hybrid = {**block(t["hybrid"], cfg), "fusion": scored["fusion"],
              "delta_vs_adapted": scoring.paired_deltas(t["hybrid"], t["adapted"], cfg),
              "delta_vs_lexical": scoring.paired_deltas(t["hybrid"], t["lexical"], cfg)}
    adapted = block(t["adapted"], cfg)
    data: RetrievalSetData = scored["data"]
    return {
        "classification": {}, "retrieval": adapted["retrieval"], "ci": adapted["ci"],
        "baseline": {"classification": {}, **block(t["base"], cfg)},
        "lexical": lexical, "hybrid": hybrid,
        "delta_vs_base": {"retrieval": scoring.paired_deltas(t["adapted"], t["base"], cfg)},
        **({"validation": {name: {"retrieval": {k: round(float(v.mean()), 5) for k, v in val[name].items()}}
                           for name in val}} if val else {}),
        "test_items": len(data.query_ids["test"]), "retrieval_queries": len(data.query_ids["test"]),
        # how many judged queries give what CI width, subsampling these test queries (README, "Without labels")
        "judged_budget": {"metric": "ndcg@10", "rows": scoring.judged_budget(
            t["adapted"]["ndcg@10"], t["base"]["ndcg@10"], seed=cfg.seed, n_boot=max(200, cfg.eval.bootstrap))},
        "corpus": {"documents": len(data.doc_ids), "passages": int(len(data.doc_of)),
                   "lengths": prep.get("lengths")},
    }


def report_tail(payload: dict) -> str:
    """report.md's retrieval-set section: the four rows with CIs, the fusion, the paired changes."""
    from pipeline.evaluate.pairs import delta_table

    def cell(b, k):
        v, ci = b["retrieval"].get(k), b.get("ci", {}).get("retrieval", {}).get(k)
        return "–" if v is None else f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"

    keys = ["ndcg@10", "recall_all@100", "map@100", "mrr@10", "recall@1"]
    rows = [("base model", payload["baseline"]), ("BM25", payload["lexical"]), ("adapted", payload),
            ("hybrid (BM25 + adapted)", payload["hybrid"])]
    c = payload["corpus"]
    f = payload["hybrid"]["fusion"]
    lines = [f"## Search over {c['documents']:,} documents ({c['passages']:,} passages), "
             f"{payload['test_items']} test queries", "",
             "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {name} | " + " | ".join(cell(b, k) for k in keys) + " |" for name, b in rows]
    lines += ["", f"Hybrid: weighted RRF, k={f['k']}, dense weight {f['dense_weight']:g} (chosen on "
              f"{f['chosen_on']}). recall_all@100 is BEIR's recall@100 (share of the relevant documents in the top "
              "100); recall@1 is success@1.", "", "## Change vs the base model (same queries)", "",
              *delta_table(payload["delta_vs_base"]["retrieval"]), "", "## Hybrid vs adapted dense", "",
              *delta_table(payload["hybrid"]["delta_vs_adapted"]), "", *budget_lines(payload.get("judged_budget")), ""]
    return "\n".join(lines)


def budget_lines(budget: dict | None) -> list[str]:
    """report.md: the CI widths that subsets of the test queries give (how many judged queries a verdict needs)."""
    if not budget:
        return []
    lines = ["## How many judged queries", "",
             f"95% CI widths of {budget['metric']} on random subsets of the test queries (median over subsets), and "
             "the share of subsets whose paired difference to the base is called better:", "",
             "| judged queries | CI width (adapted) | CI width (adapted − base) | share called better |",
             "|---|---|---|---|"]
    return lines + [f"| {r['queries']} | {r['ci_width']:.3f} | {r['delta_ci_width']:.3f} | "
                    f"{r['delta_better_share']:.0%} |" for r in budget["rows"]]


