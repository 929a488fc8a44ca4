"""`iqpir demo`: the whole method end to end, offline, on images that ship inside packages.

1. a training set from scikit-image's bundled photos (plus matplotlib's grace_hopper): each
   photo and copies of it degraded to three levels, so that the ground truths vary in quality
   as the paper assumes (section 3: "Beyond Ground-Truth"); astronaut, coffee and grace_hopper
   are kept aside as the held-out set;
2. every ground truth scored with the built-in ensemble (NIQE + PIQE, min-max normalised over
   the training set): its quality S, from about 0.1 to 0.95; stage 1 and stage 2 trained at
   the tiny preset on 64x64 crops (a general-image restorer: any photo size goes through
   tiles), stage 2 conditioned on each ground truth's own S;
3. the stage-1 autoencoder measured on the clean held-out photos (reconstruction PSNR, codes
   used, perplexity);
4. the held-out photos degraded twice (with the demo's BFR pipeline, and with `iqpir degrade`'s
   defaults), restored at five quality targets S, evaluated;
5. DIR/report.html, DIR/results.json, the pictures, and the run folders DIR/stage1, DIR/stage2.

The numbers are whatever the run measures; the report lists each of the demo's criteria with
the measured values and whether it holds.
"""

from __future__ import annotations

import html
import json
import resource
import sys
import time
from pathlib import Path

import torch

from iqpir import config as C
from iqpir import io
from iqpir.data.bundled import HELD_OUT, TRAIN, bundled_images, resize_long_side

SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)
TRAIN_SIDE = 256  # training images are resized so their longer side is this many pixels
HELD_OUT_SIDE = 192
SWEEP_IMAGE = "astronaut"  # the photo whose S sweep the report shows as a strip

# Ground truths of mixed quality (paper section 3.2: the condition is each ground truth's own
# score): every training photo plus copies degraded to three fixed levels of
# (blur sigma, downsampling factor, noise sigma in /255, JPEG quality). The prior scores the
# copies lower, so S spans most of [0, 1] and the top bins hold the clean photos.
GT_LEVELS = ((1.0, 1.0, 4.0, 70), (1.5, 2.0, 8.0, 45), (2.5, 3.0, 15.0, 25))

# The degradation the restorer learns to undo (stage-2 inputs, and the held-out inputs of the
# report): CodeFormer's BFR pipeline with ranges for 64-pixel crops of general photos (its face
# ranges, blur sigma up to 15 and 4-30x downsampling, leave nothing of a 64-pixel crop).
DEMO_OVERRIDES = [
    "data.degradation.preset=bfr",
    "data.degradation.bfr.kernel_size=21",
    "data.degradation.bfr.blur_sigma=[0.5, 2.0]",
    "data.degradation.bfr.downsample=[1.0, 3.0]",
    "data.degradation.bfr.noise=[0.0, 8.0]",
    "data.degradation.bfr.jpeg_quality=[50, 90]",
    "data.mode=crop",
    "data.num_workers=0",
    # The demo's network (docs/results.md, "The demo's recipe", says what each choice bought):
    # a 2x latent (32x32 tokens per 64-pixel crop) without attention in the autoencoder, no
    # GroupNorm before the last convs, 16-dimensional codes in two codebooks of 512 that learn
    # by moving averages with dead-code restarts, and CFT blocks at 32 and 64 pixels.
    "model.channel_mult=[1, 2]",
    "model.attn_resolutions=[]",
    "model.final_norm=false",
    "model.latent_channels=16",
    "model.codebook_size=512",
    "model.codebook_update=ema",
    "model.codebook_restart=0.03",
    "model.cft_resolutions=[32, 64]",
    "train.lr=1e-3",
    "train.lr_schedule=cosine",
    "train.min_lr=2e-5",
    "train.gan_weight=0",
]
STAGE1_STEPS, STAGE2_STEPS = 800, 400
# Stage 2 trains the CFT blocks at w = 1 (train.fidelity); the demo restores at this w.
FIDELITY = 1.0


def gt_level_config(level: tuple[float, float, float, int]) -> C.DegradationConfig:
    """The BFR degradation with every range pinned to one value: a ground-truth quality level."""
    sigma, scale, noise, jpeg = level
    return C.load(overrides=[
        "data.degradation.bfr.kernel_size=21", f"data.degradation.bfr.blur_sigma=[{sigma}, {sigma}]",
        f"data.degradation.bfr.downsample=[{scale}, {scale}]", f"data.degradation.bfr.noise=[{noise}, {noise}]",
        f"data.degradation.bfr.jpeg_quality=[{jpeg}, {jpeg}]"]).data.degradation


def write_training_set(images: dict[str, torch.Tensor], folder: Path, seed: int = 0) -> None:
    """Each training photo as NAME.png and its degraded copies as NAME-q1.png .. NAME-q3.png."""
    from iqpir.data import degrade

    for i, name in enumerate(TRAIN):
        img = resize_long_side(images[name], TRAIN_SIDE)
        io.write_image(folder / f"{name}.png", img)
        for level, params in enumerate(GT_LEVELS, 1):
            g = torch.Generator().manual_seed(seed * 100_000 + i * 10 + level)
            io.write_image(folder / f"{name}-q{level}.png", degrade(img[None], gt_level_config(params), generator=g)[0])


def demo_config(stage: int, steps: int, *overrides: str) -> C.RunConfig:
    """The demo's tiny-preset config for one stage (checkpoint at the end only)."""
    return C.load(preset="tiny", overrides=[*DEMO_OVERRIDES, f"train.stage={stage}", f"train.steps={steps}",
                                            f"train.ckpt_every={steps}", *overrides])


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


DEFAULT_HELD_OUT_SIDE = 384  # the default model restores whole photos; the trained showcase 64-px tiles


def run_demo(out: str | Path = "demo-output", seed: int = 0, quick: bool = False, train: bool = False,
             stage1_steps: int = STAGE1_STEPS, stage2_steps: int = STAGE2_STEPS) -> dict:
    """Run the demo into `out`; return the results dict (also written to out/results.json).

    Without `train`: the packaged default model restores the held-out photos (a few minutes).
    With `train`: the showcase trains both stages of a tiny IQPIR model first and restores with it.
    """
    from iqpir.data.degradations import degrade, degrade_files
    from iqpir.inference import load
    from iqpir.iqa import QualityEnsemble

    if quick:
        stage1_steps, stage2_steps = 20, 20
    out = Path(out)
    if (out / "stage1").exists() or (out / "stage2").exists() or (out / "results.json").exists():
        raise FileExistsError(f"{out} already holds a demo run; remove it or pass another --out")
    t_start, c_start = time.perf_counter(), cpu_seconds()
    marks: dict[str, tuple[float, float]] = {}

    def mark(name: str, since: tuple[float, float]) -> tuple[float, float]:
        now = (time.perf_counter(), cpu_seconds())
        marks[name] = (now[0] - since[0], now[1] - since[1])
        return now

    torch.manual_seed(seed)
    images = bundled_images()
    held_dir = out / "data" / "heldout"
    side = HELD_OUT_SIDE if train else DEFAULT_HELD_OUT_SIDE
    references = {}
    for name in HELD_OUT:
        references[name] = resize_long_side(images[name], side)
        io.write_image(held_dir / "reference" / f"{name}.png", references[name])
    now = (t_start, c_start)
    if train:
        trained, now = _train_showcase(out, images, seed, stage1_steps, stage2_steps, mark)
        degradation = trained["degradation"]
        restorer = load(out / "stage2", device="cpu", dtype="float32")  # documented numbers: float32
        fidelity = FIDELITY
    else:
        trained = None
        from iqpir.training.default_model import EVAL_DEGRADATION, bfr_config

        degradation = bfr_config(**EVAL_DEGRADATION)  # the default model's evaluation
        restorer = load(None, device="cpu", dtype="float32")
        fidelity = 0.0
    _log("restoring the held-out images")
    metrics = ["niqe", "piqe"]
    judge = QualityEnsemble(metrics, normalization="fixed")
    for i, (name, ref) in enumerate(references.items()):
        lq = degrade(ref[None], degradation, generator=seed * 1000 + i)[0]
        io.write_image(held_dir / "degraded" / f"{name}.png", lq)
    # exactly `iqpir degrade DIR/data/heldout/reference --out DIR/data/heldout/iqpir-degrade --seed SEED`
    degrade_files([held_dir / "reference"], held_dir / "iqpir-degrade", C.RunConfig().data.degradation,
                  seed=seed, progress=False)
    evaluations = {}
    for key, folder in (("demo", "degraded"), ("iqpir_degrade", "iqpir-degrade")):
        lq = {name: io.read_image(held_dir / folder / f"{name}.png").rgb for name in HELD_OUT}
        evaluations[key] = evaluate_sweep(restorer, lq, references, judge, out / "restored" / folder, fidelity)
    mark("restoring and evaluating", now)

    demo_eval = evaluations["demo"]
    results = {
        "model": _model_summary(restorer, trained),
        "lq": demo_eval["lq"],
        "restored": demo_eval["sweep"]["1.00"],
        "sweep": demo_eval["sweep"],
        "per_image": demo_eval["per_image"],
        "iqpir_degrade": evaluations["iqpir_degrade"],
        "criteria": criteria(evaluations),
        "held_out": list(HELD_OUT),
        "held_out_side": side,
        "seconds": {k: round(v[0], 1) for k, v in marks.items()} | {"total": round(time.perf_counter() - t_start, 1)},
        "cpu_seconds": {k: round(v[1], 1) for k, v in marks.items()} | {"total": round(cpu_seconds() - c_start, 1)},
        "threads": torch.get_num_threads(),
        "fidelity": fidelity,
        "quality_metric": "mean of fixed-normalised " + ", ".join(metrics) + " (higher is better)",
    }
    if trained is not None:
        results |= {k: v for k, v in trained.items() if k != "degradation"}
    io.atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    write_report(out, results)
    _log(f"done in {results['seconds']['total']:.0f} s ({results['cpu_seconds']['total']:.0f} CPU s): "
         f"{out / 'report.html'}")
    return results


def _model_summary(restorer, trained: dict | None) -> dict:
    """What restored: the packaged default model (its card's training facts) or the showcase run."""
    if trained is not None:
        return {"name": "tiny IQPIR trained by this demo", "path": "stage2"}
    from iqpir.weights import DEFAULT_CARD

    card = json.loads(DEFAULT_CARD.read_text()) if DEFAULT_CARD.is_file() else {}
    training = card.get("training", {})
    return {"name": "the packaged default model", "parameters": card.get("architecture", {}).get("parameters"),
            "route": card.get("architecture", {}).get("route"), "steps": training.get("steps"),
            "train_wall_s": training.get("wall_s"), "photos": len(card.get("data", {}).get("photos", {}))}


def _train_showcase(out: Path, images: dict, seed: int, stage1_steps: int, stage2_steps: int, mark):
    """`iqpir demo --train`: a tiny IQPIR model trained on the bundled photos, both stages."""
    from iqpir.iqa.table import read_score_table, score_files
    from iqpir.training.loop import quality_bin_counts, train

    # 1. data: bundled photos and their degraded copies; the held-out photos kept apart
    t0 = (time.perf_counter(), cpu_seconds())
    _log("writing the training set (bundled photos and degraded copies of them)")
    train_dir = out / "data" / "train"
    write_training_set(images, train_dir, seed)
    references = {name: io.load_rgb(out / "data" / "heldout" / "reference" / f"{name}.png") for name in HELD_OUT}
    # 2. the quality prior over the training set, then both stages
    _log("scoring the training images with the built-in ensemble (NIQE, PIQE)")
    cfg1 = demo_config(1, stage1_steps)
    scores = out / "scores.csv"
    score_files([str(train_dir)], metrics=cfg1.iqa.metrics, out=str(scores), normalization="minmax", progress=False)
    table = read_score_table(scores)
    cfg2 = demo_config(2, stage2_steps, f"train.quality_start_step={stage2_steps * 3 // 4}", f"train.fidelity={FIDELITY}")
    now = mark("data and scores", t0)
    _log(f"stage 1: {stage1_steps} steps")
    _check(train(cfg1, train_dir, out / "stage1", scores=scores, device="cpu"))
    now = mark("stage 1", now)
    stage1 = stage1_summary(out / "stage1", references)
    now = mark("stage-1 evaluation", now)
    _log(f"stage 2: {stage2_steps} steps")
    _check(train(cfg2, train_dir, out / "stage2", stage1=out / "stage1", scores=scores, device="cpu"))
    now = mark("stage 2", now)
    trained = {
        "degradation": cfg2.data.degradation,
        "stage1": stage1,
        "train_images": {"photos": len(TRAIN), "ground_truths": len(table.quality),
                         "levels": [list(v) for v in GT_LEVELS]},
        "quality_bins": quality_bin_counts(list(table.quality.values()), cfg2.model.quality_bins),
        "steps": {"stage1": stage1_steps, "stage2": stage2_steps},
        "hq_threshold": cfg1.model.hq_threshold,
    }
    return trained, now


def _check(result) -> None:
    if not result.completed:  # interrupted (the run folder can be resumed) or a non-finite loss
        raise SystemExit(f"[demo] stopped: {result.reason}")


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------


class _StageOne(torch.nn.Module):
    """The stage-1 autoencoder behind the Restorer's tiling: decodes the stage-2 code targets
    (both codebooks, as stage 2 learns them) and records the codes it used."""

    def __init__(self, vqgan: torch.nn.Module):
        super().__init__()
        self.vqgan = vqgan
        self.codes: dict[str, list[torch.Tensor]] = {"common": [], "hq": []}

    def forward(self, images: torch.Tensor, quality, alpha=None):
        from types import SimpleNamespace

        targets = self.vqgan.code_targets(images)
        self.codes["common"].append(targets.indices_common.flatten())
        if targets.indices_hq is not None:
            self.codes["hq"].append(targets.indices_hq.flatten())
        return SimpleNamespace(restored=self.vqgan.decoder(targets.z_q))


def codebook_usage(indices: torch.Tensor, size: int) -> dict:
    """Codes used (of `size`) and perplexity exp(H) of the code histogram of `indices`."""
    counts = torch.bincount(indices.flatten(), minlength=size).double()
    p = counts[counts > 0] / counts.sum()
    return {"used": int((counts > 0).sum()), "size": size, "perplexity": round(float(torch.exp(-(p * p.log()).sum())), 1)}


@torch.no_grad()
def stage1_summary(run: Path, references: dict[str, torch.Tensor]) -> dict:
    """Reconstruction PSNR of the clean held-out photos through the stage-1 autoencoder (the
    stage-2 code targets decoded, through the same tiles as restoration) and codebook usage."""
    from iqpir.checkpoint import load_model
    from iqpir.inference import Restorer
    from iqpir.metrics import psnr

    vqgan, cfg = load_model(run)
    probe = _StageOne(vqgan.eval())
    restorer = Restorer(probe, cfg.model.image_size, device="cpu")
    per_image = {}
    for name, ref in references.items():
        rec = restorer.restore_one(ref, quality=1.0)
        per_image[name] = round(float(psnr(rec[None], ref[None])[0]), 2)
    size = cfg.model.codebook_size
    out = {"reconstruction_psnr": round(sum(per_image.values()) / len(per_image), 2), "per_image_psnr": per_image,
           "codebooks": {k: codebook_usage(torch.cat(v), size) for k, v in probe.codes.items() if v}}
    _log(f"stage 1: held-out reconstruction {out['reconstruction_psnr']:.2f} dB; codes "
         + ", ".join(f"{k} {v['used']}/{size} (perplexity {v['perplexity']})" for k, v in out["codebooks"].items()))
    return out


def _scores(img, ref, judge) -> dict[str, float]:
    from iqpir.metrics import psnr, ssim

    with torch.no_grad():
        return {
            "psnr": float(psnr(img[None], ref[None])[0]),
            "ssim": float(ssim(img[None], ref[None])[0]),
            "quality": float(judge(img[None])[0]),
        }


def evaluate_sweep(restorer, lq: dict[str, torch.Tensor], references: dict[str, torch.Tensor], judge,
                   folder: Path, fidelity: float = 0.0) -> dict:
    """Restore each input at every S of SWEEP (images to folder/S0.00/NAME.png ...); -> held-out
    means {"lq": scores, "sweep": {"0.00": scores, ...}, "per_image": [...]}."""
    per_image = []
    for name, x in lq.items():
        entry = {"name": name, "lq": _scores(x, references[name], judge)}
        for s in SWEEP:
            restored = restorer.restore(x, quality=s, fidelity=fidelity)
            io.write_image(folder / f"S{s:.2f}" / f"{name}.png", restored)
            entry[f"S={s:.2f}"] = _scores(restored, references[name], judge)
        per_image.append(entry)

    def mean(key: str) -> dict[str, float]:
        return {m: sum(e[key][m] for e in per_image) / len(per_image) for m in ("psnr", "ssim", "quality")}

    return {"lq": mean("lq"), "sweep": {f"{s:.2f}": mean(f"S={s:.2f}") for s in SWEEP}, "per_image": per_image}


QUALITY_STEP = 0.05  # the rise of the ensemble score from S = 0 to S = 1 that the demo asks for
PSNR_GAIN = 1.0  # dB over the degraded inputs


def criteria(evaluations: dict[str, dict]) -> dict[str, dict]:
    """The demo's claims, each with the measured numbers and whether it holds."""
    out = {}
    demo = evaluations["demo"]
    lq, best = demo["lq"], demo["sweep"]["1.00"]
    out["psnr_gain"] = {"text": f"restored (S = 1) PSNR at least {PSNR_GAIN:g} dB above the degraded inputs",
                        "measured": round(best["psnr"] - lq["psnr"], 2), "holds": best["psnr"] - lq["psnr"] >= PSNR_GAIN}
    out["ssim_gain"] = {"text": "restored (S = 1) SSIM above the degraded inputs",
                        "measured": round(best["ssim"] - lq["ssim"], 4), "holds": best["ssim"] > lq["ssim"]}
    out["quality_gain"] = {"text": "restored (S = 1) quality above the degraded inputs",
                           "measured": round(best["quality"] - lq["quality"], 4), "holds": best["quality"] > lq["quality"]}
    for key, ev in evaluations.items():
        q = [ev["sweep"][f"{s:.2f}"]["quality"] for s in (0.0, 0.5, 1.0)]
        rises = q[0] < q[1] < q[2] and q[2] - q[0] >= QUALITY_STEP
        where = "the demo's degradation" if key == "demo" else "`iqpir degrade` defaults"
        out[f"quality_rises_with_s_{key}"] = {
            "text": f"quality rises strictly from S = 0 to 0.5 to 1, by at least {QUALITY_STEP:g} ({where})",
            "measured": [round(v, 4) for v in q], "holds": rises}
    return out


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


def _sweep_figure(out: Path, results: dict) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for key, label, style in (("demo", "demo degradation", "o-"), ("iqpir_degrade", "`iqpir degrade` defaults", "s--")):
        ev = {"lq": results["lq"], "sweep": results["sweep"]} if key == "demo" else results["iqpir_degrade"]
        s = [float(k) for k in ev["sweep"]]
        for ax, metric in zip(axes, ("quality", "psnr", "ssim")):
            line, = ax.plot(s, [v[metric] for v in ev["sweep"].values()], style, label=f"restored ({label})")
            ax.axhline(ev["lq"][metric], color=line.get_color(), ls=":", label=f"input ({label})")
    for ax, metric in zip(axes, ("quality (NIQE+PIQE)", "PSNR (dB)", "SSIM")):
        ax.set_xlabel("target quality S")
        ax.set_title(metric)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=100)
    plt.close(fig)
    return "sweep.png"


def _loss_figure(out: Path) -> str | None:
    """Training curves from the two runs' metrics.csv."""
    import csv

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    for ax, run in zip(axes, ("stage1", "stage2")):
        path = out / run / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        skip = {"step", "loss", "lr", "seconds", "disc"}
        for col in [c for c in (rows[0] if rows else {}) if c not in skip]:
            ax.plot([int(r["step"]) for r in rows], [float(r[col]) for r in rows], label=col)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{run} losses")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=100)
    plt.close(fig)
    return "losses.png"


def _row(tiles, gap: int = 6, height: int | None = None):
    from PIL import Image

    if height is not None:
        tiles = [t.resize((round(t.width * height / t.height), height), Image.BICUBIC) for t in tiles]
    row = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), max(t.height for t in tiles)), "white")
    x = 0
    for t in tiles:
        row.paste(t, (x, 0))
        x += t.width + gap
    return row


def _stack(rows, gap: int = 6):
    from PIL import Image

    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + gap * (len(rows) - 1)), "white")
    y = 0
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height + gap
    return canvas


def _strip(out: Path, results: dict, height: int = 160) -> str:
    """strip.png: one row per held-out photo: degraded | restored at S = 1.0 | reference."""
    from PIL import Image

    rows = [_row([Image.open(out / p / f"{e['name']}.png").convert("RGB") for p in
                  ("data/heldout/degraded", "restored/degraded/S1.00", "data/heldout/reference")], 8, height)
            for e in results["per_image"]]
    _stack(rows, 8).save(out / "strip.png", optimize=True)
    return "strip.png"


def _sweep_strip(out: Path, name: str, folder: str, height: int = 160) -> str:
    """sweep-NAME.png: the restorations of one photo at every S of the sweep, side by side."""
    from PIL import Image

    tiles = [Image.open(out / "restored" / folder / f"S{s:.2f}" / f"{name}.png").convert("RGB") for s in SWEEP]
    path = f"sweep-{folder}-{name}.png"
    _row(tiles, 6, height).save(out / path, optimize=True)
    return path


SLIDER_JS = """
for (const box of document.querySelectorAll('.cmp')) {
  const top = box.querySelector('.after'), bar = box.querySelector('.bar');
  const set = (x) => { const r = box.getBoundingClientRect();
    const f = Math.min(1, Math.max(0, (x - r.left) / r.width));
    top.style.clipPath = 'inset(0 0 0 ' + (100 * f) + '%)'; bar.style.left = (100 * f) + '%'; };
  let down = false;
  box.addEventListener('pointerdown', (e) => { down = true; box.setPointerCapture(e.pointerId); set(e.clientX); });
  box.addEventListener('pointermove', (e) => { if (down) set(e.clientX); });
  box.addEventListener('pointerup', () => { down = false; });
  box.addEventListener('keydown', (e) => { const r = box.getBoundingClientRect();
    const f = parseFloat(bar.style.left || '50') / 100, d = e.key === 'ArrowLeft' ? -0.05 : e.key === 'ArrowRight' ? 0.05 : 0;
    if (d) set(r.left + (f + d) * r.width); });
}
"""

CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0} td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left} .ok{color:#186a1e} .no{color:#a11}
.cmp{position:relative;display:inline-block;cursor:ew-resize;user-select:none;touch-action:none;margin:4px}
.cmp img{display:block;width:384px;image-rendering:pixelated} .cmp .after{position:absolute;top:0;left:0;clip-path:inset(0 0 0 50%)}
.cmp .bar{position:absolute;top:0;bottom:0;left:50%;width:2px;background:#fff;box-shadow:0 0 3px #000}
.cmp .lbl{position:absolute;top:4px;background:rgba(0,0,0,.6);color:#fff;font-size:12px;padding:1px 5px}
figure{display:inline-block;margin:4px;text-align:center} figure img{width:192px;image-rendering:pixelated}
figcaption{font-size:12px}"""


def _fmt(v: dict) -> str:
    return f"<td>{v['psnr']:.2f}</td><td>{v['ssim']:.4f}</td><td>{v['quality']:.4f}</td>"


def _showcase_html(out: Path, results: dict) -> tuple[str, str]:
    """The intro and the stage-1 / losses section of a `--train` run's report."""
    s1 = results["stage1"]
    usage = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['used']} / {v['size']}</td><td>{v['perplexity']}</td></tr>"
                    for k, v in s1["codebooks"].items())
    losses = _loss_figure(out)
    loss_html = f"<img src='{losses}' alt='training losses'>" if losses else ""
    steps, gt = results["steps"], results["train_images"]
    intro = f"""<p>Trained by this run (<code>iqpir demo --train</code>, a showcase) on {gt['photos']} photos bundled
with scikit-image and matplotlib and {gt['ground_truths'] - gt['photos']} degraded copies of them ({gt['ground_truths']}
ground truths of mixed quality, each conditioned on its own score S; per S bin of width 0.1: {results['quality_bins']}).
Tiny preset, 64x64 crops: stage 1 {steps['stage1']} steps, stage 2 {steps['stage2']} steps (its CFT blocks trained
at fidelity w = 1; the restorations here use w = {results['fidelity']:g}).</p>"""
    training = f"""<h2>Stage 1</h2>
<p>Reconstruction of the clean held-out photos through the stage-1 autoencoder (the codes stage 2 learns to
predict, decoded through the same tiles): {s1['reconstruction_psnr']:.2f} dB PSNR
({', '.join(f'{k} {v:.2f}' for k, v in s1['per_image_psnr'].items())}): the most that restoring from the codes
alone (w = 0) can give; the CFT blocks (w &gt; 0) add features of the input that the codes do not hold.</p>
<table><tr><th>codebook</th><th>codes used on the held-out photos</th><th>perplexity</th></tr>{usage}</table>
{loss_html}"""
    return intro, training


def write_report(out: Path, results: dict) -> None:
    """out/report.html (self-contained apart from the PNGs beside it; no network) and the pictures."""
    crit = "".join(
        f"<li class='{'ok' if c['holds'] else 'no'}'>{'holds' if c['holds'] else 'does NOT hold'}: "
        f"{html.escape(c['text'])} (measured: {html.escape(json.dumps(c['measured']))})</li>"
        for c in results["criteria"].values())

    def table(ev: dict) -> str:
        rows = [("degraded input", ev["lq"])] + [(f"restored, S = {s}", v) for s, v in ev["sweep"].items()]
        return ("<table><tr><th></th><th>PSNR ↑</th><th>SSIM ↑</th><th>quality ↑</th></tr>"
                + "".join(f"<tr><td>{html.escape(k)}</td>{_fmt(v)}</tr>" for k, v in rows) + "</table>")

    demo_ev = {"lq": results["lq"], "sweep": results["sweep"]}
    sliders = "".join(
        f"<div><h3>{html.escape(e['name'])}: PSNR {e['lq']['psnr']:.2f} → {e['S=1.00']['psnr']:.2f} dB, "
        f"quality {e['lq']['quality']:.3f} → {e['S=1.00']['quality']:.3f}</h3>"
        f"<div class='cmp' tabindex='0'><img src='data/heldout/degraded/{e['name']}.png' alt='degraded'>"
        f"<img class='after' src='restored/degraded/S1.00/{e['name']}.png' alt='restored'>"
        f"<div class='bar'></div><span class='lbl' style='left:4px'>degraded</span>"
        f"<span class='lbl' style='right:4px'>restored, S = 1</span></div>"
        f"<figure><img src='data/heldout/reference/{e['name']}.png' style='width:384px'>"
        f"<figcaption>reference</figcaption></figure></div>"
        for e in results["per_image"])

    def sweep_figures(folder: str, ev: dict) -> str:
        entry = next(e for e in ev["per_image"] if e["name"] == SWEEP_IMAGE)
        lq_path = "data/heldout/degraded" if folder == "degraded" else "data/heldout/iqpir-degrade"
        figs = [f"<figure><img src='{lq_path}/{SWEEP_IMAGE}.png'><figcaption>input<br>quality "
                f"{entry['lq']['quality']:.3f}, PSNR {entry['lq']['psnr']:.2f}</figcaption></figure>"]
        figs += [f"<figure><img src='restored/{folder}/S{s:.2f}/{SWEEP_IMAGE}.png'><figcaption>S = {s:.2f}<br>"
                 f"quality {entry[f'S={s:.2f}']['quality']:.3f}, PSNR {entry[f'S={s:.2f}']['psnr']:.2f}</figcaption></figure>"
                 for s in SWEEP]
        return "<div>" + "".join(figs) + "</div>"

    fig = _sweep_figure(out, results)
    _strip(out, results)
    _sweep_strip(out, SWEEP_IMAGE, "degraded")
    fig_html = f"<img src='{fig}' alt='quality sweep'>" if fig else "<p>(matplotlib not installed: no plot)</p>"
    secs, cpus = results["seconds"], results["cpu_seconds"]
    side = results.get("held_out_side", HELD_OUT_SIDE)
    if "stage1" in results:
        intro, training = _showcase_html(out, results)
    else:
        m = results["model"]
        intro = (f"<p>Restored by {html.escape(m['name'])} ({html.escape(str(m.get('route')))}; "
                 f"{m.get('parameters') or 0:,} parameters; trained by <code>make default-model</code> for "
                 f"{m.get('steps')} steps on {m.get('photos')} photos from OS packages, see "
                 "<code>iqpir/weights/default.json</code>). "
                 f"<code>iqpir demo --train</code> trains a tiny IQPIR model here instead (a showcase).</p>")
        training = ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>iqpir demo</title><style>{CSS}</style>
</head><body>
<h1>iqpir demo</h1>
{intro}
<p>Held out: {', '.join(results['held_out'])}, long side {side} px, on CPU ({results['threads']}
thread{'s' if results['threads'] != 1 else ''}): {secs['total']:.0f} s, {cpus['total']:.0f} CPU seconds in all.
Quality = {html.escape(results['quality_metric'])}.</p>
<h2>What holds</h2><ul>{crit}</ul>
<h2>Held-out photos, degraded by the demo's pipeline: before / after (drag the bar)</h2>{sliders}
<h2>Quality control: one photo at every S (paper Fig. 9)</h2>
<p>Degraded by the demo's pipeline:</p>{sweep_figures('degraded', {'per_image': results['per_image']})}
<p>Degraded by <code>iqpir degrade</code> with its defaults (CodeFormer's face ranges: blur sigma 1-15,
4-30x downsampling, noise 0-20, JPEG 30-80), which leave little of a {side}-pixel photo:</p>
{sweep_figures('iqpir-degrade', results['iqpir_degrade'])}
{fig_html}
<h2>Held-out means</h2>
<p>The demo's degradation:</p>{table(demo_ev)}
<p><code>iqpir degrade</code> defaults:</p>{table(results['iqpir_degrade'])}
{training}
<p>Time: {html.escape(', '.join(f'{k} {secs[k]:.0f} s ({cpus[k]:.0f} CPU s)' for k in secs if k != 'total'))}.</p>
<script>{SLIDER_JS}</script>
</body></html>
"""
    io.atomic_write_text(out / "report.html", page)
