"""Stage tasks: each maps a batch to a dict of named, weighted loss terms.

The loop sums the terms and runs one backward; the optimisers own disjoint parameter sets
(generator, discriminator), so the discriminator's hinge loss and the generator's terms can
share that backward: the discriminator is frozen while it judges the generator's output and
sees only a detached reconstruction when it is trained.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from iqpir import config as C
from iqpir.models import build_discriminator, build_restorer, build_vqgan
from iqpir.iqa.base import QUALITY_MIN_SIDE, quality_input  # noqa: F401  (re-exported for callers)
from iqpir.training import distributed as D

if TYPE_CHECKING:
    from iqpir.iqa import QualityEnsemble
    from iqpir.iqa.table import ScoreTable


def build_task(cfg: C.RunConfig, device: torch.device, stage1: str | Path | None = None,
               score_table: ScoreTable | None = None):
    """The task of `cfg.train.stage`. `score_table` is the table the run's S comes from: the
    stage-2 quality loss takes its normalisation and constants (see quality_loss_ensemble)."""
    if cfg.train.stage == 1:
        return Stage1Task(cfg, device)
    return Stage2Task(cfg, device, stage1, score_table)


def adaptive_gan_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1.0) -> Tensor:
    """lambda = ||grad rec|| / (||grad gan|| + 1e-4) at the decoder's last layer, clamped to [0, max_weight].

    Esser et al., "Taming Transformers for High-Resolution Image Synthesis" (CVPR 2021), Eq. 7
    (taming clamps at 1e4). The official CodeFormer/IQPIR stage 1 (VQGANModel) clamps at 1.0 and
    then multiplies by disc_weight 0.8 (train.gan_weight), so the GAN term's weight never
    exceeds 0.8.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    # Across processes, the gradients of the global batch's losses (the mean of the ranks'),
    # so that W processes with batch B weigh the GAN term as one process with batch W*B.
    g_rec, g_gan = D.mean_across_ranks(g_rec), D.mean_across_ranks(g_gan)
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def image_l1(restored: Tensor, target: Tensor, image_range: str) -> Tensor:
    """Mean absolute error of [0, 1] images, measured in `image_range` (train.l1_range):
    |(2 x - 1) - (2 y - 1)| = 2 |x - y|, the official L1 is on [-1, 1] images."""
    return (2.0 if image_range == "signed" else 1.0) * (restored - target).abs().mean()


class Stage1Task:
    """Dual-codebook VQ autoencoder (paper 3.1).

    Terms: l1, perceptual (when VGG weights are present), gan (hinge, adaptive weight, after
    train.gan_start_step), codebook_common, codebook_hq (masked per sample by S <= S_thr, times
    train.hq_codebook_weight); disc: the discriminator's hinge loss (its own optimiser).
    """

    arch = "vqgan"

    def __init__(self, cfg: C.RunConfig, device: torch.device):
        self.cfg = cfg
        self.generator = build_vqgan(cfg.model).to(device).train()
        self.discriminator = build_discriminator(cfg.model).to(device).train() if cfg.train.gan_weight > 0 else None
        self.perceptual = None
        if cfg.train.perceptual_weight > 0:
            from iqpir.training.perceptual import build_perceptual

            self.perceptual, note = build_perceptual(device, cfg.train.perceptual_input)
            if self.perceptual is None and os.environ.get("RANK", "0") == "0":  # once, not per rank
                print(f"iqpir train: perceptual loss off: {note}", file=sys.stderr)
        self.loss_names = ["l1"] + (["perceptual"] if self.perceptual is not None else [])
        self.loss_names += ["codebook_common", "codebook_hq"]
        self.aux_names: list[str] = []
        if self.discriminator is not None:
            self.loss_names.append("gan")
            self.aux_names.append("disc")

    @torch.no_grad()
    def prepare(self, batch: dict) -> None:
        """Before the first step of a new run: with train.codebook_init=first_batch, codebooks from
        the first batch's encoder outputs; "uniform" keeps the constructor's U(-1/K, 1/K)."""
        if self.cfg.train.codebook_init != "first_batch":
            return
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        self.generator.quantizer.init_from(self.generator.encoder(batch["hq"]), generator=g)

    def losses(self, batch: dict, step: int) -> dict[str, Tensor]:
        tc = self.cfg.train
        hq, quality = batch["hq"], batch["quality"]
        out = self.generator(hq, quality)
        rec = out.reconstruction
        terms: dict[str, Tensor] = {"l1": tc.l1_weight * image_l1(rec, hq, tc.l1_range)}
        rec_loss = terms["l1"]
        if self.perceptual is not None:
            terms["perceptual"] = tc.perceptual_weight * self.perceptual(rec, hq).mean()
            rec_loss = rec_loss + terms["perceptual"]
        hq_loss = out.quant.hq.loss if out.quant.hq is not None else torch.zeros_like(out.quant.common.loss)
        terms["codebook_common"] = tc.codebook_weight * out.quant.common.loss.mean()
        terms["codebook_hq"] = tc.codebook_weight * tc.hq_codebook_weight * hq_loss.mean()
        if self.discriminator is None:
            return terms
        zero = rec.new_zeros(())
        if step + 1 <= tc.gan_start_step:  # official: on when current_iter (from 1) > net_d_start_iter
            terms["gan"], terms["disc"] = zero, zero
            return terms
        self.discriminator.requires_grad_(False)
        gan = -self.discriminator(rec).mean()
        self.discriminator.requires_grad_(True)
        weight = (adaptive_gan_weight(rec_loss, gan, self.generator.last_layer, tc.gan_weight_max)
                  if self.generator.training else min(1.0, tc.gan_weight_max))
        terms["gan"] = tc.gan_weight * weight * gan
        real = self.discriminator(hq)
        fake = self.discriminator(rec.detach())
        terms["disc"] = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
        return terms

    def extra_state(self) -> dict[str, dict[str, Tensor]]:
        return {"discriminator": self.discriminator.state_dict()} if self.discriminator is not None else {}

    def load_extra_state(self, state: dict[str, dict[str, Tensor]]) -> None:
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])

    def meta(self) -> dict:
        return {}


# The model settings that stage 1 fixes (the autoencoder, its codebooks and the fusion it was
# trained with); the rest (embedding, Transformer, gradient path) belong to stage 2 alone.
STAGE1_MODEL_KEYS = ("image_size", "base_channels", "channel_mult", "num_res_blocks", "attn_resolutions",
                     "latent_channels", "final_norm", "codebook_size", "dual_codebook", "alpha", "codebook_update",
                     "codebook_restart")



def table_column(metric: str, columns: list[str]) -> str | None:
    """The score-table column on the same native scale as loss member `metric`, or None.

    The same name; else the name without the `pyiqa:` prefix; else without the `_diff` suffix
    (the differentiable variant of a built-in metric: niqe_diff -> niqe).
    """
    for name in (metric, metric.removeprefix("pyiqa:"), metric.removesuffix("_diff")):
        if name in columns:
            return name
    return None


def quality_loss_ensemble(iqa: C.IQAConfig, table: ScoreTable | None, device: torch.device | str) -> QualityEnsemble:
    """The differentiable ensemble Q of the stage-2 quality loss, on the scale of the run's S.

    S comes from the score table, so Q takes the table's normalisation (iqa.normalization only
    when the table has no sidecar) and, member by member, the (low, high) constants of the table
    column on the same scale (`table_column`). With minmax these are the training set's
    min and max (official: min-max over FFHQ), and Q of a training image equals its S when the
    loss members score what the table's members scored. A minmax member without a column has
    no constants: that is an error, not a silent fall-back to another scale.
    """
    from iqpir.iqa import QualityEnsemble

    normalization = (table.normalization if table is not None else None) or iqa.normalization
    constants: dict[str, tuple[float, float]] = {}
    for metric in iqa.loss_metrics:
        column = table_column(metric, table.metrics) if table is not None else None
        if column is not None and column in table.constants:
            constants[metric] = table.constants[column]
        elif normalization == "minmax":
            where = f"the score table {table.path}" if table is not None and table.path else "no score table"
            held = f" (it holds {', '.join(table.metrics)})" if table is not None else ""
            raise ValueError(
                f"iqa.loss_metrics: {metric} has no min-max constants in {where}{held}; score the training "
                f"images with a metric on its scale (e.g. niqe for niqe_diff) or use iqa.normalization=fixed")
    return QualityEnsemble(iqa.loss_metrics, normalization=normalization, constants=constants, device=str(device),
                           weights_dir=iqa.weights_dir or None)


class Stage2Task:
    """Quality-conditioned code prediction (paper 3.2-3.3, Eq. 10).

    Terms: feat = ||Z_l' - sg(Z_q)||^2 (Eq. 5), index_common + index_hq (cross-entropy to the
    frozen stage-1 codes of the HQ image, Eq. 6, each x index_weight), quality = 1 - Q(x_res)
    (Eq. 9 with the differentiable ensemble Q normalised like the run's score table, from
    train.quality_start_step).
    """

    arch = "restorer"

    def __init__(self, cfg: C.RunConfig, device: torch.device, stage1: str | Path | None,
                 score_table: ScoreTable | None = None):
        self.cfg = cfg
        self.stage1 = str(stage1) if stage1 is not None else None
        self.generator = build_restorer(cfg.model).to(device)
        # The frozen stage-1 autoencoder provides both code targets of each HQ image on the fly.
        self.target = build_vqgan(cfg.model).to(device)
        if stage1 is not None:
            self._init_from_stage1(stage1)
        self.generator.freeze_for_stage2().train()
        if cfg.train.fidelity > 0:  # CodeFormer's stage III, folded into stage 2 (train.fidelity)
            self.generator.cft.requires_grad_(True)
        self.target.requires_grad_(False).eval()
        self.discriminator = None
        self.quality_model = None
        if cfg.train.quality_weight > 0:
            self.quality_model = quality_loss_ensemble(cfg.iqa, score_table, device)
            if not self.quality_model.differentiable:
                raise ValueError(f"iqa.loss_metrics {cfg.iqa.loss_metrics}: every member of the quality loss must be differentiable")
        self.loss_names = ["feat", "index_common"] + (["index_hq"] if cfg.model.dual_codebook else [])
        if cfg.train.fidelity > 0:
            self.loss_names.append("fidelity_l1")
        if self.quality_model is not None:
            self.loss_names.append("quality")
        self.aux_names = []

    def _init_from_stage1(self, stage1: str | Path) -> None:
        from iqpir.checkpoint import load_checkpoint

        tensors, meta = load_checkpoint(stage1)
        saved = C.from_dict(meta["config"])
        if meta.get("arch", "vqgan") != "vqgan":
            raise ValueError(f"--stage1 {stage1} is not a stage-1 (vqgan) checkpoint")
        diff = [k for k in STAGE1_MODEL_KEYS if getattr(saved.model, k) != getattr(self.cfg.model, k)]
        if diff:
            raise ValueError(f"--stage1 {stage1}: stage-1 settings differ from this config: "
                             + ", ".join(f"model.{k} ({getattr(saved.model, k)!r} there)" for k in diff))
        state = tensors.get("ema") or tensors["model"]
        self.target.load_state_dict(state)
        self.generator.load_stage1(state)

    def losses(self, batch: dict, step: int) -> dict[str, Tensor]:
        tc = self.cfg.train
        hq, lq, quality = batch["hq"], batch["lq"], batch["quality"]
        # Both codes for every image (official), in float32 whatever the loop's autocast: under
        # bf16 the encoder's rounding moves some latents across code boundaries, and the official
        # targets are fp32 (tests/test_recipe.py).
        with torch.no_grad(), torch.autocast(hq.device.type, enabled=False):
            targets = self.target.code_targets(hq.float())
        use_quality = self.quality_model is not None and step + 1 >= tc.quality_start_step
        out = self.generator(lq, quality, decode=use_quality or tc.fidelity > 0, fidelity=tc.fidelity)
        terms = {"feat": tc.feat_weight * F.mse_loss(out.z_lq.float(), targets.z_q.float())}
        terms["index_common"] = tc.index_weight * F.cross_entropy(
            out.logits_common.flatten(0, 1).float(), targets.indices_common.flatten())
        if out.logits_hq is not None:
            terms["index_hq"] = tc.index_weight * F.cross_entropy(
                out.logits_hq.flatten(0, 1).float(), targets.indices_hq.flatten())
        if tc.fidelity > 0:
            terms["fidelity_l1"] = tc.l1_weight * image_l1(out.restored.float(), hq.float(), tc.l1_range)
        if self.quality_model is not None:
            if use_quality:
                q = self.quality_model(quality_input(out.restored.float().clamp(0, 1)))
                terms["quality"] = tc.quality_weight * (1.0 - q).mean()
            else:
                terms["quality"] = out.z_lq.new_zeros((), dtype=torch.float32)
        return terms

    def prepare(self, batch: dict) -> None:
        """Stage 2 starts from stage 1's codebooks: nothing to prepare."""

    def extra_state(self) -> dict[str, dict[str, Tensor]]:
        return {"target": self.target.state_dict()}

    def load_extra_state(self, state: dict[str, dict[str, Tensor]]) -> None:
        self.target.load_state_dict(state["target"])

    def meta(self) -> dict:
        out: dict = {"stage1": self.stage1}
        if self.quality_model is not None:
            q = self.quality_model
            out["quality_loss"] = {"metrics": q.metrics, "normalization": q.normalization,
                                   "constants": {k: list(v) for k, v in q.constants.items()}}
        return out


class RecipeTask:
    """A training recipe as a task of the loop: one network and the recipe's terms, no discriminator.

    `recipe` is an ``iqpir.plugin.PluginRecipe`` or any object with ``model`` (the network to
    train), ``loss_names`` and ``losses(batch, step) -> {name: term}``: the plug-and-play route
    of paper 4.3, through which the packaged default model and ``iqpir.plugin.fit`` train.
    """

    def __init__(self, recipe, arch: str = "plugin", meta: dict | None = None):
        self.recipe = recipe
        self.arch = arch
        self.generator = recipe.model.train()
        self.discriminator = None
        self.loss_names = list(recipe.loss_names)
        self.aux_names: list[str] = []
        self._meta = dict(meta or {})

    def losses(self, batch: dict, step: int) -> dict[str, Tensor]:
        return self.recipe.losses(batch, step)

    def extra_state(self) -> dict[str, dict[str, Tensor]]:
        return {}

    def load_extra_state(self, state: dict[str, dict[str, Tensor]]) -> None:
        """A recipe keeps all its state in its network."""

    def meta(self) -> dict:
        return dict(self._meta)
