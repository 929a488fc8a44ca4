"""Export a restorer to ONNX or OpenVINO IR, and run the exported graphs.

    iqpir export CHECKPOINT --format onnx --out model.onnx            # extra `onnx`
    iqpir export CHECKPOINT --format openvino --out model.xml         # extra `openvino` (+ model.bin)
    iqpir restore photo.png --checkpoint model.onnx --out restored/   # ONNX Runtime
    iqpir restore photo.png --checkpoint model.xml --out restored/    # OpenVINO

The graph is the restorer's inference at its image size s, batch dynamic:

    inputs   image (N, 3, s, s) float32 in [0, 1]
             quality (N,) float32 in [0, 1]          IQPIR models (a quality condition)
             alpha () float32                        dual-codebook models (HQ+ fusion weight)
             fidelity () float32                     exported with --fidelity (CFT blocks)
    outputs  restored (N, 3, s, s) float32, unclamped
             indices_common (N, h, w) int64, indices_hq (N, h, w) int64 (dual codebook)

CodeFormer's CFT blocks cost about a third more FLOPs at 512x512 and do nothing at w = 0, so
a graph has them only when exported with `fidelity=True`; without them it restores at w = 0.
The file carries what `load_restorer` needs (size, kind, task, provenance, which inputs
exist) as JSON: ONNX metadata `iqpir`, OpenVINO runtime info `iqpir`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from iqpir.models.restorer import adaptive_instance_norm

FORMATS = ("onnx", "openvino")
GRAPH_SUFFIXES = {".onnx": "onnx", ".xml": "openvino"}
METADATA_KEY = "iqpir"
OPSET = 18


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is not installed: pip install 'iqpir[{extra}]'") from None


class InferenceGraph(nn.Module):
    """A restorer's inference as one traceable function of tensors (see the module docstring).

    It computes what `Restorer.forward(image, quality, alpha=alpha, fidelity=w)` computes, with
    the input checks left to the caller (they need host synchronisation, which a graph cannot
    hold): encoder, quality embedding, Transformer, argmax codes, codebook lookup, AdaIN when
    the model has it, and the decoder with the CFT blocks when `fidelity` is True.
    """

    def __init__(self, model: nn.Module, fidelity: bool = False) -> None:
        super().__init__()
        if fidelity and getattr(model, "cft", None) is None:
            raise ValueError("this model has no CFT blocks: export it without --fidelity")
        self.model = model
        self.fidelity = fidelity
        self.quality = model.quality_embedding.kind != "none"
        self.dual = model.quantizer.hq is not None

    def input_names(self) -> list[str]:
        return ["image"] + ["quality"] * self.quality + ["alpha"] * self.dual + ["fidelity"] * self.fidelity

    def output_names(self) -> list[str]:
        return ["restored", "indices_common"] + ["indices_hq"] * self.dual

    def example_inputs(self, batch: int = 1) -> tuple[Tensor, ...]:
        s = self.model.cfg.image_size
        args = [torch.rand(batch, 3, s, s)]
        if self.quality:
            args.append(torch.full((batch,), 0.9))
        if self.dual:
            args.append(torch.tensor(self.model.quantizer.alpha))
        if self.fidelity:
            args.append(torch.tensor(0.5))
        return tuple(args)

    def forward(self, image: Tensor, *args: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        rest = list(args)
        quality = rest.pop(0) if self.quality else None
        alpha = rest.pop(0) if self.dual else None
        fidelity = rest.pop(0) if self.fidelity else None
        features: dict[int, Tensor] | None = {} if self.fidelity else None
        z = m.encoder(image, features)
        emb = m.quality_embedding
        if emb.kind == "binned":
            z = z + emb.maps[emb.bin_index(quality)]
        elif emb.kind == "continuous":
            z = z + torch.einsum("bk,kchw->bchw", emb.mlp(emb.fourier(quality)), emb.maps)
        logits_common, logits_hq = m.transformer(z)
        size = z.shape[-2:]
        idx_common = logits_common.argmax(-1).reshape(-1, *size)
        idx_hq = None if logits_hq is None else logits_hq.argmax(-1).reshape(-1, *size)
        z_f = m.quantizer.lookup(idx_common, idx_hq, alpha=alpha)
        if m.cfg.adain:
            z_f = adaptive_instance_norm(z_f, z)
        fuse = None
        if features is not None:
            def fuse(res: int, h: Tensor) -> Tensor:
                return m.cft(res, features[res], h, fidelity)

        restored = m.decoder(z_f, fuse)
        return (restored, idx_common) + ((idx_hq,) if idx_hq is not None else ())


@dataclass
class ExportedGraph:
    """An exported file and what it computes (its `iqpir` metadata)."""

    path: Path
    format: str
    image_size: int
    kind: str
    task: str
    inputs: list[str]
    outputs: list[str]
    default_alpha: float | None
    has_cft: bool = False
    source: dict | None = None

    @property
    def supports_quality(self) -> bool:
        return "quality" in self.inputs

    @property
    def supports_fidelity(self) -> bool:
        """The network has CFT blocks (the graph holds them only when exported with --fidelity)."""
        return self.has_cft

    def metadata(self) -> dict:
        return {"image_size": self.image_size, "kind": self.kind, "task": self.task, "inputs": self.inputs,
                "outputs": self.outputs, "default_alpha": self.default_alpha, "has_cft": self.has_cft,
                "source": self.source}


def is_graph_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in GRAPH_SUFFIXES and Path(path).is_file()


def export(checkpoint: str | Path, fmt: str, out: str | Path, fidelity: bool = False) -> ExportedGraph:
    """Write `checkpoint` (anything `load_restorer` reads) as an ONNX (.onnx) or OpenVINO IR
    (.xml + .bin) graph at `out`, float32; returns what was written."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    out = Path(out)
    want = ".onnx" if fmt == "onnx" else ".xml"
    if out.suffix.lower() != want:
        raise ValueError(f"--out {out}: a {fmt} graph is written to a {want} file")
    if fmt == "openvino":
        _require("openvino", "openvino")
    _require("onnx", "onnx")
    from iqpir.restore import load_restorer

    restorer = load_restorer(checkpoint, device="cpu", dtype="float32")
    graph = InferenceGraph(restorer.model, fidelity=fidelity).eval()
    info = ExportedGraph(path=out, format=fmt, image_size=restorer.image_size, kind=restorer.kind,
                         task=restorer.task, inputs=graph.input_names(), outputs=graph.output_names(),
                         default_alpha=restorer.default_alpha, has_cft=restorer.supports_fidelity,
                         source=restorer.source)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        _export_onnx(graph, out, info.metadata())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "graph.onnx"
            _export_onnx(graph, onnx_path, info.metadata())
            _onnx_to_openvino(onnx_path, out, info.metadata())
    return info


def _export_onnx(graph: InferenceGraph, out: Path, metadata: dict) -> None:
    """Trace `graph` to ONNX with a dynamic batch axis; the metadata goes into the file.

    PyTorch's TorchScript-based exporter is used where it exists: measured here (2 cores) it
    exports the tiny preset in ~3 s where the torch.export-based one (the default of
    torch.onnx.export since 2.9, which also needs onnxscript) takes ~40 s; the graphs agree.
    """
    import onnx

    example = graph.example_inputs(batch=2)
    names, outputs = graph.input_names(), graph.output_names()
    axes = {name: {0: "batch"} for name in names + outputs if name not in ("alpha", "fidelity")}
    tmp = out.with_name(out.name + ".part")
    try:
        proto = _trace_onnx(graph, example, names, outputs, axes, tmp)
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
        onnx.save_model(proto, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _trace_onnx(graph: InferenceGraph, example: tuple, names: list[str], outputs: list[str], axes: dict,
                tmp: Path):
    import warnings

    import onnx

    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        try:
            torch.onnx.export(graph, example, str(tmp), dynamo=False, input_names=names, output_names=outputs,
                              dynamic_axes=axes, opset_version=OPSET)
            proto = onnx.load_model(str(tmp))
        except (TypeError, RuntimeError, NotImplementedError, AttributeError):  # a torch without it
            _require("onnxscript", "onnx")
            batch = torch.export.Dim("batch", min=1, max=1024)
            # forward(image, *args): the shapes' structure is (image, (the other inputs)).
            dynamic = ({0: batch}, tuple({0: batch} if n == "quality" else {} for n in names[1:]))
            program = torch.onnx.export(graph, example, dynamo=True, input_names=names, output_names=outputs,
                                        dynamic_shapes=dynamic, opset_version=OPSET, external_data=False)
            proto = program.model_proto
    return proto


def _onnx_to_openvino(onnx_path: Path, out: Path, metadata: dict) -> None:
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    model.set_rt_info(json.dumps(metadata), [METADATA_KEY])
    # compress_to_fp16 would store the weights in half precision: the graph must stay float32.
    ov.save_model(model, str(out), compress_to_fp16=False)


def read_graph(path: str | Path) -> ExportedGraph:
    """The metadata of an exported .onnx or .xml file (ValueError when it has none)."""
    path = Path(path)
    fmt = GRAPH_SUFFIXES.get(path.suffix.lower())
    if fmt == "onnx":
        onnx = _require("onnx", "onnx")
        proto = onnx.load_model(str(path), load_external_data=False)
        raw = {p.key: p.value for p in proto.metadata_props}.get(METADATA_KEY)
    elif fmt == "openvino":
        ov = _require("openvino", "openvino")
        model = ov.Core().read_model(str(path))
        raw = model.get_rt_info([METADATA_KEY]).astype(str) if model.has_rt_info([METADATA_KEY]) else None
    else:
        raise ValueError(f"{path}: not an exported graph (.onnx or .xml)")
    if raw is None:
        raise ValueError(f"{path}: no iqpir metadata; export graphs with `iqpir export`")
    meta = json.loads(raw)
    return ExportedGraph(path=path, format=fmt, image_size=int(meta["image_size"]), kind=meta["kind"],
                         task=meta["task"], inputs=list(meta["inputs"]), outputs=list(meta["outputs"]),
                         default_alpha=meta.get("default_alpha"), has_cft=bool(meta.get("has_cft")),
                         source=meta.get("source"))


# --------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------


class _GraphEngine:
    """Common part of the ONNX Runtime and OpenVINO engines (see iqpir.runtime for the protocol)."""

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
        ort = _require("onnxruntime", "onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(graph.path), options, providers=["CPUExecutionProvider"])

    def describe(self) -> str:
        return "onnxruntime float32"

    def outputs(self, tiles, quality=None, alpha=None, fidelity=0.0) -> dict[str, Tensor]:
        values = self.session.run(None, self._feeds(tiles, quality, alpha, fidelity))
        return {name: torch.from_numpy(v) for name, v in zip(self.graph.outputs, values)}


class OpenVinoEngine(_GraphEngine):
    name = "openvino"

    def __init__(self, graph: ExportedGraph, dtype: str = "float32", threads: int | None = None) -> None:
        super().__init__(graph, dtype)
        ov = _require("openvino", "openvino")
        config = {
            # OpenVINO runs in bf16 by default on CPUs with native bf16: ask for what was chosen.
            "INFERENCE_PRECISION_HINT": "bf16" if dtype == "bfloat16" else "f32",
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",
        }
        self.compiled = ov.Core().compile_model(str(graph.path), "CPU", config)

    def describe(self) -> str:
        return f"openvino {self.dtype}"

    def outputs(self, tiles, quality=None, alpha=None, fidelity=0.0) -> dict[str, Tensor]:
        result = self.compiled(self._feeds(tiles, quality, alpha, fidelity))
        return {name: torch.from_numpy(result[self.compiled.output(i)].copy())
                for i, name in enumerate(self.graph.outputs)}


def graph_engine(graph: ExportedGraph, device: torch.device, dtype: str = "auto", backend: str = "auto"):
    """The engine for an exported graph: ONNX Runtime for .onnx, OpenVINO for .xml (or an .onnx
    with backend "openvino"). dtype "auto" is float32 on ONNX Runtime, bf16 on OpenVINO where
    the CPU has native bf16."""
    from iqpir import runtime

    if device.type != "cpu":
        raise ValueError(f"exported graphs run on the CPU here, not {device}; use --backend torch on {device.type}")
    if backend == "auto":
        backend = "onnxruntime" if graph.format == "onnx" else "openvino"
    if backend == "torch":
        raise ValueError(f"{graph.path} is an exported graph: restore it with --backend onnxruntime or openvino")
    if backend == "onnxruntime":
        if graph.format != "onnx":
            raise ValueError(f"{graph.path}: ONNX Runtime reads .onnx files; use --backend openvino for .xml")
        if dtype not in ("auto", "float32"):
            raise ValueError(f"--backend onnxruntime runs float32 only, got --dtype {dtype}")
        return OnnxRuntimeEngine(graph, "float32")
    if dtype == "auto":
        dtype = "bfloat16" if runtime.cpu_has_native_bf16() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--backend openvino runs float32 or bfloat16, got --dtype {dtype}")
    return OpenVinoEngine(graph, dtype)
