"""The web page and its HTTP API: `iqpir app [--checkpoint C]` (extra: `pip install 'iqpir[app]'`).

    GET  /             the page: upload, Quality/alpha/fidelity sliders, faces, before/after, download
    POST /api/restore  multipart: file `image`; fields quality, alpha, fidelity, blend, faces, upscale, keep_exif
                       -> image/png at the input's size times `upscale`
    GET  /api/health   the model, the queue, the limits, whether the face pipeline is installed

Why FastAPI + uvicorn and a page of our own rather than gradio (what face-restoration demos
use): the dependency is small (15 packages with everything they pull in); the page is one
file in this package, so nothing is ever fetched from the internet; and the HTTP API is ours
(plain multipart in, PNG out), so it is the same for the page, curl and scripts, and the
limits below are enforced where the bytes arrive.

What bad input and load get:
- An upload is read into memory as it arrives and never written to disk; over `max_bytes`
  (or an image over `max_pixels`, or an output over it after `upscale`) -> 413 with a message.
- Empty, truncated, corrupt -> 400; not an image -> 415; a bad field -> 400; each names the problem.
- One model in memory; one worker thread restores one image at a time; at most `queue`
  requests wait behind it, and further ones get 503 with Retry-After (the expected wait).
  A request takes its place in that queue only once its whole body has arrived and passed the
  size checks: a client that sends its body slowly holds a connection, never a restore slot,
  and is answered 408 (and disconnected) when the body is not in within `body_timeout`.
- A Host header outside the allow-list -> 421 (a page on another site that rebinds its DNS
  name to 127.0.0.1 cannot reach the app); a POST whose Origin is another site's -> 403.
- After the last queued request the worker hands freed memory back to the system (glibc).
- Output PNGs carry no EXIF from the upload unless `keep_exif` is true (the ICC colour
  profile is kept: it only says how to show the colours).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# (Request, defined inside create_app) when they are defined.

import asyncio
import ipaddress
import json
import logging
import math
import socket
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from iqpir import __version__
from iqpir import io as iio
from iqpir.devices import release_freed_memory
from iqpir.inference.photos import Finish, face_restorer_fn

log = logging.getLogger("iqpir.app")

_EXTRA = "pip install 'iqpir[app]'"
_MULTIPART_OVERHEAD = 64 * 1024  # form fields and part headers around the image
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no", "")
FIELDS = ("quality", "alpha", "fidelity", "blend", "faces", "upscale", "keep_exif")
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class AppLimits:
    """What one request may ask for.

    max_bytes: largest upload (the image file); max_pixels: largest image, input or output;
    queue: requests that may wait behind the one being restored; max_upscale: largest `upscale`.
    """

    max_bytes: int = 25_000_000
    max_pixels: int = 40_000_000
    queue: int = 8
    max_upscale: int = 4

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError("the upload limits must be positive")
        if self.queue < 0:
            raise ValueError(f"the queue length must be >= 0, got {self.queue}")
        if self.max_upscale < 1:
            raise ValueError(f"max_upscale must be >= 1, got {self.max_upscale}")


class RequestError(Exception):
    """An expected failure of one request: answered with `status` and a one-line message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class Params:
    """The form fields of one restore request, validated."""

    quality: float | None
    alpha: float | None
    fidelity: float | None
    faces: bool
    upscale: int
    keep_exif: bool
    blend: float | None = None  # None: the knob rule's value (1, the restoration as it is)


# --------------------------------------------------------------------------------------
# The model and what it supports
# --------------------------------------------------------------------------------------


def describe_model(restorer: Any, name: str | None = None) -> dict[str, Any]:
    """What the page and /api/health need to know about a restorer.

    Read defensively: restorers of official CodeFormer weights have a fidelity control and no
    quality control; single-codebook models have no HQ+ weight (alpha). The fidelity w starts
    at the model's own (the w an iqpir checkpoint was trained at; 0 for the official releases).
    """
    model = getattr(restorer, "model", None)
    quantizer = getattr(model, "quantizer", None)
    has_hq = quantizer is not None and getattr(quantizer, "hq", None) is not None
    default_alpha = getattr(restorer, "default_alpha", getattr(quantizer, "alpha", None) if has_hq else None)
    params = sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else None
    dtype = getattr(restorer, "dtype", None)
    fidelity = getattr(restorer, "default_fidelity", None)
    return {
        "name": name,
        "kind": getattr(restorer, "kind", "iqpir"),
        "task": getattr(restorer, "task", "general"),
        "image_size": getattr(restorer, "image_size", None),
        "device": str(getattr(restorer, "device", "cpu")),
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "parameters": params,
        "supports_quality": bool(getattr(restorer, "supports_quality", True)),
        "supports_fidelity": bool(getattr(restorer, "supports_fidelity", False)),
        "supports_alpha": bool(getattr(restorer, "supports_alpha", has_hq or default_alpha is not None)),
        "default_alpha": float(default_alpha) if isinstance(default_alpha, (int, float)) else None,
        "default_fidelity": float(fidelity) if isinstance(fidelity, (int, float)) else 0.0,
        "adain": getattr(restorer, "adain", None),
    }


def find_face_pipeline() -> tuple[Callable | None, str | None]:
    """iqpir.faces.restore_photo when the face pipeline is installed -> (function, None), else (None, why)."""
    try:
        from iqpir.faces import restore_photo
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken optional dependency under it
        return None, f"face pipeline not installed ({exc.__class__.__name__}: {exc}); pip install 'iqpir[faces]'"
    return restore_photo, None


# --------------------------------------------------------------------------------------
# The queue: one worker, a bounded number of admitted requests
# --------------------------------------------------------------------------------------


class RestoreQueue:
    """Runs jobs one at a time on one thread; admits at most `waiting + 1` requests at once.

    Thread-safe and independent of any event loop (the test client and uvicorn each run their own).
    When the last submitted job ends, `on_idle` runs on the worker thread (the app gives the
    job's freed memory back there, so a server that restored one large photo does not keep its
    peak; between queued jobs the memory is kept for the next).
    """

    def __init__(self, waiting: int, on_idle: Callable[[], Any] | None = None):
        self.capacity = waiting + 1
        self._lock = threading.Lock()
        self._admitted = 0
        self._running = 0
        self._submitted = 0
        self._done = 0
        self._mean_seconds = 1.0
        self._on_idle = on_idle
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iqpir-restore")

    def try_admit(self) -> bool:
        with self._lock:
            if self._admitted >= self.capacity:
                return False
            self._admitted += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the mean job time times the jobs ahead."""
        with self._lock:
            return max(1, math.ceil(self._mean_seconds * self._admitted))

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"running": self._running, "waiting": self._admitted - self._running,
                    "capacity": self.capacity, "done": self._done}

    def _timed(self, fn: Callable, *args: Any) -> Any:
        with self._lock:
            self._running += 1
        t0 = time.perf_counter()
        try:
            return fn(*args)  # its locals (the decoded image, the activations) are freed on return
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                self._running -= 1
                self._done += 1
                self._submitted -= 1
                idle = self._submitted == 0
                self._mean_seconds = dt if self._done == 1 else 0.8 * self._mean_seconds + 0.2 * dt
            if idle and self._on_idle is not None:
                self._on_idle()

    async def run(self, fn: Callable, *args: Any) -> Any:
        with self._lock:
            self._submitted += 1
        return await asyncio.wrap_future(self._executor.submit(self._timed, fn, *args))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------
# Who may ask: the Host and Origin headers
# --------------------------------------------------------------------------------------

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_name(authority: str) -> str | None:
    """'Example.COM:7860' -> 'example.com', '[::1]:7860' -> '::1'; None when it is no host name.

    The port is dropped (any port is the same app behind a forwarded port); a trailing dot is
    dropped ('localhost.' is 'localhost').
    """
    text = authority.strip().lower()
    if text.startswith("["):  # an IPv6 literal: [addr] or [addr]:port
        end = text.find("]")
        rest = text[end + 1:]
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return text[1:end] or None
    name, _, port = text.partition(":") if text.count(":") == 1 else (text, "", "")
    if port and not port.isdigit():
        return None
    name = name.rstrip(".")
    if not name or any(c in name for c in "/\\@?#% \t\r\n"):
        return None
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostAllowList:
    """The names (Host headers, without port) this app answers to.

    DNS rebinding: a page on another site re-points its own DNS name at 127.0.0.1, and the
    browser then lets it read this app, on this machine, as "its own" site, with that name in
    the Host header. Answering only the names the app was bound to closes that.

    names: host names and addresses, normalised by `host_name`; trusted: the names added with
    `--allowed-host` (a reverse proxy's public name, say), also accepted as a POST's Origin
    whatever Host the proxy forwards; any_address: every IP-literal Host is accepted too, as
    on a wildcard bind (0.0.0.0, ::) where clients use whichever address reaches the machine
    (a rebinding page has a DNS name, never an address, in its Host header).
    """

    names: frozenset[str]
    trusted: frozenset[str] = frozenset()
    any_address: bool = False

    @classmethod
    def for_bind(cls, host: str, extra: Iterable[str] = ()) -> "HostAllowList":
        """The allow-list of an app listening on `host`: the loopback names when it is a loopback
        address or 'localhost'; every address and this machine's name on a wildcard bind;
        otherwise `host` itself. Plus `extra` (names with or without a port) in each case."""
        trusted = set()
        for name in extra:
            parsed = host_name(name)
            if parsed is None:
                raise ValueError(f"--allowed-host {name!r} is not a host name")
            trusted.add(parsed)
        bound = host_name(host if ":" not in host or host.startswith("[") else f"[{host}]") or host.lower()
        names = {bound}
        wildcard = bound in ("", "0.0.0.0", "::")
        if _is_loopback(bound) or wildcard:
            names.update(LOOPBACK_NAMES)
        if wildcard:
            names.update(n for n in (socket.gethostname().lower(), socket.getfqdn().lower()) if n)
        names.discard("")
        return cls(frozenset(names | trusted), frozenset(trusted), any_address=wildcard)

    def allows_host(self, header: str | None) -> bool:
        name = host_name(header or "")
        if name is None:
            return False
        return name in self.names or (self.any_address and _is_ip(name))

    def describe(self) -> str:
        shown = sorted(self.names) + (["any IP address"] if self.any_address else [])
        return ", ".join(shown)


def origin_allowed(origin: str | None, host: str | None, hosts: HostAllowList | None) -> bool:
    """Whether a POST may come from `origin` (its Origin header) to this app reached as `host`.

    No Origin (curl, scripts, a same-origin form in some browsers): allowed; browsers always
    send it on a cross-site request, where it is the other site's. Otherwise its host[:port]
    must be the Host the request came to (the page served by this app posting to it), or one
    of the trusted --allowed-host names. 'null' (sandboxed frames, file:// pages) is refused.
    """
    if origin is None:
        return True
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    if host is not None and parts.netloc.lower() == host.strip().lower():
        return True
    name = host_name(parts.netloc)
    return hosts is not None and name is not None and name in hosts.trusted


# --------------------------------------------------------------------------------------
# Parsing a request
# --------------------------------------------------------------------------------------


def _number(fields: dict[str, str], name: str, lo: float, hi: float) -> float | None:
    text = fields.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise RequestError(400, f"field '{name}' must be a number in [{lo:g}, {hi:g}], got {text[:40]!r}") from None
    if not (lo <= value <= hi):  # NaN fails too
        raise RequestError(400, f"field '{name}' must be in [{lo:g}, {hi:g}], got {text[:40]}")
    return value


def _flag(fields: dict[str, str], name: str) -> bool:
    text = fields.get(name, "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RequestError(400, f"field '{name}' must be true or false, got {text[:40]!r}")


def parse_params(fields: dict[str, str], model: dict[str, Any], limits: AppLimits) -> Params:
    """Validate the form fields against what the model supports."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; the fields are 'image' and {list(FIELDS)}")
    quality = _number(fields, "quality", 0.0, 1.0)  # None: the knob rule's value (iqpir.inference.knobs)
    if quality is not None and not model["supports_quality"]:
        raise RequestError(400, f"this {model['kind']} model has no quality control; leave 'quality' out")
    alpha = _number(fields, "alpha", 0.0, 2.0)  # the library's range; the page's slider stops at 1
    if alpha is not None and not model["supports_alpha"]:
        raise RequestError(400, f"this {model['kind']} model has no HQ+ codebook; leave 'alpha' out")
    fidelity = _number(fields, "fidelity", 0.0, 1.0)
    if fidelity is not None and not model["supports_fidelity"]:
        raise RequestError(400, f"this {model['kind']} model has no fidelity control (it needs CodeFormer's CFT blocks); "
                                "leave 'fidelity' out")
    upscale_text = fields.get("upscale", "").strip() or "1"
    if not upscale_text.isdigit() or not 1 <= int(upscale_text) <= limits.max_upscale:
        raise RequestError(400, f"field 'upscale' must be an integer from 1 to {limits.max_upscale}, got {upscale_text[:40]!r}")
    blend = _number(fields, "blend", 0.0, 1.0)
    return Params(quality=quality, alpha=alpha, fidelity=fidelity, faces=_flag(fields, "faces"),
                  upscale=int(upscale_text), keep_exif=_flag(fields, "keep_exif"), blend=blend)


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.1f} megapixels"


def probe_image(data: bytes, upscale: int, limits: AppLimits) -> tuple[str, int, int]:
    """Read only the header: (format, width, height), or a RequestError naming the problem."""
    if not data:
        raise RequestError(400, "the uploaded file is empty")
    if len(data) > limits.max_bytes:
        raise RequestError(413, f"the upload is {len(data) / 1e6:.1f} MB; the limit is {limits.max_bytes / 1e6:g} MB")
    try:
        with Image.open(BytesIO(data)) as im:
            fmt, (w, h) = im.format or "?", im.size
    except Image.DecompressionBombError:
        raise RequestError(413, f"the image is over {_megapixels(limits.max_pixels)}, the limit") from None
    except UnidentifiedImageError:
        if _looks_like_video(data):
            raise RequestError(415, "the web page restores photos only; restore a video with "
                                    "`iqpir restore clip.mp4 --out OUT/`") from None
        raise RequestError(415, "the upload is not an image in a format this server reads "
                                "(PNG, JPEG, WebP, TIFF, BMP, GIF, PPM ...)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RequestError(400, f"the image header cannot be read: {exc}") from None
    if w * h == 0:
        raise RequestError(400, f"the image has zero size ({w}x{h})")
    out = w * h * upscale * upscale
    if out > limits.max_pixels:
        what = f"the image is {w}x{h} = {_megapixels(w * h)}" if upscale == 1 else \
            f"the image is {w}x{h}; upscale {upscale} would make {_megapixels(out)}"
        raise RequestError(413, f"{what}; the limit is {_megapixels(limits.max_pixels)}")
    return fmt, w, h


@dataclass
class Decoded:
    rgb: torch.Tensor  # (3, H, W) in [0, 1], EXIF orientation applied
    alpha: torch.Tensor | None  # (1, H, W) or None
    exif: bytes | None  # the upload's EXIF with the orientation tag removed, when asked for
    icc: bytes | None


def _looks_like_video(data: bytes) -> bool:
    """MP4/MOV (an 'ftyp' box), Matroska/WebM (EBML) or AVI (RIFF....AVI) by their first bytes."""
    return data[4:8] == b"ftyp" or data[:4] == b"\x1a\x45\xdf\xa3" or (data[:4] == b"RIFF" and data[8:11] == b"AVI")


def decode_image(data: bytes, keep_exif: bool) -> Decoded:
    """Decode fully (this is where truncated and corrupt files show) into the package convention."""
    try:
        with Image.open(BytesIO(data)) as im:
            im.load()
            upright = ImageOps.exif_transpose(im)  # also drops the orientation tag from its EXIF
            rgb, alpha, _, _ = iio.pil_to_tensors(upright)
            exif = upright.getexif() if keep_exif else None
            icc = im.info.get("icc_profile")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise RequestError(400, f"the image is truncated or corrupt: {exc}") from None
    return Decoded(
        rgb=rgb,
        alpha=alpha,
        exif=exif.tobytes() if exif else None,
        icc=icc if isinstance(icc, bytes) and icc else None,
    )


def encode_png(rgb: torch.Tensor, alpha: torch.Tensor | None, exif: bytes | None, icc: bytes | None) -> bytes:
    """A PNG with nothing from the upload but the pixels, the colour profile and (if given) EXIF."""
    extra: dict[str, Any] = {}
    if exif:
        extra["exif"] = exif
    if icc:
        extra["icc_profile"] = icc
    buf = BytesIO()
    iio.to_pil(rgb, alpha).save(buf, format="PNG", compress_level=3, **extra)
    return buf.getvalue()


def _resize(image: torch.Tensor, factor: int) -> torch.Tensor:
    """(C, H, W) -> (C, factor*H, factor*W), bicubic, clamped to [0, 1]."""
    if factor == 1:
        return image
    out = torch.nn.functional.interpolate(image[None], scale_factor=factor, mode="bicubic", align_corners=False)
    return out[0].clamp(0, 1)


def _safe_stem(filename: str | None) -> str:
    """The upload's name without folder or extension, kept to letters and digits of any script
    and '-_.' (everything else, quotes, ';', control characters, separators, becomes '_')."""
    return _clean(unicodedata.normalize("NFC", Path(filename or "image").stem))


def _clean(stem: str) -> str:
    clean = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80].strip("._")
    return clean or "image"


def content_disposition(filename: str | None, suffix: str = "-restored.png") -> str:
    """The download's Content-Disposition (RFC 6266): `filename="..."` in ASCII for every client,
    and, when the name is not ASCII, `filename*=UTF-8''...` (RFC 5987, percent-encoded UTF-8),
    which browsers prefer. A header is Latin-1 on the wire, so the name itself never goes in raw.
    """
    stem = _safe_stem(filename)
    # 'Café' -> 'Cafe'; a name with no ASCII letters at all ('Фото') -> 'image'
    ascii_stem = _clean(unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii"))
    value = f'inline; filename="{ascii_stem}{suffix}"'
    if not stem.isascii():
        value += f"; filename*=UTF-8''{quote(stem + suffix, safe='')}"
    return value


# --------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------


class RestoreService:
    """Holds the one restorer; does the work of one request on the worker thread."""

    def __init__(self, restorer: Any, model_info: dict[str, Any], face_pipeline: Callable | None):
        self.restorer = restorer
        self.model = model_info
        self.face_pipeline = face_pipeline

    def _model_kwargs(self, p: Params) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.model["supports_quality"] and p.quality is not None:
            kw["quality"] = p.quality
        if p.alpha is not None:
            kw["alpha"] = p.alpha
        if p.fidelity is not None:
            kw["fidelity"] = p.fidelity
        return kw

    def restore(self, data: bytes, p: Params) -> tuple[bytes, dict[str, str]]:
        """Upload bytes -> (PNG bytes, response headers). Runs on the worker thread."""
        t0 = time.perf_counter()
        img = decode_image(data, p.keep_exif)
        kw = self._model_kwargs(p)
        knobs = self.restorer.knobs(kw.get("quality"), kw.get("alpha"), kw.get("fidelity"), p.blend)
        blend = knobs["blend"].value
        headers: dict[str, str] = {}
        if p.faces:
            if self.face_pipeline is None:
                raise RequestError(400, "face pipeline not installed (pip install 'iqpir[faces]')")

            # the CLI's face path: 512-px crops resized to a face model's own size and back
            restore_faces = face_restorer_fn(self.restorer, kw.get("quality"), kw.get("alpha"), kw.get("fidelity"),
                                             blend=blend)
            try:
                restored, report = self.face_pipeline(img.rgb, restore_faces, upscale=p.upscale)
            except ImportError as exc:  # the pipeline is there but its detector's extra is not
                raise RequestError(400, f"face pipeline not installed: {exc}") from None
            faces = report.get("faces") if isinstance(report, dict) else None
            if isinstance(faces, list):
                headers["X-Faces"] = str(len(faces))
        else:
            original = _resize(img.rgb, p.upscale)
            restored = Finish(blend=blend).mix(self.restorer.restore(original, **kw), original)
        if iio.is_grey_content(img.rgb):  # grey in, grey out (as the CLI: Finish, colour "auto")
            restored = iio.to_grey(restored).expand(3, -1, -1)
        alpha = None if img.alpha is None else _resize(img.alpha, p.upscale)
        if alpha is not None and alpha.shape[-2:] != restored.shape[-2:]:
            alpha = None
        png = encode_png(restored, alpha, img.exif, img.icc)
        headers["X-Restore-Seconds"] = f"{time.perf_counter() - t0:.3f}"
        # the values this restore used (the knob rule's where the form left one out), and where each came from
        used = self.restorer.settings(kw.get("quality"), kw.get("alpha"), kw.get("fidelity"), p.blend)
        headers["X-Settings"] = json.dumps({k: used[k] for k in ("quality", "alpha", "fidelity", "adain")},
                                           separators=(",", ":"))
        headers["X-Knobs"] = json.dumps(used["knobs"], separators=(",", ":"))
        headers["X-Image-Size"] = f"{restored.shape[-1]}x{restored.shape[-2]}"
        return png, headers


async def _chunks(request: Any, deadline: float):
    """The request body's chunks as they arrive, until `deadline` (the event loop's clock):
    past it, TimeoutError, however steadily a slow sender keeps the connection alive."""
    stream = request.stream().__aiter__()
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await anext(stream)
        except StopAsyncIteration:
            return
        yield chunk


async def _read_form(request: Any, limits: AppLimits,
                     deadline: float) -> tuple[dict[str, str], tuple[str | None, bytes] | None]:
    """Stream a multipart body into memory (never to disk), stopping at the size limit, and
    at `deadline` (the event loop's clock): a body not in by then is a 408.

    Returns (fields, (filename, bytes) of the part 'image' or None).
    """
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import FormParser, parse_options_header
    from starlette.requests import ClientDisconnect

    mime, options = parse_options_header(request.headers.get("content-type", ""))
    if mime != b"multipart/form-data":
        shown = mime.decode("latin-1")[:60] or "none"
        raise RequestError(415, f"send multipart/form-data with the image in the field 'image' (got Content-Type {shown})")
    body_limit = limits.max_bytes + _MULTIPART_OVERHEAD
    # The client may still be sending what is left: this connection cannot carry another request.
    too_large = RequestError(413, f"the upload is over the limit of {limits.max_bytes / 1e6:g} MB",
                             {"Connection": "close"})
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > body_limit:
        await _drain(request, _drain_limit(limits), deadline)
        raise too_large
    fields: dict[str, str] = {}
    files: list[Any] = []

    def on_field(field: Any) -> None:
        name = (field.field_name or b"").decode("utf-8", "replace")
        fields[name] = (field.value or b"").decode("utf-8", "replace")

    def on_file(file: Any) -> None:
        files.append(file)

    received = 0
    try:
        # MAX_MEMORY_FILE_SIZE: infinity keeps every part in a BytesIO (the body size is bounded here).
        parser = FormParser("multipart/form-data", on_field, on_file, boundary=options.get(b"boundary"),
                            config={"MAX_MEMORY_FILE_SIZE": float("inf")})
        async for chunk in _chunks(request, deadline):
            received += len(chunk)
            if received > body_limit:  # keep reading (and dropping) a while: see _drain
                if received > _drain_limit(limits):
                    break
                continue
            parser.write(chunk)
        if received > body_limit:
            raise too_large
        parser.finalize()
    except (FormParserError, ValueError) as exc:
        raise RequestError(400, f"the multipart body is malformed: {exc}") from None
    except ClientDisconnect:
        raise RequestError(400, "the client went away before sending the whole body") from None
    except TimeoutError:
        if received > body_limit:
            raise too_large from None
        raise RequestError(408, "the request body did not arrive in time; send it at once",
                           {"Connection": "close"}) from None
    image = None
    for f in files:
        name = (f.field_name or b"").decode("utf-8", "replace")
        if name != "image":
            raise RequestError(400, f"unexpected file field {name!r}; send the image in the field 'image'")
        if image is not None:
            raise RequestError(400, "send one image per request")
        assert f.in_memory
        f.file_object.seek(0)
        fname = f.file_name.decode("utf-8", "replace") if f.file_name else None
        image = (fname, f.file_object.read())
    if "image" in fields:  # a text field named image: a form without enctype=multipart, or curl -F image=x
        raise RequestError(400, "the field 'image' is text, not a file; send the file itself (curl -F image=@photo.jpg)")
    return fields, image


def _drain_limit(limits: AppLimits) -> int:
    return 2 * (limits.max_bytes + _MULTIPART_OVERHEAD)


async def _drain(request: Any, limit: int, deadline: float) -> None:
    """Read and drop what is left of a refused request's body (up to `limit` bytes, until
    `deadline` on the event loop's clock), so that the client, still sending, gets to read
    the answer instead of a reset connection."""
    seen = 0
    try:
        async for chunk in _chunks(request, deadline):
            seen += len(chunk)
            if seen > limit:
                return
    except Exception:  # noqa: BLE001 - consumed, the client went away or too slow: nothing left to do
        return


def _page() -> str:
    from importlib.resources import files

    return (files("iqpir") / "app_static" / "index.html").read_text(encoding="utf-8")


def create_app(restorer: Any, *, limits: AppLimits | None = None, name: str | None = None,
               face_pipeline: Callable | None | str = "auto", allowed_hosts: HostAllowList | None = None,
               body_timeout: float = 120.0):
    """The ASGI application around one restorer.

    face_pipeline: "auto" (iqpir.faces.restore_photo when it imports), None (no faces), or a
    function with restore_photo's signature. allowed_hosts: the Host names answered (others
    get 421); None answers any Host, for an app mounted where the listening address is not
    known here (`serve` passes `HostAllowList.for_bind` of the address it listens on).
    body_timeout: seconds from a POST's headers to the end of its body; later -> 408.
    """
    if not body_timeout > 0:
        raise ValueError(f"the body timeout must be > 0 seconds, got {body_timeout}")
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import HTMLResponse, JSONResponse, Response
    except ImportError as exc:
        raise ImportError(f"the web app needs FastAPI: {_EXTRA} ({exc})") from exc

    limits = limits or AppLimits()
    faces_why = None
    if face_pipeline == "auto":
        face_pipeline, faces_why = find_face_pipeline()
    elif face_pipeline is None:
        faces_why = "face pipeline not installed"
    model_info = describe_model(restorer, name)
    service = RestoreService(restorer, model_info, face_pipeline)
    queue = RestoreQueue(limits.queue, on_idle=release_freed_memory)
    page = _page()

    async def lifespan(app: Any):
        yield
        queue.shutdown()

    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, and this app works offline.
    app = FastAPI(title="iqpir", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.queue = queue
    app.state.service = service

    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable):
        if allowed_hosts is not None and not allowed_hosts.allows_host(request.headers.get("host")):
            shown = (request.headers.get("host") or "none")[:80]
            # The names it does answer to are not listed: a rebinding page could read them.
            response = JSONResponse(
                {"detail": f"this server does not answer to the host {shown!r} "
                           "(`iqpir app --allowed-host NAME` adds a name)"},
                status_code=421, headers={"Connection": "close"})
        else:
            response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "model": model_info,
            "faces": {"available": face_pipeline is not None, "reason": faces_why},
            "queue": queue.snapshot(),
            "limits": {"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels,
                       "max_upscale": limits.max_upscale, "queue": limits.queue,
                       "body_timeout": body_timeout},
        }

    def error(exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.post("/api/restore", response_class=Response, responses={200: {"content": {"image/png": {}}}},
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["image"], "properties": {
                      "image": {"type": "string", "format": "binary"},
                      "quality": {"type": "number", "minimum": 0, "maximum": 1, "default": 1.0},
                      "alpha": {"type": "number", "minimum": 0, "maximum": 2},
                      "fidelity": {"type": "number", "minimum": 0, "maximum": 1},
                      "blend": {"type": "number", "minimum": 0, "maximum": 1, "default": 1.0},
                      "faces": {"type": "boolean", "default": False},
                      "upscale": {"type": "integer", "minimum": 1, "maximum": limits.max_upscale, "default": 1},
                      "keep_exif": {"type": "boolean", "default": False}}}}}}})
    async def restore(request: Request) -> Response:
        t_arrived = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + body_timeout
        if not origin_allowed(request.headers.get("origin"), request.headers.get("host"), allowed_hosts):
            await _drain(request, _drain_limit(limits), deadline)
            shown = request.headers["origin"][:80]
            return error(RequestError(403, f"a page from {shown!r} may not post to this server; "
                                           "use the page it serves", {"Connection": "close"}))
        # The whole body first, checked, and only then a place in the queue: a client that
        # sends slowly (or never finishes) holds its own connection, not a restore slot.
        try:
            fields, image = await _read_form(request, limits, deadline)
            if image is None:
                raise RequestError(400, "no file in the field 'image'")
            params = parse_params(fields, model_info, limits)
            if params.faces and face_pipeline is None:
                raise RequestError(400, "face pipeline not installed (pip install 'iqpir[faces]')")
            probe_image(image[1], params.upscale, limits)
        except RequestError as exc:
            return error(exc)
        if not queue.try_admit():
            wait = queue.retry_after()
            return error(RequestError(503, f"the server is busy ({queue.capacity} requests queued); retry in {wait} s",
                                      {"Retry-After": str(wait)}))
        try:
            png, headers = await queue.run(service.restore, image[1], params)
        except RequestError as exc:
            return error(exc)
        except ValueError as exc:  # the restorer refused a setting for this model (its message says which)
            return error(RequestError(400, str(exc)))
        except torch.cuda.OutOfMemoryError:
            return error(RequestError(503, "the device ran out of memory; try a smaller image", {"Retry-After": "5"}))
        except Exception as exc:  # a bug or a model failure: answer it, keep serving
            log.exception("restoring failed")
            return error(RequestError(500, f"restoring failed: {exc.__class__.__name__}: {exc}"))
        finally:
            queue.release()
        headers["X-Total-Seconds"] = f"{time.perf_counter() - t_arrived:.3f}"
        headers["Content-Disposition"] = content_disposition(image[0])
        headers["Cache-Control"] = "no-store"
        return Response(png, media_type="image/png", headers=headers)

    return app


# --------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or a ValueError naming the problem."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(checkpoint: str | Path | Any | None = None, host: str = "127.0.0.1", port: int = 7860, device: str = "auto",
          dtype: str = "auto", limits: AppLimits | None = None, allowed_hosts: Iterable[str] = (),
          body_timeout: float = 120.0) -> int:
    """Load the model once (iqpir.load; or take a ready Restorer), then serve the page and the API
    until interrupted.

    allowed_hosts: Host names answered besides those of `host` (see HostAllowList.for_bind).
    """
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(f"the web app needs uvicorn: {_EXTRA} ({exc})") from exc
    from iqpir.inference import Restorer, load

    hosts = HostAllowList.for_bind(host, allowed_hosts)  # a bad name fails before anything starts
    if not body_timeout > 0:
        raise ValueError(f"--body-timeout must be > 0 seconds, got {body_timeout}")
    sock = bind(host, port)  # first: a taken port fails before the model is loaded
    try:
        restorer = load(checkpoint, device=device, dtype=dtype)
        if isinstance(checkpoint, Restorer):
            checkpoint = checkpoint.source.get("file") if checkpoint.source else None
        name = "iqpir/weights" if checkpoint is None else Path(checkpoint).name
        app = create_app(restorer, limits=limits, name=name, allowed_hosts=hosts, body_timeout=body_timeout)
    except BaseException:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    info = describe_model(restorer)
    size = "any size" if info["image_size"] is None else f"{info['image_size']} px"
    print(f"iqpir app: http://{shown}:{bound_port}/  ({info['kind']}, {size}, "
          f"{info['device']}, {info['dtype']}; Ctrl+C stops)", flush=True)
    if not _is_loopback(host):
        print(f"iqpir app: warning: listening on {host}, reachable from other machines; the app has no login",
              file=sys.stderr, flush=True)
        print(f"iqpir app: answering the host names {hosts.describe()}; add others with --allowed-host NAME",
              file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
