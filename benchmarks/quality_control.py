"""Fig. 9 in small: does the target quality S control the restoration's quality?

Restores the held-out photos with S in {0, 0.25, 0.5, 0.75, 1.0} with the conditioned
ablation arms (reused from ablation.py's --work folder, trained when missing) and reports
the judge's mean (PIQE, lower = better; used neither to condition nor to optimise), NIQE
(the conditioning metric) and PSNR per S, and whether the judged quality improves with S
(Spearman correlation of S with -PIQE over the five targets). Writes quality_control.png.

    python benchmarks/quality_control.py --work /tmp/iqpir-bench --arms b c d
"""

from __future__ import annotations

import json
import time

import _common as B
import torch

SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)


def spearman(x: list[float], y: list[float]) -> float:
    rx = torch.tensor(x).argsort().argsort().double()
    ry = torch.tensor(y).argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm() + 1e-12))


def main() -> None:
    p = B.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--s1-steps", type=int, default=100)
    p.add_argument("--s2-steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", nargs="+", default=["b", "c", "d"], choices=[a for a in B.ARMS if a != "a"])
    args = p.parse_args()
    work, out = B.folders(args)
    t0 = time.perf_counter()
    data = B.prepare_data(work)
    refs = data[2]
    judge = B.Judge()
    from iqpir.inference import load

    results: dict[str, dict[float, dict]] = {}
    for arm in args.arms:
        run, cfg2 = B.arm_run(arm, work, data, args.s1_steps, args.s2_steps, args.seed)
        lq = B.degraded_heldout(refs, cfg2)
        restorer = load(run, device="cpu", dtype="float32")
        results[arm] = {}
        for s in SWEEP:
            results[arm][s] = B.evaluate(lambda x, r=restorer, s=s: r.restore(x, quality=s), lq, refs, judge,
                                         save=out / "quality_control" / arm / f"S{s:.2f}")
            B.log(f"arm {arm} S={s}: PIQE {results[arm][s]['piqe']:.2f} NIQE {results[arm][s]['niqe']:.2f}")

    print(f"\nFig. 9 in small: held-out means per target S (stage 1 {args.s1_steps}, stage 2 {args.s2_steps} "
          f"steps, seed {args.seed}); PIQE judges (lower better); {B.machine()}\n")
    head = "| arm | metric | " + " | ".join(f"S={s}" for s in SWEEP) + " | Spearman(S, quality) |"
    lines = [head, "|---|---|" + "---:|" * (len(SWEEP) + 1)]
    for arm, by_s in results.items():
        for k, sign in (("piqe", -1), ("niqe", -1), ("psnr", 1)):
            vals = [by_s[s][k] for s in SWEEP]
            rho = spearman(list(SWEEP), [sign * v for v in vals])
            lines.append(f"| {B.ARM_LABELS[arm]} | {k.upper()} | " + " | ".join(f"{v:.2f}" for v in vals)
                         + f" | {rho:+.2f} |")
    print("\n".join(lines))
    print("\nSpearman > 0: the metric gets better as S rises (for PSNR: higher PSNR as S rises).")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    (out / "quality_control.json").write_text(json.dumps({a: {str(s): v for s, v in r.items()}
                                                          for a, r in results.items()}, indent=2))
    plt = B.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for ax, k in zip(axes, ("piqe", "niqe", "psnr")):
        for arm, by_s in results.items():
            ax.plot(SWEEP, [by_s[s][k] for s in SWEEP], "o-", label=arm)
        ax.set_xlabel("target S")
        ax.set_title(k + (" (judge, lower better)" if k == "piqe" else ""))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "quality_control.png", dpi=100)
    B.log(f"figure {out / 'quality_control.png'}")


if __name__ == "__main__":
    main()
