"""Flicker of restored faces in a clip, landmark smoothing on and off (issue 22).

    python benchmarks/video_flicker.py [--frames 40] [--detector hog]

The clip: matplotlib's grace_hopper (a 200x234 face) drifting slowly (0.4 px right, 0.2 px down per
frame, sub-pixel) on a 320x320 frame for `--frames` frames at 25 fps, with fresh sensor noise
(sigma 4/255) in every frame, as in a real video, so the detector's landmarks jitter from frame to
frame. It is restored by `iqpir restore --faces` with the packaged default model, with the
landmarks smoothed over time (the default) and raw (`--no-smooth`). Flicker = the mean absolute
difference between consecutive frames inside the face's box (the union of its boxes over the
clip), in 8-bit levels; the input's own value (noise and motion) is the floor. Prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_video import write_clip


def make_clip(path: Path, frames: int, seed: int = 0) -> tuple[int, int, int, int]:
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        face = torch.from_numpy(np.asarray(Image.open(fh).convert("RGB").resize((200, 234), Image.LANCZOS)))
    face = face.permute(2, 0, 1).float()[None] / 255
    g = torch.Generator().manual_seed(seed)
    canvases = []
    for i in range(frames):
        dx, dy = 40 + 0.4 * i, 30 + 0.2 * i
        theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
        canvas = torch.full((1, 3, 320, 320), 0.45)
        x0, y0 = int(dx), int(dy)
        theta[0, 0, 2], theta[0, 1, 2] = -(dx - x0) * 2 / 200, -(dy - y0) * 2 / 234  # the sub-pixel part
        grid = torch.nn.functional.affine_grid(theta, face.shape, align_corners=False)
        moved = torch.nn.functional.grid_sample(face, grid, padding_mode="border", align_corners=False)
        canvas[..., y0:y0 + 234, x0:x0 + 200] = moved
        canvas = (canvas + torch.randn(canvas.shape, generator=g) * 4 / 255).clamp(0, 1)
        canvases.append((canvas[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    write_clip(path, canvases, crf=12)
    return 40, 30, int(40 + 0.4 * frames) + 200, int(30 + 0.2 * frames) + 234


def flicker(path: Path, box: tuple[int, int, int, int]) -> float:
    import av

    x0, y0, x1, y1 = box
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24")[y0:y1, x0:x1].astype(np.float64) for f in c.decode(video=0)]
    return float(np.mean([np.abs(b - a).mean() for a, b in itertools.pairwise(frames)]))


def crop_jitter(path: Path, detector_name: str, smooth: bool) -> float:
    """Mean |aligned crop t - aligned crop t-1| (8-bit levels): how much the restorer's input moves
    between frames, with the tracker's smoothed landmarks or the detector's raw ones."""
    import av

    from iqpir.faces import get_detector
    from iqpir.faces.align import FACE_SIZE, align_face
    from iqpir.faces.track import TrackingDetector

    tracker = TrackingDetector(get_detector(detector_name), smooth=smooth)
    crops = []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            image = torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1).float() / 255
            faces = tracker.detect(image)
            if faces:
                crop, _ = align_face(image, faces[0].landmarks, np.asarray(tracker.template), FACE_SIZE)
                crops.append(crop * 255)
    return float(np.mean([float((b - a).abs().mean()) for a, b in itertools.pairwise(crops)]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--detector", default="hog")
    args = p.parse_args(argv)
    from iqpir.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "drift.mp4"
        box = make_clip(src, args.frames)
        rows = [("input", flicker(src, box))]
        for name, extra in (("restored, landmarks smoothed (default)", []), ("restored, raw landmarks", ["--no-smooth"])):
            out = Path(tmp) / name.split(",")[1].strip().split()[0]
            if cli(["restore", str(src), "--faces", "--detector", args.detector, "--out", str(out), "--device", "cpu",
                    "--crf", "12", *extra]) != 0:
                print(f"{name}: restore failed", file=sys.stderr)
                return 1
            rows.append((name, flicker(out / "drift.mp4", box)))
        jitter = {smooth: crop_jitter(src, args.detector, smooth) for smooth in (True, False)}
    print(f"{args.frames} frames, 320x320, 25 fps; flicker = mean |frame t - frame t-1| in the face box (8-bit levels)")
    print("| clip | flicker | over the input's |")
    print("|---|---:|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} | {value / rows[0][1]:.2f}x |")
    print()
    print("The restorer's input: mean |aligned crop t - crop t-1| (8-bit levels, 512x512 crops)")
    print("| landmarks | crop jitter |")
    print("|---|---:|")
    print(f"| smoothed (default) | {jitter[True]:.2f} |")
    print(f"| raw | {jitter[False]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
