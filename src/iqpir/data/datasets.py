"""Folder datasets with deterministic, index-addressed sampling.

`sample(index, epoch_seed)` draws ALL of its randomness (crop position, flip, degradation
parameters and noise) from a torch.Generator seeded from (seed, epoch_seed, index). The
training loop decides which indices make each step, so a resumed run, one process or N
processes (DDP) see exactly the same samples. `__getitem__(index)` is `sample(index, 0)`.

A sample is a dict:
    hq: (3, size, size) float32 in [0, 1]
    lq: (3, size, size) float32 in [0, 1]
    quality: () float32, the HQ image's normalised quality S in [0, 1]
    path: str, the HQ image's resolved absolute path (the key of the score table)

Geometry ("mode"):
    crop    a random size x size crop (general images). An image with a side shorter than
            `size` is first upscaled (bicubic, aspect ratio kept) so that the crop fits:
            upscaling keeps the content natural, where mirror-padding would teach the
            model mirrored borders.
    resize  the whole image resized to size x size (bicubic, antialiased when shrinking),
            for aligned faces (FFHQ); the aspect ratio is not kept.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from iqpir.config import DegradationConfig
from iqpir.data.degradations import DEGRADATIONS, degrade
from iqpir.io import collect_inputs, load_rgb

Quality = Union[Mapping[str, float], Callable[[str], float], float]


def sample_generator(seed: int, epoch_seed: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch_seed, index) through sha256, so that nearby
    triples give unrelated streams (seed + index would make dataset seed 1 at index 0 equal
    dataset seed 0 at index 1)."""
    h = hashlib.sha256(f"iqpir-sample:{int(seed)}:{int(epoch_seed)}:{int(index)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


class MissingScores(KeyError, ValueError):
    """A score table lacks images of the dataset (a ValueError too, so the CLI reports it in one line)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def score_key(path: str | os.PathLike) -> str:
    """The key of a path in a score table: its resolved absolute path as a string."""
    return str(Path(path).resolve())


def _list_images(root: str | os.PathLike, what: str) -> list[Path]:
    r = Path(root)
    if not r.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {r}")
    paths, _ = collect_inputs([r])
    if not paths:
        raise FileNotFoundError(f"{what} folder {r} holds no images")
    return sorted(paths)


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) -> (3, h, w), bicubic (antialiased when shrinking), clipped to [0, 1]."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    shrink = size[0] < img.shape[-2] or size[1] < img.shape[-1]
    out = F.interpolate(img[None], size=size, mode="bicubic", align_corners=False, antialias=shrink)[0]
    return out.clamp(0.0, 1.0)


def _fit(img: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """The deterministic part of the geometry: resize mode -> (3, size, size); crop mode ->
    the image, upscaled (aspect kept) when a side is shorter than `size`."""
    if mode == "resize":
        return _resize(img, (size, size))
    h, w = img.shape[-2:]
    if h >= size and w >= size:
        return img
    scale = size / min(h, w)
    new = (max(size, math.ceil(h * scale - 1e-9)), max(size, math.ceil(w * scale - 1e-9)))
    return _resize(img, new)


def _crop_flip(
    images: list[torch.Tensor], size: int, mode: str, hflip: bool, g: torch.Generator
) -> list[torch.Tensor]:
    """The same random crop and flip on every image of the list (all of one shape).

    Three uniform numbers are always drawn (top, left, flip coin, in this order), whatever the
    mode and `hflip`, so that the degradation that follows draws the same parameters either way.
    """
    h, w = images[0].shape[-2:]
    u = torch.rand(3, generator=g, dtype=torch.float64)
    top = min(int(u[0] * (h - size + 1)), h - size)  # uniform over 0 .. h - size
    left = min(int(u[1] * (w - size + 1)), w - size)
    flip = bool(u[2] < 0.5)
    out = []
    for img in images:
        img = img[:, top : top + size, left : left + size]
        img = img.flip(-1) if hflip and flip else img.clone()  # never hand out the cached tensor
        out.append(img.contiguous())
    return out


class _Base(Dataset):
    """Shared: quality lookup, the optional in-memory cache, index checks."""

    def __init__(self, size: int, mode: str, hflip: bool, quality: Quality, seed: int, cache: bool,
                 skip_unscored: bool = False) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if mode not in ("crop", "resize"):
            raise ValueError(f"mode must be 'crop' or 'resize', got {mode!r}")
        self.size = int(size)
        self.mode = mode
        self.hflip = bool(hflip)
        self.seed = int(seed)
        self.cache = bool(cache)
        self._cache: dict[Path, torch.Tensor] = {}
        if quality is None:
            raise TypeError(
                "quality is required: a {path: score} table (from `iqpir score`), a callable(path) -> score, "
                "or one number for every image (e.g. 1.0)"
            )
        if isinstance(quality, bool) or not (
            isinstance(quality, (int, float, Mapping)) or callable(quality)
        ):
            raise TypeError("quality must be a {path: score} mapping, a callable(path) -> score or a number")
        self.quality = quality
        self.skip_unscored = bool(skip_unscored)
        self.left_out: list[Path] = []

    def _scored(self, paths: list[Path]) -> list[Path]:
        """The paths that have a score. A table lacking some is an error at construction (not
        hours into training), or with `skip_unscored` those images are left out and listed
        in `self.left_out`; leaving out every image is an error either way."""
        if not isinstance(self.quality, Mapping):
            return paths
        missing = [p for p in paths if score_key(p) not in self.quality]
        if not missing:
            return paths
        shown = ", ".join(str(p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        if self.skip_unscored and len(missing) < len(paths):
            self.left_out = missing
            return [p for p in paths if score_key(p) in self.quality]
        raise MissingScores(
            f"no quality score for {len(missing)} of {len(paths)} images: {shown}{more}; add them to the "
            "score table (`iqpir score FOLDER --out TABLE` scores only the files it lacks)"
        )

    def quality_of(self, path: str | os.PathLike) -> float:
        """The normalised quality S of an image (looked up by its resolved path)."""
        key = score_key(path)
        if isinstance(self.quality, Mapping):
            if key not in self.quality:
                raise KeyError(f"no quality score for {path} (key {key})")
            value = self.quality[key]
        elif callable(self.quality):
            value = self.quality(key)
        else:
            value = self.quality
        value = float(value)
        if not (0.0 <= value <= 1.0):
            raise ValueError(f"quality score of {path} is {value}; normalised scores must be in [0, 1]")
        return value

    def _load(self, path: Path) -> torch.Tensor:
        """The image after the deterministic geometry (`_fit`), cached when asked."""
        if self.cache and path in self._cache:
            return self._cache[path]
        img = _fit(load_rgb(path), self.size, self.mode)
        if self.cache:
            self._cache[path] = img
        return img

    def _index(self, index: int) -> int:
        n = len(self)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        return i % n

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def sample(self, index: int, epoch_seed: int = 0) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        return self.sample(index, 0)


class HQFolderDataset(_Base):
    """High-quality images from a folder (recursive), degraded on the fly.

    Args:
        root: folder of HQ images (listed recursively, sorted by path).
        size: output side.
        mode: "crop" or "resize" (module docstring).
        hflip: random horizontal flips (probability 1/2).
        degradation: the DegradationConfig, or None for lq = hq (stage 1 trains an
            autoencoder on HQ images only).
        preset: the degradation preset (default: degradation.preset).
        quality: a score table {resolved path: S} (keys `score_key(path)`), a callable
            (resolved path string) -> S, or one number for every image; required (None is a
            TypeError). A table missing an image raises MissingScores (a KeyError and a
            ValueError) at construction, naming the files; a score outside [0, 1] is a
            ValueError when sampled.
        seed: the dataset's seed, mixed with (epoch_seed, index) in `sample`.
        cache: keep decoded (and, in resize mode, resized) images in memory: for small data
            sets; each DataLoader worker holds its own copy (12 bytes per pixel).
        skip_unscored: leave out the images the table lacks (listed in `left_out`) instead
            of failing; at least one image must remain.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int,
        mode: Literal["crop", "resize"] = "crop",
        hflip: bool = True,
        degradation: DegradationConfig | None = None,
        preset: str | None = None,
        quality: Quality | None = None,
        seed: int = 0,
        cache: bool = False,
        skip_unscored: bool = False,
    ) -> None:
        super().__init__(size, mode, hflip, quality, seed, cache, skip_unscored)
        self.root = Path(root)
        self.paths = _list_images(root, "HQ image")
        self.degradation = degradation
        self.preset = None if degradation is None else (degradation.preset if preset is None else preset)
        if self.preset is not None and self.preset not in DEGRADATIONS:
            raise ValueError(f"unknown degradation preset {self.preset!r}; choose one of {sorted(DEGRADATIONS)}")
        self.paths = self._scored(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def sample(self, index: int, epoch_seed: int = 0) -> dict:
        """One training sample; everything random comes from (seed, epoch_seed, index)."""
        i = self._index(index)
        path = self.paths[i]
        g = sample_generator(self.seed, epoch_seed, i)
        (hq,) = _crop_flip([self._load(path)], self.size, self.mode, self.hflip, g)
        if self.degradation is None:
            lq = hq.clone()
        else:
            lq = degrade(hq[None], self.degradation, self.preset, g)[0]
        return {
            "hq": hq,
            "lq": lq,
            "quality": torch.tensor(self.quality_of(path), dtype=torch.float32),
            "path": score_key(path),
        }


def _pair_key(path: Path, root: Path) -> str:
    """The name two files are matched by: the path relative to its root, without extension."""
    return path.resolve().relative_to(root.resolve()).with_suffix("").as_posix()


def _keyed(paths: list[Path], root: Path, what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in paths:
        key = _pair_key(p, root)
        if key in out:
            raise ValueError(f"{what} folder {root}: {out[key].name} and {p.name} have the same name; keep one")
        out[key] = p
    return out


class PairedFolderDataset(_Base):
    """Real LQ/HQ pairs from two folders, matched by name.

    Files are matched by their path relative to their folder without the extension (so
    `lq/sub/a.jpg` pairs with `hq/sub/a.png`; two files differing only by extension in one
    folder are an error). Unmatched files are left out with a warning giving their count; no
    match at all is a ValueError listing some names of each side. When the LQ image's size
    differs from the HQ image's, the LQ image is resized (bicubic) to the HQ size first. The
    crop and flip are the same for both. Quality comes from the HQ path.

    Arguments as HQFolderDataset's; no degradation.
    """

    def __init__(
        self,
        lq_root: str | os.PathLike,
        hq_root: str | os.PathLike,
        size: int,
        mode: Literal["crop", "resize"] = "crop",
        hflip: bool = True,
        quality: Quality | None = None,
        seed: int = 0,
        cache: bool = False,
        skip_unscored: bool = False,
    ) -> None:
        super().__init__(size, mode, hflip, quality, seed, cache, skip_unscored)
        self.lq_root, self.hq_root = Path(lq_root), Path(hq_root)
        lq = _keyed(_list_images(lq_root, "LQ image"), self.lq_root, "LQ")
        hq = _keyed(_list_images(hq_root, "HQ image"), self.hq_root, "HQ")
        common = sorted(set(lq) & set(hq))
        if not common:
            raise ValueError(
                f"no file of {self.lq_root} matches one of {self.hq_root} by name; "
                f"LQ names: {sorted(lq)[:5]}, HQ names: {sorted(hq)[:5]}"
            )
        unmatched = len(lq) + len(hq) - 2 * len(common)
        if unmatched:
            lq_only = sorted(set(lq) - set(hq))
            hq_only = sorted(set(hq) - set(lq))
            warnings.warn(
                f"{unmatched} unmatched files left out ({len(lq_only)} LQ only, e.g. {lq_only[:3]}; "
                f"{len(hq_only)} HQ only, e.g. {hq_only[:3]})",
                stacklevel=2,
            )
        pairs = [(lq[k], hq[k]) for k in common]
        kept = {score_key(p) for p in self._scored([h for _, h in pairs])}
        self.pairs = [(lo, hi) for lo, hi in pairs if score_key(hi) in kept]
        self.paths = [h for _, h in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def _load_pair(self, lq_path: Path, hq_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache and lq_path in self._cache:
            return self._cache[lq_path], self._cache[hq_path]
        hq = load_rgb(hq_path)
        lq = _resize(load_rgb(lq_path), tuple(hq.shape[-2:]))
        hq, lq = _fit(hq, self.size, self.mode), _fit(lq, self.size, self.mode)  # same shapes in, same out
        if self.cache:
            self._cache[lq_path], self._cache[hq_path] = lq, hq
        return lq, hq

    def sample(self, index: int, epoch_seed: int = 0) -> dict:
        """One pair; the crop and flip come from (seed, epoch_seed, index)."""
        i = self._index(index)
        lq_path, hq_path = self.pairs[i]
        g = sample_generator(self.seed, epoch_seed, i)
        lq, hq = _crop_flip(list(self._load_pair(lq_path, hq_path)), self.size, self.mode, self.hflip, g)
        return {
            "hq": hq,
            "lq": lq,
            "quality": torch.tensor(self.quality_of(hq_path), dtype=torch.float32),
            "path": score_key(hq_path),
        }


def collate(samples: list[dict]) -> dict:
    """Stack samples: hq, lq (B, 3, s, s) float32; quality (B,) float32; path: list[str]."""
    if not samples:
        raise ValueError("collate: no samples")
    return {
        "hq": torch.stack([s["hq"] for s in samples]),
        "lq": torch.stack([s["lq"] for s in samples]),
        "quality": torch.stack([torch.as_tensor(s["quality"], dtype=torch.float32).reshape(()) for s in samples]),
        "path": [s["path"] for s in samples],
    }
