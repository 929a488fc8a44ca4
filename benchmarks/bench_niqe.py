"""NIQE throughput on 512x384 images: the batched implementation against per-image calls.

    OMP_NUM_THREADS=2 python benchmarks/bench_niqe.py [--images 16] [--batch-sizes 4,16]
        [--repeats 3] [--device cpu|cuda] [--no-pyiqa]

Prints a Markdown table of images/s. Rows:
- iqpir `niqe`, per image: a Python loop over the images, one (1, 3, H, W) call each;
- iqpir `niqe`, batched: (B, 3, H, W) in one vectorised pass (``cpu_chunk=B``, what a GPU
  runs), and, for larger batches, the same call with the CPU default (``cpu_chunk``, one
  image per pass);
- iqpir `niqe_diff` forward + backward, batched (the stage-2 loss's cost), vectorised and, on
  CPU, one image per pass;
- pyiqa `niqe` (when pyiqa is importable), per image and batched, with LIVE's parameters
  passed as a local .mat file written from the package's own (needs scipy); offline.

Images: TID2013 I04/I06 from tests/assets and noisy/blurred/flipped variants, 384x512.
Timing: one warm-up pass of every row, then ``--repeats`` rounds that time every row once
each, interleaved, so that a change of machine load hits all rows alike; the table gives the
median wall time and the median CPU time of the process (on a busy machine the CPU time is
the steadier of the two; with several threads it includes their waiting).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from iqpir.io import load_rgb  # noqa: E402
from iqpir.iqa import build_scorer, resolve_device  # noqa: E402


def make_images(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 384, 512) in [0, 1]: the two TID2013 assets and variants of them."""
    base = [load_rgb(ROOT / "tests" / "assets" / f"{k}.png") for k in ("I04", "I06")]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = base[i % 2]
        kind = (i // 2) % 4
        if kind == 1:
            x = (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        elif kind == 2:
            x = F.avg_pool2d(F.pad(x[None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0]
        elif kind == 3:
            x = x.flip(-1)
        out.append(x)
    return torch.stack(out)


def timed_rounds(
    cases: list[tuple[str, int, Callable[[], torch.Tensor]]], repeats: int, device: torch.device
) -> list[tuple[str, int, float, float, torch.Tensor]]:
    """Warm every case up, then time each once per round, interleaved: (name, batch, wall s, cpu s, result)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    results = []
    for _, _, fn in cases:  # warm-up (tables, caches, kernels)
        results.append(fn())
        sync()
    walls: list[list[float]] = [[] for _ in cases]
    cpus: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for i, (_, _, fn) in enumerate(cases):
            t0, c0 = time.perf_counter(), time.process_time()
            results[i] = fn()
            sync()
            walls[i].append(time.perf_counter() - t0)
            cpus[i].append(time.process_time() - c0)
    return [
        (name, bs, statistics.median(w), statistics.median(c), r)
        for (name, bs, _), w, c, r in zip(cases, walls, cpus, results)
    ]


def per_image(scorer, images: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: torch.cat([scorer(images[i : i + 1]).reshape(1).cpu() for i in range(images.shape[0])])


def batched(scorer, images: torch.Tensor, bs: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.cat(
        [scorer(images[i : i + bs]).reshape(-1).cpu() for i in range(0, images.shape[0], bs)]
    )


def diff_fwd_bwd(scorer, images: torch.Tensor, bs: int) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        vals = []
        for i in range(0, images.shape[0], bs):
            x = images[i : i + bs].clone().requires_grad_(True)
            v = scorer(x)
            v.sum().backward()
            vals.append(v.detach().cpu())
        return torch.cat(vals)

    return run


def pyiqa_scorer(device: torch.device):
    """pyiqa's NIQE with LIVE's parameters from a local .mat; None (and why) when unavailable."""
    try:
        import pyiqa  # noqa: F401
        import scipy.io
    except ImportError as exc:
        return None, f"pyiqa/scipy not importable ({exc.name})"
    from iqpir.iqa.niqe import load_pristine_params

    mu, cov = load_pristine_params()
    folder = tempfile.mkdtemp(prefix="bench-niqe-")
    path = os.path.join(folder, "niqe_modelparameters.mat")
    scipy.io.savemat(path, {"mu_prisparam": mu.numpy()[None], "cov_prisparam": cov.numpy()})
    try:
        scorer = build_scorer("pyiqa:niqe", device=device, weights_dir=folder)
    except Exception as exc:  # noqa: BLE001 - report and go on without it
        return None, f"pyiqa niqe failed to build: {exc}"
    return scorer, ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-sizes", default="4,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-pyiqa", action="store_true")
    args = ap.parse_args(argv)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    device = resolve_device(args.device)
    images = make_images(args.images).to(device)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    niqe = build_scorer("niqe", device=device)
    cases: list[tuple[str, int, Callable[[], torch.Tensor]]] = [("iqpir niqe, per image", 1, per_image(niqe, images))]
    for bs in sizes:
        vectorised = build_scorer("niqe", device=device, cpu_chunk=bs)
        cases.append(("iqpir niqe, batched (one vectorised pass per batch)", bs, batched(vectorised, images, bs)))
        if device.type == "cpu" and bs > niqe.cpu_chunk:
            cases.append((f"iqpir niqe, batched call, default cpu_chunk={niqe.cpu_chunk}", bs, batched(niqe, images, bs)))
    diff = build_scorer("niqe_diff", device=device, cpu_chunk=sizes[-1])
    cases.append(("iqpir niqe_diff, forward+backward (vectorised)", sizes[-1], diff_fwd_bwd(diff, images, sizes[-1])))
    if device.type == "cpu":
        one = build_scorer("niqe_diff", device=device, cpu_chunk=1)
        cases.append(("iqpir niqe_diff, forward+backward, one image per pass", sizes[-1],
                      diff_fwd_bwd(one, images, sizes[-1])))

    note = "skipped (--no-pyiqa)"
    if not args.no_pyiqa:
        peer, note = pyiqa_scorer(device)
        if peer is not None:
            cases.append(("pyiqa niqe (same LIVE parameters), per image", 1, per_image(peer, images)))
            for bs in sizes:
                cases.append(("pyiqa niqe (same LIVE parameters), batched", bs, batched(peer, images, bs)))
    rows = timed_rounds(cases, args.repeats, device)
    ref = rows[0][4]

    n = images.shape[0]
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(
        f"NIQE on {n} images of 512x384, device {device}, torch {torch.__version__}, threads {threads}, "
        f"median of {args.repeats}"
    )
    if load is not None:
        print(f"load average before the run: {load:.2f} (cores: {os.cpu_count()})")
    print()
    print("| implementation | batch | images/s | ms/image | CPU ms/image | max abs diff vs iqpir per image |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, bs, t, cpu, r in rows:
        dev = (r.double() - ref.double()).abs().max().item()
        print(f"| {name} | {bs} | {n / t:.1f} | {1000 * t / n:.1f} | {1000 * cpu / n:.1f} | {dev:.2e} |")
    if note:
        print(f"\npyiqa: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
