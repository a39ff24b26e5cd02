"""A trained run folder (``runs/<run>/model``, as the train stage writes it) as an encoder, for a notebook
(``pipeline.load_run``): the recorded base, the adapter (or full model), the run's prompts per role and the
sequence length it was trained with."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import ArtifactError
from pipeline.model import prompts
from pipeline.model.backends import TorchEncoder
from pipeline.model.encoder import load_trained, read_model_info
from pipeline.model.interface import Encoder


def model_folder(run: str | Path, runs_dir: str | Path = "runs") -> Path:
    """``run`` as a model folder: a run name under ``runs_dir``, a run folder, or its ``model/`` folder."""
    for candidate in (Path(run) / "model", Path(run), Path(runs_dir) / str(run) / "model"):
        if (candidate / "model_info.json").exists():
            return candidate
    raise ArtifactError(f"no trained run at '{run}' (looked for model_info.json in {run}/model, {run} and "
                        f"{Path(runs_dir) / str(run)}/model); run `make train` first")


def load_run(run: str | Path, *, device: str = "cpu", runs_dir: str | Path = "runs", batch_size: int = 64
             ) -> Encoder:
    """The trained encoder of ``run`` (the adapter on its recorded, weight-checked base), fp32."""
    folder = model_folder(run, runs_dir)
    info = read_model_info(folder)
    st_model = load_trained(folder, device=device)
    st_model.eval()
    return TorchEncoder(st_model, max_seq_length=info.get("max_seq_length") or st_model.max_seq_length,
                        batch_size=batch_size, device=device, used=prompts.of_record(info.get("prompts")))
