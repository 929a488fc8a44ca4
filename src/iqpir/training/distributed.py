"""Process-group set-up for 1..N devices, detected from the torchrun environment.

Gradients are averaged with one flattened all-reduce after backward instead of wrapping the
model in DistributedDataParallel: the stage-1 adaptive GAN weight takes gradients with
`torch.autograd.grad`, stage 2 freezes most of the network, and a plain all-reduce keeps
both simple while giving the same update as DDP (the mean of the per-rank mean gradients).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from iqpir.devices import resolve_device


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Average .grad over ranks with one all-reduce of a flat buffer.

    A parameter without a gradient on some ranks counts as zero there; one without a gradient
    on every rank keeps none, as in a one-process run, so that its optimiser skips it (Adam
    would otherwise count the step, e.g. the discriminator's before the GAN starts, and its
    bias correction would differ from one process's).
    """
    if not info.enabled or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [has_grad])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    anywhere = flat[-len(params) :] > 0
    offset = 0
    for i, (p, g) in enumerate(zip(params, grads)):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone() if anywhere[i] else None
        offset += n


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `t` over the ranks of the process group (`t` itself without one).

    For quantities computed inside a task's losses from the rank's own share of the batch that
    must be those of the global batch (the adaptive GAN weight's gradient norms).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not info.enabled:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is True on any rank (stop requests, non-finite losses)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_across(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average logged scalars over ranks so that rank 0 logs the global-batch value."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if info.device.type == "cuda":
        t = t.to(info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= info.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}
