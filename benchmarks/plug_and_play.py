"""Tables 7-9 in small: a plain U-Net vs the same U-Net with quality conditioning (iqpir.plugin).

Arms, each with the same data, samples, steps and seed:
- "U-Net": the reference UNet trained with L1;
- "U-Net + S": QualityConditioned(UNet, feature="bottleneck") conditioned on the training
  image's S (min-max NIQE), tested at S = 1;
- "U-Net +": the same plus the quality loss 0.1 (1 - Q), Q = differentiable NIQE, from half-way.
Degradations: the demo's mild BFR and the low-light preset. Judged on the held-out photos with
PSNR, SSIM and PIQE (used in neither training nor conditioning). Prints a Markdown table,
writes plug_and_play.png.

    python benchmarks/plug_and_play.py --work /tmp/iqpir-bench --steps 250 --seeds 0 1
"""

from __future__ import annotations

import json
import time

import _common as B
import torch

ARM_NAMES = ("U-Net", "U-Net + S", "U-Net +")


def build(arm: str, seed: int, steps: int, channels: int):
    from iqpir.iqa import QualityEnsemble
    from iqpir.plugin import PluginRecipe, QualityConditioned, UNet

    torch.manual_seed(seed)
    net = UNet(channels=channels, levels=3)
    if arm == "U-Net":
        return PluginRecipe(net)
    model = QualityConditioned(net, feature="bottleneck", channels=net.feature_channels("bottleneck"))
    if arm == "U-Net + S":
        return PluginRecipe(model)
    q = QualityEnsemble(B.LOSS_METRICS, normalization="fixed")
    return PluginRecipe(model, quality=q, quality_weight=0.1, quality_start_step=steps // 2)


def main() -> None:
    p = B.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--channels", type=int, default=16, help="U-Net base channels")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--degradations", nargs="+", default=["bfr", "lowlight"])
    args = p.parse_args()
    work, out = B.folders(args)
    t0 = time.perf_counter()
    train_dir, scores, refs, median = B.prepare_data(work)
    from iqpir.data import HQFolderDataset
    from iqpir.iqa.table import read_score_table
    from iqpir.plugin import fit

    quality = read_score_table(scores).quality
    judge = B.Judge()
    results: dict = {}
    for deg in args.degradations:
        cfg = B.make_config(2, args.steps, [], median, preset=deg)
        lq = B.degraded_heldout(refs, cfg)
        results[deg] = {"degraded input": [B.evaluate(lambda x: x, lq, refs, judge)]}
        for arm in ARM_NAMES:
            results[deg][arm] = []
            for seed in args.seeds:
                ds = HQFolderDataset(train_dir, size=cfg.model.image_size, mode="crop", hflip=True,
                                     degradation=cfg.data.degradation, preset=deg, quality=quality, seed=seed)
                recipe = build(arm, seed, args.steps, args.channels)
                t1 = time.perf_counter()
                fit(recipe, ds, args.steps, batch_size=cfg.train.batch_size, lr=args.lr, seed=seed)
                train_s = time.perf_counter() - t1
                with torch.no_grad():
                    r = B.evaluate(lambda x, r=recipe: r.restore(x[None], 1.0)[0], lq, refs, judge,
                                   save=out / "plug_and_play" / deg / f"{arm.replace(' ', '')}-seed{seed}")
                r["train_s"] = train_s
                results[deg][arm].append(r)
                B.log(f"{deg} {arm} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))

    rows = []
    for deg, arms in results.items():
        for arm, rs in arms.items():
            rows.append({"dataset": deg, "method": arm,
                         **{k: B.fmt_ms([r[k] for r in rs], 3) for k in ("psnr", "ssim", "piqe")},
                         "train_s": B.fmt_ms([r.get("train_s", 0.0) for r in rs], 0) if arm != "degraded input" else "-"})
    print(f"\nTables 7-9 in small: U-Net base {args.channels} channels, {args.steps} steps, lr {args.lr}, seeds {args.seeds} (mean ± std); "
          f"S = 1.0 at test; {B.machine()}\n")
    print(B.md_table(rows))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    (out / "plug_and_play.json").write_text(json.dumps({"results": results, "args": vars(args)}, indent=2))

    plt = B.pyplot()
    fig, axes = plt.subplots(len(results), 3, figsize=(11, 3 * len(results)), squeeze=False)
    for row, (deg, arms) in zip(axes, results.items()):
        for ax, k in zip(row, ("psnr", "ssim", "piqe")):
            for i, (arm, rs) in enumerate(arms.items()):
                vals = [r[k] for r in rs]
                ax.scatter([i] * len(vals), vals)
            ax.set_xticks(range(len(arms)), [a.replace("degraded input", "input") for a in arms], fontsize=8)
            ax.set_title(f"{deg}: {k}" + (" (lower better)" if k == "piqe" else ""))
    fig.tight_layout()
    fig.savefig(out / "plug_and_play.png", dpi=100)
    B.log(f"figure {out / 'plug_and_play.png'}")


if __name__ == "__main__":
    main()
