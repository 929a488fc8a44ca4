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

    restorer = iqpir.load_restorer("runs/stage2")
    restored = restorer.restore(image, quality=1.0)   # tensor (3,H,W)/(N,3,H,W) or PIL image
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from iqpir import io
from iqpir.training.distributed import resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """A stage-2 IQPIR model ready for inference.

    Args:
        model: the network; called as model(lq (N,3,s,s) in [0,1], quality (N,), alpha=...) and
            returning an object with `.restored` (N,3,s,s).
        image_size: the model's input size s.
        device, dtype: where and how to run (bf16/fp16 through autocast).
        overlap: tile overlap in pixels (default s/2: Hann windows; see the module docstring).
    """

    def __init__(self, model: torch.nn.Module, image_size: int, device: str | torch.device = "cpu",
                 dtype: str = "float32", batch_size: int = 4, overlap: int | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.image_size = image_size
        self.dtype = DTYPES[dtype]
        self.batch_size = max(1, batch_size)
        self.overlap = image_size // 2 if overlap is None else overlap
        self._window = blend_window(image_size, self.overlap)

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def _run(self, tiles: torch.Tensor, quality: float, alpha: float | None) -> torch.Tensor:
        q = torch.full((tiles.shape[0],), float(quality), device=self.device)
        with self._autocast():
            out = self.model(tiles.to(self.device), q, alpha=alpha).restored
        return out.float().clamp(0, 1).cpu()

    def restore_one(self, image: torch.Tensor, quality: float = 1.0, alpha: float | None = None) -> torch.Tensor:
        """(3, H, W) in [0, 1] -> (3, H, W) in [0, 1]."""
        _, h, w = image.shape
        s = self.image_size
        if h == s and w == s:
            return self._run(image[None], quality, alpha)[0]
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
            out = self._run(tiles, quality, alpha)
            for (y, x), t in zip(chunk, out):
                acc[:, y : y + s, x : x + s] += t * self._window
                weight[:, y : y + s, x : x + s] += self._window
        return (acc / weight)[:, top : top + h, left : left + w]

    def restore(self, images, quality: float = 1.0, alpha: float | None = None):
        """Restore tensors ((3,H,W) or (N,3,H,W) in [0,1]) or PIL images (one or a list).

        Returns the same kind as given. `quality` is the target S in [0, 1] (1.0 = highest).
        """
        if not 0.0 <= float(quality) <= 1.0:
            raise ValueError(f"quality must be in [0, 1], got {quality}")
        if isinstance(images, Image.Image):
            return io.to_pil(self.restore_one(io.from_pil(images), quality, alpha))
        if isinstance(images, (list, tuple)):
            return [self.restore(im, quality, alpha) for im in images]
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"expected a tensor or PIL image, got {type(images).__name__}")
        if images.ndim == 3:
            return self.restore(images[None], quality, alpha)[0]
        io.check_batch(images)
        n, _, h, w = images.shape
        if h == self.image_size and w == self.image_size:  # whole batches of aligned crops
            outs = [self._run(images[i : i + self.batch_size], quality, alpha) for i in range(0, n, self.batch_size)]
            return torch.cat(outs)
        return torch.stack([self.restore_one(im.float().cpu(), quality, alpha) for im in images])


def load_restorer(path: str | Path, device: str = "auto", dtype: str = "float32", batch_size: int = 4,
                  use_ema: bool = True) -> Restorer:
    """Build a Restorer from a stage-2 run folder (its latest checkpoint) or checkpoint file."""
    from iqpir.checkpoint import load_model

    model, cfg = load_model(path, weights="auto" if use_ema else "model")
    if not hasattr(model, "transformer"):
        raise ValueError(f"{path} is a stage-1 checkpoint; restoring needs a stage-2 run (iqpir train configs/*-stage2.yaml)")
    return Restorer(model, cfg.model.image_size, device=device, dtype=dtype, batch_size=batch_size)


def _output_paths(inputs: Sequence[str], paths: list[Path], out: Path) -> dict[Path, Path]:
    """Each input's output path: its path relative to the folder given, or its name for files."""
    roots = [Path(i) for i in inputs if Path(i).is_dir()]
    mapping = {}
    for p in paths:
        rel = Path(p.name)
        for r in roots:
            try:
                rel = p.resolve().relative_to(r.resolve())
                break
            except ValueError:
                continue
        mapping[p] = out / rel
    return mapping


def check_output_folder(inputs: Sequence[str], paths: list[Path], out: Path) -> None:
    """Refuse an output folder that is an input folder (or holds an input file)."""
    out_r = out.resolve()
    for i in inputs:
        if Path(i).is_dir() and Path(i).resolve() == out_r:
            raise ValueError(f"--out {out} is an input folder; choose another folder so no input is overwritten")
    for p in paths:
        if p.resolve().parent == out_r:
            raise ValueError(f"--out {out} holds the input {p}; choose another folder so no input is overwritten")


def restore_files(inputs: Sequence[str], checkpoint: str | Path, out: str | Path, quality: float = 1.0,
                  alpha: float | None = None, device: str = "auto", batch_size: int = 4, dtype: str = "float32",
                  overwrite: bool = False, progress: bool = True) -> io.FileReport:
    """Restore image files into `out`, named after their inputs; never overwrites an input.

    Unreadable files are named and skipped; existing outputs are kept unless `overwrite`.
    """
    if not 0.0 <= quality <= 1.0:
        raise ValueError(f"--quality must be in [0, 1], got {quality}")
    out = Path(out)
    paths, missing = io.collect_inputs(inputs)
    report = io.FileReport.empty()
    report.failed.extend((m, "no such file, folder or matching image") for m in missing)
    check_output_folder(inputs, paths, out)
    restorer = load_restorer(checkpoint, device=device, dtype=dtype, batch_size=batch_size)
    targets = _output_paths(inputs, paths, out)
    it = paths
    if progress:
        from tqdm import tqdm

        it = tqdm(paths, desc="restore", unit="img", file=sys.stderr, dynamic_ncols=True)
    for p in it:
        target = targets[p]
        if target.exists() and not overwrite:
            report.skipped.append(p)
            continue
        try:
            img = io.read_image(p)
        except io.ImageReadError as exc:
            report.failed.append((str(p), str(exc).split(": ", 1)[-1]))
            continue
        restored = restorer.restore_one(img.rgb, quality=quality, alpha=alpha)
        io.write_image(target, restored, alpha=img.alpha)
        report.done.append(target)
    msg = report.summary("restored")
    if report.skipped:
        msg += " (skipped outputs already exist; pass --overwrite to replace them)"
    print(f"iqpir restore: {msg} -> {out}", file=sys.stderr)
    return report
