"""Image input/output: the only place where dtype and range change.

Everything inside iqpir uses one convention: RGB, NCHW (or CHW for one image), float32 in
[0, 1]. `read_image` brings any common file to it (EXIF orientation applied; grey, palette,
CMYK, RGBA and 16-bit files handled) and `write_image` goes back to 8-bit files, atomically.
"""

from __future__ import annotations

import glob
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageReadError(OSError):
    """A file could not be read as an image (missing, empty, truncated or not an image)."""


@dataclass
class LoadedImage:
    """An image in the package convention plus what is needed to write it back.

    rgb: (3, H, W) float32 in [0, 1]; alpha: (1, H, W) float32 in [0, 1] or None.
    """

    rgb: torch.Tensor
    alpha: torch.Tensor | None
    path: Path


def _pil_to_float(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """PIL image of any mode -> (H, W, 3) float32 RGB and optional (H, W) alpha, in [0, 1]."""
    alpha = None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(arr / peak, 0.0, 1.0).astype(np.float32)
        return np.repeat(grey[..., None], 3, axis=2), None
    if img.mode == "F":
        grey = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=2), None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        img = img.convert("RGBA")
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return np.ascontiguousarray(arr[..., :3]), np.ascontiguousarray(arr[..., 3])
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return np.asarray(img, dtype=np.float32) / 255.0, alpha


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read an image file into the package convention.

    Returns:
        LoadedImage with rgb (3, H, W) float32 in [0, 1] and alpha (1, H, W) or None.

    Raises:
        ImageReadError: the file is missing, empty, truncated or not an image.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise ImageReadError(f"{p}: empty file")
    try:
        with Image.open(p) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb, alpha = _pil_to_float(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{p}: cannot read image ({exc})") from exc
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageReadError(f"{p}: image has zero size")
    rgb_t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
    alpha_t = None if alpha is None else torch.from_numpy(alpha)[None].contiguous()
    return LoadedImage(rgb=rgb_t, alpha=alpha_t, path=p)


def load_rgb(path: str | os.PathLike) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]; alpha is dropped."""
    return read_image(path).rgb


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, H, W) float in [0, 1] -> (H, W, C) uint8, rounded."""
    if image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) tensor, got shape {tuple(image.shape)}")
    arr = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return arr.permute(1, 2, 0).numpy()


def to_pil(image: torch.Tensor, alpha: torch.Tensor | None = None) -> Image.Image:
    """(3, H, W) float in [0, 1] (+ optional (1, H, W) alpha) -> PIL RGB or RGBA."""
    rgb = to_uint8(image)
    if alpha is None:
        return Image.fromarray(rgb, mode="RGB") if rgb.shape[2] == 3 else Image.fromarray(rgb[..., 0], mode="L")
    a = to_uint8(alpha)
    return Image.fromarray(np.concatenate([rgb, a], axis=2), mode="RGBA")


def from_pil(img: Image.Image) -> torch.Tensor:
    """PIL image of any mode -> (3, H, W) float32 in [0, 1] (EXIF orientation applied)."""
    rgb, _ = _pil_to_float(ImageOps.exif_transpose(img))
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()


def write_image(path: str | os.PathLike, image: torch.Tensor, alpha: torch.Tensor | None = None, quality: int = 95) -> Path:
    """Write (3, H, W) float in [0, 1] atomically (temporary file in the same folder, then rename).

    JPEG files cannot hold alpha; it is dropped for them.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fmt = Image.registered_extensions().get(p.suffix.lower())
    if fmt is None:
        raise ValueError(f"{p}: unknown image extension {p.suffix!r}")
    if fmt == "JPEG":
        alpha = None
    pil = to_pil(image, alpha)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            pil.save(fh, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def collect_inputs(inputs: Iterable[str | os.PathLike], strict_files: bool = False) -> tuple[list[Path], list[str]]:
    """Expand files, folders (recursive) and glob patterns into a sorted list of image paths.

    A file given by name is kept whatever its extension (so that a broken or mislabelled
    file is reported, not silently skipped); folders and globs yield image extensions only.

    Returns:
        (paths, missing): the unique paths in order, and the inputs that matched nothing.
    """
    out: list[Path] = []
    missing: list[str] = []
    for item in inputs:
        s = str(item)
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and is_image_path(q))
        elif p.is_file():
            found = [p]
        elif any(ch in s for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(s, recursive=True) if Path(q).is_file() and is_image_path(Path(q)))
        else:
            found = []
        if not found:
            missing.append(s)
        out.extend(found)
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, missing


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex, first 16 characters)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def check_batch(images: torch.Tensor, name: str = "images", check_range: bool = True) -> torch.Tensor:
    """Validate a batch in the package convention: (N, 3, H, W) floating in [0, 1].

    check_range=False skips the value check (a device sync), for hot paths such as losses.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: expected shape (N, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: expected a floating tensor in [0, 1], got {images.dtype}")
    if check_range and images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(
            f"{name}: values must be in [0, 1], got [{images.min().item():.3f}, {images.max().item():.3f}]"
        )
    return images


@dataclass
class FileReport:
    """What a command over many files did: the files done, skipped and failed (with why)."""

    done: list[Path]
    skipped: list[Path]
    failed: list[tuple[str, str]]

    @classmethod
    def empty(cls) -> "FileReport":
        return cls(done=[], skipped=[], failed=[])

    def summary(self, verb: str = "processed") -> str:
        text = f"{len(self.done)} {verb}, {len(self.skipped)} skipped, {len(self.failed)} failed"
        if self.failed:
            text += "\n" + "\n".join(f"  failed: {p}: {why}" for p, why in self.failed)
        return text
