"""`iqpir.load`: a model file (or nothing: the packaged default model) -> a ready Restorer.

    restorer = iqpir.load("runs/stage2")                   # a run folder, checkpoint, release .pth, ...
    restorer = iqpir.load(dtype="int8")                    # the default model's int8 graph
    restorer = iqpir.load("model.onnx")                    # an exported graph, on ONNX Runtime

One way down, each step once: the file is read and described once (files.describe: its
architecture, scale, sizes, the knobs it takes and the values it was trained at, its
provenance); then the engine is chosen from that description and the request (`choose`: an
int8 graph where int8 is asked for, or `auto` finds a sound cached one on a CPU with int8 dot
products; else engines.make_engine's table: the exact torch network, the bf16/float32 fast path,
ONNX Runtime, OpenVINO); then the Restorer is built around it. Every entry point (the CLI's
restore, app, export and model-info, videos, faces, sharded jobs, the Python API) gets its
model here; none opens a checkpoint itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iqpir.inference import files
from iqpir.inference.knobs import record, resolve_knobs
from iqpir.inference.restorer import Restorer

# Former keyword names -> their names now (each kept for one release, with a DeprecationWarning).
RENAMED = {"backend": "engine", "path": "path_or_name", "checkpoint": "path_or_name"}
OPTIONS = ("batch_size", "tile", "use_ema", "fidelity", "log")


def _renamed(given: dict[str, Any], where: str) -> dict[str, Any]:
    """Options with former names mapped to their new names, each with a DeprecationWarning."""
    out = {}
    for name, value in given.items():
        if name in RENAMED:
            warnings.warn(f"{where}({name}=...) is now {RENAMED[name]}=...", DeprecationWarning, stacklevel=3)
            name = RENAMED[name]
        out[name] = value
    return out


def load(path_or_name: str | Path | Restorer | None = None, device: str = "auto", dtype: str = "auto",
         engine: str = "auto", **options: Any) -> Restorer:
    """A ready Restorer for a model file.

    path_or_name: a stage-2 run folder (its latest checkpoint), a checkpoint file, an `iqpir
        convert` folder, a released IQPIR/CodeFormer .pth, a quality-conditioned U-Net
        (.safetensors), a graph from `iqpir export` (.onnx, .xml), any image model spandrel
        knows (.pth, .safetensors; extra `upscale`); None or "default": the packaged default
        model. A Restorer is returned as it is.
    device: "auto" (a GPU when there is one; graphs run on the CPU), "cpu", "cuda", "cuda:N", "mps".
    dtype: "auto", "float32" (the exact network), "bfloat16", "float16" (GPUs) or "int8" (the
        file's OpenVINO int8 graph, made and cached the first time; extra `int8`).
    engine: "auto" (from the file), "torch", "onnxruntime" or "openvino".
    options: batch_size (tiles or faces per forward pass, default 4); tile (for models that take
        any size: tiles of this size, rounded up to the model's multiple; None: whole images);
        use_ema (an iqpir checkpoint's EMA weights, default True); fidelity (the w restores will
        run at, None: the model's: int8 then uses a graph with the CFT blocks when it is > 0);
        log (where the int8 path's lines go; default stderr).
    """
    if isinstance(path_or_name, Restorer):
        return path_or_name
    options = _renamed(options, "iqpir.load")
    engine = options.pop("engine", engine)
    path_or_name = options.pop("path_or_name", path_or_name)
    if path_or_name == files.DEFAULT_NAME and not Path(path_or_name).exists():
        path_or_name = None
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"iqpir.load got unknown option(s) {unknown}; it takes {list(OPTIONS)}")
    described = files.describe(path_or_name, use_ema=options.get("use_ema", True))
    described, dtype, engine = choose(described, path_or_name, device, dtype, engine,
                                      options.get("fidelity"), options.get("log"))
    if device == "auto" and described.format in files.GRAPH_FORMATS:
        device = "cpu"  # graphs run on the CPU here
    tile = options.get("tile")
    if tile is not None and described.image_size is None:
        tile = -(-tile // described.size_multiple) * described.size_multiple
    return Restorer(described, device=device, dtype=dtype, batch_size=options.get("batch_size", 4), engine=engine,
                    own_model=True, tile=tile if described.image_size is None else None)


def choose(described: files.DescribedModel, path: str | Path | None, device: str, dtype: str, engine: str,
           fidelity: float | None = None,
           log: Callable[[str], None] | None = None) -> tuple[files.DescribedModel, str, str]:
    """The int8 part of the engine choice: (what runs, dtype, engine). A torch model asked for
    in int8 becomes its int8 graph (iqpir.quantize.int8_for, given this description so that the
    weights are not read again); anything else is left to engines.make_engine (which refuses int8
    for a model no int8 graph is made of). `auto` never runs an int8 graph: what it runs must not
    depend on what an earlier `--dtype int8` left in the cache (the same command, the same
    pixels), and it never calibrates by itself (minutes, and an extra)."""
    if dtype != "int8" or files.exports(described) is None:
        return described, dtype, engine  # a graph already, or a model no int8 graph is made of
    from iqpir import quantize  # deferred: OpenVINO and NNCF are imported only where int8 is used

    graph = quantize.int8_for(path, engine, fidelity, log=log, described=described)
    if graph is None:
        return described, dtype, engine
    return files.graph_description(graph), "int8", "openvino"


def load_restorer(path: str | Path | None = None, device: str = "auto", dtype: str = "auto", batch_size: int = 4,
                  use_ema: bool = True, backend: str | None = None, tile: int | None = None,
                  **options: Any) -> Restorer:
    """Deprecated: `iqpir.load` (the same arguments; `backend` is now `engine`)."""
    warnings.warn("iqpir.load_restorer is now iqpir.load", DeprecationWarning, stacklevel=2)
    if backend is not None:
        warnings.warn("load_restorer(backend=...) is now iqpir.load(engine=...)", DeprecationWarning, stacklevel=2)
        options["engine"] = backend
    return load(path, device=device, dtype=dtype, batch_size=batch_size, use_ema=use_ema, tile=tile, **options)


def model_info(path_or_name: str | Path | None = None) -> dict:
    """What `iqpir model-info --checkpoint` prints for any file `load` takes (and stage-1
    autoencoders): kind, task, sizes, the knobs with their values and where they come from,
    the network's hyper-parameters (IQPIR-family networks), parameter counts per module, and
    the weights' provenance and licence."""
    described = files.describe(path_or_name, restoring=False)
    shown = files.DEFAULT_WEIGHTS if path_or_name in (None, files.DEFAULT_NAME) else path_or_name
    info = {"checkpoint": str(shown), "kind": described.kind, "task": described.task, "format": described.format,
            "image_size": described.image_size, "size_multiple": described.size_multiple, "scale": described.scale}
    cfg = getattr(described.model, "cfg", None)
    if described.format == "torch" and hasattr(cfg, "codebook_size"):
        info |= _network_info(cfg, stage1=described.kind == files.STAGE1)
    if described.kind != files.STAGE1:
        info["knobs"] = record(resolve_knobs(described))
    if described.format == "torch":
        info["parameters"] = _module_counts(described.model.state_dict())
    if described.source:
        info["source"] = described.source
    return info


def _network_info(m: Any, stage1: bool) -> dict:
    """An IQPIR-family network's hyper-parameters (its ModelConfig)."""
    info = {"latent": [m.latent_channels, m.latent_size, m.latent_size], "codebooks": 2 if m.dual_codebook else 1,
            "codebook_size": m.codebook_size}
    if not stage1:
        info |= {"quality_embedding": m.quality_embedding,
                 "quality_bins": m.quality_bins if m.quality_embedding == "binned" else None,
                 "transformer": {"layers": m.transformer.layers, "width": m.transformer.width,
                                 "heads": m.transformer.heads, "mlp": m.transformer.mlp},
                 "cft_resolutions": list(m.cft_resolutions), "alpha": m.alpha if m.dual_codebook else None,
                 "adain": m.adain}
    return info


def _module_counts(state: dict) -> dict[str, int]:
    """Parameter counts per top-level module (a codebook apart), and their total."""
    counts: dict[str, int] = {}
    for key, t in state.items():
        top = key.split(".", 1)[0]
        if top == "quantizer":
            top = "codebook_" + key.split(".")[1]
        counts[top] = counts.get(top, 0) + t.numel()
    counts["total_params"] = sum(counts.values())
    return counts
