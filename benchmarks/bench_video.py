"""Frames per second of `iqpir restore clip.mp4 --faces` (issue 22).

    python benchmarks/bench_video.py [--frames 12] [--detector hog+cnn] [--checkpoint FILE]

Clips of `--frames` frames at 512x512 (one face) and 1280x720 (two faces): matplotlib's
grace_hopper pasted on a grey frame, drifting a pixel per frame. Each is restored with `--faces`
by the packaged default model (or `--checkpoint`), at `--dtype float32` and `auto`, with the
detector on every frame and on every third (`--detect-every 3`). Prints a Markdown table with the
CPU's name and whether it has native bf16; wall time of the whole command (decode, detect,
restore, paste, encode), after a one-frame warm-up run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_video import write_clip


def make_clip(path: Path, size: tuple[int, int], faces: int, frames: int) -> None:
    import matplotlib.cbook
    from PIL import Image

    w, h = size
    side = min(h - 40, 300)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        face = np.asarray(Image.open(fh).convert("RGB").resize((int(side * 0.85), side), Image.LANCZOS))
    canvases = []
    for i in range(frames):
        canvas = np.full((h, w, 3), 120, np.uint8)
        for k in range(faces):
            x = 20 + i + k * (w // faces)
            canvas[20:20 + face.shape[0], x:x + face.shape[1]] = face
        canvases.append(canvas)
    write_clip(path, canvases)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--detector", default="hog+cnn")
    p.add_argument("--checkpoint", default=None)
    args = p.parse_args(argv)
    from iqpir.cli import main as cli
    from iqpir.devices import cpu_has_native_bf16
    from iqpir.training.default_model import cpu_name

    model = ["--checkpoint", args.checkpoint] if args.checkpoint else []
    print(f"CPU: {cpu_name()}, native bf16: {cpu_has_native_bf16()}; {args.frames} frames; "
          f"model: {args.checkpoint or 'the packaged default'}")
    print("| clip | faces | dtype | detector runs | frames/s |")
    print("|---|---:|---|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for (w, h), faces in (((512, 512), 1), ((1280, 720), 2)):
            src = Path(tmp) / f"clip{w}x{h}.mp4"
            make_clip(src, (w, h), faces, args.frames)
            warm = Path(tmp) / "warm.mp4"
            make_clip(warm, (w, h), faces, 1)
            for dtype in ("float32", "auto"):
                for every in (1, 3):
                    common = ["--faces", "--detector", args.detector, "--device", "cpu", "--dtype", dtype,
                              "--detect-every", str(every), *model]
                    cli(["restore", str(warm), "--out", str(Path(tmp) / "w"), "--overwrite", *common])
                    t0 = time.perf_counter()
                    if cli(["restore", str(src), "--out", str(Path(tmp) / "o"), "--overwrite", *common]) != 0:
                        print(f"{src.name}: restore failed", file=sys.stderr)
                        return 1
                    fps = args.frames / (time.perf_counter() - t0)
                    print(f"| {w}x{h} | {faces} | {dtype} | every {'frame' if every == 1 else f'{every}rd frame'} "
                          f"| {fps:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
