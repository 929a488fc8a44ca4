"""Inference cost of the IQPIR additions (quality embedding, HQ+ codebook and head).

Times one forward pass of the restorer per image at a preset's size, for the full model and
for the plain CodeFormer-style baseline (single codebook, no quality embedding), in fp32 and
bf16 autocast, and prints a Markdown table. The IQP additions should cost a few percent.

    python benchmarks/bench_restore.py --preset paper --repeats 3
    python benchmarks/bench_restore.py --preset tiny --repeats 20 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from iqpir import config as C
from iqpir.models import build_restorer, parameter_counts


def time_forward(model, x, quality, dtype, repeats: int, device: torch.device) -> float:
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    times = []
    with torch.inference_mode(), ctx:
        model(x, quality)  # warm-up (allocator, kernels)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(x, quality)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    device = torch.device(args.device)
    variants = {
        "IQPIR (dual codebook + quality embedding)": [],
        "baseline (single codebook, no embedding)": ["model.dual_codebook=false", "model.quality_embedding=none"],
    }
    rows = []
    for name, overrides in variants.items():
        cfg = C.load(preset=args.preset, overrides=overrides)
        torch.manual_seed(0)
        model = build_restorer(cfg.model).to(device).eval()
        s = cfg.model.image_size
        x = torch.rand(1, 3, s, s, device=device)
        q = torch.ones(1, device=device)
        params = parameter_counts(cfg.model)["total_params"]
        for dtype in args.dtypes.split(","):
            rows.append((name, dtype, params, time_forward(model, x, q, dtype, args.repeats, device)))
    print(f"\npreset {args.preset}, device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats}\n")
    print("| model | dtype | params (M) | seconds / image | vs baseline |")
    print("| --- | --- | --- | --- | --- |")
    base = {dt: t for n, dt, _, t in rows if n.startswith("baseline")}
    for name, dtype, params, t in rows:
        print(f"| {name} | {dtype} | {params / 1e6:.2f} | {t:.3f} | {100 * (t / base[dtype] - 1):+.1f}% |")


if __name__ == "__main__":
    main()
