"""A described model on an engine -> images of any size: knobs, tiles, batches. No file I/O.

    restorer = iqpir.load("runs/stage2")             # iqpir.inference.loader: describe, choose the engine
    restored = restorer.restore(image, quality=1.0)  # tensor (3,H,W)/(N,3,H,W) or PIL image

The knobs (quality, alpha, fidelity) get their values by the one rule of iqpir.inference.knobs
(flag > the checkpoint's trained value > the model's default), which refuses knobs the model lacks.
Images at a fixed-size model's size (aligned faces) go through whole. Any other size is cut
into overlapping tiles of the model's size, restored in batches, and blended with a smooth
window, so the output has the input's size (times the model's scale) without seams and memory
stays bounded by one batch of tiles plus the output image. A model that takes any size (a
multiple of m) gets the whole image, padded to a multiple of m, or tiles of `tile` pixels.

Tiles overlap by half a tile by default, and the window is then the Hann window: each output
pixel is a blend weighted towards the centres of the tiles that cover it. The network's
output depends on where content falls in a tile (zero padding at the tile's borders, the
learned position embedding and per-position quality maps of the latent), so neighbouring
tiles disagree where they overlap; the half-tile cross-fade keeps that disagreement from
showing as edges at the tile stride, which a quarter-tile overlap did (its cross-fade, made
of the tiles' outermost pixels, was steepest at the overlap centres: a visible grid).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from PIL import Image

from iqpir import io
from iqpir.devices import resolve_device
from iqpir.inference import files
from iqpir.inference.engines import make_engine
from iqpir.inference.knobs import Knob, record, resolve_knobs


class NonFiniteOutput(ValueError):
    """The network's output holds NaN or infinity: an error for the image being restored,
    never an image (clamped to [0, 1], NaN would be written as black)."""


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


def _pad(image: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """(3, h, w) mirrored outwards (replicated where the image is too small to mirror)."""
    h, w = image.shape[1:]
    mode = "reflect" if max(top, bottom) < h and max(left, right) < w else "replicate"
    return torch.nn.functional.pad(image[None], (left, right, top, bottom), mode=mode)[0]


class Restorer:
    """A described model (iqpir.inference.files) on an engine (iqpir.inference.engines).

    Args:
        model: a DescribedModel, or a bare network described by `files.describe_network` with
            `image_size`, `kind`, `task` and `source` (an IQPIR-family network: called as
            model(lq (N,3,s,s) in [0,1], quality (N,) or None, alpha=..., fidelity=...) and
            returning an object with `.restored` (N,3,s,s)).
        image_size: a bare network's input size s.
        device, dtype, engine: where and how to run (engines.make_engine: "auto" is the fast
            bf16 path where the hardware has native bf16, its float32 twin on other CPUs with AVX2,
            "float32" the exact network). `backend` is the former name of `engine`.
        overlap: tile overlap in pixels (default half a tile: Hann windows; see the module docstring).
        kind: "iqpir" (quality-conditioned) or "codeformer"; task: "faces" | "general".
        source: provenance of official weights (file, sha256, licence), else None.
        own_model: the network is handed over (iqpir.load): the fast path converts it in place.
        tile: for models that take any size: the tile size (a multiple of the model's
            size_multiple); None restores each image whole.

    `supports_quality`, `supports_alpha` (with `default_alpha`) and `supports_fidelity` say which
    knobs exist; `scale` is the output size over the input size.
    """

    def __init__(self, model, image_size: int | None = None, device: str | torch.device = "cpu",
                 dtype: str = "auto", batch_size: int = 4, overlap: int | None = None, *,
                 kind: str = "iqpir", task: str = "general", source: dict | None = None, engine: str = "auto",
                 own_model: bool = False, tile: int | None = None, backend: str | None = None):
        if backend is not None:
            warnings.warn("Restorer(backend=...) is now engine=...", DeprecationWarning, stacklevel=2)
            engine = backend
        described = files.as_described(model, image_size, kind=kind, task=task, source=source)
        if isinstance(model, files.DescribedModel) and image_size not in (None, described.image_size):
            raise ValueError(f"image_size {image_size} differs from the described model's {described.image_size}")
        self.described = described
        # under torchrun each process takes its own GPU (LOCAL_RANK); alone, the first
        self.device = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0") or 0)) if isinstance(device, str) else device
        self.engine = make_engine(described, self.device, dtype, engine, own=own_model)
        self.model = self.engine.model  # the network (None for a graph; bf16 parts where own_model and fast)
        self.dtype = self.engine.dtype
        if dtype == "float16" and self.device.type == "cpu":
            # Most CPU kernels have no float16 arithmetic: autocast emulates it, far slower than float32.
            warnings.warn("float16 on the CPU is very slow (emulated): use --dtype auto, float32 or bfloat16 there",
                          UserWarning, stacklevel=2)
        self.batch_size = max(1, batch_size)
        m = described.size_multiple
        if described.image_size is None and tile is not None and (tile <= 0 or tile % m):
            raise ValueError(f"tile must be a positive multiple of {m} for this {described.kind} model, got {tile}")
        self.tile = described.image_size or tile  # None: whole images
        self.overlap = (self.tile or 0) // 2 if overlap is None else overlap
        k = described.scale
        self._window = blend_window(self.tile * k, self.overlap * k) if self.tile else None

    # What the described model is and supports (read by photos.py, the app, the benchmarks).
    image_size = property(lambda self: self.described.image_size)
    scale = property(lambda self: self.described.scale)
    kind = property(lambda self: self.described.kind)
    task = property(lambda self: self.described.task)
    source = property(lambda self: self.described.source)
    supports_quality = property(lambda self: self.described.quality)
    supports_fidelity = property(lambda self: self.described.fidelity)
    supports_alpha = property(lambda self: self.described.alpha is not None)
    default_alpha = property(lambda self: self.described.alpha)
    default_fidelity = property(lambda self: self.described.default_fidelity)
    adain = property(lambda self: self.described.adain)

    def knobs(self, quality: float | None = None, alpha: float | None = None, fidelity: float | None = None,
              blend: float | None = None) -> dict[str, Knob]:
        """Each knob's value and where it came from (iqpir.inference.knobs: flag > the checkpoint's
        trained value > the model's default); ValueError for a flag the model or engine cannot take."""
        resolved = resolve_knobs(self.described, quality, alpha, fidelity, blend)
        self.engine.check(resolved["fidelity"].value or 0.0)
        return resolved

    def settings(self, quality: float | None = None, alpha: float | None = None,
                 fidelity: float | None = None, blend: float | None = None) -> dict:
        """The values a restore with these arguments uses (None: the model has no such knob), and
        under "knobs" where each came from, for the CLI's line, restore.json and the app."""
        k = self.knobs(quality, alpha, fidelity, blend)
        return {"quality": k["quality"].value, "alpha": k["alpha"].value, "fidelity": k["fidelity"].value,
                "adain": self.adain, "dtype": str(self.dtype).replace("torch.", ""), "engine": self.engine.describe(),
                "knobs": record(k)}

    def _values(self, quality: float | None, alpha: float | None,
                fidelity: float | None) -> tuple[float | None, float | None, float]:
        """(quality, alpha, fidelity) as fed to the engine: the knob rule's values (w = 0 without CFT blocks)."""
        k = self.knobs(quality, alpha, fidelity)
        return k["quality"].value, k["alpha"].value, k["fidelity"].value or 0.0

    def _run(self, tiles: torch.Tensor, quality: float | None, alpha: float | None,
             fidelity: float = 0.0) -> torch.Tensor:
        out = self.engine(tiles, quality, alpha, fidelity)  # (N, 3, k h, k w) float32 CPU in [0, 1]
        if not bool(torch.isfinite(out).all()):  # clamped and written, NaN would be a black image
            bad = int((~torch.isfinite(out)).sum())
            raise NonFiniteOutput(f"the model gave {bad} non-finite values (NaN or infinity) for {len(out)} "
                                  f"tile{'s' if len(out) > 1 else ''} ({self.kind} model, {self.dtype}): broken weights, "
                                  "or a dtype that overflows (try --dtype float32); nothing written")
        return out

    def restore_one(self, image: torch.Tensor, quality: float | None = None, alpha: float | None = None,
                    fidelity: float | None = None, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """(3, H, W) in [0, 1] -> (3, kH, kW) in [0, 1] (k = scale); any size (tiles when it is
        not the model's size s x s). progress(done, total) is called after each batch of tiles."""
        quality, alpha, fidelity = self._values(quality, alpha, fidelity)
        _, h, w = image.shape
        s, k = self.tile, self.scale
        whole = s is None or (self.described.image_size is None and h <= s and w <= s)
        if whole:  # a model that takes any size, and the image fits one tile: whole, padded to a multiple
            m = self.described.size_multiple
            out = self._run(_pad(image, 0, -w % m, 0, -h % m)[None], quality, alpha, fidelity)[0]
            return out[:, : k * h, : k * w]
        if h == s and w == s:
            return self._run(image[None], quality, alpha, fidelity)[0]
        # A margin of overlap/2 mirrored pixels keeps the image border away from the tile
        # borders, where a convolutional network sees zero padding and does worst; images
        # smaller than a tile are padded up to one. Both are cropped off afterwards.
        m = self.overlap // 2
        top = left = m
        bottom, right = m + max(0, s - h - 2 * m), m + max(0, s - w - 2 * m)
        image = _pad(image, left, right, top, bottom)
        H, W = image.shape[1:]
        boxes = [(y, x) for y in tile_starts(H, s, self.overlap) for x in tile_starts(W, s, self.overlap)]
        acc = torch.zeros(3, k * H, k * W)
        weight = torch.zeros(1, k * H, k * W)
        S = k * s
        for i in range(0, len(boxes), self.batch_size):
            chunk = boxes[i : i + self.batch_size]
            tiles = torch.stack([image[:, y : y + s, x : x + s] for y, x in chunk])
            out = self._run(tiles, quality, alpha, fidelity)
            for (y, x), t in zip(chunk, out):
                acc[:, k * y : k * y + S, k * x : k * x + S] += t * self._window
                weight[:, k * y : k * y + S, k * x : k * x + S] += self._window
            if progress is not None:
                progress(i + len(chunk), len(boxes))
        return (acc / weight)[:, k * top : k * (top + h), k * left : k * (left + w)]

    def restore(self, images, quality: float | None = None, alpha: float | None = None, fidelity: float | None = None):
        """Restore tensors ((3,H,W) or (N,3,H,W) in [0,1]) or PIL images (one or a list).

        Returns the same kind as given. `quality` is the target S in [0, 1] (default 1.0, the
        highest; None for models without a quality condition), `alpha` the HQ+ fusion weight
        (default: the model's), `fidelity` CodeFormer's w (models with CFT blocks; default: the
        w the model was trained at, `default_fidelity`). Defaults come from the knob rule (`knobs`).
        """
        quality, alpha, fidelity = self._values(quality, alpha, fidelity)
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
        fits = self.tile is None or (self.image_size is None and h <= self.tile and w <= self.tile)
        if (h == self.image_size and w == self.image_size) or (self.image_size is None and fits):
            # whole batches: aligned crops at the model's size, or images of one size (video
            # frames) for a model that takes any size, padded to its multiple
            m, k = self.described.size_multiple, self.scale
            padded = torch.cat([_pad(im, 0, -w % m, 0, -h % m)[None] for im in images.float().cpu()])
            outs = [self._run(padded[i : i + self.batch_size], quality, alpha, fidelity)
                    for i in range(0, n, self.batch_size)]
            return torch.cat(outs)[:, :, : k * h, : k * w]
        return torch.stack([self.restore_one(im.float().cpu(), quality, alpha, fidelity) for im in images])

