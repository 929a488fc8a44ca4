"""int8 graphs: post-training quantisation of an exported model's convolutions.

`quantize_graph` takes a float32 OpenVINO graph written by `iqpir.export` and writes an int8
one: NNCF (`nncf.quantize`) calibrates the inputs of every convolution (encoder, decoder, CFT
blocks: where the FLOPs are) on a few dozen images and inserts int8 quantisers there; every other
operation keeps float32: the quality embedding, the code Transformer (its MatMuls, attention,
LayerNorms), the codebook lookup, AdaIN, the GroupNorms, the residual sums. Weights are symmetric
per output channel, activations asymmetric per tensor (NNCF's MIXED preset: activations after a
SiLU are mostly positive), then NNCF's fast bias correction.

Why OpenVINO + NNCF rather than PyTorch's own x86 int8 path: the graph we already export is the
input, the int8 convolutions run through OpenVINO's oneDNN kernels (VNNI/AMX where the CPU has
them, AVX2 otherwise) with everything around them fused by OpenVINO, and measured on a 2-core AMD
EPYC (AVX-512 VNNI and BF16) it ran the default model at 0.251 s/MP against 0.543 in OpenVINO
float32 and 0.572 for torch float32 (benchmarks/bench_paths.py); PyTorch's eager int8 modules
(torch.ao) are deprecated in favour of a compile-based flow, and torch.compile took 486 s to
compile the paper network in float32 and ran it slower than eager. The choice and its numbers:
docs/performance.md.

Every int8 graph carries what it measured against the float32 graph on held-out images (other
crops than the calibration's): the share of code tokens equal to float32's (networks with codes)
and the PSNR of the restored images, with the bars `BARS`. `auto` never runs a graph below them.

`int8_graph(checkpoint)` is what `iqpir restore --dtype int8` and `iqpir app --dtype int8` use: the
graph of a weights file, calibrated once and cached by the weights' sha256 (and the recipe's
version) under $IQPIR_CACHE (default ~/.cache/iqpir); a cached graph whose recorded hash is not
the file's is stale and made again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from iqpir.inference.engines import openvino_config
from iqpir.inference.files import METADATA_KEY, DescribedModel, ExportedGraph, compile_openvino, read_graph, require_extra

# Bump when the calibration images, the quantised operations or NNCF's settings change: every
# cached graph made by another recipe is then stale.
RECIPE = 2
# The fidelity an int8 graph must keep against the float32 graph: for a network with
# codes, the share of code tokens equal to float32's (a flipped code redraws its region of the
# image, so the PSNR of such networks is reported, not barred: the bf16 path's is 20-30 dB on the
# fixtures); for one without (the default model), the PSNR of the restored images (dB). Below its
# bar a graph is never chosen by `auto`.
BARS = {"codes": 0.97, "psnr_db": 40.0}
# The operations whose inputs are quantised; everything else stays float32.
QUANTISED = frozenset({"Convolution", "GroupConvolution"})
CALIBRATION_COUNT = 24
HELD_OUT_COUNT = 6


# --------------------------------------------------------------------------------------
# Calibration images
# --------------------------------------------------------------------------------------


def _sample_photos(face: bool) -> list[np.ndarray]:
    """Photos that ship inside scikit-image and matplotlib (the `int8` extra installs both):
    the two portraits for face models (NASA's astronaut, public domain; the US Navy's Grace Hopper,
    public domain), those and six more scenes for whole-image models."""
    try:
        import skimage.data
        from matplotlib import cbook
        from PIL import Image
    except ImportError:
        raise ImportError("the calibration photos ship with scikit-image and matplotlib: "
                          "pip install 'iqpir[int8]', or give your own with --calibration FOLDER") from None
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    photos = [skimage.data.astronaut(), hopper]
    if not face:
        photos += [getattr(skimage.data, name)() for name in ("coffee", "chelsea", "rocket", "cat", "retina",
                                                              "immunohistochemistry")]
    return [p[..., :3] if p.ndim == 3 else np.repeat(p[..., None], 3, -1) for p in photos]


def _folder_photos(folder: Path) -> list[np.ndarray]:
    from iqpir import io

    paths, _ = io.collect_inputs([str(folder)])
    if not paths:
        raise ValueError(f"--calibration {folder}: no images there")
    return [(io.read_image(p).rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for p in paths]


def calibration_images(graph: ExportedGraph, count: int, seed: int, folder: Path | None = None) -> list[np.ndarray]:
    """`count` (1, 3, H, W) float32 arrays in [0, 1] the graph takes: random crops (60-100% of the
    shorter side) of the sample photos or of `folder`'s images, resized to the graph's face size
    (or 256 px tiles for models that take any size), every other one degraded as real inputs are
    (downscaled 2-4x and back, then JPEG at quality 40-80)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _folder_photos(folder) if folder is not None else _sample_photos(face=graph.image_size is not None)
    side = graph.image_size or -(-256 // graph.size_multiple) * graph.size_multiple
    out = []
    for k in range(count):
        photo = photos[k % len(photos)]
        h, w = photo.shape[:2]
        s = int(min(h, w) * rng.uniform(0.6, 1.0))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        image = Image.fromarray(photo[y : y + s, x : x + s]).resize((side, side), Image.BICUBIC)
        if k % 2:
            small = max(8, int(side / rng.uniform(2, 4)))
            image = image.resize((small, small), Image.BICUBIC).resize((side, side), Image.BICUBIC)
            buffer = _jpeg(image, int(rng.integers(40, 81)))
            image = Image.open(buffer).convert("RGB")
        out.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 255)
    return out


def _jpeg(image, quality: int):
    import io as _io

    buffer = _io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return buffer


def feeds(graph: ExportedGraph, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The graph's inputs for each image: the quality condition spread evenly over [0, 1] (the
    int8 ranges must cover every S a user may ask for), the graph's default alpha and fidelity."""
    out = []
    for k, image in enumerate(images):
        feed = {"image": image}
        if "quality" in graph.inputs:
            feed["quality"] = np.full((1,), k / max(1, len(images) - 1), np.float32)
        if "alpha" in graph.inputs:
            feed["alpha"] = np.array(graph.default_alpha if graph.default_alpha is not None else 0.8, np.float32)
        if "fidelity" in graph.inputs:
            feed["fidelity"] = np.array(graph.default_fidelity, np.float32)
        out.append(feed)
    return out


# --------------------------------------------------------------------------------------
# Quantisation and its fidelity
# --------------------------------------------------------------------------------------


def measure(graph: ExportedGraph, reference: Any, candidate: Path, inputs: list[dict]) -> dict:
    """The candidate (int8) graph file against the reference (the float32 graph: an openvino.Model
    or its file) on `inputs`: the share of code tokens equal (None for a network without codes)
    and the PSNR (dB) of the clamped images."""
    require_extra("openvino", "int8")
    ref = compile_openvino(reference, openvino_config("float32"))
    cand = compile_openvino(Path(candidate), openvino_config("int8"))
    equal = total = 0
    errors = []
    for feed in inputs:
        a, b = ref(feed), cand(feed)
        for i, name in enumerate(graph.outputs):
            x, y = a[ref.output(i)], b[cand.output(i)]
            if name.startswith("indices"):
                equal += int((x == y).sum())
                total += x.size
            elif name == "restored":
                errors.append(float(np.mean((np.clip(x, 0, 1) - np.clip(y, 0, 1)) ** 2)))
    mse = float(np.mean(errors))
    return {"codes": equal / total if total else None, "psnr_db": float(10 * np.log10(1 / mse)) if mse > 0 else 99.0,
            "images": len(inputs), "precision_hint": openvino_config("int8")["INFERENCE_PRECISION_HINT"]}


def passes_bars(fidelity: dict | None) -> bool:
    """Whether a measured fidelity (`measure`) is within BARS: codes where the network has them, else PSNR."""
    if not fidelity:
        return False
    if fidelity.get("codes") is not None:
        return bool(fidelity["codes"] >= BARS["codes"])
    return bool(fidelity.get("psnr_db", 0.0) >= BARS["psnr_db"])


def quantize_graph(source: str | Path, out: str | Path, calibration: str | Path | None = None,
                   count: int = CALIBRATION_COUNT, seed: int = 0, weights_sha256: str | None = None,
                   float_encoder: bool = True) -> ExportedGraph:
    """Write the int8 graph of the float32 OpenVINO graph `source` (from `iqpir export`) at `out`
    (.xml + .bin), with its calibration and measured fidelity in the metadata; returns it.

    float_encoder: False quantises the encoder of a network with codes too (faster, and measured
    below the codes bar: `_encoder_convolutions`); kept for benchmarks/bench_restore.py.
    """
    ov = require_extra("openvino", "int8")
    nncf = _import_nncf()
    graph = read_graph(source)
    if graph.format != "openvino":
        raise ValueError(f"{source}: int8 graphs are made from OpenVINO graphs (iqpir export --format openvino)")
    if graph.int8:
        raise ValueError(f"{source} is an int8 graph already")
    out = Path(out)
    if out.suffix.lower() != ".xml":
        raise ValueError(f"--out {out}: an OpenVINO graph is written to a .xml file")
    folder = Path(calibration) if calibration is not None else None
    calib = feeds(graph, calibration_images(graph, count, seed, folder))
    held_out = feeds(graph, calibration_images(graph, HELD_OUT_COUNT, seed + 1, folder))
    model = graph.opened  # read by read_graph: the float32 graph is read from disk once
    keep_float = sorted({op.get_type_name() for op in model.get_ops()} - QUANTISED)
    float_convs = _encoder_convolutions(model, graph) if float_encoder else []
    nncf.set_log_level(logging.ERROR)  # one INFO line per operation left in float otherwise
    print(f"iqpir: calibrating int8 convolutions on {len(calib)} images "
          f"({'the sample photos' if folder is None else folder})", file=sys.stderr, flush=True)
    quantised = nncf.quantize(model, nncf.Dataset(calib), subset_size=len(calib),
                              preset=nncf.QuantizationPreset.MIXED, advanced_parameters=_no_overflow(nncf),
                              ignored_scope=nncf.IgnoredScope(types=keep_float, names=float_convs, validate=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # beside `out`: the final moves are renames
        trial = Path(tmp) / "int8.xml"
        ov.save_model(quantised, str(trial), compress_to_fp16=False)
        fidelity = measure(graph, graph.path, trial, held_out)
        info = {"recipe": RECIPE, "tool": f"nncf {nncf.__version__}", "quantised": sorted(QUANTISED),
                "float_encoder": bool(float_convs),
                "calibration": "sample photos" if folder is None else str(folder), "images": len(calib),
                "seed": seed, "weights_sha256": weights_sha256 or (graph.source or {}).get("sha256"),
                "fidelity": fidelity, "bars": BARS, "passes": passes_bars(fidelity)}
        graph.int8 = info
        graph.path = out
        graph.opened = None  # what read_graph read is the float32 graph: the runtime reads `out`
        quantised.set_rt_info(json.dumps(graph.metadata()), [METADATA_KEY])
        final = Path(tmp) / "final.xml"  # not over the trial's .bin, which OpenVINO may still map
        ov.save_model(quantised, str(final), compress_to_fp16=False)
        os.replace(final.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(final, out)
    return graph


def _import_nncf():
    """NNCF, without the CUDA_HOME warning torch's C++-extension module logs on import on a CPU machine."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return require_extra("nncf", "int8")


def _no_overflow(nncf):
    """Weights quantised to 7 bits in every layer (NNCF's overflow fix), not only the first.

    CPUs without VNNI (AVX2-only, AVX-512 before Cascade Lake) multiply u8 x s8 pairs with
    vpmaddubsw, whose 16-bit sums saturate with 8-bit weights; one graph must run correctly on
    every CPU class, so every layer gets the headroom (docs/performance.md, "int8 without VNNI").
    """
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    return AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)


def _encoder_convolutions(model, graph: ExportedGraph) -> list[str]:
    """In a network with codes, the encoder's convolutions: they stay in floating point (bf16 where
    the CPU has it, as on the fast path), because the codes are read from their output.

    Measured (benchmarks/bench_restore.py, docs/performance.md): with the encoder in int8 too,
    93.4% of the fixture network's code tokens matched float32's, below the 97% bar; with it in
    floating point, 98.0% (the bf16 path's 98.4%)."""
    if not any(name.startswith("indices") for name in graph.outputs):
        return []
    return [op.get_friendly_name() for op in model.get_ops()
            if op.get_type_name() in QUANTISED and "encoder" in op.get_friendly_name()]


def describe_fidelity(info: dict) -> str:
    """'codes 98.4% of float32's, images 51.3 dB from float32's: within the bars' style line."""
    f = info["fidelity"]
    parts = ([f"codes {100 * f['codes']:.1f}% of float32's"] if f.get("codes") is not None else [])
    parts.append(f"images {f['psnr_db']:.1f} dB from float32's ({f['images']} held-out images)")
    bar = f"codes >= {100 * BARS['codes']:.0f}%" if f.get("codes") is not None else f">= {BARS['psnr_db']:.0f} dB"
    verdict = f"within the bar ({bar})" if info.get("passes") else f"BELOW the bar ({bar}): auto will not use it"
    return ", ".join(parts) + ": " + verdict


# --------------------------------------------------------------------------------------
# The cache behind --dtype int8
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("IQPIR_CACHE") or Path.home() / ".cache" / "iqpir") / "int8"


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (remembered per path, size and modification time: a restore that
    looks for a cached graph and then makes one reads a large file once)."""
    stat = os.stat(path)
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def weights_file(checkpoint: str | Path | None) -> list[Path]:
    """The files whose bytes define the network: the checkpoint (an iqpir checkpoint's weights
    and its config), or the packaged default model."""
    if checkpoint is None:
        from iqpir.weights import DEFAULT_WEIGHTS

        return [Path(DEFAULT_WEIGHTS)]
    path = Path(checkpoint)
    if path.is_dir():  # a run folder (its latest checkpoint) or an `iqpir convert` folder: every file in it
        from iqpir.checkpoint import resolve_checkpoint

        try:
            stem = resolve_checkpoint(path)
        except FileNotFoundError:
            return sorted(p for p in path.rglob("*") if p.is_file())
        return [stem.with_suffix(".safetensors"), stem.with_suffix(".json")]
    if not path.exists() or path.suffix in (".safetensors", ".json"):  # a checkpoint's stem or one of its files
        pair = [path.with_suffix(".safetensors"), path.with_suffix(".json")]
        if all(p.is_file() for p in pair):
            return pair
    return [path]


def weights_sha256(checkpoint: str | Path | None) -> str:
    """One sha256 for the file(s) of `weights_file`."""
    found = [file_sha256(p) for p in weights_file(checkpoint)]
    return found[0] if len(found) == 1 else hashlib.sha256("".join(found).encode()).hexdigest()


def cached_graph_path(checkpoint: str | Path | None, cft: bool = False) -> tuple[Path, str]:
    """Where the int8 graph of `checkpoint`'s weights (with its CFT blocks or without) lives in the
    cache, and the weights' sha256."""
    sha = weights_sha256(checkpoint)
    return cache_dir() / f"{sha[:24]}-r{RECIPE}{'-cft' if cft else ''}.xml", sha


def cached_int8_graph(checkpoint: str | Path | None, cft: bool = False) -> ExportedGraph | None:
    """The cached int8 graph of these weights when there is a sound one, else None."""
    path, sha = cached_graph_path(checkpoint, cft)
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        return None
    try:
        graph = read_graph(path)
    except (ValueError, RuntimeError):
        return None
    if not graph.int8 or graph.int8.get("weights_sha256") != sha or graph.int8.get("recipe") != RECIPE:
        return None
    return graph


def int8_graph(checkpoint: str | Path | None, cft: bool = False, calibration: str | Path | None = None,
               log: Callable[[str], None] | None = None, described: DescribedModel | None = None) -> ExportedGraph:
    """The int8 graph of `checkpoint` (any file `iqpir export` takes; None: the default model):
    from the cache when a sound one is there, else exported, calibrated, measured and cached.

    cft: with the network's CFT blocks (a `fidelity` input), as `iqpir export --fidelity`; needed
    to restore at a fidelity w > 0, and slower at w = 0, so both are cached apart. A given
    `calibration` folder always makes the graph again (and caches it). described: the file as
    iqpir.inference.files described it already (the export then reads nothing again).
    """
    from iqpir.export import export

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    path, sha = cached_graph_path(checkpoint, cft)
    graph = cached_int8_graph(checkpoint, cft) if calibration is None else None
    if graph is not None:
        log(f"iqpir: the cached int8 graph of these weights: {path} ({describe_fidelity(graph.int8)})")
        return graph
    if path.exists():
        log(f"iqpir: {path} is stale (not these weights' int8 graph): making it again")
    log(f"iqpir: making the int8 graph of {weights_file(checkpoint)[0]} once (export, calibrate, measure; "
        f"minutes for a paper-size network) -> {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        float_graph = Path(tmp) / "float32.xml"
        export(checkpoint if described is None else described, "openvino", float_graph, fidelity=cft)
        graph = quantize_graph(float_graph, Path(tmp) / "int8.xml", calibration, weights_sha256=sha)
        for suffix in (".bin", ".xml"):  # the .xml last: a cache entry is whole when its .xml is there
            shutil.move(str(Path(tmp) / f"int8{suffix}"), str(path.with_suffix(suffix)))
    graph.path = path
    log(f"iqpir: int8 graph cached: {describe_fidelity(graph.int8)}")
    return graph



def int8_for(checkpoint: str | Path | None, engine: str = "auto", fidelity: float | None = None,
             log: Callable[[str], None] | None = None, described: DescribedModel | None = None) -> ExportedGraph | None:
    """The int8 graph a `--dtype int8` restore of `checkpoint` runs (None for a graph file: it runs
    as it is): made and cached the first time (`int8_graph`). iqpir.load asks it, with the file's
    description (`described`: its weights are then not read again). The graph holds the CFT
    blocks when the restore's fidelity w (the model's own when None) is > 0.
    """
    from iqpir.inference.files import describe, is_graph_file

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if checkpoint is not None and is_graph_file(checkpoint):
        return None
    if engine not in ("auto", "openvino"):
        raise ValueError(f"--dtype int8 runs an OpenVINO graph: leave --engine {engine} out")
    _import_nncf()
    described = described if described is not None else describe(checkpoint)
    w = described.default_fidelity if fidelity is None else fidelity
    cft = bool(described.fidelity) and bool(w)
    return int8_graph(checkpoint, cft, log=log, described=described)
