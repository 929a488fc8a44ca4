"""What a restore does to the part of a JPEG photo it does not restore (issue 23, item 7).

    python benchmarks/jpeg_keep.py [PHOTO.jpg ...]     # default: matplotlib's grace_hopper.jpg

Each photo goes through `iqpir restore --faces` with the packaged default model (the background
is kept as it is). Outside the face boxes (each box grown by half its size: paste-back blends a
ring around the face), the table gives the share of pixel values within one level of the input's:
as written now (the input's quantisation tables and chroma subsampling) and as the same pixels
re-saved at Pillow quality 95 (what iqpir wrote before), and the same for `--format png`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def background_mask(size: tuple[int, int], boxes: list[list[float]]) -> np.ndarray:
    h, w = size
    mask = np.ones((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        gx, gy = (x1 - x0) / 2, (y1 - y0) / 2
        mask[max(0, int(y0 - gy)):int(y1 + gy) + 1, max(0, int(x0 - gx)):int(x1 + gx) + 1] = False
    return mask


def share_within_one(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float((np.abs(a.astype(int) - b.astype(int)) <= 1)[mask].mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photos", nargs="*", type=Path)
    args = p.parse_args(argv)
    photos = args.photos
    if not photos:
        import matplotlib.cbook

        photos = [Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))]
    from iqpir import io
    from iqpir.cli import main as cli

    print("| photo | faces | background pixels | kept tables (now) | quality 95 (before) | --format png |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for photo in photos:
            out = Path(tmp) / photo.stem
            if cli(["restore", str(photo), "--faces", "--out", str(out), "--device", "cpu"]) != 0:
                print(f"{photo}: restore failed", file=sys.stderr)
                continue
            cli(["restore", str(photo), "--faces", "--out", str(out / "png"), "--device", "cpu", "--format", "png"])
            entry = json.loads((out / "restore.json").read_text())[0]
            src = np.asarray(Image.open(photo).convert("RGB"))
            mask = background_mask(src.shape[:2], [f["box"] for f in entry["faces"]])
            kept = np.asarray(Image.open(out / photo.name).convert("RGB"))
            io.write_image(out / "q95.jpg", io.load_rgb(out / "png" / (photo.stem + ".png")))
            q95 = np.asarray(Image.open(out / "q95.jpg").convert("RGB"))
            png = np.asarray(Image.open(out / "png" / (photo.stem + ".png")).convert("RGB"))
            print(f"| {photo.name} | {len(entry['faces'])} | {mask.mean():.0%} | {share_within_one(kept, src, mask):.1%} "
                  f"| {share_within_one(q95, src, mask):.1%} | {share_within_one(png, src, mask):.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
