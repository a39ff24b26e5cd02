"""prepare: the user's corpus -> leak-free splits and contrastive training pairs under
``data/processed/<dataset>/`` (the file contract is :mod:`pipeline.contracts.prepared_data`).

Three implementations behind one stage: labelled corpora (texts with a group and/or a label;
:mod:`pipeline.prepare.labelled`), pair corpora (query -> matching record; :mod:`pipeline.prepare.pairs`) and
retrieval sets (documents, queries per split, graded judgments: a BEIR folder or dataset, or pairs with a
document table; :mod:`pipeline.prepare.retrieval`), chosen by ``data.format`` (and ``data.corpus_path``).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.artifacts import Layout, clean_stale
from pipeline.core.config import PAIR_FORMATS, Config


def run(cfg: Config, *, force: bool = False) -> Path:
    """Prepare the corpus of ``cfg`` unless its outputs are up to date; returns the processed folder."""
    clean_stale(Layout(cfg).processed.parent, Layout(cfg).raw)
    from pipeline.prepare.retrieval_sources import is_text_table

    # a table of texts alone (no labels, no ids) is a corpus of documents: the corpus objective (issue 24)
    if cfg.data.format == "beir" or (cfg.data.format == "pairs" and cfg.data.corpus_path) or is_text_table(cfg):
        from pipeline.prepare import retrieval

        return retrieval.prepare(cfg, force=force)
    if cfg.data.format in PAIR_FORMATS:
        from pipeline.prepare import pairs as prepare_pairs

        return prepare_pairs.prepare(cfg, force=force)
    from pipeline.prepare import labelled as prepare_labelled

    return prepare_labelled.prepare(cfg, force=force)
