"""`iqpir restore` on an idle machine and beside a busy process: OpenMP wait policy x threads (issue 24, item 5).

    python benchmarks/bench_busy.py [--side 768] [--repeats 3]

Each cell restores one photo (skimage's astronaut at `--side` px) with the packaged default model
in a fresh process (OMP_WAIT_POLICY and OMP_NUM_THREADS set before torch loads), timing the
restore command itself, median of `--repeats`. "busy": one competing process spins on a core
meanwhile (a pure-Python loop, as another user's job would). Prints a Markdown table with the
CPU's name and core count; the CLI's choice (README) is the row that is best under load without
losing more than a few per cent idle.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = """
import sys, time
from iqpir.cli import main
t0 = time.perf_counter()
rc = main(["restore", sys.argv[1], "--out", sys.argv[2], "--overwrite", "--device", "cpu"])
print(time.perf_counter() - t0)
sys.exit(rc)
"""


def one(photo: Path, out: Path, policy: str, threads: int) -> float:
    env = dict(os.environ, OMP_WAIT_POLICY=policy, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", RUN, str(photo), str(out)], env=env, capture_output=True, text=True,
                          check=True)
    return float(done.stdout.split()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=768)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import skimage.data
    from PIL import Image

    from iqpir.training.default_model import cpu_name

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; astronaut at {args.side} px, the packaged default model; "
          f"median of {args.repeats}")
    print("| machine | OMP_WAIT_POLICY | threads | restore (s) |")
    print("|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "astronaut.png"
        Image.fromarray(skimage.data.astronaut()).resize((args.side, args.side), Image.LANCZOS).save(photo)
        for load in ("idle", "busy"):
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
            try:
                for policy in ("ACTIVE", "PASSIVE"):
                    for threads in (1, 2):
                        times = [one(photo, Path(tmp) / "out", policy, threads) for _ in range(args.repeats)]
                        print(f"| {load} | {policy} | {threads} | {statistics.median(times):.2f} |", flush=True)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
