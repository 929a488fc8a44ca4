"""Image input/output: the only place where dtype and range change.

Everything inside iqpir uses one convention: RGB, NCHW (or CHW for one image), float32 in
[0, 1]. `read_image` brings any common file to it (EXIF orientation applied; grey, palette,
CMYK, RGBA and 16-bit files handled) and remembers what the file was (grey or colour, 8 or 16
bits), so that `write_image` can give back a file of the same kind: grey in, grey out; 16-bit
grey in, 16-bit grey out (Pillow reads 16-bit colour files as 8-bit, so those come back 8-bit).

Every file iqpir writes goes through `atomic_write_bytes` (or `atomic_write` for writers that
need a path): a temporary file in the target's folder, checked against what was meant to be
written, flushed, then renamed, so a reader never sees half a file and a full disk never leaves
a truncated one; `OutputLog` records the outputs finished, so a rerun skips only complete ones. The temporary file is created with mode
0666 minus the umask, like any file a program opens for writing (0644 under umask 022);
`tempfile.mkstemp` would make every output 0600, unreadable to colleagues and web servers.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageReadError(OSError):
    """A file could not be read as an image (missing, empty, truncated or not an image).

    ``str(exc)`` is "PATH: REASON"; ``exc.reason`` is REASON alone, for reports that name
    the path themselves.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def __reduce__(self) -> tuple:
        return (type(self), (self.path, self.reason))


@dataclass
class LoadedImage:
    """An image in the package convention plus what is needed to write it back.

    rgb: (3, H, W) float32 in [0, 1]; alpha: (1, H, W) float32 in [0, 1] or None;
    grey: the file held one grey channel (the three rgb channels are then equal);
    bits: 16 for a 16-bit (or 32-bit integer/float) grey file, else 8;
    jpeg: a JPEG file's quantisation tables and chroma subsampling (`write_image(jpeg=...)`
        writes a JPEG with them, so that what is not restored loses nothing more), else None.
    metadata: what the file says about the picture, for its output (`write_image(metadata=...)`):
        "exif" (capture date, camera, GPS; the orientation tag reset to 1, since the pixels
        were turned upright on reading), "icc_profile" and "xmp", where the file has them.
    """

    rgb: torch.Tensor
    alpha: torch.Tensor | None
    path: Path
    grey: bool = False
    bits: int = 8
    jpeg: dict | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def grey_content(self) -> bool:
        """A grey file, or colour channels that hold a grey picture (`is_grey_content`)."""
        return self.grey or is_grey_content(self.rgb)


# A pixel is grey when its channels lie within 3/255 of each other (JPEG's chroma rounding stays
# below that); a picture is grey when fewer than 0.1% of its pixels are not (a few stray ones).
GREY_SPREAD = 3.0 / 255
GREY_SHARE = 0.001


def is_grey_content(rgb: torch.Tensor) -> bool:
    """(3, H, W): R = G = B within GREY_SPREAD at all but GREY_SHARE of the pixels."""
    spread = rgb.amax(0) - rgb.amin(0)
    return bool((spread > GREY_SPREAD + 1e-6).float().mean() <= GREY_SHARE)


def _jpeg_settings(img: Image.Image) -> dict | None:
    """The quantisation tables and subsampling of an opened JPEG, as Pillow's `save` takes them."""
    if img.format != "JPEG" or not getattr(img, "quantization", None):
        return None
    from PIL import JpegImagePlugin

    sampling = JpegImagePlugin.get_sampling(img)
    tables = [list(img.quantization[k]) for k in sorted(img.quantization)]
    return {"qtables": tables, "subsampling": sampling if sampling in (0, 1, 2) else 2}


def _pil_to_float(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None, bool, int]:
    """PIL image of any mode -> (H, W, 3) float32 RGB, optional (H, W) alpha, in [0, 1],
    whether the file was grey, and its bits per channel (8 or 16)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        wide = img.mode.startswith("I;16") or arr.max() > 255
        grey = np.clip(arr / (65535.0 if wide else 255.0), 0.0, 1.0).astype(np.float32)
        return np.repeat(grey[..., None], 3, axis=2), None, True, 16 if wide else 8
    if img.mode == "F":
        grey = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=2), None, True, 16
    is_grey = img.mode in ("L", "1", "LA", "La")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        img = img.convert("RGBA")
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return np.ascontiguousarray(arr[..., :3]), np.ascontiguousarray(arr[..., 3]), is_grey, 8
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return np.asarray(img, dtype=np.float32) / 255.0, None, is_grey, 8


def pil_to_tensors(img: Image.Image) -> tuple[torch.Tensor, torch.Tensor | None, bool, int]:
    """A decoded PIL image (orientation already applied) -> (rgb (3, H, W), alpha (1, H, W) or
    None, both float32 in [0, 1], whether it is grey, its bits per channel (8 or 16))."""
    rgb, alpha, grey, bits = _pil_to_float(img)
    rgb_t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
    alpha_t = None if alpha is None else torch.from_numpy(np.ascontiguousarray(alpha))[None].contiguous()
    return rgb_t, alpha_t, grey, bits


def _metadata(img: Image.Image) -> dict:
    """EXIF, ICC profile and XMP of an image already turned upright (`ImageOps.exif_transpose`),
    with the EXIF orientation set to 1: the pixels written are upright, so a viewer must not
    turn them again."""
    found = {}
    exif = img.getexif()
    if len(exif):
        if exif.get(0x0112, 1) != 1:
            exif[0x0112] = 1
        found["exif"] = exif.tobytes()
    for key, name in (("icc_profile", "icc_profile"), ("xmp", "xmp"), ("XML:com.adobe.xmp", "xmp")):
        value = img.info.get(key)
        if value and name not in found:
            found[name] = value.encode("utf-8") if isinstance(value, str) else value
    return found


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read an image file into the package convention.

    Returns:
        LoadedImage with rgb (3, H, W) float32 in [0, 1] and alpha (1, H, W) or None.

    Raises:
        ImageReadError: the file is missing, empty, truncated or not an image, holds several
            frames or pages (animated GIF/WebP/PNG, multi-page TIFF: refused, never cut to
            the first), or is HEIC/HEIF without pillow-heif.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(p, "no such file")
    if p.stat().st_size == 0:
        raise ImageReadError(p, "empty file")
    if p.suffix.lower() in HEIF_EXTENSIONS:
        if not _heif_available():
            raise ImageReadError(p, "a HEIC/HEIF photo: reading it needs pillow-heif: pip install 'iqpir[heif]'")
        _open_heif()
    try:
        with Image.open(p) as img:
            frames = getattr(img, "n_frames", 1)
            if frames > 1:  # restoring the first frame alone would drop the rest without a word
                kind = "pages" if img.format == "TIFF" else "frames"
                raise ImageReadError(p, f"holds {frames} {kind} (an animation or a multi-page file); iqpir restores "
                                        f"single images: extract the {kind} first (e.g. ffmpeg -i IN %04d.png)")
            img.load()
            jpeg = _jpeg_settings(img)
            upright = ImageOps.exif_transpose(img)
            metadata = _metadata(upright)
            rgb_t, alpha_t, grey, bits = pil_to_tensors(upright)
    except ImageReadError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageReadError(p, "not an image file (or a format Pillow cannot read)") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        why = str(exc).replace(f" '{p}'", "").replace(str(p), "the file")  # the report names the path
        raise ImageReadError(p, f"cannot read image ({why})") from exc
    if rgb_t.shape[1] == 0 or rgb_t.shape[2] == 0:
        raise ImageReadError(p, "image has zero size")
    return LoadedImage(rgb=rgb_t, alpha=alpha_t, path=p, grey=grey, bits=bits, jpeg=jpeg, metadata=metadata)


def load_rgb(path: str | os.PathLike) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]; alpha is dropped."""
    return read_image(path).rgb


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, H, W) float in [0, 1] -> (H, W, C) uint8, rounded."""
    if image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) tensor, got shape {tuple(image.shape)}")
    arr = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return arr.permute(1, 2, 0).numpy()


def to_grey(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB -> (1, H, W) luma Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601, as
    Pillow's RGB -> L conversion)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype, device=image.device)
    return (image * w[:, None, None]).sum(0, keepdim=True)


def to_pil(image: torch.Tensor, alpha: torch.Tensor | None = None, grey: bool = False, bits: int = 8) -> Image.Image:
    """(3, H, W) float in [0, 1] (+ optional (1, H, W) alpha) -> PIL RGB or RGBA; with `grey`
    L or LA (luma, `to_grey`), and with `bits=16` (no alpha) a 16-bit grey "I;16" image."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    if grey or image.shape[0] == 1:
        y = to_grey(image.float()) if image.shape[0] == 3 else image.float()
        if bits == 16 and alpha is None:
            arr = y[0].detach().clamp(0, 1).mul(65535).round().to(torch.int32).cpu().numpy().astype(np.uint16)
            return Image.fromarray(arr)  # uint16 -> "I;16"
        image = y
    rgb = to_uint8(image)
    if alpha is None:
        return Image.fromarray(rgb, mode="RGB") if rgb.shape[2] == 3 else Image.fromarray(rgb[..., 0], mode="L")
    a = to_uint8(alpha)
    return Image.fromarray(np.concatenate([rgb, a], axis=2), mode="RGBA" if rgb.shape[2] == 3 else "LA")


def from_pil(img: Image.Image) -> torch.Tensor:
    """PIL image of any mode -> (3, H, W) float32 in [0, 1] (EXIF orientation applied)."""
    return pil_to_tensors(ImageOps.exif_transpose(img))[0]


def pil_kind(img: Image.Image) -> tuple[bool, int]:
    """(grey, bits) of a PIL image, as `read_image` records them for a file."""
    if img.mode in ("I;16", "I;16B", "I;16L", "F"):
        return True, 16
    if img.mode == "I":
        return True, 16 if np.asarray(img).max(initial=0) > 255 else 8
    return img.mode in ("L", "1", "LA", "La"), 8


def _temp_file(path: Path) -> str:
    """Create an empty, hidden temporary file next to `path` with the umask's mode; its name."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            # 0o666 & ~umask, applied by the kernel: what open(path, "w") would give the file.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return str(tmp)
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def _remove_stale_temps(path: Path) -> None:
    """Remove the temporary files a killed run left for `path` (`_temp_file`'s names): the
    file about to be written is this process's to write, so nobody else is writing them."""
    stale = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{8}}\.tmp")
    try:
        names = [q for q in path.parent.iterdir() if stale.fullmatch(q.name)]
    except OSError:
        return
    for q in names:
        q.unlink(missing_ok=True)


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to the disk, where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Windows opens no folders; its renames are flushed with the file
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (network, FUSE) refuse fsync on a folder
    finally:
        os.close(fd)


class WriteError(OSError):
    """An output could not be written completely (disk full, I/O error, no permission, or the
    file did not read back as written). ``str(exc)`` is one line naming the file (and the free
    space when the disk is full); nothing of the file is left behind."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot write {path}: {reason}")

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"

    def __reduce__(self) -> tuple:
        return (type(self), (self.path, self.reason))


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def write_error(path: Path, exc: OSError) -> WriteError:
    """The one-line error (`WriteError`) for an OSError met while writing `path`."""
    if isinstance(exc, WriteError):
        return exc
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        try:
            free = _megabytes(shutil.disk_usage(path.parent).free)
        except OSError:
            free = "unknown"
        why = f"{why.lower()} ({free} free in {path.parent})"
    return WriteError(path, why)


@dataclass(frozen=True)
class Written:
    """A file `atomic_write_bytes` put in place: its path, size in bytes and SHA-256 (hex)."""

    path: Path
    size: int
    sha256: str


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written (a write may take fewer than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _sha256_of_file(path: str | os.PathLike) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Written:
    """Put `data` at `path` complete or not at all: written to a temporary file in the target's
    folder, read back and checked (size and SHA-256 equal the buffer's), flushed to the disk
    (file and folder), then renamed into place.

    The file gets the umask's mode (0644 under umask 022). Temporary files a killed run left
    for `path` are removed first; this one is removed on every way out.

    Raises:
        WriteError (an OSError): one line naming the file (and the free space on a full disk).
    """
    p = Path(path)
    want = hashlib.sha256(data).hexdigest()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(p)
        tmp = _temp_file(p)
    except OSError as exc:
        raise write_error(p, exc) from None
    try:
        fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        size, digest = _sha256_of_file(tmp)
        if size != len(data) or digest != want:
            raise WriteError(p, f"the file read back as {size} bytes that differ from the {len(data)} written")
        os.replace(tmp, p)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(p, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(p.parent)
    return Written(path=p, size=len(data), sha256=want)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], fsync: bool = False) -> Path:
    """Call write(tmp_path) on a temporary file next to `path`, then rename it onto `path`;
    for writers that need a path (safetensors). Data held in memory goes through
    `atomic_write_bytes`, which also verifies it.

    The file gets the umask's mode (0644 under umask 022). `fsync` flushes the data to the
    disk before the rename, and the folder after it (checkpoints). On any error the temporary
    file is removed.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(p)
    tmp = _temp_file(p)
    mode = os.stat(tmp).st_mode & 0o7777
    try:
        write(tmp)
        if os.stat(tmp).st_mode & 0o7777 != mode:  # a writer that made its own file (safetensors: 0600)
            os.chmod(tmp, mode)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_folder(p.parent)
    return p


HIGH_BIT_FORMATS = ("PNG", "TIFF")  # formats Pillow writes 16-bit grey and grey + alpha to


def write_image(path: str | os.PathLike, image: torch.Tensor, alpha: torch.Tensor | None = None, quality: int = 95,
                grey: bool = False, bits: int = 8, jpeg: dict | None = None, log: "OutputLog | None" = None,
                metadata: dict | None = None) -> Path:
    """Write (3, H, W) float in [0, 1]: encoded in memory, then put in place complete and
    verified (`atomic_write_bytes`); with `log`, recorded there as finished (`OutputLog`).

    jpeg: a JPEG input's tables (`LoadedImage.jpeg`): a JPEG output is written with its
        quantisation tables and chroma subsampling instead of `quality` (Pillow's "keep").
    grey: write one luma channel (L; LA with alpha in PNG and TIFF, RGBA in other formats
        that hold alpha), for an input that was grey.
    bits: 16 writes 16-bit grey where the format holds it (PNG, TIFF; not with alpha),
        else 8 bits. JPEG files cannot hold alpha; it is dropped for them.
    metadata: an input's EXIF, ICC profile and XMP (`LoadedImage.metadata`), written where the
        format holds them.
    """
    p = Path(path)
    fmt = Image.registered_extensions().get(p.suffix.lower())
    if fmt is None:
        raise ValueError(f"{p}: unknown image extension {p.suffix!r}")
    if fmt == "JPEG":
        alpha = None
    if not grey or fmt not in HIGH_BIT_FORMATS:
        bits = 8
        grey = grey and alpha is None
    pil = to_pil(image, alpha, grey=grey, bits=bits)
    options = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    if fmt == "JPEG" and jpeg is not None and len(jpeg["qtables"]) >= (1 if pil.mode == "L" else 2):
        options = {"qtables": jpeg["qtables"][:1] if pil.mode == "L" else jpeg["qtables"],
                   "subsampling": jpeg["subsampling"]}
    for key, value in (metadata or {}).items():
        if key == "icc_profile" and pil.mode not in ("RGB", "RGBA"):
            continue  # a colour profile does not describe the grey channel written for a grey input
        options[key] = value
    buf = BytesIO()
    pil.save(buf, format=fmt, **options)  # encoded in memory: what reaches the disk is checked against it
    written = atomic_write_bytes(p, buf.getbuffer())
    if log is not None:
        log.add(written)
    return p


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (UTF-8) atomically and verified (`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8")).path


class OutputLog:
    """The outputs a command has finished in its output folder, each with its size and SHA-256:
    OUT/.iqpir-done.jsonl, one JSON line {"path": relative path, "size", "sha256"} appended
    (and flushed to the disk) once the output is in place.

    A rerun skips an output only when it is complete (`complete`): logged, and its size and
    SHA-256 still the logged ones; or, for an output the log does not know (an earlier version
    wrote it, or the user put it there), an image that decodes to the end. Everything else is
    restored again. A line cut short by a kill is ignored. Hidden, so never taken for an input.
    """

    NAME = ".iqpir-done.jsonl"

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / self.NAME
        self.entries: dict[str, tuple[int, str]] = {}
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                entry = json.loads(line)
                self.entries[entry["path"]] = (int(entry["size"]), str(entry["sha256"]))
            except (ValueError, KeyError, TypeError):
                continue

    def _key(self, target: Path) -> str:
        return Path(os.path.relpath(os.path.abspath(target), os.path.abspath(self.out))).as_posix()

    def complete(self, target: str | os.PathLike) -> bool:
        """Whether `target` is a complete output (see the class); False when it is missing."""
        target = Path(target)
        if not target.is_file():
            return False
        logged = self.entries.get(self._key(target))
        if logged is not None:
            if target.stat().st_size != logged[0]:
                return False
            return _sha256_of_file(target) == logged
        if target.suffix.lower() not in IMAGE_EXTENSIONS:
            return True  # a clip: put in place only when whole (inference.video)
        try:
            with Image.open(target) as img:
                img.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return False
        return True

    def add(self, written: Written) -> None:
        """Log a finished output (one appended line, flushed to the disk)."""
        key = self._key(written.path)
        line = json.dumps({"path": key, "size": written.size, "sha256": written.sha256}) + "\n"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0), 0o666)
            try:
                _write_all(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        self.entries[key] = (written.size, written.sha256)

    def add_file(self, path: str | os.PathLike) -> None:
        """Log a finished output written by another writer (a clip), reading its size and hash."""
        size, digest = _sha256_of_file(path)
        self.add(Written(path=Path(path), size=size, sha256=digest))


HEIF_EXTENSIONS = (".heic", ".heif")  # phone photos: read with pillow-heif (extra heif) where installed


def _heif_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("pillow_heif") is not None


def _open_heif() -> None:
    """Let Pillow open HEIC/HEIF files (pillow-heif registers its opener; idempotent)."""
    import pillow_heif

    pillow_heif.register_heif_opener()


def image_extensions() -> tuple[str, ...]:
    """The extensions folders and globs yield: IMAGE_EXTENSIONS, and HEIC/HEIF with pillow-heif."""
    return IMAGE_EXTENSIONS + (HEIF_EXTENSIONS if _heif_available() else ())


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in image_extensions() and not path.name.startswith(".")


def _hidden_below(path: Path, root: Path) -> bool:
    """True when a component of `path` below `root` is hidden (.ipynb_checkpoints/, .git/, .x.png)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


@dataclass
class InputScan:
    """What a list of inputs holds: the image paths (unique, in order), the inputs that matched
    nothing, the files found in folders and globs that are not images iqpir reads (`ignored`:
    .gif, .heic without pillow-heif, .txt ...; hidden files are not counted), and the folders
    that could not be read, with why (`unreadable`)."""

    paths: list[Path]
    missing: list[str]
    ignored: list[Path]
    unreadable: list[tuple[str, str]]


def _walk(folder: Path, ignored: list[Path], unreadable: list[tuple[str, str]]) -> list[Path]:
    """The image files below `folder` (sorted), hidden files and folders left out; the other
    files go to `ignored`, folders that cannot be listed to `unreadable`. Linked folders are
    followed, each real folder once."""
    found: list[Path] = []
    visited: set[str] = set()

    def failed(exc: OSError) -> None:
        unreadable.append((str(exc.filename or folder), f"cannot read the folder ({exc.strerror or exc})"))

    for top, dirs, names in os.walk(folder, onerror=failed, followlinks=True):
        real = os.path.realpath(top)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            q = Path(top) / name
            if name.startswith(".") or not q.is_file():
                continue
            (found if is_image_path(q) else ignored).append(q)
    return sorted(found)


def scan_inputs(inputs: Iterable[str | os.PathLike]) -> InputScan:
    """Expand files, folders (recursive) and glob patterns into a sorted list of image paths,
    accounting for every other file met (`InputScan`).

    A file given by name is kept whatever its extension (so that a broken or mislabelled
    file is reported, not silently skipped); folders and globs yield image extensions only,
    and skip hidden files and everything under hidden folders (`.ipynb_checkpoints/`, `.git/`).
    """
    out: list[Path] = []
    missing: list[str] = []
    ignored: list[Path] = []
    unreadable: list[tuple[str, str]] = []
    for item in inputs:
        s = str(item)
        p = Path(s)
        if p.is_dir():
            found = _walk(p, ignored, unreadable)
        elif p.is_file():
            found = [p]
        elif any(ch in s for ch in "*?["):
            matches = [Path(q) for q in glob.glob(s, recursive=True) if Path(q).is_file()]
            found = sorted(q for q in matches if is_image_path(q))
            ignored.extend(sorted(q for q in matches if not is_image_path(q) and not q.name.startswith(".")))
        else:
            found = []
        if not found and not (p.is_dir() and any(u[0].startswith(s) for u in unreadable)):
            missing.append(s)
        out.extend(found)
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return InputScan(paths=unique, missing=missing, ignored=list(dict.fromkeys(ignored)), unreadable=unreadable)


def collect_inputs(inputs: Iterable[str | os.PathLike], strict_files: bool = False) -> tuple[list[Path], list[str]]:
    """(paths, missing) of `scan_inputs`: the unique image paths in order, and the inputs that
    matched nothing."""
    scan = scan_inputs(inputs)
    return scan.paths, scan.missing


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def glob_root(pattern: str) -> Path:
    """The fixed prefix of a glob pattern: its folders before the first one with a wildcard
    (`in/**/*.jpg` -> `in`, `*.png` -> `.`), the root its matches are mirrored from."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


class OutputClash(ValueError):
    """Two or more inputs would be written to one output; the message lists every clash."""


@dataclass
class OutputPlan:
    """Where a command that writes one file per input puts each output.

    pairs: (input, output) in input order; failed: (input, why) for inputs that matched
    nothing; targets: the output of every input found; ignored, unreadable: the files met that
    are not images iqpir reads, and the folders that could not be read (`InputScan`).
    """

    pairs: list[tuple[Path, Path]]
    failed: list[tuple[str, str]]
    targets: dict[Path, Path]
    ignored: list[Path] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def plan_outputs(inputs: Sequence[str | os.PathLike], out: str | os.PathLike,
                 extensions: Sequence[str] | None = None, flag: str = "--out", suffix: str | None = None,
                 rename: Callable[[Path, Path], Path] | None = None) -> OutputPlan:
    """The one output rule of `iqpir restore` (photos, faces, videos) and `iqpir degrade`.

    - each output mirrors its input's path relative to the input's root: the folder given
      (recursive), a glob's fixed prefix (`glob_root`), and for files given by name the folder
      they all share (`in/2019/a.jpg in/2020/a.jpg` -> `2019/a.jpg`, `2020/a.jpg`; one file: its name);
    - with `extensions`, a name whose suffix is not among them gets ".png" appended
      (a.pgm -> a.pgm.png); with `suffix` every output gets it (a.jpg -> a.png); `rename(input,
      relative output)` -> the relative output, last (a video's container);
    - two inputs never share an output: where they would (two folders given that both hold
      x.png, y.jpg and y.png under one `suffix`), the plan is refused before any work, naming
      every clash;
    - the output folder may not be an input folder nor lie inside one (a second run would
      take the first run's outputs for inputs), and no output may be an input file;
    - hidden files and folders are not inputs (`collect_inputs`).
    What to do with outputs that exist already (keep or replace) is the command's flag; resume
    keys on the relative path (`OutputLog`).

    Raises:
        OutputClash (a ValueError): two inputs would share an output.
        ValueError: the output folder is, or is inside, an input folder.
        FileExistsError: an output would overwrite an input, or `out` is not a folder.
    """
    out = Path(out)
    out_r = out.resolve()
    if out_r.exists() and not out_r.is_dir():
        raise FileExistsError(f"{flag} {out} exists and is not a folder")
    for item in inputs:
        s = str(item)
        folder = glob_root(s) if _is_glob(s) and "**" in s else Path(item)
        if folder.is_dir() and _is_within(out_r, folder.resolve()):
            what = "is" if out_r == folder.resolve() else "is inside"
            raise ValueError(
                f"{flag} {out} {what} the input folder {folder}: inputs could be overwritten, and a later run "
                "would take the outputs for inputs; "
                "choose an output folder outside the inputs"
            )
    exts = None if extensions is None else {e.lower() for e in extensions}
    rooted: list[tuple[Path, Path | None]] = []  # (input, its root; None: a file given by name)
    failed: list[tuple[str, str]] = []
    ignored: list[Path] = []
    unreadable: list[tuple[str, str]] = []
    seen: set[Path] = set()
    for item in inputs:
        s = str(item)
        scan = scan_inputs([item])
        found = scan.paths
        failed.extend((m, "no such file, folder or matching image") for m in scan.missing)
        unreadable.extend(scan.unreadable)
        ignored.extend(scan.ignored)
        root = Path(item) if Path(item).is_dir() else glob_root(s) if _is_glob(s) and not Path(item).is_file() else None
        for src in found:
            key = src.resolve()
            if key not in seen:
                seen.add(key)
                rooted.append((src, root))
    loose = [Path(os.path.abspath(src)).parent for src, root in rooted if root is None]
    shared = Path(os.path.commonpath(loose)) if loose else None
    pairs: list[tuple[Path, Path]] = []
    for src, root in rooted:
        # lexical, not resolved: a link in the inputs keeps its own name
        rel = Path(os.path.abspath(src)).relative_to(shared if root is None else os.path.abspath(root))
        if suffix is not None:
            rel = rel.with_suffix(suffix)
        elif exts is not None and rel.suffix.lower() not in exts:
            rel = rel.with_name(rel.name + ".png")
        if rename is not None:
            rel = rename(src, rel)
        pairs.append((src, out / rel))
    taken: dict[Path, list[Path]] = {}
    for src, dst in pairs:
        if dst.resolve() in seen:
            raise FileExistsError(f"the output of {src} would overwrite the input {dst}; choose another {flag} folder")
        taken.setdefault(dst, []).append(src)
    clashes = {dst: srcs for dst, srcs in taken.items() if len(srcs) > 1}
    if clashes:
        lines = [f"  {dst} <- {', '.join(map(str, srcs))}" for dst, srcs in clashes.items()]
        raise OutputClash(f"{len(clashes)} output{'s' if len(clashes) > 1 else ''} would be written by more than one "
                          "input; nothing was done. Give the folder that holds them all (its structure is kept), "
                          "or restore them into separate output folders:\n" + "\n".join(lines))
    return OutputPlan(pairs=pairs, failed=failed, targets=dict(pairs), ignored=list(dict.fromkeys(ignored)),
                      unreadable=unreadable)


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex, first 16 characters)."""
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
    """What a command over many files did: the files done, skipped and failed (with why), and
    `left`: the inputs not started because the run stopped (an output could not be written);
    `ignored`: the files found in the input folders and globs that are not images iqpir reads."""

    done: list[Path]
    skipped: list[Path]
    failed: list[tuple[str, str]]
    left: int = 0
    ignored: list[Path] = field(default_factory=list)

    @classmethod
    def empty(cls) -> "FileReport":
        return cls(done=[], skipped=[], failed=[])

    def stop(self, source: str | os.PathLike, exc: WriteError, left: int) -> None:
        """The run stops at `source`, whose output could not be written; `left` inputs after it
        are not started (a rerun of the same command does them)."""
        self.failed.append((str(source), str(exc)))
        self.left = left

    def ignored_note(self) -> str:
        """", 2 ignored (.gif 1, .heic 1: ...)" for the summary line; "" when none were."""
        if not self.ignored:
            return ""
        counts: dict[str, int] = {}
        for p in self.ignored:
            counts[p.suffix.lower() or "(no extension)"] = counts.get(p.suffix.lower() or "(no extension)", 0) + 1
        kinds = ", ".join(f"{ext} {n}" for ext, n in sorted(counts.items()))
        note = f", {len(self.ignored)} ignored ({kinds}: not images iqpir reads; --verbose names them"
        if any(ext in HEIF_EXTENSIONS for ext in counts):
            note += "; HEIC/HEIF needs pillow-heif: pip install 'iqpir[heif]'"
        if any(ext in (".gif", ".apng") for ext in counts):
            note += "; a GIF given by name is read when it holds one frame"
        return note + ")"

    def summary(self, verb: str = "processed") -> str:
        text = f"{len(self.done)} {verb}, {len(self.skipped)} skipped, {len(self.failed)} failed" + self.ignored_note()
        if self.failed:
            text += "\n" + "\n".join(f"  failed: {p}: {why}" for p, why in self.failed)
        if self.left:
            text += (f"\n  stopped: {self.left} input{'s' if self.left > 1 else ''} not started; the outputs "
                     "written are complete, and running the same command again finishes the rest")
        return text

    def announce(self, command: str, verb: str, out: str | Path) -> None:
        """Print the summary of a command that writes into the folder `out` to stderr, saying
        why files were skipped: `iqpir restore: 3 restored, 1 skipped (...) -> OUT`."""
        head, _, failures = self.summary(verb).partition("\n")
        if self.skipped:
            head += " (skipped: the outputs exist; pass --overwrite to replace them)"
        print(f"iqpir {command}: {head} -> {out}" + (f"\n{failures}" if failures else ""), file=sys.stderr)
