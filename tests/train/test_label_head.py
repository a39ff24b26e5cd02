"""The label head trained with the encoder (pipeline/train/label_head.py): its loss, its checkpoints, what the
run saves, and eval choosing it only where it wins on validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.contracts import label_head as contract
from pipeline.train.label_head import CosineHead, centroids, classes_of, head_loss
from tests.conftest import cli, run_stages


def intent_corpus(labels: int, per_label: int, test_share: float = 0.3, seed: int = 0) -> pd.DataFrame:
    """A synthetic intent set: ``labels`` intents of ``per_label`` texts each, a train/test split column
    only (no val, no entity ids). Each intent has its own verb and object words, the filler is shared."""
    rng = np.random.default_rng(seed)
    verbs = ["reset", "cancel", "upgrade", "transfer", "book", "order", "track", "close", "open", "pay",
             "change", "find", "report", "renew", "block", "unlock", "share", "delete", "export", "print"]
    things = ["card", "plan", "flight", "parcel", "account", "table", "loan", "alarm", "playlist", "invoice"]
    fill = ["please", "now", "today", "for me", "quickly", "if you can", "right away", "asap"]
    rows = []
    for i in range(labels):
        verb, thing = verbs[i % len(verbs)], things[(i // len(verbs)) % len(things)]
        for j in range(per_label):
            text = f"{rng.choice(['can you', 'i want to', 'help me', 'how do i'])} {verb} my {thing} " \
                   f"{rng.choice(fill)} {j}"
            rows.append({"text": text, "intent": f"{verb}_{thing}",
                         "split": "test" if j < max(2, int(round(test_share * per_label))) else "train"})
    return pd.DataFrame(rows)


def _config(tiny_model_dir, name: str, **train) -> dict:
    return {"data": {"name": name, "format": "table", "path": f"{name}.csv", "text_column": "text",
                     "label_column": "intent", "group_column": None, "split_column": "split"},
            "model": {"base": str(tiny_model_dir)},
            "train": {"batch_size": 16, "max_seq_length": 32, "epochs": 2, "lr": 2e-3,
                      "lora": {"r": 4, "alpha": 8}, **train}, "runtime": {"num_threads": 1},
            "eval": {"bootstrap": 20, "classifier_c": [1.0]}, "tracking": {"experiment": "tests"}}


def test_the_head_classifies_by_its_nearest_prototype_and_round_trips_through_its_files(tmp_path):
    protos = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # not normalised: make() normalises
    head = contract.make(["a", "b"], protos, 10.0)
    emb = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.3]], dtype=np.float32)
    assert list(head.predict(emb)) == ["a", "b"]
    probs = head.probabilities(emb)
    assert np.allclose(probs.sum(1), 1) and probs[0, 0] > 0.99
    assert head.top(emb, 5)[1][0]["label"] == "b" and len(head.top(emb, 5)[1]) == 2
    contract.save(tmp_path, head)
    back = contract.load(tmp_path)
    assert back.labels == ("a", "b") and back.scale == 10.0 and np.allclose(back.logits(emb), head.logits(emb))
    assert contract.load(tmp_path / "nothing") is None
    with pytest.raises(Exception, match="3-dimensional"):
        head.predict(np.zeros((1, 4), dtype=np.float32))


def test_head_loss_reaches_the_encoder_side_and_ignores_rows_without_a_class():
    torch.manual_seed(0)
    head = CosineHead(np.eye(3, 8, dtype=np.float32), ["x", "y", "z"], 20.0)
    emb = torch.randn(4, 8, requires_grad=True)
    loss = head_loss(head, [emb], [np.array([0, -1, 2, -1])])
    loss.backward()
    assert emb.grad[[0, 2]].abs().sum() > 0 and emb.grad[[1, 3]].abs().sum() == 0  # unlabelled rows: no gradient
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert head_loss(head, [emb], [np.array([-1, -1, -1, -1])]) is None
    assert list(classes_of(pd.Series(["y", None, "q"]), ["x", "y"])) == [1, -1, -1]


def test_prototypes_start_at_the_class_centroids(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    from pipeline.model import prompts

    st = SentenceTransformer(str(tiny_model_dir), device="cpu")
    train = pd.DataFrame({"text": ["red apple", "green apple", "fast car", "slow car", "blue car"],
                          "label": ["fruit", "fruit", "car", "car", "car"]})
    got = centroids(st, train, ["car", "fruit"], prompts.Prompts(), 32, "cpu", 0)
    emb = st.encode(train["text"].tolist(), normalize_embeddings=True)
    want = np.stack([emb[2:].mean(0), emb[:2].mean(0)])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert np.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("pair_weight", [1.0, 0.0])
def test_a_run_with_a_label_head_saves_it_and_eval_offers_it_as_a_head(tmp_path, monkeypatch, tiny_model_dir,
                                                                         pair_weight):
    """Combined pair + label loss, and the label loss alone: the head is saved with the run, validation
    records its macro-F1 beside the kNN vote, and eval lists it among both models' heads."""
    monkeypatch.chdir(tmp_path)
    intent_corpus(6, 12).to_csv("intents.csv", index=False)
    Path("c.yaml").write_text(yaml.safe_dump(_config(tiny_model_dir, "intents", label_loss_weight=1.0,
                                                     pair_loss_weight=pair_weight)))
    run_stages("--config", "c.yaml")
    run = "intents-lora-r4-a8-s0"
    model = Path(f"runs/{run}/model")
    head = contract.load(model)
    assert head is not None and len(head.labels) == 6
    info = json.loads((model / "model_info.json").read_text())
    assert info["label_head"]["labels"] == 6
    trained = json.loads((model / "manifest.json").read_text())["train"]
    assert trained["label_loss_weight"] == 1.0 and trained["pair_loss_weight"] == pair_weight
    # the head was trained beside the pairs, not left at its start, the base model's class centroids
    from sentence_transformers import SentenceTransformer

    from pipeline.contracts.prepared_data import load_split
    from pipeline.model import prompts
    start = centroids(SentenceTransformer(str(tiny_model_dir), device="cpu"),
                      load_split(Path("data/processed/intents"), "train"), list(head.labels), prompts.Prompts(), 32,
                      "cpu", 0)
    assert not np.allclose(head.prototypes, start, atol=1e-4)
    curve = trained["validation"]["curve"]
    assert all("label_head_macro_f1" in c and "macro_f1_without_head" in c for c in curve)
    assert all(c["value"] == max(c["label_head_macro_f1"], c["macro_f1_without_head"]) for c in curve)
    m = json.loads(Path(f"reports/{run}/metrics.json").read_text())
    assert "label_head" in m["heads"]["adapted"] and "label_head" not in m["heads"]["base"]
    assert "label_head_macro_f1" in m["classification"] and m["classifier"]["label_head_trained"] is True
    assert m["objective"]["label_loss_weight"] == 1.0
    # the head's test figure is the saved head applied to the embeddings eval read
    emb = np.load(Path(json.loads(Path(f"runs/{run}/embeddings/manifest.json").read_text())["adapted_dir"]) / "test.npy")
    test = pd.read_json("data/processed/intents/test.jsonl", lines=True, dtype=str)
    from pipeline.search import metrics as M
    assert m["heads"]["adapted"]["label_head"]["test_macro_f1"] == pytest.approx(
        M.classification_scores(test["label"].to_numpy(), head.predict(emb))["macro_f1"], abs=1e-5)
    report = Path(f"reports/{run}/report.md").read_text()
    assert "## Classifier heads (macro-F1)" in report and "| label_head |" in report
    assert "label head trained with the encoder" in report


def test_pair_weight_zero_without_a_label_head_is_a_one_line_error(project, capsys):
    assert cli("prepare", "--config", str(project)) == 0
    assert cli("train", "--config", str(project), "train.pair_loss_weight=0") == 2
    assert "leaves nothing to train" in capsys.readouterr().err


def test_a_resumed_run_continues_with_the_head_it_checkpointed(project):
    """Kill after a checkpoint, resume: the head's weights come back from the checkpoint, so the resumed run
    ends exactly where an uninterrupted one does."""
    args = ["--config", str(project), "train.label_loss_weight=1", "train.validation.enabled=false",
            "train.checkpoint_every=3", "train.max_steps=6"]
    assert cli("prepare", *args) == 0
    assert cli("train", *args, "run_name=straight") == 0
    straight = contract.load(Path("runs/straight/model"))

    from pipeline.train import stage as train_stage
    real = train_stage._after_step

    def crash_after_checkpoint(job, su, sel, tracker, progress, checks):
        stop = real(job, su, sel, tracker, progress, checks)
        if progress.done == 4:
            raise KeyboardInterrupt
        return stop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_stage, "_after_step", crash_after_checkpoint)
        assert cli("train", *args, "run_name=resumed") != 0  # the CLI reports the interrupt and exits
    assert json.loads(Path("runs/resumed/checkpoints/state.json").read_text())["step"] == 3
    assert cli("train", *args, "run_name=resumed") == 0
    resumed = contract.load(Path("runs/resumed/model"))
    assert np.allclose(resumed.prototypes, straight.prototypes, atol=1e-6)


@pytest.mark.parametrize("labels,per_label", [(3, 10), (30, 12), pytest.param(8, 100, marks=pytest.mark.slow)])
def test_intent_sets_of_other_shapes_train_a_head_from_a_train_test_file(tmp_path, monkeypatch, tiny_model_dir,
                                                                         labels, per_label):
    """Label counts and examples per label unlike the staged corpora, given train/test only: val is carved per
    label, the head has one prototype per label, and eval scores every head of both models on the same split."""
    monkeypatch.chdir(tmp_path)
    intent_corpus(labels, per_label, seed=labels).to_csv("shape.csv", index=False)
    Path("c.yaml").write_text(yaml.safe_dump(_config(tiny_model_dir, "shape", label_loss_weight=1.0, epochs=1)))
    run_stages("--config", "c.yaml")
    prep = json.loads(Path("data/processed/shape/manifest.json").read_text())
    assert prep["split_plan"]["carved"] == ["val"]
    assert all(len(prep["class_counts"][s]) == labels for s in ("train", "val", "test"))
    run = "shape-lora-r4-a8-s0"
    assert len(contract.load(Path(f"runs/{run}/model")).labels) == labels
    m = json.loads(Path(f"reports/{run}/metrics.json").read_text())
    assert m["test_items"] == sum(prep["class_counts"]["test"].values())
    assert {"label_head", "zero_shot"} <= set(m["heads"]["adapted"]) and any(
        h.startswith("logreg") for h in m["heads"]["base"])
    chosen = m["classifier"]["head"]
    best_val = max(v["val_macro_f1"] for v in m["heads"]["adapted"].values())
    assert m["heads"]["adapted"][chosen]["val_macro_f1"] == best_val  # chosen on validation, never on test
    assert m["verdict"]["heads"] == {"adapted": chosen, "base": m["classifier"]["base_head"]}
