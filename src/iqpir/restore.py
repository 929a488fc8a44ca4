"""Inference: a checkpoint alone -> a restorer; any image size through blended tiles.

Images at the model's size (aligned faces) go through whole. Any other size is cut into
overlapping tiles of the model's size, restored in batches, and blended with a smooth
window, so the output has the input's size without seams and memory stays bounded by one
batch of tiles plus the output image.

Tiles overlap by half a tile by default, and the window is then the Hann window: each output
pixel is a blend weighted towards the centres of the tiles that cover it. The network's
output depends on where content falls in a tile (zero padding at the tile's borders, the
learned position embedding and per-position quality maps of the latent), so neighbouring
tiles disagree where they overlap; the half-tile cross-fade keeps that disagreement from
showing as edges at the tile stride, which a quarter-tile overlap did (its cross-fade, made
of the tiles' outermost pixels, was steepest at the overlap centres: a visible grid).

    restorer = iqpir.load_restorer("runs/stage2")          # or an official IQPIR/CodeFormer .pth
    restored = restorer.restore(image, quality=1.0)   # tensor (3,H,W)/(N,3,H,W) or PIL image
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from iqpir import io, runtime
from iqpir.runtime import DTYPES  # noqa: F401  (the names --dtype accepts, besides "auto")
from iqpir.training.distributed import resolve_device


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length) with at least `overlap` shared pixels."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_window(tile: int, overlap: int) -> torch.Tensor:
    """(tile, tile) weights: 1 in the middle, a raised-cosine ramp over `overlap` pixels at the edges.

    ramp[k] = (1 - cos(pi (k + 1/2) / n)) / 2 for k < n = min(overlap, tile // 2), mirrored at the
    other edge: two tiles `tile - overlap` apart have weights summing to 1 across their overlap.
    With overlap = tile / 2 the window is the Hann window sin^2(pi (k + 1/2) / tile). The ramp
    never reaches zero, so every pixel has positive total weight even at image borders.
    """
    ramp = torch.ones(tile)
    if overlap > 0:
        n = min(overlap, tile // 2)
        x = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        edge = 0.5 - 0.5 * torch.cos(torch.pi * x)
        ramp[:n] = edge
        ramp[tile - n :] = edge.flip(0)
    return ramp[:, None] * ramp[None, :]


class Restorer:
    """A stage-2 model (IQPIR, or CodeFormer's released network) ready for inference.

    Args:
        model: the network; called as model(lq (N,3,s,s) in [0,1], quality (N,) or None,
            alpha=..., fidelity=...) and returning an object with `.restored` (N,3,s,s).
        image_size: the model's input size s.
        device, dtype, backend: where and how to run (iqpir.runtime: "auto" is the fast
            bf16 path where the hardware has native bf16, "float32" the exact network).
        overlap: tile overlap in pixels (default s/2: Hann windows; see the module docstring).
        kind: "iqpir" (quality-conditioned) or "codeformer"; task: "faces" | "general".
        source: provenance of official weights (file, sha256, licence), else None.
        own_model: `model` is handed over (load_restorer): the fast path converts it in place.

    `supports_quality` (the model has a quality condition S) and `supports_fidelity` (it has
    CodeFormer's CFT blocks, so the fidelity weight w can be > 0) say which knobs exist.
    """

    def __init__(self, model: torch.nn.Module, image_size: int, device: str | torch.device = "cpu",
                 dtype: str = "auto", batch_size: int = 4, overlap: int | None = None, *,
                 kind: str = "iqpir", task: str = "general", source: dict | None = None, backend: str = "auto",
                 own_model: bool = False):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.engine = runtime.make_engine(model, self.device, dtype, backend, own=own_model)
        self.model = self.engine.model  # the network (None for a graph; bf16 parts where own_model and fast)
        self.image_size = image_size
        self.dtype = self.engine.dtype
        if dtype == "float16" and self.device.type == "cpu":
            # Most CPU kernels have no float16 arithmetic: autocast emulates it, far slower than float32.
            warnings.warn("float16 on the CPU is very slow (emulated): use --dtype auto, float32 or bfloat16 there",
                          UserWarning, stacklevel=2)
        self.batch_size = max(1, batch_size)
        self.overlap = image_size // 2 if overlap is None else overlap
        self._window = blend_window(image_size, self.overlap)
        self.kind = kind
        self.task = task
        self.source = source
        self.supports_quality, self.supports_fidelity, self.default_alpha = runtime.knobs(model)

    def check_knobs(self, quality: float | None, alpha: float | None, fidelity: float) -> float | None:
        """Validate the inference settings for this model; -> the quality to feed (None when the
        model has no quality condition)."""
        if quality is not None and not 0.0 <= float(quality) <= 1.0:
            raise ValueError(f"quality must be in [0, 1], got {quality}")
        if not 0.0 <= float(fidelity) <= 1.0:
            raise ValueError(f"fidelity must be in [0, 1], got {fidelity}")
        if fidelity and not self.supports_fidelity:
            raise ValueError(f"this {self.kind} model has no CFT blocks: --fidelity needs CodeFormer-style weights")
        self.engine.check(fidelity)
        if alpha is not None and self.default_alpha is None:
            raise ValueError(f"this {self.kind} model has one codebook: --alpha needs a dual-codebook (IQPIR) model")
        if alpha is not None and not 0.0 <= float(alpha) <= 2.0:
            raise ValueError(f"alpha must be in [0, 2], got {alpha}")
        if not self.supports_quality:
            if quality is not None:
                raise ValueError(f"this {self.kind} model has no quality condition: leave --quality out")
            return None
        return 1.0 if quality is None else float(quality)

    def _run(self, tiles: torch.Tensor, quality: float | None, alpha: float | None,
             fidelity: float = 0.0) -> torch.Tensor:
        return self.engine(tiles, quality, alpha, fidelity)  # (N, 3, s, s) float32 CPU in [0, 1]

    def restore_one(self, image: torch.Tensor, quality: float | None = None, alpha: float | None = None,
                    fidelity: float = 0.0) -> torch.Tensor:
        """(3, H, W) in [0, 1] -> (3, H, W) in [0, 1]; any size (tiles when it is not s x s)."""
        quality = self.check_knobs(quality, alpha, fidelity)
        _, h, w = image.shape
        s = self.image_size
        if h == s and w == s:
            return self._run(image[None], quality, alpha, fidelity)[0]
        # A margin of overlap/2 mirrored pixels keeps the image border away from the tile
        # borders, where a convolutional network sees zero padding and does worst; images
        # smaller than a tile are padded up to one. Both are cropped off afterwards.
        m = self.overlap // 2
        top = left = m
        bottom, right = m + max(0, s - h - 2 * m), m + max(0, s - w - 2 * m)
        mode = "reflect" if max(top, bottom) < h and max(left, right) < w else "replicate"
        image = torch.nn.functional.pad(image[None], (left, right, top, bottom), mode=mode)[0]
        H, W = image.shape[1:]
        boxes = [(y, x) for y in tile_starts(H, s, self.overlap) for x in tile_starts(W, s, self.overlap)]
        acc = torch.zeros(3, H, W)
        weight = torch.zeros(1, H, W)
        for i in range(0, len(boxes), self.batch_size):
            chunk = boxes[i : i + self.batch_size]
            tiles = torch.stack([image[:, y : y + s, x : x + s] for y, x in chunk])
            out = self._run(tiles, quality, alpha, fidelity)
            for (y, x), t in zip(chunk, out):
                acc[:, y : y + s, x : x + s] += t * self._window
                weight[:, y : y + s, x : x + s] += self._window
        return (acc / weight)[:, top : top + h, left : left + w]

    def restore(self, images, quality: float | None = None, alpha: float | None = None, fidelity: float = 0.0):
        """Restore tensors ((3,H,W) or (N,3,H,W) in [0,1]) or PIL images (one or a list).

        Returns the same kind as given. `quality` is the target S in [0, 1] (default 1.0, the
        highest; None for models without a quality condition), `alpha` the HQ+ fusion weight
        (default: the model's), `fidelity` CodeFormer's w (models with CFT blocks).
        """
        self.check_knobs(quality, alpha, fidelity)
        if isinstance(images, Image.Image):  # grey in, grey out; 16-bit grey in, 16-bit out
            grey, bits = io.pil_kind(images)
            return io.to_pil(self.restore_one(io.from_pil(images), quality, alpha, fidelity), grey=grey, bits=bits)
        if isinstance(images, (list, tuple)):
            return [self.restore(im, quality, alpha, fidelity) for im in images]
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"expected a tensor or PIL image, got {type(images).__name__}")
        if images.ndim == 3:
            return self.restore(images[None], quality, alpha, fidelity)[0]
        io.check_batch(images)
        n, _, h, w = images.shape
        if h == self.image_size and w == self.image_size:  # whole batches of aligned crops
            q = self.check_knobs(quality, alpha, fidelity)
            outs = [self._run(images[i : i + self.batch_size], q, alpha, fidelity) for i in range(0, n, self.batch_size)]
            return torch.cat(outs)
        return torch.stack([self.restore_one(im.float().cpu(), quality, alpha, fidelity) for im in images])


def load_restorer(path: str | Path, device: str = "auto", dtype: str = "auto", batch_size: int = 4,
                  use_ema: bool = True, backend: str = "auto") -> Restorer:
    """Build a Restorer from a stage-2 run folder (its latest checkpoint), a checkpoint file, a
    folder written by `iqpir convert`, a released IQPIR/CodeFormer `.pth` file, or a graph
    written by `iqpir export` (.onnx, .xml). dtype/backend: see iqpir.runtime."""
    from iqpir import export, official

    if export.is_graph_file(path):
        graph = export.read_graph(path)
        return Restorer(graph, graph.image_size, device="cpu" if device == "auto" else device, dtype=dtype,
                        batch_size=batch_size, kind=graph.kind, task=graph.task, source=graph.source,
                        backend=backend)
    if official.is_official_file(path):
        model, cfg, weights = official.load_official(path)
        kind = weights.kind
        source = {"file": str(weights.path), "kind": kind, "licence": official.LICENCE_NOTE}
    else:
        from iqpir.checkpoint import load_checkpoint_meta, load_model

        where = Path(path)
        if not (where.exists() or where.with_suffix(".safetensors").is_file()):
            raise FileNotFoundError(f"--checkpoint {path}: no such run folder or checkpoint file")
        model, cfg = load_model(path, weights="auto" if use_ema else "model")
        source = load_checkpoint_meta(path).get("source")
        kind = (source or {}).get("kind") or ("codeformer" if cfg.model.quality_embedding == "none" else "iqpir")
    if not hasattr(model, "transformer"):
        raise ValueError(f"{path} is a stage-1 (VQGAN) checkpoint; restoring needs a stage-2 network "
                         "(an IQPIR or CodeFormer release, or iqpir train configs/*-stage2.yaml)")
    return Restorer(model, cfg.model.image_size, device=device, dtype=dtype, batch_size=batch_size,
                    kind=kind, task=cfg.model.task, source=source, backend=backend, own_model=True)


def _plan(inputs: Sequence[str], out: str | Path) -> tuple[Path, list[Path], list[str], io.FileReport, dict[Path, Path]]:
    """The start of every restore command: the output folder, the inputs found, the inputs that
    matched nothing (already in the report as failures) and each input's output path, by the
    rule of `io.plan_outputs` (shared with `iqpir degrade`: the output folder may not be or lie
    inside an input folder, and no output may replace an input)."""
    out = Path(out)
    paths, missing = io.collect_inputs(inputs)
    report = io.FileReport.empty()
    report.failed.extend((m, "no such file, folder or matching image") for m in missing)
    return out, paths, missing, report, io.plan_outputs(inputs, out).targets


def restore_files(inputs: Sequence[str], checkpoint: str | Path, out: str | Path, quality: float | None = None,
                  alpha: float | None = None, device: str = "auto", batch_size: int = 4, dtype: str = "auto",
                  overwrite: bool = False, progress: bool = True, fidelity: float = 0.0,
                  aligned: bool = False, backend: str = "auto") -> io.FileReport:
    """Restore image files into `out`, named after their inputs; never overwrites an input.

    Unreadable files are named and skipped; existing outputs are kept unless `overwrite`.
    Grey inputs give grey outputs, 16-bit grey inputs 16-bit outputs.
    aligned: every input is an aligned face (CodeFormer's `--has_aligned`): restored whole at
    the model's size (resized there and back when it has another size), never tiled.
    """
    if quality is not None and not 0.0 <= quality <= 1.0:
        raise ValueError(f"--quality must be in [0, 1], got {quality}")
    out, paths, _, report, targets = _plan(inputs, out)
    restorer = load_restorer(checkpoint, device=device, dtype=dtype, batch_size=batch_size, backend=backend)
    restorer.check_knobs(quality, alpha, fidelity)
    it = paths
    if progress:
        from tqdm import tqdm

        it = tqdm(paths, desc="restore", unit="img", file=sys.stderr, dynamic_ncols=True)
    s = restorer.image_size
    warned = False
    for p in it:
        target = targets[p]
        if target.exists() and not overwrite:
            report.skipped.append(p)
            continue
        try:
            img = io.read_image(p)
        except io.ImageReadError as exc:
            report.failed.append((str(p), exc.reason))
            continue
        rgb = img.rgb
        if aligned:
            restored = restore_aligned(restorer, rgb, quality, alpha, fidelity)
        else:
            if restorer.task == "faces" and tuple(rgb.shape[1:]) != (s, s) and not warned:
                print(f"iqpir restore: warning: {p} is not a {s}x{s} aligned face and this is a face model; "
                      "it is restored through tiles. Use --faces for photos with faces, --aligned for aligned "
                      "crops", file=sys.stderr)
                warned = True
            restored = restorer.restore_one(rgb, quality=quality, alpha=alpha, fidelity=fidelity)
        io.write_image(target, restored, alpha=img.alpha, grey=img.grey, bits=img.bits)
        report.done.append(target)
    report.announce("restore", "restored", out)
    return report


def restore_aligned(restorer: Restorer, image: torch.Tensor, quality: float | None = None,
                    alpha: float | None = None, fidelity: float = 0.0) -> torch.Tensor:
    """An aligned face (3, H, W) in [0, 1] restored whole: resized to the model's size when it is
    not already (bicubic, antialiased), and the result resized back to (H, W)."""
    s = restorer.image_size
    h, w = image.shape[1:]
    if (h, w) == (s, s):
        return restorer.restore_one(image, quality, alpha, fidelity)
    resize = torch.nn.functional.interpolate
    face = resize(image[None], size=(s, s), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)[0]
    out = restorer.restore_one(face, quality, alpha, fidelity)
    return resize(out[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)[0]

# --------------------------------------------------------------------------------------
# Whole photos with faces (issue 12): detect, align, restore, paste back
# --------------------------------------------------------------------------------------


def face_restorer_fn(restorer: Restorer, quality: float | None = None, alpha: float | None = None,
                     fidelity: float = 0.0):
    """Bind a Restorer into the callable `iqpir.faces.restore_photo` takes: (N,3,512,512) -> same.

    A model of another size (a tiny test preset) gets the crops resized to its size and back.
    """
    from iqpir.faces import FACE_SIZE

    s = restorer.image_size

    def run(faces: torch.Tensor) -> torch.Tensor:
        if s == FACE_SIZE:
            return restorer.restore(faces, quality=quality, alpha=alpha, fidelity=fidelity)
        small = torch.nn.functional.interpolate(faces, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        out = restorer.restore(small.clamp(0, 1), quality=quality, alpha=alpha, fidelity=fidelity)
        return torch.nn.functional.interpolate(out, size=faces.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)

    return run


def background_fn(restorer: Restorer, upscale: int, quality: float | None = None):
    """The rest of the photo through a general model's tiles (at `quality` when it is
    quality-conditioned, its own defaults otherwise), then Lanczos-resized by `upscale`."""
    from iqpir.faces import resize_lanczos

    q = quality if restorer.supports_quality else None
    return lambda image: resize_lanczos(restorer.restore_one(image, quality=q), upscale)


def _tensor_upscale(alpha: torch.Tensor | None, upscale: int) -> torch.Tensor | None:
    from iqpir.faces import resize_lanczos

    return None if alpha is None or upscale == 1 else resize_lanczos(alpha, upscale)


def restore_face_files(inputs: Sequence[str], checkpoint: str | Path, out: str | Path, quality: float | None = None,
                       alpha: float | None = None, device: str = "auto", batch_size: int = 4, dtype: str = "float32",
                       overwrite: bool = False, progress: bool = True, detector: str = "hog+cnn", upscale: int = 1,
                       only_center_face: bool = False, min_face: float = 0, save_faces: bool = False,
                       draw_box: bool = False, bg_checkpoint: str | Path | None = None,
                       fidelity: float = 0.0) -> io.FileReport:
    """`iqpir restore --faces`: restore the faces of whole photos into `out`, plus OUT/restore.json.

    Each photo: faces detected (iqpir.faces detectors), aligned to 512x512, restored with the
    face model of `checkpoint` at `quality`/`alpha`, pasted back; the rest of the photo kept,
    Lanczos-resized by `upscale`, or restored by the general model `bg_checkpoint`. A photo
    without faces is written as it is (resized) and reported. With `save_faces`, the aligned
    and restored crops go to OUT/faces/. Never overwrites an input.
    """
    import json
    import time

    from iqpir.faces import get_detector, restore_photo

    if quality is not None and not 0.0 <= quality <= 1.0:
        raise ValueError(f"--quality must be in [0, 1], got {quality}")
    if int(upscale) != upscale or upscale < 1:
        raise ValueError(f"--upscale must be a positive integer, got {upscale}")
    if min_face < 0:
        raise ValueError(f"--min-face must be >= 0, got {min_face}")
    out, paths, missing, report, targets = _plan(inputs, out)
    restorer = load_restorer(checkpoint, device=device, dtype=dtype, batch_size=batch_size)
    restorer.check_knobs(quality, alpha, fidelity)
    restore_faces = face_restorer_fn(restorer, quality, alpha, fidelity)
    background = None
    if bg_checkpoint is not None:
        background = background_fn(load_restorer(bg_checkpoint, device=device, dtype=dtype, batch_size=batch_size),
                                   int(upscale), quality)
    face_detector = get_detector(detector)
    entries: list[dict] = [{"input": m, "error": "no such file, folder or matching image"} for m in missing]
    n_faces = n_without = 0
    start = time.perf_counter()
    it = paths
    bar = None
    if progress:
        from tqdm import tqdm

        it = bar = tqdm(paths, desc="restore", unit="photo", file=sys.stderr, dynamic_ncols=True)
    for p in it:
        target = targets[p]
        if target.exists() and not overwrite:
            report.skipped.append(p)
            entries.append({"input": str(p), "output": str(target), "skipped": "output exists (--overwrite replaces it)"})
            continue
        try:
            img = io.read_image(p)
        except io.ImageReadError as exc:
            why = exc.reason
            report.failed.append((str(p), why))
            entries.append({"input": str(p), "error": why})
            continue
        restored, rep = restore_photo(img.rgb, restore_faces, detector=face_detector, upscale=int(upscale),
                                      only_center_face=only_center_face, min_face=min_face, background=background,
                                      save_faces=save_faces, draw_box=draw_box)
        io.write_image(target, restored, alpha=_tensor_upscale(img.alpha, int(upscale)), grey=img.grey, bits=img.bits)
        report.done.append(target)
        entry = {"input": str(p), "output": str(target), "size": list(img.rgb.shape[1:]), "faces": rep["faces"],
                 "skipped_faces": rep["skipped_faces"], "detector": rep["detector"], "seconds": rep["seconds"]}
        if save_faces and rep["faces"]:
            crops = []
            stem = target.relative_to(out).with_suffix("")
            for i, (a, r) in enumerate(zip(rep["aligned_faces"], rep["restored_faces"])):
                pa = io.write_image(out / "faces" / f"{stem}_{i:02d}_aligned.png", a)
                pr = io.write_image(out / "faces" / f"{stem}_{i:02d}_restored.png", r)
                crops.append({"aligned": str(pa), "restored": str(pr)})
            entry["crops"] = crops
        entries.append(entry)
        n_faces += len(rep["faces"])
        n_without += not rep["faces"]
        if bar is not None:
            bar.set_postfix(faces=n_faces)
        io.atomic_write_text(out / "restore.json", json.dumps(entries, indent=1) + "\n")
    io.atomic_write_text(out / "restore.json", json.dumps(entries, indent=1) + "\n")
    seconds = time.perf_counter() - start
    msg = (f"{len(report.done)} photos, {n_faces} faces restored, {n_without} without faces, "
           f"{len(report.skipped)} skipped, {len(report.failed)} failed, {seconds:.1f} s")
    if report.skipped:
        msg += " (skipped outputs already exist; pass --overwrite to replace them)"
    if report.failed:
        msg += "\n" + "\n".join(f"  failed: {p}: {why}" for p, why in report.failed)
    print(f"iqpir restore: {msg} -> {out}", file=sys.stderr)
    return report
