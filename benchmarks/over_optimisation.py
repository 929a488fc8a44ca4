"""Fig. 7 in small: push an NR-IQA score up in a continuous latent vs through the discrete codes.

Start: a held-out degraded photo restored by the stage-2 model of ablation arm (c) (dual
codebook, score condition, no quality loss) at S = 1, as 3x3 tiles of 64 px. Then, for the
same number of Adam steps, maximise Q = fixed-normalised differentiable NIQE (the training
quality metric) of the assembled 192-px image by optimising
  (i)  continuous: the decoder input Z (unconstrained, any vector in R^{C x h x w});
  (ii) discrete: the Transformer's code logits through the soft-code path: the decoder sees
       the hard argmax codes (always on the codebooks' finite output space), the gradient
       flows through softmax(logits) @ codebook (model.gradient_path = soft).
Reported: Q gain (what was optimised), change of PIQE (the judge, lower = better; not
optimised) and of PSNR to the clean reference, per step count. Writes image strips
(degraded | start | continuous | discrete | reference) and a score-vs-judge plot.

    python benchmarks/over_optimisation.py --work /tmp/iqpir-bench --steps 40
"""

from __future__ import annotations

import json
import time

import _common as B
import torch

from iqpir import io


def tiles_of(img: torch.Tensor, s: int) -> torch.Tensor:
    c = img.shape[0]
    return img.unfold(1, s, s).unfold(2, s, s).permute(1, 2, 0, 3, 4).reshape(-1, c, s, s)


def assemble(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    _, c, s, _ = t.shape
    return t.view(rows, cols, c, s, s).permute(2, 0, 3, 1, 4).reshape(c, rows * s, cols * s)


def main() -> None:
    p = B.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--s1-steps", type=int, default=100, help="of the ablation's stage-1 run (reused)")
    p.add_argument("--s2-steps", type=int, default=60, help="of the ablation's stage-2 run (reused)")
    p.add_argument("--steps", type=int, default=40, help="optimisation steps in each space")
    p.add_argument("--lr-continuous", type=float, default=0.02)
    p.add_argument("--lr-discrete", type=float, default=0.2)
    p.add_argument("--every", type=int, default=10, help="evaluate the judge every this many steps")
    args = p.parse_args()
    work, out = B.folders(args)
    t0 = time.perf_counter()
    data = B.prepare_data(work)
    refs = data[2]
    run, cfg2 = B.arm_run("c", work, data, args.s1_steps, args.s2_steps, 0)
    from iqpir.checkpoint import load_model
    from iqpir.iqa import QualityEnsemble

    model, _ = load_model(run)
    model.requires_grad_(False)
    q_model = QualityEnsemble(B.LOSS_METRICS, normalization="fixed")
    judge = B.Judge()
    s = cfg2.model.image_size
    lq_all = B.degraded_heldout(refs, cfg2)
    alpha = model.quantizer.alpha
    results, curves = {}, {}
    for name, lq in lq_all.items():
        ref = refs[name]
        rows, cols = lq.shape[1] // s, lq.shape[2] // s
        lq = lq[:, : rows * s, : cols * s]
        ref = ref[:, : rows * s, : cols * s]
        with torch.no_grad():
            o = model(tiles_of(lq, s), 1.0)
        start = assemble(o.restored, rows, cols).clamp(0, 1)

        def decode_continuous(z, rows=rows, cols=cols):
            return assemble(model.decoder(z), rows, cols).clamp(0, 1)

        def decode_discrete(logits, rows=rows, cols=cols, o=o):
            lc, lh = logits
            size = o.z_f.shape[-2:]
            hard = model.quantizer.lookup(lc.argmax(-1).view(-1, *size), lh.argmax(-1).view(-1, *size), alpha=alpha)
            soft = model._soft_codes(lc, model.quantizer.common, size) + alpha * model._soft_codes(
                lh, model.quantizer.hq, size)
            return assemble(model.decoder(hard + (soft - soft.detach())), rows, cols).clamp(0, 1)

        spaces = {
            "continuous": ([o.z_f.clone().requires_grad_(True)], decode_continuous, args.lr_continuous),
            "discrete": ([o.logits_common.clone().requires_grad_(True), o.logits_hq.clone().requires_grad_(True)],
                         decode_discrete, args.lr_discrete),
        }
        results[name] = {"start": {**judge(start, ref), "q": float(q_model(start[None])[0])}}
        finals = {}
        for space, (params, decode, lr) in spaces.items():
            opt = torch.optim.Adam(params, lr=lr)
            curve = []
            for step in range(args.steps + 1):
                img = decode(params[0] if space == "continuous" else params)
                q = q_model(img[None])[0]
                if step % args.every == 0 or step == args.steps:
                    m = judge(img.detach(), ref)
                    curve.append({"step": step, "q": q.item(), **m})
                if step == args.steps:
                    break
                opt.zero_grad()
                (1.0 - q).backward()
                opt.step()
            finals[space] = img.detach()
            curves[f"{name}/{space}"] = curve
            results[name][space] = curve[-1]
            B.log(f"{name} {space}: Q {results[name]['start']['q']:.3f} -> {curve[-1]['q']:.3f}, "
                  f"PIQE {results[name]['start']['piqe']:.1f} -> {curve[-1]['piqe']:.1f}, "
                  f"PSNR {results[name]['start']['psnr']:.2f} -> {curve[-1]['psnr']:.2f}")
        strip = torch.cat([lq, start, finals["continuous"], finals["discrete"], ref], dim=2)
        io.write_image(out / "over_optimisation" / f"{name}.png", strip)

    table = []
    for space in ("continuous", "discrete"):
        def delta(k, space=space):
            return [results[n][space][k] - results[n]["start"][k] for n in results]
        table.append({"method": f"{space} ({args.steps} steps, lr {getattr(args, 'lr_' + space)})",
                      "ΔQ (optimised) ↑": B.fmt_ms(delta("q"), 3), "ΔPIQE (judge) ↓": B.fmt_ms(delta("piqe"), 2),
                      "ΔNIQE ↓": B.fmt_ms(delta("niqe"), 2), "ΔPSNR ↑": B.fmt_ms(delta("psnr"), 2),
                      "ΔSSIM ↑": B.fmt_ms(delta("ssim"), 3)})
    print(f"\nFig. 7 in small: mean ± std over {len(results)} held-out images; Q = normalised differentiable "
          f"NIQE (higher better); PIQE/NIQE lower better; {B.machine()}\n")
    print(B.md_table(table))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    (out / "over_optimisation.json").write_text(json.dumps({"results": results, "curves": curves,
                                                            "args": vars(args)}, indent=2))
    plt = B.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, curve in curves.items():
        name, space = key.split("/")
        style = "-" if space == "continuous" else "--"
        axes[0].plot([c["q"] for c in curve], [c["piqe"] for c in curve], style + "o", ms=3, label=key)
        axes[1].plot([c["q"] for c in curve], [c["psnr"] for c in curve], style + "o", ms=3, label=key)
    axes[0].set_xlabel("Q (optimised, higher better)")
    axes[0].set_ylabel("PIQE (judge, lower better)")
    axes[1].set_xlabel("Q (optimised, higher better)")
    axes[1].set_ylabel("PSNR to reference")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "over_optimisation.png", dpi=100)
    B.log(f"figure {out / 'over_optimisation.png'}; strips in {out / 'over_optimisation'}")


if __name__ == "__main__":
    main()
