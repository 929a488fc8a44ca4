"""What a path holds -> a described model: the network (or graph) and what callers need to know.

    described = describe("runs/stage2")     # or a checkpoint file, an `iqpir convert` folder,
                                            # an official IQPIR/CodeFormer .pth, an .onnx/.xml graph,
                                            # any image model spandrel knows (.pth, .safetensors)
    described.model       nn.Module (float32, eval, CPU) or ExportedGraph
    described.quality / .alpha / .fidelity    which knobs exist (alpha: its default, None: no knob)
    described.default_fidelity, .adain    what the model was trained and evaluated with
    described.image_size, .size_multiple, .scale    the sizes it takes and gives

`DETECTORS` is the one table of what `describe` recognises, tried in order; a new kind of file
(the packaged default model, a spandrel upscaler) is one new entry. Nothing here runs a
network or knows about tiles (engines.py, restorer.py) or image files (photos.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from iqpir import official
from iqpir.checkpoint import read_network
from iqpir.models import Restorer as IQPIRNetwork
from iqpir.plugin import conditioned_unet
from iqpir.weights import DEFAULT_WEIGHTS

GRAPH_SUFFIXES = {".onnx": "onnx", ".xml": "openvino"}
DEFAULT_NAME = "default"  # the packaged default model, by name (as is no path at all)
GRAPH_FORMATS = tuple(GRAPH_SUFFIXES.values())
METADATA_KEY = "iqpir"

# Why a model lacks a knob, as the end of "this {kind} model ..." (IQPIR/CodeFormer wording);
# other kinds of model give their own reasons in DescribedModel.refusals.
NO_KNOB = {
    "quality": "has no quality condition: leave --quality out",
    "alpha": "has one codebook: --alpha needs a dual-codebook (IQPIR) model",
    "fidelity": "has no CFT blocks: --fidelity needs CodeFormer-style weights",
}


def openvino_from_onnx(path: str | Path):
    """An ONNX file as an OpenVINO model, through the runtime's own ONNX reader (Core.read_model)
    rather than ov.convert_model: the converter reports usage to Google Analytics from a forked
    process (OpenVINO's telemetry), and on a machine without internet that child hangs on and
    keeps the process from exiting."""
    ov = require_extra("openvino", "openvino")
    return ov.Core().read_model(str(path))


def require_extra(module: str, extra: str):
    """Import an optional dependency, or fail with the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is not installed: pip install 'iqpir[{extra}]'") from None


@dataclass
class DescribedModel:
    """A model ready for an engine, and its capabilities (spandrel's ModelDescriptor is the pattern).

    model: an nn.Module in float32, eval mode, on the CPU (format "torch"), or an ExportedGraph.
    call: how a torch network is called (engines.CALLS): "iqpir" is
        model(x, quality (N,) | None, alpha=..., [fidelity=...]) -> an object with `.restored`;
        "image" is model(x) or model(x, quality) -> the restored tensor.
    image_size: the input size s the network takes (s x s tiles); None: any size whose sides are
        multiples of `size_multiple` (fully convolutional networks).
    scale: output size / input size (1 for restoration, 2 or 4 for upscalers).
    quality, alpha, fidelity: the knobs: a quality condition S, the HQ+ fusion weight (its
        default; None when the model has no second codebook), CodeFormer's fidelity w.
    default_fidelity: the w a restore uses unless told otherwise: the w an iqpir checkpoint's
        CFT blocks were trained at (train.fidelity; the official releases: 0, the IQPIR authors').
    adain: whether the network re-normalises its codebook latent to the input's (model.adain);
        None where it has no codebook latent.
    bf16: the mixed bf16 path knows this network's parts (engines.MixedEngine).
    low_precision: whether bf16 autocast suits the whole network: True = `auto` may choose it
        where the hardware has native bf16; False = it breaks the network, so a requested bf16 or
        float16 runs float32 (spandrel says so per architecture); None = not known (run as asked).
    source: provenance of weights not trained here (file, sha256, licence), else None.
    refusals: knob -> why this model lacks it, where NO_KNOB's wording does not fit.
    trained: knob -> the value the file records the network was trained at (an iqpir run's
        train.fidelity and model.alpha); the knob rule (iqpir.inference.knobs) puts these
        between a flag and the model's default, and says which one a value came from.
    """

    model: Any
    kind: str
    task: str = "general"
    image_size: int | None = None
    size_multiple: int = 1
    scale: int = 1
    quality: bool = False
    alpha: float | None = None
    fidelity: bool = False
    default_fidelity: float = 0.0
    adain: bool | None = None
    bf16: bool = False
    low_precision: bool | None = None
    format: str = "torch"
    call: str = "iqpir"
    source: dict | None = None
    refusals: dict[str, str] = field(default_factory=dict)
    trained: dict[str, float] = field(default_factory=dict)

    def refusal(self, knob: str) -> str:
        """One line: why `knob` cannot be set on this model."""
        return f"this {self.kind} model {self.refusals.get(knob, NO_KNOB[knob])}"


def describe_network(model: nn.Module, image_size: int | None = None, *, kind: str = "iqpir",
                     task: str = "general", source: dict | None = None,
                     default_fidelity: float = 0.0, trained: dict[str, float] | None = None) -> DescribedModel:
    """An IQPIR-family network (iqpir.models.Restorer, or a module with its call and parts) ->
    its description; the knobs are read from the parts it has. trained: the knob values the file
    records the network was trained at (kept for the knobs the network has)."""
    embedding = getattr(model, "quality_embedding", None)
    quantizer = getattr(model, "quantizer", None)
    has_cft = getattr(model, "cft", None) is not None
    cfg = getattr(model, "cfg", None)
    alpha = quantizer.alpha if quantizer is not None and quantizer.hq is not None else None
    kept = {k: float(v) for k, v in (trained or {}).items()
            if (k == "alpha" and alpha is not None) or (k == "fidelity" and has_cft)}
    return DescribedModel(
        model=model, kind=kind, task=task, image_size=image_size, source=source,
        quality=embedding is None or embedding.kind != "none",
        alpha=alpha, fidelity=has_cft, default_fidelity=float(default_fidelity) if has_cft else 0.0,
        adain=bool(cfg.adain) if quantizer is not None and hasattr(cfg, "adain") else None,
        bf16=isinstance(model, IQPIRNetwork), trained=kept,
    )


def exports(described: DescribedModel) -> str | None:
    """How iqpir.export writes this model as a graph: "image" (a quality-conditioned network called
    model(x, quality): the packaged default model's kind), "iqpir" (an IQPIR-family network), or
    None (not exportable: graphs, upscalers, stage-1 autoencoders). int8 graphs are made from these."""
    if described.format != "torch":
        return None
    if described.call == "image" and described.quality:
        return "image"
    return "iqpir" if isinstance(described.model, IQPIRNetwork) else None


def as_described(model: Any, image_size: int | None = None, **network) -> DescribedModel:
    """A DescribedModel as it is; an ExportedGraph or a network (with `describe_network`'s
    keywords) described."""
    if isinstance(model, DescribedModel):
        return model
    if isinstance(model, ExportedGraph):
        return graph_description(model)
    return describe_network(model, image_size, **network)


STAGE1 = "vqgan"


def describe_stage1(model: nn.Module, source: dict | None = None) -> DescribedModel:
    """A stage-1 autoencoder (VQGAN): described for `iqpir model-info`, never restored with
    (`describe` refuses it where a restorer is asked for); it takes no knobs."""
    return DescribedModel(model=model, kind=STAGE1, task=model.cfg.task, image_size=model.cfg.image_size,
                          source=source, call=STAGE1, refusals={k: "is a stage-1 autoencoder: it does not restore"
                                                                for k in NO_KNOB})


def _refuse_stage1(described: DescribedModel, path: str | Path) -> None:
    if described.kind == STAGE1:
        raise ValueError(f"{path} is a stage-1 (VQGAN) checkpoint; restoring needs a stage-2 network "
                         "(an IQPIR or CodeFormer release, or iqpir train configs/*-stage2.yaml)")


# --------------------------------------------------------------------------------------
# Exported graphs (written by iqpir.export)
# --------------------------------------------------------------------------------------


@dataclass
class ExportedGraph:
    """An exported file and what it computes (its `iqpir` metadata)."""

    path: Path
    format: str
    image_size: int | None  # None: any size that is a multiple of size_multiple
    kind: str
    task: str
    inputs: list[str]
    outputs: list[str]
    default_alpha: float | None
    has_cft: bool = False
    default_fidelity: float = 0.0
    adain: bool | None = None
    source: dict | None = None
    size_multiple: int = 1
    refusals: dict[str, str] = field(default_factory=dict)
    # Written by iqpir.quantize: how the int8 graph was calibrated and what it measured against
    # the float32 graph (codes agreement, PSNR, the bars); None for a float32 graph.
    int8: dict | None = None
    # The knob values the exported checkpoint records it was trained at (DescribedModel.trained).
    trained: dict[str, float] = field(default_factory=dict)
    # The file as read by `read_graph` (an openvino.Model, or the ONNX file's bytes), handed to
    # the runtime by `open_runtime` so that the file is read from disk once; None once handed over.
    opened: Any = field(default=None, repr=False, compare=False)

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
                "default_fidelity": self.default_fidelity, "adain": self.adain, "source": self.source,
                "size_multiple": self.size_multiple, "refusals": self.refusals, "int8": self.int8,
                "trained": self.trained}


def is_graph_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in GRAPH_SUFFIXES and Path(path).is_file()


def read_graph(path: str | Path) -> ExportedGraph:
    """The metadata of an exported .onnx or .xml file (ValueError when it has none)."""
    path = Path(path)
    fmt = GRAPH_SUFFIXES.get(path.suffix.lower())
    if fmt == "onnx":
        onnx = require_extra("onnx", "onnx")
        data = path.read_bytes()
        proto = onnx.load_model_from_string(data)
        raw = {p.key: p.value for p in proto.metadata_props}.get(METADATA_KEY)
        opened = data
    elif fmt == "openvino":
        ov = require_extra("openvino", "openvino")
        opened = ov.Core().read_model(str(path))
        raw = opened.get_rt_info([METADATA_KEY]).astype(str) if opened.has_rt_info([METADATA_KEY]) else None
    else:
        raise ValueError(f"{path}: not an exported graph (.onnx or .xml)")
    if raw is None:
        raise ValueError(f"{path}: no iqpir metadata; export graphs with `iqpir export`")
    meta = json.loads(raw)
    size = meta["image_size"]
    return ExportedGraph(path=path, format=fmt, image_size=None if size is None else int(size), kind=meta["kind"],
                         task=meta["task"], inputs=list(meta["inputs"]), outputs=list(meta["outputs"]),
                         default_alpha=meta.get("default_alpha"), has_cft=bool(meta.get("has_cft")),
                         default_fidelity=float(meta.get("default_fidelity") or 0.0), adain=meta.get("adain"),
                         source=meta.get("source"), size_multiple=int(meta.get("size_multiple", 1)),
                         refusals=dict(meta.get("refusals") or {}), int8=meta.get("int8"),
                         trained={k: float(v) for k, v in (meta.get("trained") or {}).items()}, opened=opened)


def open_runtime(graph: ExportedGraph, runtime: str, config: dict):
    """The graph opened by its runtime, from what `read_graph` read (the file is not read again):
    an onnxruntime.InferenceSession (runtime "onnxruntime"; config: intra_op_num_threads) or an
    OpenVINO compiled model on the CPU (runtime "openvino"; config: OpenVINO's CPU properties)."""
    source, graph.opened = graph.opened, None
    if runtime == "onnxruntime":
        ort = require_extra("onnxruntime", "onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = config["intra_op_num_threads"]
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not isinstance(source, bytes):
            source = graph.path.read_bytes()
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return compile_openvino(source if source is not None and not isinstance(source, bytes) else graph.path, config)


def compile_openvino(source: Any, config: dict):
    """An OpenVINO model (an openvino.Model, or the path of a .xml / .onnx file) compiled for the CPU."""
    ov = require_extra("openvino", "openvino")
    return ov.Core().compile_model(source if not isinstance(source, Path) else str(source), "CPU", config)


# --------------------------------------------------------------------------------------
# One describer per kind of file: (path, use_ema) -> DescribedModel
# --------------------------------------------------------------------------------------


def describe_graph(path: str | Path, use_ema: bool = True) -> DescribedModel:
    return graph_description(read_graph(path))


def graph_description(graph: ExportedGraph) -> DescribedModel:
    return DescribedModel(model=graph, kind=graph.kind, task=graph.task, image_size=graph.image_size,
                          size_multiple=graph.size_multiple, quality=graph.supports_quality, alpha=graph.default_alpha,
                          fidelity=graph.supports_fidelity, default_fidelity=graph.default_fidelity,
                          adain=graph.adain, format=graph.format, source=graph.source, refusals=graph.refusals,
                          trained=dict(graph.trained))


def describe_official(path: str | Path, use_ema: bool = True) -> DescribedModel:
    """A PyTorch weights file (.pth, .pt, .ckpt, .bin), read without running code: a released
    IQPIR/CodeFormer network (iqpir.official: key mapping), else any image model spandrel knows."""
    state, group = official.read_state(path)
    try:
        kind = official.detect_kind(state, path)
    except official.OfficialCheckpointError as exc:
        if importlib.util.find_spec("spandrel") is None:
            raise official.OfficialCheckpointError(
                f"{exc}; other image models (Real-ESRGAN, SwinIR, GFPGAN, ...) load with "
                "pip install 'iqpir[upscale]'") from None
        return describe_spandrel(state, path, exc)
    weights = official.OfficialWeights(kind, state, group, Path(path))
    model, cfg = official.build_official(weights)
    weights.state = {}  # the network holds the tensors now (official.load_official does the same)
    source = {"file": str(weights.path), "kind": weights.kind, "licence": official.LICENCE_NOTE}
    if not hasattr(model, "transformer"):
        return describe_stage1(model, source)
    return describe_network(model, cfg.model.image_size, kind=weights.kind, task=cfg.model.task, source=source)


# --------------------------------------------------------------------------------------
# Any other image model: spandrel (extra `upscale`) knows the architectures from the keys
# --------------------------------------------------------------------------------------

SPANDREL_NOTE = ("read through spandrel (MIT; its core architectures only); the model's own licence "
                 "is yours to check")


class SpandrelNetwork(nn.Module):
    """A spandrel ImageModelDescriptor as a module called model(x) -> (N, 3, kH, kW)."""

    def __init__(self, descriptor: Any) -> None:
        super().__init__()
        self.descriptor = descriptor
        self.network = descriptor.model  # registered, so that .to()/.eval() reach its parameters

    def forward(self, x):
        return self.descriptor(x)


def describe_spandrel(state: dict, path: str | Path, why: Exception | None = None) -> DescribedModel:
    """A state dict (already read safely) -> the image model spandrel recognises in it."""
    spandrel = require_extra("spandrel", "upscale")
    try:
        desc = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise official.OfficialCheckpointError(
            f"{path}: not an IQPIR/CodeFormer network nor an architecture spandrel knows"
            + (f" ({why})" if why is not None else "")) from None
    if not isinstance(desc, spandrel.ImageModelDescriptor) or desc.input_channels != 3 or desc.output_channels != 3:
        raise ValueError(f"{path}: a {desc.architecture.name} model ({desc.purpose}, {desc.input_channels} -> "
                         f"{desc.output_channels} channels): iqpir restores RGB images with RGB image models only")
    name = desc.architecture.name
    req = desc.size_requirements
    face = desc.purpose == "FaceSR"
    why_not = "(read through spandrel) has no "
    return DescribedModel(
        model=SpandrelNetwork(desc).eval(), kind=name, task="faces" if face else "general",
        image_size=req.minimum if face else None, size_multiple=max(1, req.multiple_of),  # GFPGAN: 512 aligned faces
        scale=int(desc.scale), quality=False, call="image", low_precision=bool(desc.supports_bfloat16),
        source={"file": str(path), "kind": name, "architecture": name, "purpose": desc.purpose,
                "licence": SPANDREL_NOTE},
        refusals={"quality": why_not + "quality condition: leave --quality out",
                  "alpha": why_not + "codebooks: leave --alpha out",
                  "fidelity": why_not + "CFT blocks: leave --fidelity out"})


def is_spandrel_safetensors(path: str | Path) -> bool:
    """A .safetensors file that is neither an iqpir checkpoint (JSON beside it) nor a plug-in U-Net."""
    p = Path(path)
    return (p.suffix == ".safetensors" and p.is_file() and not p.with_suffix(".json").is_file()
            and _safetensors_meta(p) is None)


def describe_spandrel_file(path: str | Path, use_ema: bool = True) -> DescribedModel:
    from safetensors.torch import load_file

    return describe_spandrel(load_file(str(path)), path)


def is_checkpoint(path: str | Path) -> bool:
    where = Path(path)
    return where.exists() or where.with_suffix(".safetensors").is_file()


def describe_checkpoint(path: str | Path, use_ema: bool = True) -> DescribedModel:
    """An iqpir run folder (its latest checkpoint), checkpoint file or `iqpir convert` folder."""
    model, cfg, meta = read_network(path, weights="auto" if use_ema else "model")
    source = meta.get("source")
    if not hasattr(model, "transformer"):
        return describe_stage1(model, source)
    kind = (source or {}).get("kind") or ("codeformer" if cfg.model.quality_embedding == "none" else "iqpir")
    # The w its CFT blocks learnt at is the w it restores at unless told otherwise (a stage-2
    # run at train.fidelity = 1 restored at w = 0 skips the blocks it trained). A converted
    # release (it has a `source`) records no training here: its values are the model's defaults.
    trained = {} if source else {"fidelity": cfg.train.fidelity, "alpha": cfg.model.alpha}
    return describe_network(model, cfg.model.image_size, kind=kind, task=cfg.model.task, source=source,
                            default_fidelity=cfg.train.fidelity, trained=trained)


# --------------------------------------------------------------------------------------
# Quality-conditioned U-Nets (iqpir.plugin): the packaged default model's format
# --------------------------------------------------------------------------------------

PLUGIN_FORMAT = "iqpir-default"
UNET_REFUSALS = {
    "alpha": "has no codebooks: --alpha needs a dual-codebook (IQPIR) model",
    "fidelity": "has no CFT blocks: --fidelity needs CodeFormer-style weights",
}


def _safetensors_meta(path: str | Path) -> dict | None:
    """The `iqpir` JSON of a .safetensors file's header, or None."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        raw = (fh.metadata() or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None


def is_plugin_weights(path: str | Path) -> bool:
    meta = _safetensors_meta(path)
    return meta is not None and meta.get("format") == PLUGIN_FORMAT


def describe_plugin(path: str | Path, use_ema: bool = True) -> DescribedModel:
    """A quality-conditioned U-Net file (the packaged default model's format): any size, quality only."""
    from safetensors.torch import load_file

    meta = _safetensors_meta(path)
    if meta.get("architecture") != "conditioned_unet":
        raise ValueError(f"{path}: unknown architecture {meta.get('architecture')!r} (iqpir knows conditioned_unet)")
    model = conditioned_unet(**meta["network"])
    model.load_state_dict(load_file(str(path)))
    model.eval()
    kind = "default" if Path(path).resolve() == DEFAULT_WEIGHTS.resolve() else "unet"
    return DescribedModel(model=model, kind=kind, task="general", image_size=None,
                          size_multiple=model.network.multiple, quality=True, call="image",
                          source={"file": str(path), "kind": kind, "card": meta.get("card")},
                          refusals=UNET_REFUSALS)


Detector = tuple[Callable[[str | Path], bool], Callable[[str | Path, bool], DescribedModel]]

# What `describe` recognises: name -> (recognises(path), describe(path, use_ema)), tried in
# order, the first that recognises a path describes it. Each new kind of model file is one new
# entry here: "plugin" reads quality-conditioned U-Nets (the packaged default model, iqpir/weights);
# "official" reads PyTorch weights files: IQPIR/CodeFormer releases, else any image model spandrel
# knows (extra `upscale`: Real-ESRGAN, SwinIR, GFPGAN, ...; call="image", its own scale, no knobs);
# "spandrel" the same models as .safetensors.
DETECTORS: dict[str, Detector] = {
    "graph": (is_graph_file, describe_graph),
    "plugin": (is_plugin_weights, describe_plugin),
    "official": (official.is_official_file, describe_official),  # or spandrel, by the keys
    "spandrel": (is_spandrel_safetensors, describe_spandrel_file),
    "checkpoint": (is_checkpoint, describe_checkpoint),
}


def _read(describe_one: Callable, path: str | Path, use_ema: bool) -> Any:
    """describe_one(path, use_ema), with what a damaged or unreadable file raises in the readers
    (safetensors, protobuf, OpenVINO, JSON metadata, a missing key) turned into one line naming
    the file; our own refusals (ValueError, FileNotFoundError, ImportError) pass as they are."""
    try:
        return describe_one(path, use_ema)
    except PermissionError as exc:
        raise ValueError(f"{path}: permission denied ({exc.filename or path})") from exc
    except (FileNotFoundError, ImportError, TypeError, AttributeError, NameError):
        raise
    except ValueError as exc:
        if str(path) in str(exc) or Path(path).name in str(exc):
            raise
        raise ValueError(f"{path}: cannot read this model file ({_first_line(exc)})") from exc
    except Exception as exc:  # noqa: BLE001 - each reader raises its own kind for a damaged file
        raise ValueError(f"{path}: cannot read this model file: it is cut short or damaged "
                         f"({type(exc).__name__}: {_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    """The line of an exception's text that says what is wrong (OpenVINO's first lines name its
    own source file)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return (said or lines or [type(exc).__name__])[0]


def _refuse_non_finite(described: DescribedModel, path: str | Path) -> None:
    """A torch network with a NaN or infinite weight is refused, naming the tensor: it would
    restore every photo black (or as NaN) and report it done."""
    if not isinstance(described.model, nn.Module):
        return  # a graph: its outputs are checked per file (Restorer)
    for name, tensor in described.model.state_dict().items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            bad = int((~tensor.isfinite()).sum())
            raise ValueError(f"{path}: the weight {name!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}; "
                             "the file is damaged or its training diverged")


def describe(path: str | Path | None = None, use_ema: bool = True, restoring: bool = True) -> DescribedModel:
    """What `path` holds, read once and described (see DETECTORS for what is recognised); None or
    "default": the packaged default model (iqpir/weights).

    use_ema: an iqpir checkpoint's EMA weights when it has them (else its "model" weights).
    restoring: refuse a stage-1 autoencoder (False: describe it too, for `iqpir model-info`).
    """
    if path == DEFAULT_NAME and not Path(path).exists():
        path = None
    if path is None:
        if not DEFAULT_WEIGHTS.is_file():
            raise FileNotFoundError(f"the packaged default model is missing ({DEFAULT_WEIGHTS}): reinstall iqpir, "
                                    "or give --checkpoint")
        path = DEFAULT_WEIGHTS
    for recognises, describe_one in DETECTORS.values():
        if _read(lambda p, _: recognises(p), path, use_ema):
            described = _read(describe_one, path, use_ema)
            if restoring:
                _refuse_stage1(described, path)
            _refuse_non_finite(described, path)
            return described
    raise FileNotFoundError(f"--checkpoint {path}: no such run folder or checkpoint file (released IQPIR/CodeFormer "
                            "weights: see docs/usage.md, 'Use the published weights'; without --checkpoint the "
                            "packaged default model restores)")
