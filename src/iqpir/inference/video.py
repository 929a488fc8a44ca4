"""Videos: frames in, restored frames out, everything else copied.

    restore_video(src, dst, restore_frame)     # `iqpir restore clip.mp4 --out OUT/`

One pass over the input's packets (PyAV, extra `video`: FFmpeg's libraries in wheels): video
packets are decoded, each frame restored by `restore_frame` ((3, H, W) -> (3, kH, kW) in [0, 1])
and encoded as H.264 (`crf`) with the frame's own timestamp, so the frame count, the
timing (variable frame rate included) and the duration stay the input's; every other stream
(audio, subtitles, data) is copied packet for packet, without re-encoding. The frame size is
kept: yuv420p where both sides are even (what every player takes), else yuv444p (4:2:0 chroma
needs even sides; the summary says so). Memory holds a few
frames, whatever the clip's length. The output is written to a hidden partial file beside the
target and renamed into place only when complete: an interrupted or failed run leaves no
truncated clip (and a re-run starts over); a full disk is one line naming the output
(`io.WriteError`). Inputs are only read.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from iqpir import io

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")
# Containers that hold H.264 with its timestamps; .webm cannot hold it, and .avi keeps no
# presentation times (its H.264 frames come back a frame late), so both get an .mp4 output.
H264_CONTAINERS = (".mp4", ".mov", ".mkv")
_DISK_ERRORS = (errno.ENOSPC, errno.EIO, getattr(errno, "EDQUOT", errno.ENOSPC))


class VideoError(ValueError):
    """A clip that cannot be restored; the message is one line naming the file."""


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def output_name(path: str | Path) -> str:
    """The output's file name: the input's, with .mp4 where its container cannot hold H.264."""
    p = Path(path)
    return p.name if p.suffix.lower() in H264_CONTAINERS else p.stem + ".mp4"


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("restoring videos needs PyAV: pip install 'iqpir[video]'") from None
    return av


def probe(src: str | Path) -> dict:
    """What a clip holds: {"frames", "fps", "width", "height", "codec", "streams"}; VideoError when
    it cannot be opened or has no video stream."""
    av = _av()
    try:
        with av.open(str(src)) as container:
            video = next((s for s in container.streams if s.type == "video"), None)
            if video is None:
                raise VideoError(f"{src}: no video stream (streams: "
                                 f"{', '.join(s.type for s in container.streams) or 'none'})")
            info = {"frames": int(video.frames or 0), "fps": float(video.average_rate or 0),
                    "width": video.codec_context.width, "height": video.codec_context.height,
                    "codec": video.codec_context.name, "streams": [s.type for s in container.streams],
                    "rotation": 0}
            try:  # the display rotation rides on the frames (a phone's portrait clip): read one
                info["rotation"] = int(getattr(next(container.decode(video=0)), "rotation", 0) or 0)
            except (StopIteration, av.FFmpegError):
                pass  # restore_video names the damage
            return info
    except av.FFmpegError as exc:
        raise VideoError(f"{src}: cannot open the clip ({exc})") from None


def restore_video(src: str | Path, dst: str | Path, restore_frames: Callable[[torch.Tensor], torch.Tensor],
                  scale: int = 1, crf: int = 18, max_frames: int | None = None, progress: bool = True,
                  batch_size: int = 1) -> dict:
    """Restore every frame of `src` into `dst` (H.264), copying the other streams; -> a summary.

    restore_frames: (N, 3, H, W) in [0, 1] -> (N, 3, scale H, scale W), given up to `batch_size`
        consecutive frames at a time (several frames per forward pass where the model allows).
    Raises VideoError (one line, naming the file) for a clip without a video stream, a codec
    FFmpeg cannot decode, damage found while decoding (nothing is written: a clip cut short is
    never passed off as the whole), or more than `max_frames` frames (checked before any work
    where the container says how many frames it has, else as soon as the count passes it).
    """
    av = _av()
    src, dst = Path(src), Path(dst)
    info = probe(src)
    if max_frames is not None and info["frames"] > max_frames:
        raise VideoError(f"{src}: {info['frames']} frames, over --max-frames {max_frames}")
    partial = dst.with_name(f".{dst.name}.partial{dst.suffix}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    frames = 0
    try:
        with av.open(str(src)) as inp, av.open(str(partial), "w", format=_format(dst)) as out:
            vin = next(s for s in inp.streams if s.type == "video")
            vout = _video_stream(out, vin, (3, info["height"] * scale, info["width"] * scale), crf)
            if vout.pix_fmt != "yuv420p":
                print(f"iqpir restore: {src.name}: {vout.width}x{vout.height} has an odd side, so it is written as "
                      "H.264 4:4:4 (yuv444p) to keep its size; some players (Firefox, older phones) play "
                      "only 4:2:0, which needs even sides", file=sys.stderr)
            if info["rotation"]:
                vout.set_display_rotation(info["rotation"])
            copies = {}
            for s in inp.streams:
                if s is not vin and s.type in ("audio", "subtitle", "data"):
                    try:
                        copies[s.index] = out.add_stream_from_template(s)
                    except (ValueError, av.FFmpegError):
                        print(f"iqpir restore: warning: {src}: its {s.type} stream {s.index} "
                              f"({s.codec_context.name}) cannot go into {dst.suffix}; left out", file=sys.stderr)
            bar = _bar(info["frames"], src.name) if progress else None
            end = 0.0  # where the packets read so far end, in seconds: a cut clip ends early
            pending: list = []  # (decoded frame, its image) waiting for a full batch

            def flush() -> None:
                restored = restore_frames(torch.stack([image for _, image in pending])).clamp(0, 1)
                for (frame, _), out_image in zip(pending, restored):
                    _encode(out, vout, out_image, frame)
                if bar is not None:
                    bar.update(len(pending))
                pending.clear()

            for packet in inp.demux():
                if packet.pts is not None and packet.time_base is not None:
                    end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
                if packet.stream.index in copies:
                    if packet.dts is not None:
                        packet.stream = copies[packet.stream.index]
                        out.mux(packet)
                    continue
                if packet.stream is not vin:
                    continue
                for frame in packet.decode():
                    frames += 1
                    if max_frames is not None and frames > max_frames:
                        raise VideoError(f"{src}: more than --max-frames {max_frames} frames")
                    image = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).float() / 255
                    pending.append((frame, image))
                    if len(pending) >= batch_size:
                        flush()
            if pending:
                flush()
            if frames == 0:
                raise VideoError(f"{src}: no frame could be decoded")
            if info["frames"] and frames < info["frames"]:
                raise VideoError(f"{src}: the clip is damaged: {frames} of its {info['frames']} frames decoded; "
                                 "nothing written")
            length = (inp.duration or 0) / 1e6
            if length and end < length - 0.25:  # the streams stop well before the container's duration
                raise VideoError(f"{src}: the clip is damaged or cut short: its streams end at {end:.2f} s of its "
                                 f"{length:.2f} s ({frames} frames decoded); nothing written")
            for p in vout.encode():
                out.mux(p)
            if bar is not None:
                bar.close()
    except av.FFmpegError as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:  # the output's disk, not the clip
            raise io.write_error(dst, exc) from None
        if isinstance(exc, (av.error.DecoderNotFoundError, av.error.PatchWelcomeError)):  # FFmpeg lacks it
            raise VideoError(f"{src}: cannot decode its {info['codec']} video ({exc}); nothing written") from None
        raise VideoError(f"{src}: the clip is damaged after {frames} frames ({exc}); nothing written") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    try:  # on the disk before it is renamed into place, as every output (io.atomic_write_bytes)
        with open(partial, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, dst)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise io.write_error(dst, exc) from None
    io.fsync_folder(dst.parent)
    return {"input": str(src), "output": str(dst), "frames": frames, "width": vout.width, "height": vout.height,
            "pix_fmt": vout.pix_fmt, "seconds": round(time.perf_counter() - start, 2)}


def _format(dst: Path) -> str | None:
    return {".mkv": "matroska", ".mov": "mov", ".mp4": "mp4"}.get(dst.suffix.lower())


def _video_stream(out, vin, shape: tuple[int, ...], crf: int):
    """H.264 in the input's time base, sized like the restored frames: yuv420p, or yuv444p where a
    side is odd (4:2:0 halves the chroma in both directions, so it needs even sides)."""
    vout = out.add_stream("libx264", rate=vin.average_rate or vin.guessed_rate or 25)
    vout.width, vout.height = shape[2], shape[1]
    vout.pix_fmt = "yuv420p" if shape[1] % 2 == 0 and shape[2] % 2 == 0 else "yuv444p"
    vout.time_base = vin.time_base
    vout.codec_context.time_base = vin.time_base
    vout.options = {"crf": str(crf)}
    return vout


def _encode(out, vout, restored: torch.Tensor, frame) -> None:
    av = _av()
    arr = (restored.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    h, w = arr.shape[:2]
    if (h, w) != (vout.height, vout.width):
        raise ValueError(f"a restored frame of {w}x{h} is not the clip's {vout.width}x{vout.height}")
    new = av.VideoFrame.from_ndarray(arr, format="rgb24")
    new.pts, new.time_base = frame.pts, frame.time_base
    for p in vout.encode(new):
        out.mux(p)


def _bar(total: int, name: str):
    from tqdm import tqdm

    return tqdm(total=total or None, desc=name, unit="frame", file=sys.stderr, dynamic_ncols=True)
