"""How a restorer runs: the dtype and backend choice, and the fast CPU path.

An *engine* maps a batch of model-size tiles to restored tiles:

    engine(tiles (N, 3, s, s) float in [0, 1], quality float | None, alpha float | None,
           fidelity float) -> (N, 3, s, s) float32 on the CPU, clamped to [0, 1]

`make_engine` picks one from the model, the device and the `dtype` / `backend` asked for:

- "float32": the network exactly as written, in float32 (bit-identical to calling the model).
- "bfloat16" (and "auto" where the hardware has native bf16 arithmetic: AVX512-BF16 or AMX on
  x86 CPUs, any CUDA GPU that supports it): the *mixed* path. The convolutional encoder,
  decoder and CFT blocks (~97% of the FLOPs at 512x512, paper preset) run in bf16 with
  channels-last activations and bf16 weights; the quality embedding, the code Transformer,
  the codebook lookup and AdaIN stay in float32, so the predicted codes only move where the
  encoder's bf16 rounding moves the Transformer's argmax. Residual adds and SiLUs are done in
  place (less memory traffic around the convolutions, which is what limits them at 512 and
  256 px).
- "float16": autocast (CUDA; as before this module existed).
- backend "onnxruntime" / "openvino": a graph written by `iqpir export` (iqpir.export).

"auto" on a CPU without native bf16 is float32: emulated bf16 is slower than float32 there.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iqpir.models.vqgan import ResBlock, Upsample

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")


# --------------------------------------------------------------------------------------
# What the machine has
# --------------------------------------------------------------------------------------


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


def resolve_dtype(dtype: str, device: torch.device, model: nn.Module | None = None) -> str:
    """"auto" -> "bfloat16" where the device has native bf16 and the model is an iqpir
    restorer (the mixed path knows its parts), else "float32"; other names are checked."""
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16(device) and _is_restorer(model) else "float32"


def _is_restorer(model: nn.Module | None) -> bool:
    from iqpir.models.restorer import Restorer

    return isinstance(model, Restorer)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # from glibc's malloc.h
_GLIBC_MMAP_MAX = 65536  # glibc's default M_MMAP_MAX
_kept = False  # keep_freed_memory() is in effect


def _mallopt(param: int, value: int) -> bool:
    import ctypes

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


# --------------------------------------------------------------------------------------
# Torch engines
# --------------------------------------------------------------------------------------


class TorchEngine:
    """The network itself: float32 exactly, or float16 under autocast.

    `model` is called as model(lq, quality (N,) | None, alpha=..., [fidelity=...]) and returns
    an object with `.restored` (see iqpir.models.Restorer).
    """

    name = "torch"

    def __init__(self, model: nn.Module, device: torch.device, dtype: str = "float32", *,
                 own: bool = False) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.dtype = dtype
        if own and dtype == "float32":  # bit-identical, fewer activations alive at 512 px
            for m in self.model.modules():
                if type(m) is ResBlock:
                    m.__class__ = InPlaceResBlock

    def describe(self) -> str:
        return f"torch {self.dtype}" + (" (autocast)" if self.dtype != "float32" else "")

    def _context(self):
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.dtype])

    def _network(self) -> nn.Module:
        return self.model

    def check(self, fidelity: float) -> None:
        """Settings this engine cannot run raise ValueError (the network checks its own)."""

    @torch.inference_mode()
    def outputs(self, tiles: Tensor, quality: float | None = None, alpha: float | None = None,
                fidelity: float = 0.0) -> dict[str, Tensor]:
        """{"restored": (N, 3, s, s) float32 unclamped, "indices_common": (N, h, w) int64, and
        "indices_hq" for dual-codebook models}, all on the CPU."""
        q = None if quality is None else torch.full((tiles.shape[0],), float(quality), device=self.device)
        kwargs = {"fidelity": fidelity} if fidelity else {}
        with self._context():
            out = self._network()(tiles.to(self.device), q, alpha=alpha, **kwargs)
        result = {"restored": out.restored.float().cpu()}
        for name in ("indices_common", "indices_hq"):
            if getattr(out, name, None) is not None:
                result[name] = getattr(out, name).cpu()
        return result

    def __call__(self, tiles: Tensor, quality: float | None = None, alpha: float | None = None,
                 fidelity: float = 0.0) -> Tensor:
        """(N, 3, s, s) restored tiles, float32 on the CPU, clamped to [0, 1]."""
        return self.outputs(tiles, quality, alpha, fidelity)["restored"].clamp(0, 1)


class _LowPrecision(nn.Module):
    """A convolutional part (encoder or decoder) in `dtype`, channels-last, float32 at its output.

    forward(x, *args) casts x to the part's dtype and layout; tensors the part writes into a
    `features` dict argument stay in the low precision (the CFT blocks read them in it).
    """

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, x: Tensor, *args) -> Tensor:
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        return self.inner(x, *args).float().contiguous()


class InPlaceResBlock(ResBlock):
    """ResBlock (iqpir.models.vqgan) for inference: the SiLUs and the residual sum in place and
    each intermediate released as soon as it is used, so fewer activations are alive at once.
    Bit-identical to ResBlock (the same kernels; a + b == b + a in IEEE arithmetic)."""

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.norm2(self.conv1(F.silu(self.norm1(x), inplace=True))), inplace=True)
        h = self.conv2(h)
        return h.add_(self.skip(x))


class InferenceResBlock(InPlaceResBlock):
    """The fast path's ResBlock (low precision, channels-last)."""


def subpixel_kernel(weight: Tensor) -> Tensor:
    """(C_out, C_in, 3, 3) kernel of a 3x3 conv applied after nearest x2 upsampling -> the
    (4 C_out, C_in, 2, 2) kernel of the same map computed on the low-resolution input.

    Output pixel (2i + a, 2j + b) of conv3x3(up2(x)) sees upsampled rows 2i + a - 1 .. 2i + a + 1,
    i.e. input rows (i - 1, i) for a = 0, with kernel rows (w0, w1 + w2), and rows (i, i + 1)
    for a = 1, with (w0 + w1, w2); columns likewise. Phase g = 2a + b owns output channels
    [g C_out, (g + 1) C_out). 16 instead of 36 multiply-adds per input pixel and channel pair.
    """
    w = weight.float()

    def fold(k: Tensor, phase: int, dim: int) -> Tensor:
        k0, k1, k2 = k.unbind(dim)
        return torch.stack((k0, k1 + k2) if phase == 0 else (k0 + k1, k2), dim)

    return torch.cat([fold(fold(w, a, 2), b, 3) for a in (0, 1) for b in (0, 1)]).to(weight.dtype)


class InferenceUpsample(nn.Module):
    """Upsample (nearest x2, then a 3x3 conv) computed without the upsampled tensor: one 2x2
    conv to 4x the channels on the input padded by one pixel, then each output phase is a
    shifted slice of it (see `subpixel_kernel`). The same function as Upsample up to rounding;
    2.25x fewer FLOPs (the decoder's upsampling convs are ~21% of the paper network's).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.out_channels = conv.out_channels
        self.weight = nn.Parameter(subpixel_kernel(conv.weight.detach()), requires_grad=False)
        bias = conv.bias.detach() if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
        self.bias = nn.Parameter(bias.repeat(4), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        c = self.out_channels
        y = F.conv2d(x, self.weight, self.bias, padding=1)  # (N, 4C, H+1, W+1)
        y = y.permute(0, 2, 3, 1)  # a view: (N, H+1, W+1, 4C), contiguous for channels-last y
        out = y.new_empty(n, h, 2, w, 2, c)
        for a in (0, 1):
            for b in (0, 1):
                g = 2 * a + b
                out[:, :, a, :, b] = y[:, a : a + h, b : b + w, g * c : (g + 1) * c]
        return out.view(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)  # channels-last (N, C, 2H, 2W)


def low_precision_copy(module: nn.Module, dtype: torch.dtype, device: torch.device, *,
                       in_place: bool = False) -> nn.Module:
    """An inference copy of a convolutional part in `dtype`, channels-last; `module` is untouched
    unless `in_place`, where it is converted itself and its float32 weights are released one by
    one as they are replaced (the caller owns it: `load_restorer`).

    Residual blocks become InferenceResBlock, upsampling blocks InferenceUpsample. On the CPU
    the GroupNorm parameters stay float32 (PyTorch's mixed-type kernel: as fast, and half the
    error of bf16 parameters). The copy's modules are new, its tensors are made in `dtype` one
    at a time: no float32 copy of the whole part is ever made.
    """
    twin = module if in_place else _share_tensors_copy(module)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Upsample):
                setattr(parent, name, InferenceUpsample(child.conv))
        if type(parent) is ResBlock:
            parent.__class__ = InferenceResBlock
    for m in twin.modules():
        keep_float = device.type == "cpu" and isinstance(m, nn.GroupNorm)
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is None:
                    continue
                new_dtype = torch.float32 if keep_float or not t.is_floating_point() else dtype
                layout = torch.channels_last if t.dim() == 4 else torch.preserve_format
                new = t.detach().to(device=device, dtype=new_dtype, memory_format=layout)
                table[name] = nn.Parameter(new, requires_grad=False) if table is m._parameters else new
    return twin.eval()


def _share_tensors_copy(module: nn.Module) -> nn.Module:
    """A copy of `module`'s module tree that shares its parameters and buffers (no memory)."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def _with_children(model: nn.Module, **children: nn.Module) -> nn.Module:
    """A shallow twin of `model` (same class, same other children and parameters) whose
    named children are replaced; `model` itself is not modified."""
    twin = copy.copy(model)
    twin._modules = dict(model._modules)
    for name, child in children.items():
        twin._modules[name] = child
    return twin


class MixedEngine(TorchEngine):
    """The fast path (module docstring): bf16 convolutions, float32 codes.

    By default the float32 model stays what it is (`self.model`) and the engine runs a twin
    whose encoder, decoder and CFT blocks are low-precision copies. With `own=True` (the caller
    hands the model over: `load_restorer`) those parts are converted in place instead, so the
    float32 weights of the convolutional parts are not kept beside their bf16 copies, and
    `self.model` is the converted network.
    """

    def __init__(self, model: nn.Module, device: torch.device, dtype: str = "bfloat16", *,
                 own: bool = False) -> None:
        super().__init__(model, device, "float32")
        self.dtype = dtype
        low = DTYPES[dtype]
        names = ["encoder", "decoder"] + ["cft"] * (getattr(model, "cft", None) is not None)
        children = {}
        for name in names:  # one part at a time: its float32 weights go before the next is made
            part = low_precision_copy(getattr(self.model, name), low, device, in_place=own)
            children[name] = part if name == "cft" else _LowPrecision(part, low)
            if own:
                setattr(self.model, name, children[name])
        self.fast = self.model if own else _with_children(self.model, **children)

    def describe(self) -> str:
        return f"torch {self.dtype} convolutions (channels-last), float32 codes"

    def _context(self):
        # No autocast: the low-precision parts hold bf16 weights; everything else (the quality
        # embedding, the Transformer, the lookup, AdaIN) must stay float32.
        return nullcontext()

    def _network(self) -> nn.Module:
        return self.fast


def make_engine(model, device: torch.device, dtype: str = "auto", backend: str = "auto", *, own: bool = False):
    """The engine for `model` (an nn.Module, or an exported graph from iqpir.export) on `device`.

    own: the caller hands `model` over (nobody else uses it), so the fast path may convert it in
    place rather than keep a float32 copy beside the bf16 one (MixedEngine).

    A torch engine on the CPU also calls `keep_freed_memory()`, as the CLI does: the process
    then keeps its peak heap (the restorer reaches it on every image anyway) instead of paying
    for page faults on every forward pass. Set IQPIR_DEFAULT_MALLOC=1 to leave malloc alone.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    from iqpir import export

    if isinstance(model, export.ExportedGraph):
        return export.graph_engine(model, device, dtype, backend)
    if backend not in ("auto", "torch"):
        raise ValueError(f"--backend {backend} runs a graph written by `iqpir export`; "
                         f"export the checkpoint first (iqpir export CHECKPOINT --format ...)")
    dtype = resolve_dtype(dtype, device, model)
    if device.type == "cpu":
        # What the CLI does for every command: large activations stop being re-faulted from the
        # kernel on every forward pass. Process-wide (glibc only); IQPIR_DEFAULT_MALLOC=1 opts out.
        keep_freed_memory()
    if dtype == "bfloat16" and _is_restorer(model):
        return MixedEngine(model, device, dtype, own=own)
    return TorchEngine(model, device, dtype, own=own)


def knobs(model) -> tuple[bool, bool, float | None]:
    """(supports_quality, supports_fidelity, default_alpha) of a network or exported graph."""
    from iqpir import export

    if isinstance(model, export.ExportedGraph):
        return model.supports_quality, model.supports_fidelity, model.default_alpha
    embedding = getattr(model, "quality_embedding", None)
    supports_quality = embedding is None or embedding.kind != "none"
    supports_fidelity = getattr(model, "cft", None) is not None
    quantizer = getattr(model, "quantizer", None)
    default_alpha = quantizer.alpha if quantizer is not None and quantizer.hq is not None else None
    return supports_quality, supports_fidelity, default_alpha
