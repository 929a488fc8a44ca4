"""Two processes (gloo, CPU) compute what one process computes with their batches together.

The loop promises that W processes with batch B take the same steps as one process with
batch W*B. Adam hides a wrong gradient scale (its first step is lr * sign(g) almost
everywhere), so the runs are compared through Adam's first moment after step 1, which is
exactly (1 - beta1) * g: the gradient itself, at a tight tolerance.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from train_helpers import read_metrics, small_cfg

from iqpir import checkpoint as ckpt
from iqpir import config as C
from iqpir.training import distributed as D
from iqpir.training.loop import train

# Two spawned processes and four training runs (about 6 s idle, 12 s on a busy machine): with the
# slow tests (`make test-all`, and `make mutants`, whose DDP plants run them by name).
pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _collectives(rank: int, world: int, out: Path) -> None:
    """Known per-rank inputs through each collective of iqpir.training.distributed -> out/rankR.json."""
    info = D.setup("cpu")
    try:
        a = torch.nn.Parameter(torch.zeros(3))
        b = torch.nn.Parameter(torch.zeros(2, 2))
        c = torch.nn.Parameter(torch.zeros(2))
        d = torch.nn.Parameter(torch.zeros(2))
        a.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)
        b.grad = torch.full((2, 2), 4.0 if rank == 0 else -2.0)
        c.grad = None if rank == 0 else torch.tensor([6.0, 8.0])  # no gradient counts as zero
        D.average_gradients([a, b, c, d], info)  # d: no gradient anywhere (its optimiser skips it)
        net = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(net.weight, float(rank + 1))
        D.broadcast_module(net, info)
        result = {
            "grads": [None if p.grad is None else p.grad.flatten().tolist() for p in (a, b, c, d)],
            "mean_across": D.mean_across({"x": rank + 1.0, "y": 2.0 * rank}, info),
            "mean_across_ranks": D.mean_across_ranks(torch.tensor([rank * 4.0, 1.0])).tolist(),
            "flags": [D.broadcast_flag(rank == 1, info), D.broadcast_flag(False, info)],
            "broadcast": net.weight.flatten().tolist(),
        }
    finally:
        D.cleanup(info)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def _worker(rank, world, ports, out, runs, data, stage1, scores):
    """One rank: the collectives, then each run of `runs` ({name: config dict}) into out/NAME/two."""
    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = Path(out)
    os.environ["MASTER_PORT"] = str(ports[0])
    _collectives(rank, world, out)
    for port, (name, cfg) in zip(ports[1:], runs.items()):
        os.environ["MASTER_PORT"] = str(port)
        train(C.from_dict(cfg), data, out / name / "two", stage1=stage1 if name == "stage2" else None,
              device="cpu", progress=False, scores=scores)


RUNS = {  # name: overrides; each runs as 1 process x batch 2 ("one") and 2 processes x batch 1 ("two")
    # the GAN at once; codebooks drawn uniformly (the official init): codes copied from the first
    # batch's encoder outputs put positions on near-ties that batch-size float noise flips
    "stage1": (1, "train.steps=1", "train.ckpt_every=1", "train.gan_start_step=0", "train.codebook_init=uniform"),
    # the quality loss off: NIQE amplifies the 1e-7 differences between batch sizes
    "stage2": (2, "train.steps=2", "train.ckpt_every=1", "train.quality_start_step=100"),
}


@pytest.fixture(scope="module")
def ddp(stage1_run, train_images, tmp_path_factory) -> Path:
    """Both runs in one process, then the collectives and both runs in one 2-process group (gloo)."""
    out = tmp_path_factory.mktemp("ddp")
    scores = stage1_run / "scores.csv"
    for name, args in RUNS.items():
        train(small_cfg(*args, "train.batch_size=2"), train_images, out / name / "one",
              stage1=stage1_run if name == "stage2" else None, device="cpu", progress=False, scores=scores)
    runs = {name: C.to_dict(small_cfg(*args, "train.batch_size=1")) for name, args in RUNS.items()}
    mp.spawn(_worker, args=(2, _free_ports(1 + len(runs)), str(out), runs, str(train_images), str(stage1_run),
                            str(scores)), nprocs=2, join=True)
    return out


def test_average_gradients_is_the_exact_mean(ddp):
    for rank in range(2):
        r = json.loads((ddp / f"rank{rank}.json").read_text())
        assert r["grads"] == [[1.5, 3.0, 4.5], [1.0] * 4, [3.0, 4.0], None]
        assert r["mean_across"] == {"x": 1.5, "y": 1.0}
        assert r["mean_across_ranks"] == [2.0, 1.0]
        assert r["flags"] == [True, False]
        assert r["broadcast"] == [1.0] * 4  # rank 0's


def _losses(run: Path, keys) -> list[list[float]]:
    return [[float(row[k]) for k in keys] for row in read_metrics(run)]


def _first_moment(run: Path, optimizer: str) -> torch.Tensor:
    """Adam's exp_avg after step 1, all parameters: (1 - beta1) * the (all-reduced) gradient."""
    tensors, _ = ckpt.load_checkpoint(ckpt.checkpoint_stem(run, 1))
    state = tensors[f"optim.{optimizer}"]
    names = sorted(k for k in state if k.endswith("exp_avg"))
    assert len(names) >= 10
    return torch.cat([state[k].flatten() for k in names])


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((b - a).norm() / a.norm())


def test_stage2_two_processes_equal_one(ddp):
    keys = ("loss", "feat", "index_common", "index_hq")
    one, two = _losses(ddp / "stage2" / "one", keys), _losses(ddp / "stage2" / "two", keys)
    assert len(one) == len(two) == 2
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-7)
    # measured: 3e-6 (float summation order); summed gradients: 1.0
    assert _relative_error(_first_moment(ddp / "stage2" / "one", "generator"),
                           _first_moment(ddp / "stage2" / "two", "generator")) < 1e-4


def test_stage1_two_processes_equal_one(ddp):
    """With the GAN from step 1: the adaptive GAN weight is that of the global batch, and the
    discriminator's gradients are averaged too."""
    keys = ("loss", "l1", "codebook_common", "codebook_hq", "gan", "disc")
    one, two = _losses(ddp / "stage1" / "one", keys), _losses(ddp / "stage1" / "two", keys)
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=2e-3, atol=1e-6)
    # measured: 4e-6 (generator) and 1.4e-6 (discriminator)
    assert _relative_error(_first_moment(ddp / "stage1" / "one", "generator"),
                           _first_moment(ddp / "stage1" / "two", "generator")) < 1e-4
    assert _relative_error(_first_moment(ddp / "stage1" / "one", "discriminator"),
                           _first_moment(ddp / "stage1" / "two", "discriminator")) < 1e-4
