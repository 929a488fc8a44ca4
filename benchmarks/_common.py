"""Shared set-up of the small reproduction experiments (paper 4.2-4.3) in this folder.

Data: the demo's bundled photos (iqpir.demo: scikit-image + matplotlib), resized as the demo
does; training images in WORK/data/train, held-out astronaut/coffee/grace_hopper at 192 px,
degraded with the demo's mild BFR pipeline (iqpir.demo.DEMO_OVERRIDES) or another preset.

Three metrics, kept apart on purpose:
- conditioning: S of each training image = min-max normalised NIQE (cfg.iqa.metrics = ["niqe"]);
- optimised: the stage-2 / plug-in quality loss 1 - Q with Q = fixed-normalised differentiable
  NIQE (cfg.iqa.loss_metrics = ["niqe_diff"]);
- judge: PIQE (lower = better), used in neither training nor conditioning.

Runs are cached under --work (a run folder with a checkpoint at the last step is reused), so
arms that share a stage-1 model train it once and a script can be re-run to re-evaluate.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from iqpir import config as C
from iqpir import io

CONDITION_METRICS = ["niqe"]
LOSS_METRICS = ["niqe_diff"]
JUDGE = "piqe"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--work", default=None, help="cache folder for data and runs (default: a new temp folder)")
    p.add_argument("--out", default=None, help="folder for the figure and images (default: WORK/out)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on busy shared cores, 2 OpenMP threads wait at barriers and "
                        "small convolutions run up to 50x slower)")
    return p


def folders(args) -> tuple[Path, Path]:
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="iqpir-bench-"))
    out = Path(args.out) if args.out else work / "out"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    log(f"work folder {work}, outputs in {out}")
    return work, out


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def prepare_data(work: Path) -> tuple[Path, Path, dict[str, torch.Tensor], float]:
    """-> (train folder, score table, held-out references name -> (3,H,W), median S).

    The score table holds min-max normalised NIQE over the training images (the condition).
    """
    from iqpir import demo
    from iqpir.data import bundled
    from iqpir.iqa.table import read_score_table, score_files

    train_dir = work / "data" / "train"
    ref_dir = work / "data" / "heldout"
    scores = work / "data" / "scores.csv"
    if not scores.is_file():
        log("writing the bundled training photos and scoring them with NIQE")
        images = bundled.bundled_images()
        for name in bundled.TRAIN:
            io.write_image(train_dir / f"{name}.png", bundled.resize_long_side(images[name], demo.TRAIN_SIDE))
        for name in bundled.HELD_OUT:
            io.write_image(ref_dir / f"{name}.png", bundled.resize_long_side(images[name], demo.HELD_OUT_SIDE))
        score_files([str(train_dir)], metrics=CONDITION_METRICS, out=str(scores), normalization="minmax",
                    device="cpu", progress=False)
    refs = {name: io.read_image(ref_dir / f"{name}.png").rgb for name in bundled.HELD_OUT}
    table = read_score_table(scores)
    median = float(torch.tensor(sorted(table.quality.values())).median())
    return train_dir, scores, refs, median


def degradation_overrides(preset: str) -> list[str]:
    """The demo's settings (its network recipe and mild BFR degradation for general photos at 64x64
    crops), or the same with another degradation preset's defaults."""
    from iqpir.demo import DEMO_OVERRIDES

    if preset == "bfr":
        return list(DEMO_OVERRIDES)
    return [o for o in DEMO_OVERRIDES if not o.startswith("data.degradation.")] + [f"data.degradation.preset={preset}"]


def make_config(stage: int, steps: int, extra: list[str], threshold: float, seed: int = 0,
                preset: str = "bfr") -> C.RunConfig:
    return C.load(preset="tiny", overrides=[
        *degradation_overrides(preset), f"train.stage={stage}", f"train.steps={steps}", f"train.ckpt_every={steps}",
        f"train.seed={seed}", f"model.hq_threshold={threshold:.4f}", "iqa.metrics=[niqe]",
        "iqa.normalization=minmax", "iqa.loss_metrics=[niqe_diff]", *extra])


def degraded_heldout(refs: dict[str, torch.Tensor], cfg: C.RunConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    from iqpir.data import degrade

    return {name: degrade(ref[None], cfg.data.degradation, generator=10_000 + seed * 100 + i)[0]
            for i, (name, ref) in enumerate(refs.items())}


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------


def cached_train(cfg: C.RunConfig, train_dir: Path, scores: Path, run_dir: Path, stage1: Path | None = None) -> Path:
    """Train into run_dir unless a finished run is already there; -> run_dir.

    A run being trained by another live process (its pid in run_dir/OWNER) is waited for, so
    several invocations can share one --work folder.
    """
    from iqpir.training.loop import train

    done = run_dir / "DONE"
    if done.is_file() and done.read_text() == C.to_yaml(cfg):
        log(f"reusing {run_dir.name}")
        return run_dir
    owner = run_dir / "OWNER"
    while owner.is_file() and not done.is_file() and _alive(int(owner.read_text() or 0)):
        log(f"waiting for process {owner.read_text()} to finish {run_dir.name}")
        time.sleep(30)
    if done.is_file() and done.read_text() == C.to_yaml(cfg):
        return run_dir
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    owner.write_text(str(os.getpid()))
    t0 = time.perf_counter()
    res = train(cfg, train_dir, run_dir, stage1=stage1, scores=scores, device="cpu", progress=False)
    if not res.completed:
        raise RuntimeError(f"{run_dir}: training stopped early: {res.reason}")
    io.atomic_write_text(done, C.to_yaml(cfg))
    log(f"trained {run_dir.name}: {cfg.train.steps} steps in {time.perf_counter() - t0:.0f} s")
    return run_dir


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


class Judge:
    """PSNR, SSIM, PIQE (judge, lower = better) and NIQE (the conditioning metric) of restorations."""

    def __init__(self):
        from iqpir.iqa import build_scorer

        self.piqe = build_scorer("piqe")
        self.niqe = build_scorer("niqe")

    @torch.no_grad()
    def __call__(self, img: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
        from iqpir.metrics import psnr, ssim

        x, r = img[None].clamp(0, 1), ref[None]
        return {"psnr": float(psnr(x, r)[0]), "ssim": float(ssim(x, r)[0]),
                "piqe": float(self.piqe(x)[0]), "niqe": float(self.niqe(x)[0])}


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def evaluate(restore, lq: dict[str, torch.Tensor], refs: dict[str, torch.Tensor], judge: Judge,
             save: Path | None = None) -> dict[str, float]:
    """restore((3,H,W)) -> (3,H,W); mean metrics over the held-out set plus seconds per image."""
    rows, seconds = [], 0.0
    for name, x in lq.items():
        t0 = time.perf_counter()
        y = restore(x)
        seconds += time.perf_counter() - t0
        rows.append(judge(y, refs[name]))
        if save is not None:
            io.write_image(save / f"{name}.png", y.clamp(0, 1))
    out = mean_rows(rows)
    out["sec_per_image"] = seconds / len(lq)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def fmt_ms(values: list[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------
# The Table 5 arms (shared by ablation.py, quality_control.py, over_optimisation.py)
# --------------------------------------------------------------------------------------

ARMS = {
    # name: (dual codebook, quality embedding, quality loss, gradient path)
    "a": (False, "none", False, "straight_through"),
    "b": (False, "binned", False, "straight_through"),
    "c": (True, "binned", False, "straight_through"),
    "d": (True, "binned", True, "straight_through"),
    "d-soft": (True, "binned", True, "soft"),
}
ARM_LABELS = {
    "a": "(a) single codebook, no condition",
    "b": "(b) + score condition",
    "c": "(c) + dual codebook",
    "d": "(d) + quality optimisation (straight-through)",
    "d-soft": "(d') + quality optimisation (soft codes)",
}


def arm_run(name: str, work: Path, data, s1_steps: int, s2_steps: int, seed: int = 0) -> tuple[Path, C.RunConfig]:
    """Train (or reuse) the stage-1 and stage-2 runs of arm `name`; -> (stage-2 run dir, cfg2)."""
    train_dir, scores, _, median = data
    dual, emb, qloss, path = ARMS[name]
    model = [f"model.dual_codebook={str(dual).lower()}"]
    cfg1 = make_config(1, s1_steps, model, median, seed=0)
    s1 = cached_train(cfg1, train_dir, scores, work / "runs" / f"stage1-{'dual' if dual else 'single'}-{s1_steps}")
    extra = [*model, f"model.quality_embedding={emb}", f"model.gradient_path={path}", "train.lr=5e-4",
             f"train.quality_weight={0.1 if qloss else 0.0}", f"train.quality_start_step={s2_steps // 2}"]
    cfg2 = make_config(2, s2_steps, extra, median, seed=seed)
    run = work / "runs" / f"stage2-{name}-{s1_steps}-{s2_steps}-seed{seed}"
    return cached_train(cfg2, train_dir, scores, run, stage1=s1), cfg2


def md_table(rows: list[dict[str, str]]) -> str:
    """A plain Markdown table of preformatted cells (iqpir.metrics.markdown_table takes numbers
    only; these cells hold 'mean ± std' over seeds)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
