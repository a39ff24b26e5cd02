"""export: the trained encoder in the forms a search stack takes, each proven equal before it ships.

Reads ``runs/<run>/model/`` (train), the prepared text files, and ``reports/<run>/metrics.json`` (eval;
optional, for the model card). Writes ``exports/<run>/`` atomically:

- ``merged/``   a plain sentence-transformers folder with LoRA merged into the weights (safetensors,
                tokenizer, pooling and normalisation modules); it loads without peft installed.
- ``adapter/``  the PEFT adapter; ``adapter_config.json`` names the base model and revision and
                ``base_model.json`` adds its resolved path and weights hash (field note 1).
- ``onnx/``     ``model.onnx`` (transformer, pooling and normalisation in one graph: outputs
                ``last_hidden_state`` and ``sentence_embedding``), ``model_qint8.onnx`` (dynamic int8),
                the tokenizer and ``onnx_config.json``; needs only onnxruntime + tokenizers to run. Traced
                with TorchScript, else with the dynamo exporter; when neither can build the architecture
                the folder is left out and ``manifest.json`` / the card say why (the other forms ship).
- ``index/``    a FAISS inner-product index of the corpus (embedded with the gate-checked ONNX model, or
                ``merged/`` without ONNX), ``records.jsonl``
                (row i of the index -> id, text, label, group, split) and ``index.json``.
- ``manifest.json`` (with the gate's numbers) and ``README.md`` (model card).

The equivalence gate runs on a fixed sample of texts before anything is committed. The merged folder
is reloaded from disk as a plain SentenceTransformer and must match the unmerged adapter (min cosine
>= export.merged_vs_adapter_min_cos) and must differ from the base model (field note 2: a merge that
silently did nothing), in the adapted modules (and those train.lora.modules_to_save names) only; the ONNX model must match the reloaded merged model (>= export.onnx_min_cos);
the int8 model is measured and reported only. A failed gate raises ExportError and leaves no export.
The merged model is then logged to the run's MLflow run with the sentence_transformers flavor.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from pipeline.model import prompts
from pipeline.core.artifacts import (MANIFEST, Layout, atomic_dir, digest, hash_tree, make_manifest, read_json,
                                require_manifest, sha256_file, skip_or_refuse, write_json_atomic)
# The ONNX trace, int8 quantisation and ONNX encoder are shared with the embed stage (pipeline/model/backends.py).
from pipeline.model.backends import ONNX_FILE, ONNX_INT8_FILE, OnnxEncoder, export_onnx, quantize_int8, row_cosines
from pipeline.core.config import Config
from pipeline.core.errors import ExportError
from pipeline.contracts.export_folder import (BASE_META, EDGE_TEXTS, FORMS, SearchIndex, STEncoder, TorchEncoder, fixed_sample,
                               load_adapter_form, load_form, write_index)
from pipeline.model.encoder import check_base_matches, load_encoder, load_trained, read_model_info
from pipeline.export import head as label_head

log = logging.getLogger(__name__)

# Bump when the export layout or the gate changes, so an old export is not taken as up to date.
EXPORT_VERSION = 4  # 3: prompts in the merged folder and onnx_config.json, the gate checks both roles; 4: label head


# ----------------------------------------------------------------------------------------------- corpus

def load_corpus(processed: Path, prep: dict, which: str) -> list[dict]:
    """Records of the prepared text files: ``all`` of them, or the ``test`` split only."""
    import pandas as pd

    if prep.get("kind") == "retrieval":  # the whole corpus, as passages: every split searches all of it
        df = pd.read_json(Path(processed) / "passages.jsonl", lines=True, dtype=str)
        return [{"id": r["id"], "doc": r["doc"], "text": r["text"]} for r in df.to_dict("records")]
    files = prep.get("text_files", ["train.jsonl", "val.jsonl", "test.jsonl"])
    if which == "test":
        files = [f for f in files if Path(f).stem == "test"]
        if not files:
            raise ExportError(f"export.index_corpus=test but the prepared data at {processed} has no test split")
    records: list[dict] = []
    for name in files:
        df = pd.read_json(Path(processed) / name, lines=True, dtype=str)
        split = Path(name).stem
        for row in df.to_dict("records"):
            rec = {"id": row.get("id"), "text": row["text"], "label": row.get("label"), "group": row.get("group"),
                   "split": split}
            records.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()})
    if not records:
        raise ExportError(f"no texts to index in {processed} ({', '.join(files)})")
    return records


# -------------------------------------------------------------------------------------------------- gate

def changed_tensors(model_a, model_b) -> tuple[list[str], int]:
    """(names of the tensors that differ, tensors compared) between two state dicts of the same shape."""
    import torch

    sa, sb = model_a.state_dict(), model_b.state_dict()
    common = [k for k in sa if k in sb and sa[k].shape == sb[k].shape]
    changed = [k for k in common if not torch.equal(sa[k].float().cpu(), sb[k].float().cpu())]
    return changed, len(common)


def outside_adapted(changed: list[str], info: dict) -> list[str]:
    """The changed tensors (sentence-transformers state-dict names) that belong to no module the LoRA run
    adapted or named in ``train.lora.modules_to_save``: weights a merge must not have touched."""
    lora = info.get("lora") or {}
    inner = list(lora.get("target_modules") or [])
    outer = []
    for entry in (lora.get("targets") or {}).get("modules_to_save") or []:
        position, _, _ = entry.partition(":")
        (outer if position.isdigit() and ":" in entry else inner).append(position if ":" in entry else entry)

    def allowed(key: str) -> bool:
        path = "." + key.rsplit(".", 1)[0] + "."
        return key.split(".", 1)[0] in outer or any(f".{m}." in path for m in inner)

    return [k for k in changed if not allowed(k)]


def check_gate(numbers: dict, ecfg) -> list[str]:
    """Failures of the equivalence gate, as sentences; empty when the export may ship."""
    failures = []
    if numbers["merged_vs_reference_min_cos"] < ecfg.merged_vs_adapter_min_cos:
        failures.append(f"the saved merged model differs from the {numbers['reference']} (min cosine "
                        f"{numbers['merged_vs_reference_min_cos']:.6f} < {ecfg.merged_vs_adapter_min_cos}): "
                        "the merge or the save changed the embeddings")
    if numbers["merged_vs_base_mean_cos"] >= ecfg.merged_vs_base_max_cos or numbers["changed_weight_tensors"] == 0:
        failures.append(f"the merged model equals the untrained base (mean cosine "
                        f"{numbers['merged_vs_base_mean_cos']:.7f} >= {ecfg.merged_vs_base_max_cos} or "
                        f"{numbers['changed_weight_tensors']} weight tensors changed): the merge silently did nothing")
    if numbers.get("changed_outside_adapted"):
        failures.append(f"the merged model differs from the base outside the adapted modules "
                        f"({numbers['changed_outside_adapted'][:5]}): the run changed weights it did not say it trains")
    onnx_cos = numbers.get("onnx_vs_torch_min_cos")
    if onnx_cos is not None and onnx_cos < ecfg.onnx_min_cos:
        failures.append(f"the ONNX model differs from the merged PyTorch model (min cosine {onnx_cos:.6f} < "
                        f"{ecfg.onnx_min_cos})")
    return failures + label_head.failures(numbers.get("label_head"), ecfg.head_max_prob_diff)


def _raise_on_failures(failures: list[str], run_name: str, out: Path) -> None:
    if failures:
        raise ExportError(f"export of run '{run_name}' failed its equivalence gate: " + "; ".join(failures)
                          + f". Nothing was written to {out}.")


def neighbour_agreement(encoders: dict[str, object], index: SearchIndex, queries: Sequence[str], k: int) -> dict:
    """Top-k rows per form for ``queries`` and their agreement with the merged form."""
    rows = {form: index.search_ids(enc.encode(queries, "query"), k)[1] for form, enc in encoders.items()}
    ref = rows["merged"]
    out = {}
    for form, r in rows.items():
        out[form] = {"top1_agreement": float(np.mean(r[:, 0] == ref[:, 0])),
                     f"overlap@{k}": float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(r, ref)]))}
    return out


# ---------------------------------------------------------------------------------------------- the card

def _fmt_metric(value, ci) -> str:
    if value is None:
        return "–"
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else f"{value:.4f}"


@dataclass
class Built:
    """What an export built and checked: the forms written, the gate's numbers, the index, and how often every
    form finds the same neighbours in it."""

    forms: dict
    gate: dict
    index_meta: dict
    neighbours: dict | None


def model_card(ex: _Export, metrics: dict | None, built: Built, mlflow_info: dict | None) -> str:
    """The export's README.md: model, data, metrics, the equivalence gate, files, training config."""
    run_name, info, cfg, prep, train_manifest = ex.run_name, ex.info, ex.cfg, ex.prep, ex.train_manifest
    gate, forms, index_meta, neighbours = built.gate, built.forms, built.index_meta, built.neighbours
    lines = [f"# {run_name}", "",
             f"`{info['base']}` adapted to **{cfg.data.name}** ({info['method']} fine-tuning) by this pipeline.", ""]
    lines += _card_model(info, train_manifest)
    lines += ["## Data", "", f"Dataset `{cfg.data.name}`, prepared data fingerprint `{prep.get('fingerprint')}`. "
              + _split_sentence(prep), ""]
    lines += _card_metrics(metrics, run_name)
    lines += _card_gate(gate, neighbours, cfg.export)
    lines += _card_files(info, forms, index_meta, cfg.data.name, mlflow_info, gate.get("label_head"))
    dump = cfg.model_dump(mode="json")
    trained_with = yaml.safe_dump({k: dump[k] for k in ("seed", "model", "data", "pairs", "train")}, sort_keys=False)
    lines += ["", "## Training configuration", "", "```yaml", trained_with.rstrip(), "```", ""]
    return "\n".join(lines)


def _split_sentence(prep: dict) -> str:
    """How this corpus was split, from its prepare manifest (no dataset's words in another's card)."""
    if prep.get("kind") == "pairs":
        return ("A pair corpus: no training pair touches a test query or its relevant records "
                f"({(prep.get('notes') or {}).get('retrieval', 'see the prepare manifest')}).")
    plan = prep.get("split_plan") or {}
    given = plan.get("given") or []
    how = (f"the corpus's own {', '.join(given)} split(s)" + (f", {', '.join(plan['carved'])} carved by group"
                                                              if plan.get("carved") else "")
           if given else "splits drawn by group")
    return (f"Splits: {how}; a group never spans two drawn splits and no text is in two splits; training pairs "
            "come from the train split only.")


def _card_model(info: dict, train_manifest: dict) -> list[str]:
    lines = ["## Model", "", "| | |", "|---|---|",
             f"| base model | `{info['base']}`" + (f" revision `{info['revision']}`" if info.get("revision") else "")
             + f" (weights hash {info['base_fingerprint']}) |",
             f"| method | {info['method']} |"]
    if info.get("lora"):
        lo = info["lora"]
        lines.append(f"| LoRA | r={lo['r']}, alpha={lo['alpha']}, dropout={lo['dropout']}, "
                     f"targets {', '.join(lo['target_modules'])} |")
    stats = train_manifest.get("train", {})
    lines += [f"| trainable / total parameters | {info.get('trainable_params'):,} / {info.get('total_params'):,} |",
              f"| embedding dimension | {info.get('embedding_dim')} |",
              f"| max sequence length | {info.get('max_seq_length')} tokens |",
              f"| training | {stats.get('steps')} steps, {stats.get('seconds')} s on {stats.get('device')} "
              f"({stats.get('precision')}), seed {train_manifest.get('seed')} |", ""]
    return lines


def _card_metrics(metrics: dict | None, run_name: str) -> list[str]:
    lines = []
    if metrics:
        lines += ["## Metrics (test split, 95% bootstrap CI)", "",
                  "| metric | this model | base model | TF-IDF |", "|---|---|---|---|"]
        for block in ("retrieval", "classification"):
            for key, value in metrics.get(block, {}).items():
                if not isinstance(value, (int, float)):
                    continue
                base_b, lex_b = metrics.get("baseline", {}), metrics.get("lexical", {})
                lines.append(
                    f"| {block} {key} | {_fmt_metric(value, metrics.get('ci', {}).get(block, {}).get(key))} | "
                    f"{_fmt_metric(base_b.get(block, {}).get(key), base_b.get('ci', {}).get(block, {}).get(key))} | "
                    f"{_fmt_metric(lex_b.get(block, {}).get(key), lex_b.get('ci', {}).get(block, {}).get(key))} |")
        lines += ["", f"{metrics.get('retrieval_queries', '?')} retrieval queries over {metrics.get('test_items', '?')} "
                  "test items. Adaptation can hurt out of domain; these numbers hold for this corpus only.", ""]
    else:
        lines += ["## Metrics", "", "No evaluation was found for this run (`make eval` writes "
                  f"reports/{run_name}/metrics.json); the export was not scored.", ""]
    return lines


def _card_gate(gate: dict, neighbours: dict | None, ecfg) -> list[str]:
    lines = ["## Equivalence gate (passed)", "",
             f"On {gate['sample_size']} fixed texts (seeded corpus sample, the longest texts, edge cases):", "",
             "| check | value | required |", "|---|---|---|",
             f"| merged vs {gate['reference']}, min cosine | {gate['merged_vs_reference_min_cos']:.7f} | "
             f">= {ecfg.merged_vs_adapter_min_cos} |",
             f"| merged vs base, mean cosine | {gate['merged_vs_base_mean_cos']:.6f} | "
             f"< {ecfg.merged_vs_base_max_cos} |",
             f"| weight tensors changed by training | {gate['changed_weight_tensors']} of {gate['compared_tensors']} | > 0 |"]
    if gate.get("onnx_vs_torch_min_cos") is not None:
        lines.append(f"| ONNX vs PyTorch, min cosine | {gate['onnx_vs_torch_min_cos']:.7f} | >= {ecfg.onnx_min_cos} |")
    if gate.get("onnx_int8_vs_torch_min_cos") is not None:
        lines.append(f"| ONNX int8 vs PyTorch, min / mean cosine | {gate['onnx_int8_vs_torch_min_cos']:.4f} / "
                     f"{gate['onnx_int8_vs_torch_mean_cos']:.4f} | reported only |")
    if neighbours:
        k = ecfg.neighbour_k
        lines += ["", f"Top-{k} neighbours of {neighbours['queries']} sample queries in the index, against the merged form:",
                  "", f"| form | top-1 agreement | overlap@{k} |", "|---|---|---|"]
        for form, agree in neighbours["forms"].items():
            lines.append(f"| {form} | {agree['top1_agreement']:.3f} | {agree[f'overlap@{k}']:.3f} |")
    return lines + label_head.card_lines(gate.get("label_head"), ecfg.head_max_prob_diff)


def _card_files(info: dict, forms: dict, index_meta: dict, dataset: str, mlflow_info: dict | None,
                head_numbers: dict | None = None) -> list[str]:
    lines = ["", "## Files and how to load them", "",
             "- `merged/`: a plain sentence-transformers model (no peft needed); text-embeddings-inference "
             "style servers take it as is.", "", "  ```python", "  from sentence_transformers import SentenceTransformer",
             "  model = SentenceTransformer(\"merged\")", "  vectors = model.encode(texts, normalize_embeddings=True)",
             "  ```"]
    if forms.get("adapter"):
        lines += ["- `adapter/`: the PEFT LoRA adapter for the base above (for hot-swapping tasks on one base); "
                  "`base_model.json` records the base id, resolved path, revision and weights hash. Load it with "
                  "`pipeline.contracts.export_folder.load_form(export_dir, \"adapter\")`, which checks the base weights."]
    onnx = forms.get("onnx") or {}
    if onnx.get("left_out"):
        lines += [f"- ONNX: **not included**: neither ONNX exporter could build this architecture ({onnx['left_out']}). "
                  "Use `merged/` (or the adapter) instead; everything else here passed the gate."]
    elif onnx:
        lines += ["- `onnx/model.onnx`: inputs " + ", ".join(f"`{n}`" for n in forms["onnx"]["inputs"]) +
                  "; outputs `last_hidden_state` and `sentence_embedding` (pooled"
                  + (" and normalised" if forms["onnx"]["normalized_in_graph"] else "; normalise it yourself")
                  + " in the graph). "
                  f"Tokenise with `onnx/tokenizer.json`, truncating at {info.get('max_seq_length')} tokens. "
                  + ("`onnx/model_qint8.onnx` is the dynamic int8 variant (smaller and faster, slightly less exact). "
                     if (forms.get("onnx_int8") or {}).get("path") else "")]
    lines += [f"- `index/`: FAISS `{index_meta['factory']}` index, inner product on normalised vectors, "
              f"{index_meta['n']} items ({index_meta['corpus']} of `{dataset}`), embedded with the "
              f"{index_meta['encoder']} form; "
              "`records.jsonl` line i is row i of the index.",
              "- Serve it: `make serve` (HTTP `/embed`, `/search?q=...&k=...`, `/health` on 127.0.0.1)."]
    lines += label_head.file_lines(head_numbers)
    if mlflow_info:
        lines += [f"- MLflow: run `{mlflow_info['run_id']}`, model `{mlflow_info['model_uri']}` "
                  "(`mlflow.sentence_transformers.load_model(uri)`)."]
        if mlflow_info.get("classifier"):
            lines += [f"- MLflow classifier: `{mlflow_info['classifier']['model_uri']}` (`mlflow.pyfunc.load_model(uri)"
                      ".predict(texts)`: a label and its probability per text)."]
    return lines


# ------------------------------------------------------------------------------------------------ mlflow

def log_to_mlflow(cfg: Config, run_id: str | None, merged_st, folder: Path, summary: dict) -> dict | None:
    """Log the merged model (sentence_transformers flavor) and the export's card to the training run."""
    from importlib import metadata

    from pipeline.core import tracking

    if not cfg.tracking.enabled or not cfg.export.mlflow_model:
        return None
    import mlflow

    # Explicit requirements: MLflow would otherwise load the model again in a subprocess to infer them.
    reqs = [f"{p}=={metadata.version(p)}" for p in ("sentence-transformers", "transformers", "torch")]
    with tracking.run(cfg, run_name=cfg.resolved_run_name, run_id=run_id) as tracker:
        model_info = mlflow.sentence_transformers.log_model(
            merged_st, name="encoder", pip_requirements=reqs, registered_model_name=cfg.export.register_name,
            metadata={"run_name": cfg.resolved_run_name, **summary})
        tracker.log_metrics({f"export.{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        tracker.set_tags({"exported": "true"})
        for name in ("README.md", "index/index.json"):
            tracker.log_artifact(folder / name, "export")
        return {"run_id": tracker.run_id, "model_uri": model_info.model_uri,
                "model_id": getattr(model_info, "model_id", None),
                "registered_model": cfg.export.register_name,
                "registered_version": getattr(model_info, "registered_model_version", None)}


# --------------------------------------------------------------------------------------------------- run

def fingerprint(cfg: Config, train_manifest: dict, prep: dict, metrics_path: Path) -> str:
    ecfg = cfg.export.model_dump(mode="json")  # serving and loading into engines have their own sections
    metrics_hash = sha256_file(metrics_path) if metrics_path.exists() else None
    payload = [EXPORT_VERSION, train_manifest["fingerprint"], prep["fingerprint"], ecfg, metrics_hash,
               cfg.tracking.enabled]
    return digest(payload)


def _folder_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20, 2)


def _write_adapter(model_dir: Path, info: dict, out: Path) -> None:
    """Copy the PEFT adapter and record its base where both PEFT and a person look for it."""
    shutil.copytree(model_dir / "adapter", out)
    cfg_path = out / "adapter_config.json"
    adapter_cfg = read_json(cfg_path)
    adapter_cfg["base_model_name_or_path"] = info["base"]
    adapter_cfg["revision"] = info.get("revision")
    write_json_atomic(cfg_path, adapter_cfg)
    write_json_atomic(out / BASE_META, {
        "base": info["base"], "base_resolved": info["base_resolved"], "base_fingerprint": info["base_fingerprint"],
        "revision": info.get("revision"), "trust_remote_code": info.get("trust_remote_code", False),
        "max_seq_length": info["max_seq_length"], "embedding_dim": info.get("embedding_dim"),
        "prompts": prompts.of_record(info.get("prompts")).record(),
        "note": "the adapter wraps the transformer inside the base sentence-transformers model; its pooling "
                "and normalisation are the base model's"})


def check_verdict(run_name: str, metrics_path: Path, train_fingerprint: str, *, force: bool) -> None:
    """Refuse a run whose eval found it not better than the base model on validation, unless forced.

    A run without an eval of this very model (no metrics.json, one from before verdicts, or one that
    scored an earlier model) exports as before: there is no verdict to go by.
    """
    if not metrics_path.exists():
        return
    metrics = read_json(metrics_path)
    if metrics.get("verified") is False and metrics.get("model_fingerprint") == train_fingerprint:
        why = metrics.get("unverified_reason") or "no judged queries"
        if not force:
            raise ExportError(f"run '{run_name}' is unverified ({why.split(':')[0]}): nothing measured it against the "
                              f"base model ({metrics_path}); pass --force to export it anyway")
        log.warning("export: run '%s' is unverified (%s); exporting anyway (--force)", run_name, why)
        return
    v = (metrics.get("verdict") or {}).get("validation") or {}
    if v.get("better") is not False or metrics.get("model_fingerprint") != train_fingerprint:
        return
    figures = (f"{v.get('metric')} {v.get('adapted'):.4f} vs the base model's {v.get('base'):.4f} on validation, "
               f"from {v.get('source')}; {metrics_path}")
    if force:
        log.warning("export: run '%s' is not better than the base model (%s); exporting anyway (--force)",
                    run_name, figures)
        return
    raise ExportError(f"run '{run_name}' is not better than the base model ({figures}); pass --force to export it "
                      "anyway")


class _Export:
    """What one export works with: the run, its prepared data and metrics, the gate sample and timings."""

    def __init__(self, cfg: Config, layout: Layout, prep: dict, train_manifest: dict, info: dict, fp: str):
        self.cfg, self.ecfg, self.layout, self.prep, self.info, self.fp = cfg, cfg.export, layout, prep, info, fp
        self.train_manifest = train_manifest
        self.run_name, self.model_dir = cfg.resolved_run_name, layout.model_dir()
        self.metrics_path = layout.report() / "metrics.json"
        self.max_len = int(info["max_seq_length"])
        self.records = load_corpus(layout.processed, prep, self.ecfg.index_corpus)
        self.sample = fixed_sample([r["text"] for r in self.records], self.ecfg.sample_texts, cfg.seed)
        n_queries = min(self.ecfg.neighbour_queries, max(1, len(self.sample) - len(EDGE_TEXTS) - 4))
        self.queries = self.sample[:n_queries]
        self.used = prompts.of_record(info.get("prompts"))
        self.roles: tuple[prompts.Role, ...] = ("document", "query") if self.used.differ else ("document",)
        self.timing: dict[str, float] = {}
        self.reference_doc: np.ndarray | None = None  # the reference's document vectors: what the head gate reads
        self.started = self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timing[name] = round(now - self._t, 2)
        self._t = now

    def gate_vectors(self, encoder) -> np.ndarray:
        """The sample in every role whose prompt differs (document rows first), so the gate checks queries too."""
        return np.vstack([encoder.encode(self.sample, role) for role in self.roles])


def run(cfg: Config, *, overwrite: bool = False, force: bool = False) -> Path:
    """Export the run's model in every form, each gated against the trained model, with a FAISS index."""
    import torch

    layout = Layout(cfg)
    run_name = cfg.resolved_run_name
    prep = require_manifest(layout.processed, "prepared data", "run `make data` first")
    train_manifest = require_manifest(layout.model_dir(), f"trained model for run '{run_name}'",
                                      "run `make train` (or pass --run NAME of a trained run)")
    info = read_model_info(layout.model_dir())
    if info.get("kept_base"):
        raise ExportError(f"run '{run_name}' kept the untrained base model: no trained step beat it on validation "
                          f"(runs/{run_name}/model/manifest.json has the curve); there is nothing trained to export: "
                          "use the base model")
    if info["method"] == "base":
        raise ExportError(f"run '{run_name}' is the untrained base reference (train.method=base): there is "
                          "nothing trained to export; export a lora or full run")
    check_base_matches(layout.model_dir(), info, cfg.model.base)  # the base-vs-merged gate must use the right base
    metrics_path = layout.report() / "metrics.json"
    out = layout.export()
    fp = fingerprint(cfg, train_manifest, prep, metrics_path)
    if skip_or_refuse(out, fp, overwrite=overwrite, stage="export", refusal=(
            f"export {out} exists from another model, data, eval or export config; pass --overwrite to replace it")):
        return out  # up to date with this very metrics.json: it passed the check below, or was forced
    check_verdict(run_name, metrics_path, train_manifest["fingerprint"], force=force)
    if cfg.tracking.enabled and cfg.export.mlflow_model:
        from pipeline.core import tracking

        tracking.resolve_uri(cfg)  # an unreachable server fails here, before minutes of work
    torch.set_num_threads(cfg.runtime.num_threads or torch.get_num_threads())
    ex = _Export(cfg, layout, prep, train_manifest, info, fp)
    log.info("export: %s (%s) -> %s", run_name, info["method"], out)
    with atomic_dir(out) as tmp:
        encoders, merged_st, merged_emb, gate, forms = _merged_and_gated(ex, tmp, out)
        if ex.ecfg.onnx:
            _onnx_forms(ex, tmp, merged_st, merged_emb, gate, forms, encoders)
        _label_head_form(ex, tmp, gate, forms, encoders)
        log.info("export gate: merged vs %s min cos %.6f, vs base mean %.6f, onnx min %s, int8 min %s",
                 gate["reference"], gate["merged_vs_reference_min_cos"], gate["merged_vs_base_mean_cos"],
                 gate["onnx_vs_torch_min_cos"], gate["onnx_int8_vs_torch_min_cos"])
        _raise_on_failures(check_gate(gate, ex.ecfg), run_name, out)
        gate["passed"] = True
        index_meta, neighbours = _index_and_neighbours(ex, tmp, encoders)
        built = Built(forms, gate, index_meta, neighbours)
        mlflow_info = _card_and_mlflow(ex, tmp, merged_st, built)
        ex.timing["total_seconds"] = round(time.perf_counter() - ex.started, 2)
        _write_manifest(ex, tmp, built, mlflow_info)
    log.info("export: wrote %s in %.0fs (index %d items, %s)", out, ex.timing["total_seconds"], index_meta["n"],
             index_meta["factory"])
    return out


def _merged_and_gated(ex: _Export, tmp: Path, out: Path) -> tuple[dict, object, np.ndarray, dict, dict]:
    """Write the adapter (LoRA) and the merged model, and check the merged folder reproduces the trained
    model (and differs from the base) before minutes of ONNX and indexing. Returns (encoders, merged model,
    its gate vectors, the gate, the forms written)."""
    from sentence_transformers import SentenceTransformer

    info, used, max_len = ex.info, ex.used, ex.max_len
    # The reference the merged model must reproduce: the exported adapter on its base (LoRA), or
    # the trained full model as the train stage wrote it.
    if info["method"] == "lora":
        _write_adapter(ex.model_dir, info, tmp / "adapter")
        reference = TorchEncoder(load_adapter_form(tmp / "adapter"), max_seq_length=max_len, used=used, name="adapter")
        reference_name = "unmerged adapter"
    else:
        reference = TorchEncoder(load_trained(ex.model_dir), max_seq_length=max_len, used=used, name="trained")
        reference_name = "trained full model"
    ref_emb = ex.gate_vectors(reference)
    ex.reference_doc = ref_emb[: len(ex.sample)]  # document rows come first: what the label head reads
    ex.lap("reference_seconds")
    merged = load_trained(ex.model_dir, merge=True)
    merged.max_seq_length = max_len
    # the run's prompts under the names encode_query / encode_document look for
    merged.prompts = prompts.for_sentence_transformers(used, merged.prompts)
    merged.save(str(tmp / "merged"), safe_serialization=True)
    del merged
    # Everything below uses the folder as written, so a bad save fails the gate like a bad merge.
    merged_st = SentenceTransformer(str(tmp / "merged"), device="cpu")
    merged_enc = STEncoder(merged_st)
    merged_emb = ex.gate_vectors(merged_enc)
    base = load_encoder(info["base"], revision=info.get("revision"),
                        trust_remote_code=info.get("trust_remote_code", False), max_seq_length=max_len)
    base_emb = ex.gate_vectors(TorchEncoder(base, max_seq_length=max_len, used=used, name="base"))
    changed, compared = changed_tensors(merged_st, base)
    del base
    ex.lap("merge_seconds")
    gate = {"reference": reference_name, "sample_size": len(ex.sample), "roles": list(ex.roles),
            "prompts": used.record(),
            "merged_vs_reference_min_cos": float(row_cosines(merged_emb, ref_emb).min()),
            "merged_vs_reference_mean_cos": float(row_cosines(merged_emb, ref_emb).mean()),
            "merged_vs_base_mean_cos": float(row_cosines(merged_emb, base_emb).mean()),
            "merged_vs_base_min_cos": float(row_cosines(merged_emb, base_emb).min()),
            "changed_weight_tensors": len(changed), "compared_tensors": compared,
            "changed_outside_adapted": outside_adapted(changed, info) if info["method"] == "lora" else [],
            "onnx_vs_torch_min_cos": None, "onnx_int8_vs_torch_min_cos": None, "onnx_int8_vs_torch_mean_cos": None}
    _raise_on_failures(check_gate(gate, ex.ecfg), ex.run_name, out)
    forms: dict = {"merged": {"path": "merged", "size_mb": _folder_mb(tmp / "merged")},
                   "adapter": ({"path": "adapter", "size_mb": _folder_mb(tmp / "adapter")}
                               if info["method"] == "lora" else None),
                   "onnx": None, "onnx_int8": None}
    encoders: dict[str, object] = {"merged": merged_enc, **({"adapter": reference} if info["method"] == "lora" else {})}
    return encoders, merged_st, merged_emb, gate, forms


def _onnx_forms(ex: _Export, tmp: Path, merged_st, merged_emb: np.ndarray, gate: dict, forms: dict,
                encoders: dict) -> None:
    """The ONNX model (and its int8 form), each measured against the merged model; fills the gate in place.
    A graph neither exporter can build is left out with the reason (the other forms still ship)."""
    onnx_meta, tried = _build_onnx(merged_st, tmp / "onnx", ex)
    ex.lap("onnx_seconds")
    if onnx_meta is None:
        reason = "; ".join(f"{k}: {v}" for k, v in tried.items())
        log.warning("export: the ONNX forms are left out (%s); merged, adapter and index ship", reason)
        forms["onnx"] = {"left_out": reason, "tried": tried}
        if ex.ecfg.quantize_int8:
            forms["onnx_int8"] = {"left_out": "no ONNX graph to quantise"}
        shutil.rmtree(tmp / "onnx", ignore_errors=True)
        return
    onnx_enc = OnnxEncoder.from_folder(tmp / "onnx", ONNX_FILE)
    # Batched (padded) and one text at a time (no padding): both paths of the traced mask.
    single = np.vstack([onnx_enc.encode([s], "document") for s in ex.sample[:8]])
    cos = np.concatenate([row_cosines(ex.gate_vectors(onnx_enc), merged_emb), row_cosines(single, merged_emb[:8])])
    gate["onnx_vs_torch_min_cos"] = float(cos.min())
    forms["onnx"] = {"path": f"onnx/{ONNX_FILE}", "inputs": onnx_meta["inputs"],
                     "normalized_in_graph": onnx_meta["normalized_in_graph"], "exporter": onnx_meta["exporter"],
                     **({"tried": tried} if tried else {}),
                     "size_mb": round((tmp / "onnx" / ONNX_FILE).stat().st_size / 2**20, 2)}
    encoders["onnx"] = onnx_enc
    if not ex.ecfg.quantize_int8:
        return
    quantize_int8(tmp / "onnx")
    int8 = OnnxEncoder.from_folder(tmp / "onnx", ONNX_INT8_FILE)
    cos8 = row_cosines(ex.gate_vectors(int8), merged_emb)
    gate["onnx_int8_vs_torch_min_cos"] = float(cos8.min())
    gate["onnx_int8_vs_torch_mean_cos"] = float(cos8.mean())
    forms["onnx_int8"] = {"path": f"onnx/{ONNX_INT8_FILE}",
                          "size_mb": round((tmp / "onnx" / ONNX_INT8_FILE).stat().st_size / 2**20, 2)}
    encoders["onnx_int8"] = int8
    ex.lap("onnx_int8_seconds")


def _label_head_form(ex: _Export, tmp: Path, gate: dict, forms: dict, encoders: dict) -> None:
    """The run's label head in ``head/`` and its gate numbers on every form (nothing without a head)."""
    head = label_head.copy_head(ex.model_dir, tmp)
    forms["head"] = None
    if head is None:
        return
    vectors = {form: enc.encode(ex.sample, "document") for form, enc in encoders.items()}
    gate["label_head"] = label_head.gate(head, ex.reference_doc, vectors)
    forms["head"] = {"path": label_head.FOLDER, "labels": len(head.labels)}
    ex.lap("label_head_seconds")


def _build_onnx(merged_st, folder: Path, ex: _Export) -> tuple[dict | None, dict]:
    """onnx_config.json of the graph written to ``folder``: the TorchScript exporter first, then the dynamo
    exporter; (None, errors) when neither can build it. The second item holds each failed exporter's error."""
    tried: dict[str, str] = {}
    for exporter in ("torchscript", "dynamo"):
        shutil.rmtree(folder, ignore_errors=True)
        try:
            return export_onnx(merged_st, folder, ex.max_len, ex.sample, ex.used, dynamo=exporter == "dynamo"), tried
        except Exception as exc:  # noqa: BLE001  any exporter failure: recorded, then the next exporter
            tried[exporter] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
            log.warning("export: the %s ONNX exporter failed (%s)", exporter, tried[exporter])
    return None, tried


def _index_and_neighbours(ex: _Export, tmp: Path, encoders: dict) -> tuple[dict, dict]:
    """The FAISS index of the corpus, and how often every form finds the same neighbours in it."""
    # The corpus is embedded with the ONNX model when there is one: it has just been proven equal to the
    # merged model (the gate above), and it is the faster form (reports/examples/bench/, part "encode").
    index_encoder = "onnx" if "onnx" in encoders else "merged"
    vectors = encoders[index_encoder].encode([r["text"] for r in ex.records], "document")
    ex.lap("index_embed_seconds")
    index_meta = write_index(tmp / "index", ex.records, vectors, ex.ecfg, {
        "corpus": ex.ecfg.index_corpus, "encoder": index_encoder, "normalized": True,
        "data_fingerprint": ex.prep["fingerprint"], "files": ["index.faiss", "records.jsonl"]})
    if ex.prep.get("kind") == "retrieval":  # documents, BM25 and the validation-chosen fusion beside the passages
        from pipeline.contracts.document_index import write_document_index
        from pipeline.contracts.prepared_data import load_corpus as load_documents

        metrics = read_json(ex.metrics_path) if ex.metrics_path.exists() else {}
        fusion = (metrics.get("hybrid") or {}).get("fusion")
        index_meta["documents"] = write_document_index(tmp / "index", load_documents(ex.layout.processed).to_dict(
            "records"), fusion)
        write_json_atomic(tmp / "index" / "index.json", {**read_json(tmp / "index" / "index.json"),
                                                         "documents": index_meta["documents"]})
    index_meta["size_mb"] = _folder_mb(tmp / "index")
    ex.lap("index_build_seconds")
    index = SearchIndex(tmp / "index")
    neighbours = {"queries": len(ex.queries), "k": ex.ecfg.neighbour_k,
                  "forms": neighbour_agreement(encoders, index, ex.queries, ex.ecfg.neighbour_k)}
    ex.lap("neighbours_seconds")
    return index_meta, neighbours


def _card_and_mlflow(ex: _Export, tmp: Path, merged_st, built: Built) -> dict | None:
    """README.md (the model card) and, when tracking is on, the merged model (and adapter) in MLflow."""
    gate, index_meta = built.gate, built.index_meta
    metrics = read_json(ex.metrics_path) if ex.metrics_path.exists() else None
    summary = {"merged_vs_reference_min_cos": gate["merged_vs_reference_min_cos"],
               "merged_vs_base_mean_cos": gate["merged_vs_base_mean_cos"],
               **({"onnx_vs_torch_min_cos": gate["onnx_vs_torch_min_cos"]} if ex.ecfg.onnx else {}),
               **({"onnx_int8_vs_torch_min_cos": gate["onnx_int8_vs_torch_min_cos"]}
                  if gate["onnx_int8_vs_torch_min_cos"] is not None else {}),
               "index_items": index_meta["n"], "export_fingerprint": ex.fp}
    (tmp / "README.md").write_text(model_card(ex, metrics, built, mlflow_info=None), encoding="utf-8")
    mlflow_info = log_to_mlflow(ex.cfg, ex.train_manifest.get("mlflow_run_id"), merged_st, tmp, summary)
    if mlflow_info and ex.info["method"] == "lora":  # the adapter as a model of its own, beside the merged one
        from pipeline.export import mlflow_adapter

        mlflow_info["adapter"] = mlflow_adapter.log_adapter_model(
            ex.cfg, mlflow_info["run_id"], tmp / "adapter", read_json(tmp / "adapter" / BASE_META))
    if mlflow_info and built.forms.get("head"):  # the merged model with its label head: a pyfunc that classifies
        from pipeline.export import mlflow_classifier

        mlflow_info["classifier"] = mlflow_classifier.log_classifier_model(
            ex.cfg, mlflow_info["run_id"], tmp / "merged", tmp / label_head.FOLDER)
    if mlflow_info:
        (tmp / "README.md").write_text(model_card(ex, metrics, built, mlflow_info=mlflow_info), encoding="utf-8")
    ex.lap("mlflow_seconds")
    return mlflow_info


def _write_manifest(ex: _Export, tmp: Path, built: Built, mlflow_info: dict | None) -> None:
    inputs = {"model": ex.train_manifest["fingerprint"], "prepared_data": ex.prep["fingerprint"]}
    if ex.metrics_path.exists():
        inputs["metrics"] = sha256_file(ex.metrics_path)
    info = ex.info
    write_json_atomic(tmp / MANIFEST, make_manifest("export", ex.cfg, fingerprint=ex.fp, inputs=inputs, extra={
        "run_name": ex.run_name, "method": info["method"],
        "base": {k: info.get(k) for k in ("base", "base_resolved", "base_fingerprint", "revision")},
        "forms": built.forms, "gate": built.gate, "neighbours": built.neighbours, "index": built.index_meta,
        "timing": ex.timing,
        "mlflow": mlflow_info, "merged_hash": hash_tree(tmp / "merged"),
        "mlflow_run_id": (mlflow_info or {}).get("run_id") or ex.train_manifest.get("mlflow_run_id")}))


def neighbours_report(export_dir: Path, forms: Sequence[str], queries: Sequence[str], k: int = 10) -> dict:
    """Top-k record ids per form for ``queries``: what a fresh process sees when it loads each form."""
    index = SearchIndex(Path(export_dir) / "index")
    out = {}
    for form in forms:
        enc = load_form(export_dir, form)
        scores, rows = index.search_ids(enc.encode(queries, "query"), k)
        out[form] = {"ids": [[index.records[i]["id"] for i in r] for r in rows], "scores": scores.tolist()}
    return out


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.export.stage EXPORT_DIR FORM [FORM ...] --query Q [--query Q ...]``: neighbours as JSON."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline.export.stage", description=_main.__doc__)
    p.add_argument("export_dir")
    p.add_argument("forms", nargs="+", choices=FORMS)
    p.add_argument("--query", action="append", required=True)
    p.add_argument("-k", type=int, default=10)
    args = p.parse_args(argv)
    print(json.dumps(neighbours_report(Path(args.export_dir), args.forms, args.query, args.k)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
