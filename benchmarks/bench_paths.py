"""Every path for the packaged default model (or --checkpoint) on whole photos: speed and fidelity.

The speed table of bench_restore.py is for the paper-size face network; this one is for models
that take any size (the packaged conditioned U-Net): torch float32 (exact), torch auto, OpenVINO
float32 and bf16 (when the CPU has it natively) and the int8 graph of iqpir.quantize (calibrated here,
on the sample photos, as `--dtype int8` does), each timed in one process, alternating, on the same
photos (median seconds per megapixel), and compared with torch float32's output (PSNR over all the
photos; the int8 bar is 40 dB). The photos should be real ones the calibration has not seen.

    python benchmarks/bench_paths.py --photos runs/default-model/heldout/degraded
    python benchmarks/bench_paths.py                    # scikit-image's sample photos not used for calibration
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import iqpir
from iqpir import devices, io

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_restore import machine  # noqa: E402

# Photos in scikit-image's wheel that iqpir.quantize's calibration does not use ("skin" and "lily"
# are not in the wheel: scikit-image downloads them with pooch, which a fresh install lacks).
HELD_OUT = ("hubble_deep_field", "logo", "stereo_motorcycle")


def photos(folder: Path | None, multiple: int) -> list[torch.Tensor]:
    if folder is not None:
        paths, _ = io.collect_inputs([str(folder)])
        images = [io.read_image(p).rgb for p in paths]
    else:
        import skimage.data

        images = []
        for name in HELD_OUT:
            a = getattr(skimage.data, name)()
            a = a[0] if isinstance(a, tuple) else a  # stereo_motorcycle: (left, right, disparity)
            a = a[..., :3] if a.ndim == 3 else np.repeat(a[..., None], 3, -1)
            images.append(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 255)
    crop = [img[:, : img.shape[1] // multiple * multiple, : img.shape[2] // multiple * multiple] for img in images]
    return [img[None].contiguous() for img in crop]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a model that takes any size (default: the packaged one)")
    ap.add_argument("--photos", type=Path, default=None, help="folder of photos (default: scikit-image's)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    devices.keep_freed_memory()
    info = machine()
    images = photos(args.photos, 16)
    mp = sum(x.shape[-1] * x.shape[-2] for x in images) / 1e6
    with tempfile.TemporaryDirectory(prefix="iqpir-paths-") as tmp:
        specs = {"torch float32 (exact)": (args.checkpoint, "float32", "torch"),
                 "torch auto": (args.checkpoint, "auto", "torch")}
        if importlib.util.find_spec("openvino"):
            from iqpir.export import export

            xml = export(args.checkpoint, "openvino", Path(tmp) / "f32.xml").path
            specs["openvino float32"] = (xml, "float32", "openvino")
            if devices.cpu_has_native_bf16():
                specs["openvino bf16"] = (xml, "bfloat16", "openvino")
            if importlib.util.find_spec("nncf"):
                from iqpir import quantize

                graph = quantize.quantize_graph(xml, Path(tmp) / "int8.xml")
                specs["openvino int8"] = (graph.path, "int8", "openvino")
        restorers = {name: iqpir.load(path, device="cpu", dtype=dtype, engine=backend)
                     for name, (path, dtype, backend) in specs.items()}
        outputs = {name: [r.restore(x, quality=1.0) for x in images] for name, r in restorers.items()}
        times = {name: [] for name in restorers}
        for _ in range(args.repeats):
            for name, r in restorers.items():
                start = time.perf_counter()
                for x in images:
                    r.restore(x, quality=1.0)
                times[name].append((time.perf_counter() - start) / mp)
    ref = outputs["torch float32 (exact)"]
    rows = ["| path | engine | s/MP | vs torch float32 | PSNR vs float32 (dB) |", "|---|---|---:|---:|---:|"]
    base = statistics.median(times["torch float32 (exact)"])
    for name, r in restorers.items():
        err = torch.cat([(a - b).flatten() for a, b in zip(outputs[name], ref)]).pow(2).mean().item()
        psnr = "exact" if err == 0 else f"{10 * np.log10(1 / err):.1f}"
        t = statistics.median(times[name])
        rows.append(f"| {name} | {r.engine.describe()} | {t:.3f} | {t / base:.2f}x | {psnr} |")
    source = args.photos or "scikit-image: " + ", ".join(HELD_OUT)
    print(f"Machine: {info['cpu']}, {info['cores']} cores ({info['isa']}), {info['threads']} torch threads; "
          f"torch {info['torch']}.\nCommand: `python benchmarks/bench_paths.py {' '.join(sys.argv[1:])}`\n"
          f"{len(images)} photos ({source}), {mp:.2f} MP in all, S = 1; median of {args.repeats} alternating rounds.\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
