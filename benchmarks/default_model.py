"""The packaged default model (and any other restorer) on the default model's held-out photos.

    python benchmarks/default_model.py --work runs/default-model                      # the packaged model
    python benchmarks/default_model.py --work runs/default-model \\
        --checkpoint runs/iqpir-arm/stage2 --fidelity 1                               # + another restorer

Held-out photos: three photos of the Debian packages that the recipe leaves out of training and the
demo's three (astronaut, coffee, grace_hopper), long side 384 px (iqpir.training.default_model:
`held_out`; `data` writes them). Degraded twice with fixed seeds: the issue's moderate BFR (blur
sigma 1-3, 2-4x down-sampling, noise <= 10/255, JPEG 50-80) and `iqpir degrade`'s heavy default
preset. Every restorer goes through `iqpir.load_restorer` (no path: the packaged model) at float32.
Prints one Markdown table per degradation: PSNR / SSIM at S = 1 and the judge's quality (mean of
fixed-normalised NIQE and PIQE) at S = 0, 0.5, 1, its raw NIQE and PIQE, and the detail (mean
|Laplacian| of the luma over the clean reference's); then the clean photos restored as they are at
S = 0, 0.3, 0.5, 1 (PSNR to the input); with --speed, seconds per megapixel at `auto`.
For IQPIR checkpoints it also restores with AdaIN on and off (which is right per model).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SWEEP = (0.0, 0.5, 1.0)


def log(msg: str) -> None:
    import sys

    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def detail(image: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean |Laplacian| of the luma, over the clean reference's: 1 = as much fine detail as the reference."""
    from iqpir.metrics import rgb_to_y

    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]

    def energy(x: torch.Tensor) -> float:
        return float(torch.nn.functional.conv2d(rgb_to_y(x[None]).float(), k).abs().mean())

    return energy(image) / energy(ref)


def scores(restore, refs: dict, lqs: dict, judge) -> dict:
    """Held-out means of PSNR/SSIM (S = 1), and per S: judged quality, the judge's raw NIQE and
    PIQE, and the detail (Laplacian energy) relative to the reference."""
    from iqpir.metrics import psnr, ssim

    rows = {s: [] for s in SWEEP}
    for name, ref in refs.items():
        for s in SWEEP:
            out = restore(lqs[name], s)[None]
            raw = judge.raw(out)
            rows[s].append((float(psnr(out, ref[None])[0]), float(ssim(out, ref[None])[0]),
                            float(judge.normalize_raw(raw)[0]), float(raw["niqe"][0]), float(raw["piqe"][0]),
                            detail(out[0], ref)))
    mean = {s: [sum(v) / len(v) for v in zip(*r)] for s, r in rows.items()}
    return {"psnr": mean[1.0][0], "ssim": mean[1.0][1], **{f"q{s:g}": mean[s][2] for s in SWEEP},
            **{f"niqe{s:g}": mean[s][3] for s in SWEEP}, **{f"piqe{s:g}": mean[s][4] for s in SWEEP},
            **{f"detail{s:g}": mean[s][5] for s in SWEEP}}


CLEAN_SWEEP = (0.0, 0.3, 0.5, 1.0)


def clean_scores(restore, refs: dict) -> dict:
    """The clean held-out photos themselves restored at each S: PSNR to the input (an input already
    better than S should come back as it is)."""
    from iqpir.metrics import psnr

    return {s: sum(float(psnr(restore(ref[None], s).clamp(0, 1), ref[None])) for ref in refs.values()) / len(refs)
            for s in CLEAN_SWEEP}


def input_scores(refs: dict, lqs: dict, judge) -> dict:
    from iqpir.metrics import psnr, ssim

    n = len(refs)
    raw = [judge.raw(lqs[k][None]) for k in refs]
    return {"psnr": sum(float(psnr(lqs[k][None], r[None])[0]) for k, r in refs.items()) / n,
            "ssim": sum(float(ssim(lqs[k][None], r[None])[0]) for k, r in refs.items()) / n,
            "q_input": sum(float(judge.normalize_raw(r)[0]) for r in raw) / n,
            "detail": sum(detail(lqs[k], r) for k, r in refs.items()) / n,
            "niqe": sum(float(r["niqe"][0]) for r in raw) / n, "piqe": sum(float(r["piqe"][0]) for r in raw) / n}


def _mean_raw(judge, images) -> dict:
    raws = [judge.raw(x[None]) for x in images]
    return {m: [sum(float(r[m][0]) for r in raws) / len(raws)] for m in raws[0]}


def seconds_per_megapixel(restorer, side: int = 1024, repeats: int = 2) -> float:
    x = torch.rand(3, side, side)
    restorer.restore(x[:, :256, :256])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        restorer.restore(x)
        times.append(time.perf_counter() - t)
    return min(times) / (side * side / 1e6)


def write_strip(path: Path, arms: list, refs: dict, lqs: dict, name: str, height: int = 192) -> None:
    """Rows per restorer: a degraded photo and the same photo clean, each as input | S=0 | S=0.5 | S=1."""
    from PIL import Image, ImageDraw

    from iqpir import io

    def cell(x: torch.Tensor) -> Image.Image:
        img = io.to_pil(x.clamp(0, 1))
        return img.resize((round(img.width * height / img.height), height), Image.LANCZOS)

    rows = []
    for label, restorer, kw in arms:
        for kind, x in (("degraded", lqs[name]), ("clean", refs[name])):
            with torch.no_grad():
                cells = [cell(x)] + [cell(restorer.restore(x, quality=s, **kw)) for s in SWEEP]
            row = Image.new("RGB", (sum(c.width for c in cells) + 4 * len(cells), height + 18), "white")
            draw = ImageDraw.Draw(row)
            for i, c in enumerate(cells):
                row.paste(c, (i * (c.width + 4), 18))
                draw.text((i * (c.width + 4) + 2, 3), f"{label}: {kind} input" if i == 0 else f"S = {SWEEP[i - 1]:g}",
                          fill="black")
            rows.append(row)
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 6 for r in rows)), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + 6
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="the recipe's work folder (held-out photos)")
    p.add_argument("--checkpoint", nargs="*", default=[], help="other restorers to compare (anything load_restorer reads)")
    p.add_argument("--fidelity", type=float, default=0.0, help="fidelity w for restorers with CFT blocks")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--speed", action="store_true", help="also time a 1024x1024 restore at dtype auto")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--strip", type=Path, default=None,
                   help="also write a picture: per restorer, a degraded and a clean photo at S = 0, 0.5, 1")
    p.add_argument("--strip-photo", default="astronaut", help="the held-out photo of the strip")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from iqpir.inference import load
    from iqpir.iqa import QualityEnsemble
    from iqpir.training import default_model as dm

    judge = QualityEnsemble(list(dm.METRICS), normalization="fixed")
    refs = dm.held_out(args.work)
    sets = {"moderate": dm.degraded_held_out(args.work, refs), "heavy": dm.heavy_held_out(args.work, refs)}
    refs_row = {"reference (clean)": {k: v[0] for k, v in _mean_raw(judge, refs.values()).items()}}
    arms: list[tuple[str, object, dict]] = [("packaged", load(None, device="cpu", dtype="float32"), {})]
    for ckpt in args.checkpoint:
        r = load(ckpt, device="cpu", dtype="float32")
        kw = {"fidelity": args.fidelity} if r.supports_fidelity else {}
        arms.append((f"{Path(ckpt).parent.name or ckpt}/{Path(ckpt).name}", r, kw))
        if r.model is not None and hasattr(r.model, "cfg") and hasattr(r.model.cfg, "adain"):
            other = load(ckpt, device="cpu", dtype="float32")
            other.model.cfg.adain = not other.model.cfg.adain
            arms.append((f"{ckpt} (adain {'on' if other.model.cfg.adain else 'off'})", other, kw))
    results = {}
    for deg, lqs in sets.items():
        base = input_scores(refs, lqs, judge)
        print(f"\n### {deg} degradation ({len(refs)} held-out photos)\n")
        print("| restorer | PSNR (S=1) | SSIM (S=1) | quality S=0 | S=0.5 | S=1 | NIQE S=0 / 0.5 / 1 | "
              "PIQE S=0 / 0.5 / 1 | detail S=0 / 0.5 / 1 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| degraded input | {base['psnr']:.2f} | {base['ssim']:.4f} | {base['q_input']:.4f} | | | "
              f"{base['niqe']:.2f} | {base['piqe']:.1f} | {base['detail']:.2f} |")
        results[deg] = {"input": base, **refs_row}
        for name, restorer, kw in arms:
            log(f"{deg}: {name}")
            with torch.no_grad():
                r = scores(lambda x, s, r=restorer, kw=kw: r.restore(x, quality=s if r.supports_quality else None, **kw),
                           refs, lqs, judge)
            results[deg][name] = r
            niqe = " / ".join(f"{r[f'niqe{s:g}']:.2f}" for s in SWEEP)
            piqe = " / ".join(f"{r[f'piqe{s:g}']:.1f}" for s in SWEEP)
            det = " / ".join(f"{r[f'detail{s:g}']:.2f}" for s in SWEEP)
            print(f"| {name} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['q0']:.4f} | {r['q0.5']:.4f} | {r['q1']:.4f} | "
                  f"{niqe} | {piqe} | {det} |", flush=True)
    print(f"\n### clean inputs ({len(refs)} held-out photos, undegraded): PSNR to the input\n")
    print("| restorer | " + " | ".join(f"S={s:g}" for s in CLEAN_SWEEP) + " |")
    print("|---|" + "---:|" * len(CLEAN_SWEEP))
    for name, restorer, kw in arms:
        if not restorer.supports_quality:
            continue
        with torch.no_grad():
            c = clean_scores(lambda x, s, r=restorer, kw=kw: r.restore(x, quality=s, **kw), refs)
        results.setdefault("clean", {})[name] = c
        print(f"| {name} | " + " | ".join(f"{c[s]:.2f}" for s in CLEAN_SWEEP) + " |", flush=True)
    print(f"\nclean references: NIQE {refs_row['reference (clean)']['niqe']:.2f}, "
          f"PIQE {refs_row['reference (clean)']['piqe']:.1f} (lower is better)")
    if args.strip:
        write_strip(args.strip, [a for a in arms if a[1].supports_quality], refs, sets["moderate"], args.strip_photo)
        print(f"\nstrip: {args.strip}")
    if args.speed:
        r = load(None, device="cpu", dtype="auto")
        spm = seconds_per_megapixel(r)
        results["seconds_per_megapixel"] = {"dtype": r.dtype, "threads": args.threads, "value": spm}
        print(f"\ndefault model, dtype auto ({r.dtype}), {args.threads} threads: {spm:.2f} s per megapixel")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
