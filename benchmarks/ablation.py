"""Table 5 in small: (a) single codebook, no condition; (b) + score condition; (c) + dual
codebook; (d) + quality optimisation, plus (d') the soft-code gradient path.

Same data (the demo's bundled photos, mild BFR), steps and seeds for every arm; stage-1 runs
are shared (one single-codebook, one dual-codebook). Judged on the held-out astronaut, coffee
and grace_hopper (192 px, degraded with fixed seeds) at S = 1 with PSNR, SSIM, PIQE (the
judge: used neither to condition nor to optimise) and NIQE (the conditioning metric), plus
seconds per image (CPU, 64-px tiles). Prints a Markdown table, writes ablation.png.

    python benchmarks/ablation.py --work /tmp/iqpir-bench --s1-steps 100 --s2-steps 60 --seeds 0
"""

from __future__ import annotations

import json
import time

import _common as B


def main() -> None:
    p = B.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--s1-steps", type=int, default=100)
    p.add_argument("--s2-steps", type=int, default=60)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="stage-2 seeds (stage 1 is shared)")
    p.add_argument("--arms", nargs="+", default=list(B.ARMS), choices=list(B.ARMS))
    args = p.parse_args()
    work, out = B.folders(args)
    t0 = time.perf_counter()
    data = B.prepare_data(work)
    refs = data[2]
    judge = B.Judge()
    from iqpir.inference import load

    results: dict[str, list[dict]] = {a: [] for a in args.arms}
    lq_scores = None
    for seed in args.seeds:
        for arm in args.arms:
            run, cfg2 = B.arm_run(arm, work, data, args.s1_steps, args.s2_steps, seed)
            lq = B.degraded_heldout(refs, cfg2)
            if lq_scores is None:
                lq_scores = B.evaluate(lambda x: x, lq, refs, judge)
            restorer = load(run, device="cpu", dtype="float32")
            r = B.evaluate(lambda x, r=restorer: r.restore(x, quality=1.0), lq, refs, judge,
                           save=out / "ablation" / f"{arm}-seed{seed}")
            results[arm].append(r)
            B.log(f"arm {arm} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))

    keys = ("psnr", "ssim", "piqe", "niqe", "sec_per_image")
    rows = [{"method": "degraded input", **{k: f"{lq_scores[k]:.3f}" for k in keys[:4]}, "sec_per_image": "-"}]
    for arm, rs in results.items():
        rows.append({"method": B.ARM_LABELS[arm],
                     **{k: B.fmt_ms([r[k] for r in rs], 3) for k in keys}})
    print(f"\nTable 5 in small: stage 1 {args.s1_steps} steps, stage 2 {args.s2_steps} steps, "
          f"seeds {args.seeds} (mean ± std over seeds); S = 1.0; PIQE judges, NIQE conditioned, "
          f"differentiable NIQE optimised in (d); {B.machine()}\n")
    print(B.md_table(rows))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    (out / "ablation.json").write_text(json.dumps({"lq": lq_scores, "arms": results, "args": vars(args)}, indent=2))

    plt = B.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    names = list(results)
    for ax, k in zip(axes, ("psnr", "ssim", "piqe")):
        for i, arm in enumerate(names):
            vals = [r[k] for r in results[arm]]
            ax.scatter([i] * len(vals), vals)
            ax.plot([i - 0.2, i + 0.2], [sum(vals) / len(vals)] * 2, "k-")
        ax.axhline(lq_scores[k], color="gray", ls="--", label="degraded")
        ax.set_xticks(range(len(names)), names)
        ax.set_title(k + (" (lower better)" if k == "piqe" else ""))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=100)
    B.log(f"figure {out / 'ablation.png'}")


if __name__ == "__main__":
    main()
