"""Training under torchrun: 2 CPU processes (gloo) on the tiny model give the adapter one process gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.train.distributed import Dist
from tests.conftest import REPO, cli, free_port



def test_shards_are_contiguous_and_cover_the_batch():
    idx = np.arange(11) * 3
    parts = [Dist(rank=r, world=3, local_rank=r).shard(idx) for r in range(3)]
    assert np.array_equal(np.concatenate(parts), idx)
    assert [len(p) for p in parts] == Dist(0, 3, 0).shard_sizes(11) == [4, 4, 3]


def _torchrun(config: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pipeline", "train", "--config", str(config), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_two_process_training_saves_the_single_process_adapter(project):
    common = ["train.lora.dropout=0.0", "train.precision=fp32", "train.max_steps=6", "train.lr=0.005",
              "train.warmup_ratio=0.0"]
    assert cli("prepare", "--config", str(project)) == 0
    assert cli("train", "--config", str(project), *common, "run_name=single", "tracking.enabled=false") == 0

    done = _torchrun(project, *common, "run_name=ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = Path("runs/single/model"), Path("runs/ddp/model")
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(ddp) == files(single)
    a, b = _tensors(single), _tensors(ddp)
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    # Values differ by the base model's dropout masks (each process draws its own); that the gradient
    # itself is the single-process one is checked exactly below without dropout.
    assert all(b[k].abs().sum() > 0 for k in b if "lora_B" in k)
    manifest = json.loads((ddp / "manifest.json").read_text())
    assert manifest["train"]["processes"] == 2 and manifest["train"]["steps"] == 6
    # only rank 0 wrote: one MLflow run, no leftovers of a second writer
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tests"], output_format="list")
    assert [r.info.run_name for r in runs] == ["ddp"]
    assert not [p for p in Path("runs/ddp").iterdir() if p.name.startswith(".")]
    # the adapter trained under torchrun loads and embeds like any other
    assert cli("embed", "--config", str(project), *common, "run_name=ddp", "tracking.enabled=false") == 0


def _grads_worker(rank: int, world: int, model_dir: str, port: int, out: str, with_head: bool = False) -> None:
    """One step of training_step with plain SGD (lr 1) and no clipping: the weight change is -gradient."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    from pipeline.train import distributed

    dist = distributed.init_from_env("cpu") if world > 1 else None
    delta = _one_step(model_dir, dist, with_head)
    if rank == 0:
        torch.save(delta, out)
    if dist:
        dist.close()


def _one_step(model_dir: str, dist, with_head: bool = False) -> dict[str, torch.Tensor]:
    import pandas as pd

    from pipeline.core.config import LoraSettings, TrainConfig
    from pipeline.model.encoder import apply_lora, load_encoder
    from pipeline.train.label_head import CosineHead
    from pipeline.train.loop import PairTensors, Stepper, training_step

    torch.manual_seed(0)
    st = load_encoder(model_dir, max_seq_length=32)
    apply_lora(st, LoraSettings(r=4, alpha=8, dropout=0.0))
    params = {n: p for n, p in st.named_parameters() if p.requires_grad}
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without gradient
        for n, p in params.items():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    pairs = pd.DataFrame({
        "anchor": [f"anchor text {i} apple" for i in range(7)], "positive": [f"positive {i} pear" for i in range(7)],
        "kind": ["group"] * 6 + ["label"], "group": ["1", "1", "2", "3", "4", "5", "6"],
        "label": ["a", "a", "b", "b", "a", "b", "a"],
        "negative": [f"negative {i}" if i % 2 else None for i in range(7)],
        "negative_group": [str(i + 10) if i % 2 else None for i in range(7)],
        "negative_label": ["b" if i % 2 else None for i in range(7)],
        "negative_kind": ["text" if i % 2 else None for i in range(7)]})
    data = PairTensors(pairs, st, 32, label_names=["a", "b"] if with_head else None)
    head = None
    if with_head:  # the label head's gradient must also be the single-process one (it is not sharded)
        head = CosineHead(np.random.default_rng(0).standard_normal((2, st.get_embedding_dimension())), ["a", "b"], 20.0)
        params.update({f"label_head.{n}": p for n, p in head.named_parameters()})
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(list(params.values()), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    t = TrainConfig(grad_clip=0.0, batch_size=7, label_loss_weight=1.0 if with_head else None)
    st.eval()  # no dropout: the two runs draw different dropout masks; gradients flow in eval mode too
    training_step(Stepper(st, data, t, opt, sched, torch.device("cpu"), None, dist, head), np.arange(7))
    return {n: (p.detach() - before[n]) for n, p in params.items()}


@pytest.mark.slow
@pytest.mark.parametrize("with_head", [False, True])
def test_gathered_loss_gives_the_single_process_gradient(tiny_model_dir, tmp_path, with_head):

    import torch.multiprocessing as mp

    single = _one_step(str(tiny_model_dir), None, with_head)
    port = free_port()
    out = tmp_path / "delta.pt"
    mp.spawn(_grads_worker, args=(2, str(tiny_model_dir), port, str(out), with_head), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    assert set(ddp) == set(single)
    assert all(single[n].abs().sum() > 0 for n in single)  # every LoRA tensor received gradient
    for n in single:
        assert torch.allclose(ddp[n], single[n], atol=1e-6, rtol=1e-4), n
