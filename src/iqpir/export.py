"""Export a restorer to ONNX or OpenVINO IR (the engines that run them: iqpir.inference.engines).

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
The file carries what `iqpir.load` needs (size, kind, task, provenance, which inputs
exist) as JSON: ONNX metadata `iqpir`, OpenVINO runtime info `iqpir`, read back by
iqpir.inference.files (the only inference module this one imports: it sits beside the
restorer, not above it).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from iqpir.inference.files import (
    METADATA_KEY,
    DescribedModel,
    ExportedGraph,
    describe,
    exports,
    openvino_from_onnx,
    require_extra,
)
from iqpir.models.restorer import adaptive_instance_norm

FORMATS = ("onnx", "openvino")
OPSET = 18


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


class ImageGraph(nn.Module):
    """A network called as model(image, quality) (iqpir.plugin's conditioned U-Nets, the packaged
    default model) as a graph: any batch, height and width (multiples of the model's)."""

    def __init__(self, model: nn.Module, multiple: int) -> None:
        super().__init__()
        self.model = model
        self.multiple = multiple

    def input_names(self) -> list[str]:
        return ["image", "quality"]

    def output_names(self) -> list[str]:
        return ["restored"]

    def dynamic_axes(self) -> dict:
        return {"image": {0: "batch", 2: "height", 3: "width"}, "quality": {0: "batch"},
                "restored": {0: "batch", 2: "height", 3: "width"}}

    def example_inputs(self, batch: int = 1) -> tuple[Tensor, ...]:
        s = 4 * self.multiple
        return torch.rand(batch, 3, s, s + self.multiple), torch.full((batch,), 0.9)

    def forward(self, image: Tensor, quality: Tensor) -> tuple[Tensor]:
        return (self.model(image, quality),)


def export(checkpoint: str | Path | DescribedModel | None, fmt: str, out: str | Path,
           fidelity: bool = False) -> ExportedGraph:
    """Write `checkpoint` (anything `iqpir.load` reads, or a model iqpir.inference.files described
    already) as an ONNX (.onnx) or OpenVINO IR (.xml + .bin) graph at `out`, float32; returns what
    was written."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    out = Path(out)
    want = ".onnx" if fmt == "onnx" else ".xml"
    if out.suffix.lower() != want:
        raise ValueError(f"--out {out}: a {fmt} graph is written to a {want} file")
    if fmt == "openvino":
        require_extra("openvino", "openvino")
    require_extra("onnx", "onnx")
    described = checkpoint if isinstance(checkpoint, DescribedModel) else describe(checkpoint)
    how = exports(described)
    if how == "image":
        if fidelity:
            raise ValueError(described.refusal("fidelity"))
        graph = ImageGraph(described.model, described.size_multiple).eval()
    elif how == "iqpir":
        graph = InferenceGraph(described.model, fidelity=fidelity).eval()
    else:  # an exported graph, or another kind of network
        raise ValueError(f"{checkpoint}: only iqpir checkpoints, quality-conditioned U-Nets and official .pth "
                         f"files export, not a {described.format} {described.kind} model")
    info = ExportedGraph(path=out, format=fmt, image_size=described.image_size, kind=described.kind,
                         task=described.task, inputs=graph.input_names(), outputs=graph.output_names(),
                         default_alpha=described.alpha, has_cft=described.fidelity,
                         default_fidelity=described.default_fidelity if fidelity else 0.0, adain=described.adain,
                         source=described.source, size_multiple=described.size_multiple, refusals=described.refusals,
                         trained={k: v for k, v in described.trained.items() if k != "fidelity" or fidelity})
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        _export_onnx(graph, out, info.metadata())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "graph.onnx"
            _export_onnx(graph, onnx_path, info.metadata())
            _onnx_to_openvino(onnx_path, out, info.metadata())
    return info


def _export_onnx(graph: InferenceGraph | ImageGraph, out: Path, metadata: dict) -> None:
    """Trace `graph` to ONNX with a dynamic batch axis; the metadata goes into the file.

    PyTorch's TorchScript-based exporter is used where it exists: measured here (2 cores) it
    exports the tiny preset in ~3 s where the torch.export-based one (the default of
    torch.onnx.export since 2.9, which also needs onnxscript) takes ~40 s; the graphs agree.
    """
    import onnx

    example = graph.example_inputs(batch=2)
    names, outputs = graph.input_names(), graph.output_names()
    axes = (graph.dynamic_axes() if isinstance(graph, ImageGraph) else
            {name: {0: "batch"} for name in names + outputs if name not in ("alpha", "fidelity")})
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
            require_extra("onnxscript", "onnx")
            batch = torch.export.Dim("batch", min=1, max=1024)
            # forward(image, *args): the shapes' structure is (image, (the other inputs)).
            dynamic = ({0: batch}, tuple({0: batch} if n == "quality" else {} for n in names[1:]))
            program = torch.onnx.export(graph, example, dynamo=True, input_names=names, output_names=outputs,
                                        dynamic_shapes=dynamic, opset_version=OPSET, external_data=False)
            proto = program.model_proto
    return proto


def _onnx_to_openvino(onnx_path: Path, out: Path, metadata: dict) -> None:
    import openvino as ov

    model = openvino_from_onnx(onnx_path)
    model.set_rt_info(json.dumps(metadata), [METADATA_KEY])
    # compress_to_fp16 would store the weights in half precision: the graph must stay float32.
    ov.save_model(model, str(out), compress_to_fp16=False)
