"""What the machine has and how the process uses it: the torch device, native bf16, malloc.

The lowest layer shared by training and inference (both import it; it imports nothing of
iqpir): `resolve_device` turns a --device name into a torch.device, `native_bf16` says where
bf16 arithmetic is an instruction rather than emulation, `keep_freed_memory` and
`weights_outside_the_heap` set glibc's malloc for processes that restore or train image after
image. `process_shard`, `shard_owner` and `ShardMeeting` split a file job (`iqpir restore`,
`iqpir score`) over the processes of a torchrun job and let them finish together.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch


def process_shard() -> tuple[int, int]:
    """(rank, world size) of this process in a job started by torchrun (RANK, WORLD_SIZE); (0, 1) alone."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1
    return (rank, world) if 0 <= rank < world else (0, 1)


def shard_owner(path: str | os.PathLike, world: int) -> int:
    """The rank that takes `path` in a file job of `world` processes.

    sha256 of the path as given, not Python's hash() (salted per process): every process of a
    job, and every later run, must agree on the owner so that a re-run finds each file's
    output or score where its owner left it.
    """
    return int(hashlib.sha256(str(path).encode()).hexdigest(), 16) % world


# How long the processes of a file job wait for each other at the end. Long enough for ranks
# whose shares took unequal time; a rank that crashes does not make the others wait this long
# (torchrun stops the whole job when one process dies), only one that hangs does.
SHARD_WAIT = timedelta(hours=2)


class ShardMeeting:
    """Where the processes of a torchrun file job meet once their shares are done.

    torchrun stops every process of a job as soon as one exits with an error, so a process
    whose share had a bad file must not exit before the others have finished theirs: all of
    them meet here (`gather`, which also tells each one how the others did), the rank-0 work
    that needs every share (merging score tables) happens, then all leave together (`close`).
    The meeting is a gloo process group over torchrun's rendezvous (MASTER_ADDR/MASTER_PORT),
    on CPU whatever device the job restores or scores on, joined only at the end so that a
    long share holds no sockets. Without a rendezvous (RANK and WORLD_SIZE set by hand, e.g.
    one cluster job per rank) there is nobody to meet: `join` returns None.
    """

    def __init__(self, group: object | None, own: bool) -> None:
        self.group = group  # None: the default group, which `own` says this meeting created
        self.own = own

    @classmethod
    def join(cls) -> "ShardMeeting | None":
        """Wait for every process of the job (at most SHARD_WAIT); None for one process or no rendezvous."""
        _, world = process_shard()
        if world == 1 or not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
            return None
        import torch.distributed as dist

        if not dist.is_available():
            return None
        if dist.is_initialized():  # a caller's own group (NCCL, say): meet in a gloo group beside it
            return cls(dist.new_group(backend="gloo", timeout=SHARD_WAIT), own=False)
        dist.init_process_group(backend="gloo", timeout=SHARD_WAIT)
        return cls(None, own=True)

    def gather(self, status: str) -> list[str]:
        """Every rank's `status` line, in rank order ("" for a rank that did all its files)."""
        import torch.distributed as dist

        out: list[object] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, status, group=self.group)
        return [str(s) for s in out]

    def close(self) -> None:
        """Leave together: a rank that exits now cannot cut short rank 0's merge."""
        import torch.distributed as dist

        dist.barrier(group=self.group)
        if self.own:
            dist.destroy_process_group()


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when CUDA is available, else mps, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' requested but MPS is not available")
    return device


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (Linux), else an empty set."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True where bf16 dot products are instructions (AVX512-BF16, AMX-BF16), not emulation.

    Reads /proc/cpuinfo; elsewhere (macOS, Windows) falls back to PyTorch's own dispatch level,
    which reports "AVX512_BF16"/"AMX" style capabilities on recent builds.
    """
    flags = cpu_flags() if flags is None else flags
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    return "BF16" in capability or "AMX" in capability


def cpu_has_avx2_fma(flags: frozenset[str] | None = None) -> bool:
    """True where the CPU has 256-bit FMA vectors (AVX2 and FMA: x86 since 2013-2015), the ISA
    on which the float32 fast path measured faster than the exact network (docs/performance.md).

    Reads /proc/cpuinfo; elsewhere falls back to PyTorch's own dispatch level ("AVX2", "AVX512").
    """
    flags = cpu_flags() if flags is None else flags
    if flags:
        return {"avx2", "fma"} <= flags
    return str(torch.backends.cpu.get_cpu_capability()).upper() in ("AVX2", "AVX512")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively (fast), rather than by emulation."""
    if device.type == "cpu":
        return cpu_has_native_bf16()
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # from glibc's malloc.h
_GLIBC_MMAP_MAX = 65536  # glibc's default M_MMAP_MAX
_kept = False  # keep_freed_memory() is in effect


def _mallopt(param: int, value: int) -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory instead of returning it to the kernel.

    By default every large tensor is an mmap that is unmapped when freed, and the next one
    page-faults all its memory again: measured here (2 cores, the paper network at 512x512,
    `benchmarks/bench_restore.py`) that is 9.8 s per image against 5.3 s with this setting
    (M_MMAP_MAX = 0: large blocks come from the heap; M_TRIM_THRESHOLD = 1 GiB: the heap is
    not trimmed). The process keeps its peak memory, which inference and training reach on
    every step anyway. No effect off glibc; IQPIR_DEFAULT_MALLOC=1 leaves malloc alone.
    """
    global _kept
    if os.environ.get("IQPIR_DEFAULT_MALLOC") or not sys.platform.startswith("linux"):
        return False
    _kept = _mallopt(_M_MMAP_MAX, 0) and _mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    return _kept


def release_freed_memory() -> bool:
    """Hand the free memory inside glibc's heaps back to the kernel: malloc_trim(0).

    For a long-running process between jobs (the web app when its queue is empty): with
    `keep_freed_memory()` the heap otherwise stays at the largest request's peak for good. The
    next job faults its pages in once more, but its own buffers are still reused within it.
    Returns whether anything was released; False off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False


@contextmanager
def weights_outside_the_heap():
    """Inside, large blocks are mmapped again even after `keep_freed_memory()`: for reading a
    weights file whose tensors are converted or dropped soon after (the fast path replaces the
    float32 encoder and decoder by bf16 copies). Freed, they go back to the kernel instead of
    leaving holes in the heap that the activations fit badly into (measured: ~80 MB less peak
    RSS for `iqpir restore` of one face)."""
    if not _kept:
        yield
        return
    _mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
    try:
        yield
    finally:
        _mallopt(_M_MMAP_MAX, 0)
