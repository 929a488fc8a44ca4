"""File loops: image files and photos with faces in, restored files (and OUT/restore.json) out.

    restore_files(inputs, restorer, out, quality=...)          # `iqpir restore` (tiles, --aligned)
    restore_face_files(inputs, restorer, out, quality=...)     # `iqpir restore --faces`

Each loop plans its outputs (iqpir.io: never over an input), takes a ready Restorer (or builds
one with iqpir.load from a path), reads, restores and writes file by file, records the knobs it
used and where each came from in OUT/restore.json, and reports what was done, skipped and failed. The restoring itself is restorer.py's; faces are iqpir.faces'. `Finish`
is what happens between a model's output and the file (blend with the input, grey in -> grey
out, the output format, a JPEG's tables); `upsampler_fn` puts an upscaler (`--bg-upsampler`)
behind a photo's background. A video loop (frames in, frames out) is one more module beside
this one (inference/video.py).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from iqpir import io
from iqpir.devices import process_shard, shard_owner
from iqpir.faces import FACE_SIZE, get_detector, resize_lanczos, restore_photo
from iqpir.inference import video
from iqpir.inference.loader import load
from iqpir.inference.restorer import NonFiniteOutput, Restorer

COLOURS = ("auto", "grey", "colour")
FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp", "tiff": ".tif"}


@dataclass(frozen=True)
class Finish:
    """What happens between the model's output and the file.

    blend: W in [0, 1]: the output is W * restored + (1 - W) * input (inside the pasted face
        regions with --faces; the whole image otherwise). 1 = the restoration as it is. None: not
        given; the file loops put the knob rule's value in its place (`resolved`).
    colour: "auto" = a grey input (a grey file, or colour channels that hold a grey picture,
        `io.is_grey_content`) comes back grey, a colour one in colour; "grey" forces grey
        (`--grayscale`), "colour" keeps the model's colour output even for grey inputs (`--color`).
    format: write every output as png/jpg/webp/tiff (`--format`); None keeps each input's format.
        A JPEG written from a JPEG input keeps the input's quantisation tables and subsampling.
    metadata: the input's EXIF (capture date, camera, GPS), ICC profile and XMP go to its output
        (the orientation reset, since the pixels are upright); False (`--strip-metadata`) keeps
        the ICC profile only, which says what the colours mean.
    """

    blend: float | None = 1.0
    colour: str = "auto"
    format: str | None = None
    metadata: bool = True

    def __post_init__(self) -> None:
        if self.blend is not None and not 0.0 <= float(self.blend) <= 1.0:
            raise ValueError(f"--blend must be in [0, 1], got {self.blend}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {list(COLOURS)}, got {self.colour!r}")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"--format must be one of {list(FORMATS)}, got {self.format!r}")

    def resolved(self, settings: dict) -> Finish:
        """This finish with the blend the knob rule gave (`Restorer.settings(...)["knobs"]`)."""
        return replace(self, blend=settings["knobs"]["blend"]["value"])

    def mix(self, restored: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """W * restored + (1 - W) * original (same shapes); exactly `restored` at W = 1, `original` at 0."""
        if self.blend >= 1.0:
            return restored
        if self.blend <= 0.0:
            return original.clone()
        return (self.blend * restored + (1.0 - self.blend) * original).clamp(0, 1)

    def blended(self, restored: torch.Tensor, original: torch.Tensor, upscale: int = 1) -> torch.Tensor:
        """`mix` with the input brought to the output's size (Lanczos, as the background is)."""
        return restored if self.blend >= 1.0 else self.mix(restored, resize_lanczos(original, upscale))

    def frame(self, restored: torch.Tensor, original: torch.Tensor, upscale: int = 1) -> torch.Tensor:
        """A video frame as the file rule would write it: blended, grey where the input frame is."""
        out = self.blended(restored, original, upscale)
        grey = self.colour == "grey" or (self.colour == "auto" and io.is_grey_content(original))
        return io.to_grey(out).expand(3, -1, -1) if grey else out

    def colour_of(self, img: io.LoadedImage) -> tuple[bool, bool]:
        """(make the output grey, write a one-channel file) for this input."""
        grey = self.colour == "grey" or (self.colour == "auto" and img.grey_content)
        return grey, grey and img.grey

    def write(self, target: Path, img: io.LoadedImage, restored: torch.Tensor, upscale: int = 1,
              log: io.OutputLog | None = None) -> Path:
        """The output file of one input: grey where it should be, alpha and JPEG tables kept;
        put in place verified (`io.write_image`), and logged as finished in `log`."""
        grey, one_channel = self.colour_of(img)
        if grey:
            restored = io.to_grey(restored).expand(3, -1, -1)
        alpha = _tensor_upscale(img.alpha, upscale)
        kept = img.metadata if self.metadata else {k: v for k, v in img.metadata.items() if k == "icc_profile"}
        return io.write_image(target, restored, alpha=alpha, grey=one_channel, bits=img.bits, jpeg=img.jpeg, log=log,
                              metadata=kept)


def _plan(inputs: Sequence[str], out: str | Path,
          suffix: str | None = None) -> tuple[Path, list[Path], list[str], io.FileReport, dict[Path, Path]]:
    """The start of every restore command: the output folder, the inputs found, the inputs that
    matched nothing (already in the report as failures) and each input's output path, by the
    rule of `io.plan_outputs` (shared with `iqpir degrade`: outputs mirror the inputs' paths, two
    inputs never share an output, the output folder may not be or lie inside an input folder, and
    no output may replace an input). A clip keeps its container (`video.output_name`), not --format."""
    out = Path(out)
    plan = io.plan_outputs(inputs, out, suffix=suffix, rename=_clip_name)
    paths = [src for src, _ in plan.pairs]
    missing = [m for m, _ in plan.failed]
    rank, world = process_shard()
    if world > 1:  # a torchrun job: this process takes its share, each input goes to one rank
        paths = [p for p in paths if shard_owner(p, world) == rank]
        missing = missing if rank == 0 else []
        print(f"iqpir restore: rank {rank} of {world}: {len(paths)} inputs", file=sys.stderr)
    report = io.FileReport.empty()
    report.failed.extend((m, "no such file, folder or matching image") for m in missing)
    if rank == 0:  # unreadable folders are failures; files that are not images are counted
        report.failed.extend(plan.unreadable)
        report.ignored = plan.ignored
    return out, paths, missing, report, plan.targets


def _clip_name(src: Path, rel: Path) -> Path:
    """A video's output name (its container, or .mp4); other files' as planned."""
    return rel.with_name(video.output_name(src)) if video.is_video(src) else rel


def _stop(report: io.FileReport, paths: Sequence[Path], targets: dict[Path, Path], exc: io.WriteError) -> None:
    """An output could not be written (a full disk): the run stops, its input is named as failed
    with the one-line reason, and the inputs not started are counted (a rerun does them)."""
    source_of = {t: p for p, t in targets.items()}
    report.stop(source_of.get(exc.path, exc.path), exc, 0)
    handled = ({Path(p) for p, _ in report.failed} | set(report.skipped)
               | {source_of.get(t, t) for t in report.done})
    report.left = sum(p not in handled for p in paths)


def _to_do(paths: Sequence[Path], targets: dict[Path, Path], log: io.OutputLog, overwrite: bool,
           report: io.FileReport) -> list[Path]:
    """The inputs to restore: those whose output is not complete already (or all, with
    `overwrite`); the others are counted as skipped before any work, so that the progress bar
    and its rate count only the files restored."""
    todo = [p for p in paths if overwrite or not log.complete(targets[p])]
    left = set(todo)
    report.skipped.extend(p for p in paths if p not in left)
    return todo


def _write_report(out: Path, entries: list[dict], report: io.FileReport) -> None:
    """restore.json (what each output was restored from and with); a write that fails is a
    failure of the run, unless a full disk stopped the run already and is named."""
    try:
        io.atomic_write_text(out / report_name(), json.dumps(entries, indent=1) + "\n")
    except io.WriteError as exc:
        if not report.left:
            report.failed.append((str(out / report_name()), str(exc)))


def report_name() -> str:
    """restore.json, or restore-RANK.json in a torchrun job (each process writes its own)."""
    rank, world = process_shard()
    return "restore.json" if world == 1 else f"restore-{rank}.json"


def settings_line(restorer: Restorer, settings: dict, fidelity: float | None = None) -> str:
    """One line: the model and the values a restore runs with, where each came from (for the
    engine, why `--dtype auto` chose it: the same flag gives different paths on different CPUs)."""
    reason = getattr(restorer.engine, "auto_reason", None)
    parts = [settings["engine"] + (f" (auto: {reason})" if reason else "")]
    if settings["quality"] is not None:
        parts.append(f"quality S = {settings['quality']:g}")
    if settings["fidelity"] is not None:
        came = settings["knobs"]["fidelity"]["from"]
        parts.append(f"fidelity w = {settings['fidelity']:g}" + (f" (the {'checkpoint' if came == 'checkpoint' else 'model'}'s; "
                                                                 "--fidelity sets it)" if came != "flag" else ""))
    if settings["alpha"] is not None:
        parts.append(f"alpha = {settings['alpha']:g}")
    if settings["adain"] is not None:
        parts.append(f"AdaIN {'on' if settings['adain'] else 'off'}")
    return f"restoring with the {restorer.kind} model: " + ", ".join(parts)


def restore_files(inputs: Sequence[str], checkpoint: str | Path | Restorer | None, out: str | Path,
                  quality: float | None = None, alpha: float | None = None, device: str = "auto", batch_size: int = 4,
                  dtype: str = "auto", overwrite: bool = False, progress: bool = True, fidelity: float | None = None,
                  aligned: bool = False, engine: str = "auto", finish: Finish | None = None,
                  tile: int | None = None, upscale: int | None = None, crf: int | None = None,
                  max_frames: int | None = None, **renamed) -> io.FileReport:
    """Restore image files into `out`, named after their inputs; never overwrites an input.

    checkpoint: a ready Restorer (device, dtype, batch_size, engine and tile are then its own), or
    what iqpir.load takes, loaded with those. OUT/restore.json records the knobs each output was
    restored with and where each value came from.

    Unreadable files are named and skipped; existing outputs are kept unless `overwrite`.
    Grey inputs give grey outputs, 16-bit grey inputs 16-bit outputs.
    aligned: every input is an aligned face (CodeFormer's `--has_aligned`): restored whole at
    the model's size (resized there and back when it has another size), never tiled.
    finish: blend with the input, colour and output format (`Finish`; default: none of them).
    tile: tiles of this size for a model that takes any size (an upscaler: `--bg-tile`).
    upscale: the output's size over the input's (None: the model's own scale); a model of
        another scale (an x4 upscaler at --upscale 2) has its output resampled (bicubic, antialiased).
    crf, max_frames: for videos (inference.video: H.264 quality, default 18; clips with more frames
        are refused); given without a video among the inputs, they are refused.
    """
    if quality is not None and not 0.0 <= quality <= 1.0:
        raise ValueError(f"--quality must be in [0, 1], got {quality}")
    finish = finish or Finish()
    if upscale is not None and (int(upscale) != upscale or upscale < 1):
        raise ValueError(f"--upscale must be a positive integer, got {upscale}")
    out, paths, _, report, targets = _plan(inputs, out, FORMATS.get(finish.format))
    _check_video_options(paths, crf, max_frames)
    restorer = load(checkpoint, device=device, dtype=dtype, batch_size=batch_size, engine=engine, tile=tile,
                    fidelity=fidelity, **renamed)
    upscale = restorer.scale if upscale is None else int(upscale)
    settings = restorer.settings(quality, alpha, fidelity, finish.blend)  # refuses knobs the model lacks, first
    finish = finish.resolved(settings)
    if progress:
        print(settings_line(restorer, settings), file=sys.stderr)
    entries: list[dict] = []
    log = io.OutputLog(out)
    todo = _to_do(paths, targets, log, overwrite, report)
    it = todo
    if progress:
        it = tqdm(todo, desc="restore", unit="img", file=sys.stderr, dynamic_ncols=True)
    s = restorer.image_size
    warned = False
    pending: list[tuple[Path, io.LoadedImage]] = []  # aligned faces waiting for a full batch

    def write(target: Path, img: io.LoadedImage, restored: torch.Tensor) -> None:
        h, w = img.rgb.shape[1:]
        finish.write(target, img, finish.blended(rescale(restored, (h * upscale, w * upscale)), img.rgb, upscale),
                     upscale, log=log)
        report.done.append(target)
        entries.append({"input": str(source_of[target]), "output": str(target), "settings": settings})

    source_of = {t: p for p, t in targets.items()}

    def flush() -> None:
        try:
            outs = restore_aligned_batch(restorer, [img.rgb for _, img in pending], quality, alpha, fidelity)
        except NonFiniteOutput as exc:  # the batch's files fail, the run goes on
            report.failed.extend((str(source_of[target]), str(exc)) for target, _ in pending)
            pending.clear()
            return
        for (target, img), restored in zip(pending, outs):
            write(target, img, restored)
        pending.clear()

    try:
        for p in it:
            target = targets[p]
            if video.is_video(p):  # every frame through the same path, the other streams copied
                frames = tile_frames(restorer, finish, upscale, quality, alpha, fidelity)
                if _clip(p, target, frames, upscale, crf, max_frames, report, progress, restorer.batch_size, log):
                    entries.append({"input": str(p), "output": str(target), "settings": settings})
                continue
            try:
                img = io.read_image(p)
            except io.ImageReadError as exc:
                report.failed.append((str(p), exc.reason))
                continue
            rgb = img.rgb
            if aligned:  # --batch-size faces per forward pass
                pending.append((target, img))
                if len(pending) == restorer.batch_size:
                    flush()
            else:
                if restorer.task == "faces" and s is not None and tuple(rgb.shape[1:]) != (s, s) and not warned:
                    print(f"iqpir restore: warning: {p} is not a {s}x{s} aligned face and this is a face model; "
                          "it is restored through tiles. Use --faces for photos with faces, --aligned for aligned "
                          "crops", file=sys.stderr)
                    warned = True
                tiles = None if not progress else (lambda done, total: it.set_postfix_str(f"tiles {done}/{total}"))
                try:
                    restored = restorer.restore_one(rgb, quality=quality, alpha=alpha, fidelity=fidelity, progress=tiles)
                except NonFiniteOutput as exc:
                    report.failed.append((str(p), str(exc)))
                    continue
                write(target, img, restored)
        if pending:
            flush()
    except io.WriteError as exc:
        if progress:
            it.close()
        _stop(report, paths, targets, exc)
    if entries:
        _write_report(out, entries, report)
    report.announce("restore", "restored", out)
    return report


def tile_frames(restorer: Restorer, finish: Finish, upscale: int, quality: float | None = None,
                alpha: float | None = None, fidelity: float | None = None):
    """Video frames (N, 3, H, W) through the tiles path, several per forward pass where the model
    takes them whole (Restorer.restore): restored, resampled to `upscale`, finished (`Finish.frame`)."""
    def run(frames: torch.Tensor) -> torch.Tensor:
        h, w = frames.shape[2:]
        outs = restorer.restore(frames, quality=quality, alpha=alpha, fidelity=fidelity)
        return torch.stack([finish.frame(rescale(o, (h * upscale, w * upscale)), f, upscale)
                            for o, f in zip(outs, frames)])

    return run


def _tracker(src: Path, detector, detect_every: int, smooth: bool):
    """A fresh TrackingDetector for one clip, at its frame rate (25 where it states none)."""
    from iqpir.faces.track import TrackingDetector

    try:
        rate = video.probe(src)["fps"] or 25.0
    except (video.VideoError, ImportError):
        rate = 25.0  # restore_video names the problem
    return TrackingDetector(detector, stride=detect_every, smooth=smooth, rate=rate)


def _check_video_options(paths: list[Path], crf: int | None, max_frames: int | None) -> None:
    """--crf and --max-frames act on clips only: refused when no input is one."""
    given = [flag for flag, value in (("--crf", crf), ("--max-frames", max_frames)) if value is not None]
    if given and not any(video.is_video(p) for p in paths):
        raise ValueError(f"{' and '.join(given)} apply only to videos (.mp4, .mov, .mkv, .avi, .webm), and no "
                         "input is one")


def _clip(src: Path, target: Path, frames, scale: int, crf: int | None, max_frames: int | None,
          report: io.FileReport, progress: bool, batch_size: int = 1, log: io.OutputLog | None = None) -> bool:
    """One video through inference.video; a clip that cannot be restored is named in the report,
    a clip written is logged as finished in `log`."""
    try:
        video.restore_video(src, target, frames, scale=scale, crf=18 if crf is None else crf, max_frames=max_frames,
                            progress=progress, batch_size=batch_size)
    except (video.VideoError, ImportError, NonFiniteOutput) as exc:
        report.failed.append((str(src), str(exc).removeprefix(f"{src}: ")))
        return False
    if log is not None:
        log.add_file(target)
    report.done.append(target)
    return True


def restore_aligned(restorer: Restorer, image: torch.Tensor, quality: float | None = None,
                    alpha: float | None = None, fidelity: float | None = None) -> torch.Tensor:
    """An aligned face (3, H, W) in [0, 1] restored whole (restore_aligned_batch of one)."""
    return restore_aligned_batch(restorer, [image], quality, alpha, fidelity)[0]


def restore_aligned_batch(restorer: Restorer, images: Sequence[torch.Tensor], quality: float | None = None,
                          alpha: float | None = None, fidelity: float | None = None) -> list[torch.Tensor]:
    """Aligned faces (3, H, W) in [0, 1], each restored whole: resized to the model's size when
    not already at it (bicubic, antialiased), restored `restorer.batch_size` per forward pass,
    and resized back to its (H, W). A model that takes any size restores each at its own size."""
    s = restorer.image_size
    if s is None:
        return [restorer.restore_one(image, quality, alpha, fidelity) for image in images]

    def resize(x: torch.Tensor, size: tuple[int, int], **kw) -> torch.Tensor:
        if tuple(x.shape[1:]) == size:
            return x
        return torch.nn.functional.interpolate(x[None], size=size, mode="bicubic", align_corners=False,
                                               **kw).clamp(0, 1)[0]

    faces = torch.stack([resize(image, (s, s), antialias=True) for image in images])
    outs = restorer.restore(faces, quality, alpha, fidelity)
    return [resize(out, tuple(image.shape[1:]), antialias=True) for image, out in zip(images, outs)]

# --------------------------------------------------------------------------------------
# Whole photos with faces: detect, align, restore, paste back
# --------------------------------------------------------------------------------------


def face_restorer_fn(restorer: Restorer, quality: float | None = None, alpha: float | None = None,
                     fidelity: float | None = None, blend: float = 1.0):
    """Bind a Restorer into the callable `iqpir.faces.restore_photo` takes: (N,3,512,512) -> same.

    A model of another size (a tiny test preset) gets the crops resized to its size and back.
    blend: W * restored + (1 - W) * the aligned input crop (`Finish.mix`): paste-back carries the
    restorer's change into the photo, so W scales that change inside each face region.
    """
    finish = Finish(blend=blend)
    s = restorer.image_size

    def restore(faces: torch.Tensor) -> torch.Tensor:
        if s in (None, FACE_SIZE):
            return restorer.restore(faces, quality=quality, alpha=alpha, fidelity=fidelity)
        small = torch.nn.functional.interpolate(faces, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        out = restorer.restore(small.clamp(0, 1), quality=quality, alpha=alpha, fidelity=fidelity)
        return torch.nn.functional.interpolate(out, size=faces.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)

    def run(faces: torch.Tensor) -> torch.Tensor:
        return finish.mix(restore(faces), faces)

    return run


def rescale(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) -> (3, *size) (bicubic, antialiased, clamped); the image itself at its size."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    return torch.nn.functional.interpolate(image[None], size=size, mode="bicubic", antialias=True,
                                           align_corners=False).clamp(0, 1)[0]


def upsampler_fn(restorer: Restorer, upscale: int):
    """The rest of the photo through an upscaler's tiles (`--bg-upsampler`), at its native scale,
    then resampled to `upscale` when that differs (an x4 model at --upscale 2)."""
    def run(image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[1:]
        return rescale(restorer.restore_one(image), (h * upscale, w * upscale))

    return run


def background_fn(restorer: Restorer, upscale: int, quality: float | None = None):
    """The rest of the photo through a general model's tiles (at `quality` when it is
    quality-conditioned, its own defaults otherwise), then Lanczos-resized by `upscale`."""
    q = quality if restorer.supports_quality else None
    return lambda image: resize_lanczos(restorer.restore_one(image, quality=q), upscale)


def _tensor_upscale(alpha: torch.Tensor | None, upscale: int) -> torch.Tensor | None:
    return None if alpha is None else resize_lanczos(alpha, upscale)


def restore_face_files(inputs: Sequence[str], checkpoint: str | Path | Restorer | None, out: str | Path,
                       quality: float | None = None, alpha: float | None = None, device: str = "auto",
                       batch_size: int = 4, dtype: str = "auto",
                       overwrite: bool = False, progress: bool = True, detector: str = "hog+cnn", upscale: int = 1,
                       only_center_face: bool = False, min_face: float = 0, save_faces: bool = False,
                       draw_box: bool = False, bg_checkpoint: str | Path | Restorer | None = None,
                       fidelity: float | None = None, engine: str = "auto",
                       finish: Finish | None = None, bg_upsampler: str | Path | Restorer | None = None,
                       bg_tile: int = 400, face_upsample: bool = False, crf: int | None = None,
                       max_frames: int | None = None, detect_every: int = 1, smooth: bool = True,
                       **renamed) -> io.FileReport:
    """`iqpir restore --faces`: restore the faces of whole photos into `out`, plus OUT/restore.json.

    Each photo: faces detected (iqpir.faces detectors), aligned to 512x512, restored with the
    face model of `checkpoint` at `quality`/`alpha`, pasted back; the rest of the photo kept,
    Lanczos-resized by `upscale`, restored by the general model `bg_checkpoint`, or restored and
    upscaled by the upscaler `bg_upsampler` (spandrel; tiles of `bg_tile` px; with `face_upsample`
    and upscale > 1 the restored faces are upscaled by it too before paste-back). A photo
    without faces is written as it is (resized) and reported. With `save_faces`, the aligned
    and restored crops go to OUT/faces/. Never overwrites an input. `finish.blend` mixes each
    restored face with its input crop before paste-back, so it acts inside the face regions only.
    checkpoint, bg_checkpoint, bg_upsampler: ready Restorers, or what iqpir.load takes (loaded
    with device, dtype, batch_size and engine).
    """
    if quality is not None and not 0.0 <= quality <= 1.0:
        raise ValueError(f"--quality must be in [0, 1], got {quality}")
    if int(upscale) != upscale or upscale < 1:
        raise ValueError(f"--upscale must be a positive integer, got {upscale}")
    if min_face < 0:
        raise ValueError(f"--min-face must be >= 0, got {min_face}")
    finish = finish or Finish()
    out, paths, missing, report, targets = _plan(inputs, out, FORMATS.get(finish.format))
    _check_video_options(paths, crf, max_frames)
    restorer = load(checkpoint, device=device, dtype=dtype, batch_size=batch_size, engine=engine, fidelity=fidelity,
                    **renamed)
    settings = restorer.settings(quality, alpha, fidelity, finish.blend)
    finish = finish.resolved(settings)
    if progress:
        print(settings_line(restorer, settings), file=sys.stderr)
    if restorer.task != "faces" and restorer.image_size not in (None, FACE_SIZE):
        print(f"iqpir restore: warning: --faces with a general {restorer.image_size}-px model: every "
              f"{FACE_SIZE}-px face is shrunk to {restorer.image_size} px and back, losing its detail; use a "
              "face model (an IQPIR/CodeFormer release) or the packaged default model (no --checkpoint)",
              file=sys.stderr)
    restore_faces = face_restorer_fn(restorer, quality, alpha, fidelity, blend=finish.blend)
    colour = replace(finish, blend=1.0)  # video frames: the blend acted inside the faces already
    background = None
    if bg_checkpoint is not None and bg_upsampler is not None:
        raise ValueError("--bg-checkpoint and --bg-upsampler both restore the background: choose one")
    if face_upsample and (bg_upsampler is None or int(upscale) == 1):
        raise ValueError("--face-upsample upscales the restored faces with the --bg-upsampler model: it needs "
                         "--bg-upsampler and --upscale > 1")
    faces_up = None
    if bg_upsampler is not None:
        upsampler = load(bg_upsampler, device=device, dtype=dtype, batch_size=batch_size, tile=bg_tile)
        background = upsampler_fn(upsampler, int(upscale))
        if face_upsample:
            faces_up = lambda crops: torch.stack([upsampler.restore_one(c) for c in crops])
    if bg_checkpoint is not None:
        background = background_fn(load(bg_checkpoint, device=device, dtype=dtype, batch_size=batch_size),
                                   int(upscale), quality)
    elif background is None and int(upscale) > 1 and progress:
        print(f"iqpir restore: the photos are enlarged {int(upscale)}x around the restored faces as they are "
              "(Lanczos), JPEG blocks and noise included, so the faces may look sharper than what surrounds "
              "them; --bg-checkpoint default restores the background with the packaged model first, "
              "--bg-upsampler FILE with an upscaler", file=sys.stderr)
    face_detector = get_detector(detector)
    entries: list[dict] = [{"input": m, "error": "no such file, folder or matching image"} for m in missing]
    n_faces = n_without = 0
    start = time.perf_counter()
    log = io.OutputLog(out)
    todo = _to_do(paths, targets, log, overwrite, report)
    entries += [{"input": str(p), "output": str(targets[p]), "skipped": "output exists (--overwrite replaces it)"}
                for p in report.skipped]
    it = todo
    bar = None
    if progress:
        it = bar = tqdm(todo, desc="restore", unit="photo", file=sys.stderr, dynamic_ncols=True)
    try:
        for p in it:
            target = targets[p]
            if video.is_video(p):  # each frame through the photo path, the faces tracked across frames
                tracker = _tracker(p, face_detector, detect_every, smooth)
                per_frame: list[int] = []  # faces restored in each frame, in order

                def frame(image: torch.Tensor, tracker=tracker, per_frame=per_frame) -> torch.Tensor:
                    restored, rep = restore_photo(image, restore_faces, detector=tracker, upscale=int(upscale),
                                                  only_center_face=only_center_face, min_face=min_face,
                                                  background=background, draw_box=draw_box, face_upsample=faces_up)
                    per_frame.append(len(rep["faces"]))
                    return colour.frame(restored, image, int(upscale))

                def frames(batch: torch.Tensor, frame=frame) -> torch.Tensor:  # one at a time: tracked in order
                    return torch.stack([frame(image) for image in batch])

                ok = _clip(p, target, frames, int(upscale), crf, max_frames, report, progress, log=log)
                entries.append({"input": str(p), "output": str(target), "settings": settings, "frames": len(per_frame),
                                "faces": sum(per_frame), "frames_with_faces": sum(n > 0 for n in per_frame)} if ok
                               else {"input": str(p), "error": report.failed[-1][1]})
                if ok:
                    n_faces += sum(per_frame)
                    n_without += not any(per_frame)
                continue
            try:
                img = io.read_image(p)
            except io.ImageReadError as exc:
                why = exc.reason
                report.failed.append((str(p), why))
                entries.append({"input": str(p), "error": why})
                continue
            try:
                restored, rep = restore_photo(img.rgb, restore_faces, detector=face_detector, upscale=int(upscale),
                                              only_center_face=only_center_face, min_face=min_face,
                                              background=background,
                                              save_faces=save_faces, draw_box=draw_box, face_upsample=faces_up)
            except NonFiniteOutput as exc:
                report.failed.append((str(p), str(exc)))
                entries.append({"input": str(p), "error": str(exc)})
                continue
            finish.write(target, img, restored, int(upscale), log=log)
            report.done.append(target)
            entry = {"input": str(p), "output": str(target), "size": list(img.rgb.shape[1:]), "faces": rep["faces"],
                     "skipped_faces": rep["skipped_faces"], "detector": rep["detector"], "seconds": rep["seconds"],
                     "settings": settings}
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
            io.atomic_write_text(out / report_name(), json.dumps(entries, indent=1) + "\n")
    except io.WriteError as exc:
        if bar is not None:
            bar.close()
        _stop(report, paths, targets, exc)
        entries.append({"input": report.failed[-1][0], "error": report.failed[-1][1]})
    _write_report(out, entries, report)
    seconds = time.perf_counter() - start
    clips = sum(video.is_video(Path(t)) for t in report.done)
    files = f"{len(report.done) - clips} photos" + (f", {clips} clip{'s' * (clips != 1)}" if clips else "")
    msg = (f"{files}, {n_faces} faces restored{' (one per frame where a face is)' if clips else ''}, "
           f"{n_without} without faces, "
           f"{len(report.skipped)} skipped, {len(report.failed)} failed{report.ignored_note()}, {seconds:.1f} s")
    if report.skipped:
        msg += " (skipped outputs already exist; pass --overwrite to replace them)"
    _, _, failures = report.summary().partition("\n")
    print(f"iqpir restore: {msg} -> {out}" + (f"\n{failures}" if failures else ""), file=sys.stderr)
    return report
