"""Seconds per megapixel of the background path (`--bg-upsampler`) for a Real-ESRGAN-x2-sized network.

    python benchmarks/bench_upscaler.py [--size 256] [--repeats 3] [--threads 2]

Random weights in Real-ESRGAN x2plus's key layout and size (RRDBNet: 64 features, 23 blocks,
growth 32, pixel-unshuffle input; 16.7M parameters), read through spandrel like a release. The
photo goes through `iqpir.load(..., tile=400)` (the CLI's default `--bg-tile`), at
float32 and at `auto` (bf16 autocast where the CPU has native bf16). Prints one Markdown table
with the CPU's model name and flags class; the best of `--repeats` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def cpu_class() -> str:
    from iqpir.training.default_model import cpu_name

    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    kind = "AVX-512 BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
    return f"{cpu_name()} ({kind})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="square photo side in pixels (default 256)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from test_upscalers import real_esrgan_state

    import iqpir

    x = torch.rand(3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    mp = args.size * args.size / 1e6
    print(f"CPU: {cpu_class()}, {args.threads} torch threads; {args.size}x{args.size} input, x2 output")
    print("| dtype | engine | s per input MP | s per photo |")
    print("|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "RealESRGAN_x2plus_random.pth"
        torch.save({"params_ema": real_esrgan_state(2, nf=64, blocks=23)}, path)
        for dtype in ("float32", "auto"):
            r = iqpir.load(path, device="cpu", dtype=dtype, tile=400)
            r.restore(x[:, :64, :64])
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                r.restore(x)
                best = min(best, time.perf_counter() - t0)
            print(f"| {dtype} | {r.engine.describe()} | {best / mp:.1f} | {best:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
