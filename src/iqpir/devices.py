"""What the machine has and how the process uses it: the torch device, native bf16, malloc.

The lowest layer shared by training and inference (both import it; it imports nothing of
iqpir): `resolve_device` turns a --device name into a torch.device, `native_bf16` says where
bf16 arithmetic is an instruction rather than emulation, `keep_freed_memory` and
`weights_outside_the_heap` set glibc's malloc for processes that restore or train image after
image.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch


def process_shard() -> tuple[int, int]:
    """(rank, world size) of this process in a job started by torchrun (RANK, WORLD_SIZE); (0, 1) alone."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1
    return (rank, world) if 0 <= rank < world else (0, 1)


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
