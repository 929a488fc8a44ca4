"""Whole-photo face restoration speed: photos per minute for a photo with two faces.

The photo: two copies of scikit-image's astronaut face (one small, one large and cut by the
right edge) on a 1024x768 canvas. The face model: the paper-size restorer (`paper` preset,
random weights: the speed does not depend on them), through `iqpir.faces.restore_photo`
exactly as `iqpir restore --faces` runs it (the CLI's allocator setting included). Prints the
seconds per phase and photos per minute as a Markdown table.

    python benchmarks/bench_faces.py                      # CPU, float32
    python benchmarks/bench_faces.py --dtype bfloat16 --repeats 3
    python benchmarks/bench_faces.py --device cuda --upscale 2

Needs the `faces` and `demo` extras (dlib, scikit-image).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from iqpir import config as C
from iqpir.cli import keep_freed_memory
from iqpir.faces import get_detector, restore_photo
from iqpir.inference import Restorer
from iqpir.inference.photos import face_restorer_fn
from iqpir.models import build_restorer


def two_face_photo() -> torch.Tensor:
    """(3, 768, 1024): a small astronaut face on the left, a large one cut by the right edge."""
    import skimage.data

    astro = torch.from_numpy(skimage.data.astronaut().copy()).permute(2, 0, 1).float() / 255
    face = astro[:, 20:240, 120:320]
    canvas = torch.ones(3, 768, 1024) * torch.tensor([0.55, 0.6, 0.65])[:, None, None]

    def scaled(x, f):
        return F.interpolate(x[None], scale_factor=f, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)

    a = scaled(face, 1.0)
    canvas[:, 100 : 100 + a.shape[1], 120 : 120 + a.shape[2]] = a
    b = scaled(face, 2.0)
    cut = 120
    canvas[:, 200 : 200 + b.shape[1], 1024 - b.shape[2] + cut :] = b[:, :, : b.shape[2] - cut]
    return canvas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--detector", default="hog+cnn")
    ap.add_argument("--upscale", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="timed photos after one warm-up photo")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = C.from_preset(args.preset)
    torch.manual_seed(0)
    restorer = Restorer(build_restorer(cfg.model), cfg.model.image_size, device=args.device, dtype=args.dtype)
    restore_faces = face_restorer_fn(restorer, quality=1.0)
    detector = get_detector(args.detector)
    photo = two_face_photo()
    runs = []
    for i in range(args.repeats + 1):
        t = time.perf_counter()
        _, report = restore_photo(photo, restore_faces, detector=detector, upscale=args.upscale)
        total = time.perf_counter() - t
        if i == 0:  # warm-up: allocator, kernels, detector models
            continue
        assert len(report["faces"]) == 2, report["faces"]
        runs.append({**report["seconds"], "total": total})
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"\npreset {args.preset}, device {args.device}, dtype {args.dtype}, detector {args.detector}, "
          f"upscale {args.upscale}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"photo 1024x768 with 2 faces, median of {len(runs)}\n")
    phases = [k for k in ("detect", "align", "restore", "background", "paste", "total") if k in med]
    print("| " + " | ".join(f"{p} (s)" for p in phases) + " | photos / minute |")
    print("|" + " --- |" * (len(phases) + 1))
    print("| " + " | ".join(f"{med[p]:.2f}" for p in phases) + f" | {60 / med['total']:.2f} |")


if __name__ == "__main__":
    main()
