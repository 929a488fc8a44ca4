"""How a described model runs: one Engine protocol, and `make_engine` choosing among engines.

An *engine* maps a batch of tiles to restored tiles; the layer above (restorer.py) never knows
which one runs (ultralytics' AutoBackend is the pattern):

    engine(tiles (N, 3, h, w) float in [0, 1], quality float | None, alpha float | None,
           fidelity float) -> (N, 3, h * scale, w * scale) float32 on the CPU, clamped to [0, 1]

- TorchEngine "float32": the network exactly as written (bit-identical to calling the model);
  "float16": autocast (CUDA).
- MixedEngine "bfloat16" (and "auto" where the hardware has native bf16 arithmetic: AVX512-BF16
  or AMX on x86 CPUs, any CUDA GPU that supports it, for networks whose parts it knows): the
  convolutional encoder, decoder and CFT blocks (~97% of the FLOPs at 512x512, paper preset)
  run in bf16 with channels-last activations and bf16 weights; the quality embedding, the code
  Transformer, the codebook lookup and AdaIN stay in float32, so the predicted codes only move
  where the encoder's bf16 rounding moves the Transformer's argmax. Residual adds and SiLUs are
  done in place (less memory traffic around the convolutions, which is what limits them at 512
  and 256 px).
- MixedEngine "float32" ("auto" on CPUs without native bf16 but with AVX2 and FMA): the same
  structure (channels-last, sub-pixel upsampling, in-place blocks) in float32: the same function
  as the network up to rounding, faster where oneDNN's float32 kernels are what runs
  (docs/performance.md, "AVX2-only CPUs").
- OnnxRuntimeEngine / OpenVinoEngine: a graph written by `iqpir export` (engine "onnxruntime"
  or "openvino"; extras onnx, openvino), opened by iqpir.inference.files.open_runtime.

"auto" on a CPU without native bf16 is float32 (emulated bf16 is slower than float32 there): the
float32 fast path where the CPU has AVX2 and FMA, else the exact network. `make_engine` records
why on the engine (`auto_reason`), for the line `iqpir restore` prints.
int8: OpenVinoEngine on a graph that iqpir.quantize calibrated (`graph_engine` runs it; making
one from a checkpoint, the cache, and `auto`'s use of it are iqpir.inference.loader's choice,
through iqpir.quantize, above this layer).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iqpir import devices
from iqpir.devices import cpu_has_native_bf16, keep_freed_memory, native_bf16
from iqpir.inference.files import GRAPH_FORMATS, DescribedModel, ExportedGraph, as_described, open_runtime
from iqpir.models.vqgan import ResBlock, Upsample

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# int8: a graph calibrated by iqpir.quantize, run by OpenVINO (never a torch network).
DTYPE_CHOICES = ("auto", *DTYPES, "int8")
ENGINES = ("auto", "torch", "onnxruntime", "openvino")


class Engine(Protocol):
    """What every engine offers (see the module docstring)."""

    name: str
    dtype: str
    model: nn.Module | None  # the network it runs (None for a graph)

    def describe(self) -> str: ...

    def check(self, fidelity: float) -> None:
        """Raise ValueError for settings this engine cannot run, before any work is done."""

    def outputs(self, tiles: Tensor, quality: float | None = None, alpha: float | None = None,
                fidelity: float = 0.0) -> dict[str, Tensor]:
        """{"restored": unclamped float32, and the code indices where the model has them}, on the CPU."""

    def __call__(self, tiles: Tensor, quality: float | None = None, alpha: float | None = None,
                 fidelity: float = 0.0) -> Tensor: ...


def resolve_dtype(dtype: str, device: torch.device, model: Any = None) -> str:
    """"auto" -> "bfloat16" where the device has native bf16 and the mixed path knows the
    model's parts (its description says bf16), else "float32"; other names are checked."""
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {dtype!r}")
    if dtype == "int8" and not (model is not None and as_described(model).format in GRAPH_FORMATS):
        raise ValueError("--dtype int8 runs a calibrated OpenVINO graph, not a torch network: iqpir.load(path, "
                         "dtype='int8') (or `iqpir restore --dtype int8`) makes one from the checkpoint")
    if dtype != "auto":
        return dtype
    d = as_described(model) if model is not None else None
    return "bfloat16" if native_bf16(device) and d is not None and (d.bf16 or d.low_precision) else "float32"


# --------------------------------------------------------------------------------------
# Torch engines
# --------------------------------------------------------------------------------------


def _call_iqpir(net: nn.Module, x: Tensor, q: Tensor | None, alpha: float | None, fidelity: float) -> dict:
    """model(x, quality, alpha=..., [fidelity=...]) -> .restored and the code indices (iqpir.models.Restorer)."""
    kwargs = {"fidelity": fidelity} if fidelity else {}
    out = net(x, q, alpha=alpha, **kwargs)
    result = {"restored": out.restored}
    for name in ("indices_common", "indices_hq"):
        if getattr(out, name, None) is not None:
            result[name] = getattr(out, name)
    return result


def _call_image(net: nn.Module, x: Tensor, q: Tensor | None, alpha: float | None, fidelity: float) -> dict:
    """model(x) or, with a quality, model(x, quality) -> the restored tensor (plug-in networks, upscalers)."""
    return {"restored": net(x) if q is None else net(x, q)}


# How torch networks are called, by DescribedModel.call.
CALLS: dict[str, Callable[..., dict]] = {"iqpir": _call_iqpir, "image": _call_image}


class TorchEngine:
    """The network itself: float32 exactly, or float16 under autocast.

    `call` names how the network is called (CALLS; "iqpir": model(lq, quality (N,) | None,
    alpha=..., [fidelity=...]) returning an object with `.restored`, see iqpir.models.Restorer).
    """

    name = "torch"
    auto_reason: str | None = None  # why `make_engine` chose this engine for dtype "auto"

    def __init__(self, model: nn.Module, device: torch.device, dtype: str = "float32", *,
                 own: bool = False, call: str = "iqpir") -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.dtype = dtype
        self.call = CALLS[call]
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
        with self._context():
            out = self.call(self._network(), tiles.to(self.device), q, alpha, fidelity)
        return {name: t.float().cpu() if name == "restored" else t.cpu() for name, t in out.items()}

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
    one as they are replaced (the caller owns it: `iqpir.load`).

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
    """The fast path (module docstring): bf16 convolutions, float32 codes; with dtype "float32"
    the same restructured network in float32 (equal to the exact one up to rounding).

    By default the float32 model stays what it is (`self.model`) and the engine runs a twin
    whose encoder, decoder and CFT blocks are low-precision copies. With `own=True` (the caller
    hands the model over: `iqpir.load`) those parts are converted in place instead, so the
    float32 weights of the convolutional parts are not kept beside their bf16 copies, and
    `self.model` is the converted network.
    """

    def __init__(self, model: nn.Module, device: torch.device, dtype: str = "bfloat16", *,
                 own: bool = False, call: str = "iqpir") -> None:
        super().__init__(model, device, "float32", call=call)
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
        if self.dtype == "float32":
            return "torch float32 convolutions (channels-last, sub-pixel upsampling)"
        return f"torch {self.dtype} convolutions (channels-last), float32 codes"

    def _context(self):
        # No autocast: the low-precision parts hold bf16 weights; everything else (the quality
        # embedding, the Transformer, the lookup, AdaIN) must stay float32.
        return nullcontext()

    def _network(self) -> nn.Module:
        return self.fast


# --------------------------------------------------------------------------------------
# Graph engines (exported by iqpir.export)
# --------------------------------------------------------------------------------------


class _GraphEngine:
    """Common part of the ONNX Runtime and OpenVINO engines (the Engine protocol above)."""

    model = None

    def __init__(self, graph: ExportedGraph, dtype: str) -> None:
        self.graph = graph
        self.dtype = dtype

    def check(self, fidelity: float) -> None:
        """Refuse settings the graph cannot run (before any work is done)."""
        if fidelity and "fidelity" not in self.graph.inputs:
            raise ValueError(f"{self.graph.path} was exported without the CFT blocks: "
                             "re-export it with --fidelity to restore with --fidelity > 0")

    def _feeds(self, tiles: Tensor, quality: float | None, alpha: float | None, fidelity: float) -> dict:
        self.check(fidelity)
        n = tiles.shape[0]
        feeds = {"image": tiles.float().cpu().contiguous().numpy()}
        if "quality" in self.graph.inputs:
            feeds["quality"] = torch.full((n,), 1.0 if quality is None else float(quality)).numpy()
        if "alpha" in self.graph.inputs:
            a = self.graph.default_alpha if alpha is None else alpha
            feeds["alpha"] = torch.tensor(float(a)).numpy()
        if "fidelity" in self.graph.inputs:
            feeds["fidelity"] = torch.tensor(float(fidelity)).numpy()
        return feeds

    def __call__(self, tiles: Tensor, quality: float | None = None, alpha: float | None = None,
                 fidelity: float = 0.0) -> Tensor:
        return self.outputs(tiles, quality, alpha, fidelity)["restored"].clamp(0, 1)


class OnnxRuntimeEngine(_GraphEngine):
    name = "onnxruntime"

    def __init__(self, graph: ExportedGraph, dtype: str = "float32", threads: int | None = None) -> None:
        super().__init__(graph, dtype)
        self.session = open_runtime(graph, "onnxruntime", {"intra_op_num_threads": threads or torch.get_num_threads()})

    def describe(self) -> str:
        return "onnxruntime float32"

    def outputs(self, tiles, quality=None, alpha=None, fidelity=0.0) -> dict[str, Tensor]:
        values = self.session.run(None, self._feeds(tiles, quality, alpha, fidelity))
        return {name: torch.from_numpy(v) for name, v in zip(self.graph.outputs, values)}


class OpenVinoEngine(_GraphEngine):
    name = "openvino"

    def __init__(self, graph: ExportedGraph, dtype: str = "float32", threads: int | None = None) -> None:
        super().__init__(graph, dtype)
        self.compiled = open_runtime(graph, "openvino", openvino_config(dtype, threads))

    def describe(self) -> str:
        if self.dtype == "int8":
            rest = "bf16" if openvino_config("int8")["INFERENCE_PRECISION_HINT"] == "bf16" else "float32"
            return f"openvino int8 convolutions ({rest} elsewhere)"
        return f"openvino {self.dtype}"

    def outputs(self, tiles, quality=None, alpha=None, fidelity=0.0) -> dict[str, Tensor]:
        result = self.compiled(self._feeds(tiles, quality, alpha, fidelity))
        return {name: torch.from_numpy(result[self.compiled.output(i)].copy())
                for i, name in enumerate(self.graph.outputs)}


def openvino_config(dtype: str, threads: int | None = None) -> dict:
    """OpenVINO CPU settings for a graph run in `dtype` ("float32", "bfloat16" or "int8").

    OpenVINO runs in bf16 by default on CPUs with native bf16: the hint asks for what was chosen.
    An int8 graph (iqpir.quantize) runs its convolutions in int8 and the operations left in
    floating point in bf16 where the CPU has it natively (as the torch fast path runs its
    convolutions), f32 elsewhere.
    """
    low = dtype == "bfloat16" or (dtype == "int8" and cpu_has_native_bf16())
    return {"INFERENCE_PRECISION_HINT": "bf16" if low else "f32",
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}


def graph_engine(graph: ExportedGraph, device: torch.device, dtype: str = "auto", engine: str = "auto"):
    """The engine for an exported graph: ONNX Runtime for .onnx, OpenVINO for .xml (or an .onnx
    with engine "openvino"). dtype "auto" is float32 on ONNX Runtime, bf16 on OpenVINO where
    the CPU has native bf16."""
    if device.type != "cpu":
        raise ValueError(f"exported graphs run on the CPU here, not {device}; use --engine torch on {device.type}")
    if engine == "auto":
        engine = "onnxruntime" if graph.format == "onnx" else "openvino"
    if engine == "torch":
        raise ValueError(f"{graph.path} is an exported graph: restore it with --engine onnxruntime or openvino")
    if graph.int8:
        if engine == "onnxruntime" or graph.format != "openvino":
            raise ValueError(f"{graph.path} is an int8 graph: OpenVINO runs it (--engine openvino)")
        if dtype not in ("auto", "int8"):
            raise ValueError(f"{graph.path} is an int8 graph: restore it with --dtype int8 (or auto), not {dtype}")
        return OpenVinoEngine(graph, "int8")
    if dtype == "int8":
        raise ValueError(f"{graph.path} is a float32 graph: make an int8 one with `iqpir export CHECKPOINT "
                         "--format openvino --int8`, or restore the checkpoint itself with --dtype int8")
    if engine == "onnxruntime":
        if graph.format != "onnx":
            raise ValueError(f"{graph.path}: ONNX Runtime reads .onnx files; use --engine openvino for .xml")
        if dtype not in ("auto", "float32"):
            raise ValueError(f"--engine onnxruntime runs float32 only, got --dtype {dtype}")
        return OnnxRuntimeEngine(graph, "float32")
    if dtype == "auto":
        dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--engine openvino runs float32 or bfloat16 graphs, got --dtype {dtype}")
    return OpenVinoEngine(graph, dtype)


# --------------------------------------------------------------------------------------
# The choice
# --------------------------------------------------------------------------------------


def make_engine(model: DescribedModel | nn.Module | ExportedGraph, device: torch.device, dtype: str = "auto",
                engine: str = "auto", *, own: bool = False) -> Engine:
    """The engine for a described model (or a bare network or exported graph) on `device`: the
    table of engines (torch exact, the fast path, ONNX Runtime, OpenVINO) and the one choice among
    them; engine: "auto" (from the description) or one of ENGINES.

    own: the caller hands the network over (nobody else uses it), so the fast path may convert
    it in place rather than keep a float32 copy beside the bf16 one (MixedEngine).

    A torch engine on the CPU also calls `keep_freed_memory()`, as the CLI does: the process
    then keeps its peak heap (the restorer reaches it on every image anyway) instead of paying
    for page faults on every forward pass. Set IQPIR_DEFAULT_MALLOC=1 to leave malloc alone.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    described = as_described(model)
    if described.format in GRAPH_FORMATS:
        return graph_engine(described.model, device, dtype, engine)
    if engine not in ("auto", "torch"):
        raise ValueError(f"--engine {engine} runs a graph written by `iqpir export`; "
                         f"export the checkpoint first (iqpir export CHECKPOINT --format ...)")
    requested, dtype = dtype, resolve_dtype(dtype, device, described)
    if dtype != "float32" and described.low_precision is False:
        warnings.warn(f"--dtype {dtype} breaks this {described.kind} model (its architecture does not support it): "
                      "it runs float32", UserWarning, stacklevel=2)
        dtype = "float32"
    if device.type == "cpu":
        # What the CLI does for every command: large activations stop being re-faulted from the
        # kernel on every forward pass. Process-wide (glibc only); IQPIR_DEFAULT_MALLOC=1 opts out.
        keep_freed_memory()
    if dtype == "bfloat16" and described.bf16:
        chosen = MixedEngine(described.model, device, dtype, own=own, call=described.call)
    elif requested == "auto" and dtype == "float32" and described.bf16 and fast_float32(device):
        chosen = MixedEngine(described.model, device, "float32", own=own, call=described.call)
    else:
        chosen = TorchEngine(described.model, device, dtype, own=own, call=described.call)
    if requested == "auto":
        chosen.auto_reason = auto_reason(device, described, chosen)
    return chosen


def fast_float32(device: torch.device) -> bool:
    """Whether "auto" runs the float32 fast path rather than the exact network: on CPUs with AVX2
    and FMA, where it measured faster (paper network, one face: 0.83x the exact network's time
    with oneDNN and ATen limited to AVX2, 0.84x with AVX-512; docs/performance.md); not on older
    CPUs (not measured) nor on GPUs (bf16 there, or the exact network)."""
    return device.type == "cpu" and devices.cpu_has_avx2_fma()


def auto_reason(device: torch.device, described: DescribedModel, engine: Engine) -> str:
    """Why "auto" chose `engine`, in a few words: the hardware fact the choice rests on."""
    if device.type != "cpu":
        return f"{'native' if native_bf16(device) else 'no native'} bf16 on {device}"
    flags = devices.cpu_flags()
    if cpu_has_native_bf16():
        found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
        why = "this CPU computes in bf16 natively"
    else:
        found = ([f for f in ("avx512f", "avx2", "fma", "f16c") if f in flags]
                 or [f for f in ("avx", "sse4_2") if f in flags])
        why = "this CPU has no native bf16"
    why += f" ({' '.join(found) or str(torch.backends.cpu.get_cpu_capability()).lower()})"
    if not described.bf16:
        why += f"; the faster path is built for IQPIR and CodeFormer networks, so this {described.kind} model runs as trained"
    elif type(engine) is TorchEngine and engine.dtype == "float32":
        why += "; without AVX2 and FMA the faster path is slower here, so the network runs as trained"
    return why
