"""Stage 2: the quality-conditioned restorer (paper 3.2-3.3).

    Z_l  = E(x_l)                              encoder (initialised from stage 1, trained)
    Z_l' = Z_l + s(S)                          quality embedding (Eq. 2)
    c1, c2 = argmax T(Z_l')                    code prediction, two heads
    Z_f  = C1[c1] + alpha * C2[c2]             frozen codebooks (Eq. 3)
    x_res = D(Z_f)                             frozen decoder

Gradient through the discrete lookup (config `gradient_path`):
- "straight_through" (official): the decoder input is C[c] + (Z_l' - sg(Z_l')), the looked-up
  codes forward, the identity backward. An image loss (L_quality) then reaches E and s(S)
  but not T, which learns from L_index only.
- "soft": the decoder input is C[c] + (P @ C - sg(P @ C)) with P = softmax(logits / tau), the
  hard codes forward and the gradient of the softmax-weighted codebook backward. The forward
  pass (and so the restored image) is identical to the official path; an image loss reaches
  T's logits, and through T, E and s(S). We keep the hard forward so that stage-2 outputs
  stay on the codebook's finite output space, which paper 3.3 relies on against adversarial
  examples of the IQA loss.

Released-network options (both off in training, as in the official recipe):
- AdaIN (`adain`): official inference re-normalises Z_f per channel to the mean and standard
  deviation of Z_l' before decoding.
- CodeFormer's CFT blocks (`model.cft_resolutions`, `fidelity` w): encoder features of the
  input modulate the decoder (iqpir.models.cft); w = 0 skips them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from iqpir.config import ModelConfig
from iqpir.models.cft import FeatureTransform
from iqpir.models.embedding import QualityEmbedding, check_quality
from iqpir.models.quantizer import VectorQuantizer
from iqpir.models.transformer import CodeTransformer
from iqpir.models.vqgan import build_decoder, build_encoder, build_quantizer

GRADIENT_PATHS = ("straight_through", "soft")
STAGE1_MODULES = ("encoder", "quantizer", "decoder")
ADAIN_EPS = 1e-5  # CodeFormer's calc_mean_std: variance + 1e-5 before the square root


def adaptive_instance_norm(content: Tensor, style: Tensor, eps: float = ADAIN_EPS) -> Tensor:
    """Adaptive instance normalisation (Huang & Belongie 2017) of (B, C, H, W) maps: `content`
    with each channel's mean and standard deviation (unbiased variance over H*W, + eps) of `style`."""

    def stats(x: Tensor) -> tuple[Tensor, Tensor]:
        flat = x.flatten(2)
        return flat.mean(2)[..., None, None], (flat.var(2) + eps).sqrt()[..., None, None]

    c_mean, c_std = stats(content)
    s_mean, s_std = stats(style)
    return (content - c_mean) / c_std * s_std + s_mean


@dataclass
class RestorerOutput:
    """Result of Restorer.forward.

    z_lq: (B, C, h, w) Z_l' = E(x_l) + s(S), the input of T and of L_feat (Eq. 5).
    logits_common, logits_hq: (B, h*w, K) (logits_hq None with a single codebook).
    indices_common, indices_hq: (B, h, w) long argmax codes.
    z_f: (B, C, h, w) decoder input Z_f (Eq. 3), with the configured gradient path;
        None when decode=False.
    restored: (B, 3, H, W) in [0, 1] scale, unclamped; None when decode=False.
    """

    z_lq: Tensor
    logits_common: Tensor
    logits_hq: Tensor | None
    indices_common: Tensor
    indices_hq: Tensor | None
    z_f: Tensor | None
    restored: Tensor | None


class Restorer(nn.Module):
    """Encoder + quality embedding + code Transformer + dual codebook + decoder.

    forward(lq (B, 3, H, W) in [0, 1], quality (B,) or a number in [0, 1]) -> RestorerOutput.
    H = W = cfg.image_size (the position embedding fixes the token count). With
    quality_embedding "none" (CodeFormer) quality may be None.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.gradient_path not in GRADIENT_PATHS:
            raise ValueError(f"gradient_path {cfg.gradient_path!r} is not one of {list(GRADIENT_PATHS)}")
        self.cfg = cfg
        size = cfg.latent_size
        self.encoder = build_encoder(cfg)
        self.quality_embedding = QualityEmbedding(
            kind=cfg.quality_embedding,
            bins=cfg.quality_bins,
            channels=cfg.latent_channels,
            size=size,
            fourier_features=cfg.fourier_features,
            init_std=1.0 if cfg.init == "official" else 0.02,
        )
        t = cfg.transformer
        self.transformer = CodeTransformer(
            in_channels=cfg.latent_channels,
            tokens=size * size,
            codebook_size=cfg.codebook_size,
            layers=t.layers,
            width=t.width,
            heads=t.heads,
            mlp=t.mlp,
            dropout=t.dropout,
            dual=cfg.dual_codebook,
            init=cfg.init,
        )
        self.quantizer = build_quantizer(cfg)  # holds the two codebooks; only lookups are used
        self.decoder = build_decoder(cfg)
        self.cft = None
        if cfg.cft_resolutions:
            levels = len(cfg.channel_mult)
            width = {cfg.image_size // 2**i: cfg.base_channels * cfg.channel_mult[i] for i in range(levels)}
            self.cft = FeatureTransform(list(cfg.cft_resolutions), width)

    def forward(
        self,
        lq: Tensor,
        quality: Tensor | float | None,
        *,
        alpha: float | None = None,
        decode: bool = True,
        fidelity: float = 0.0,
        adain: bool | None = None,
    ) -> RestorerOutput:
        """Restore `lq` at target quality `quality`.

        alpha overrides the fusion weight of Eq. 3 (inference `--alpha`; 0 drops the HQ+ codes).
        decode=False stops after the code prediction (the L_feat and L_index losses need no
        image; z_f and restored are None). fidelity is CodeFormer's w (needs CFT blocks);
        adain defaults to the model setting `cfg.adain`.
        """
        b = lq.shape[0]
        if fidelity and self.cft is None:
            raise ValueError("this model has no CFT blocks (model.cft_resolutions is empty): fidelity must be 0")
        if not 0.0 <= fidelity <= 1.0:
            raise ValueError(f"fidelity must be in [0, 1], got {fidelity}")
        features: dict[int, Tensor] | None = {} if fidelity > 0 else None
        z_lq = self.encoder(lq, features)
        if self.quality_embedding.kind != "none":
            if quality is None:
                raise ValueError("this model is quality-conditioned: give a target quality S in [0, 1]")
            q = check_quality(quality, b, device=lq.device)
            z_lq = z_lq + self.quality_embedding(q).to(z_lq.dtype)
        elif quality is not None:
            check_quality(quality, b, device=lq.device)  # validated, then unused
        logits_common, logits_hq = self.transformer(z_lq)
        size = z_lq.shape[-2:]
        idx_common = logits_common.argmax(-1).view(b, *size)
        idx_hq = None if logits_hq is None else logits_hq.argmax(-1).view(b, *size)
        if not decode:
            return RestorerOutput(z_lq, logits_common, logits_hq, idx_common, idx_hq, None, None)

        alpha = self.quantizer.alpha if alpha is None else alpha
        hard = self.quantizer.lookup(idx_common, idx_hq, alpha=alpha).to(z_lq.dtype)
        if self.cfg.gradient_path == "straight_through":
            z_f = hard + (z_lq - z_lq.detach())
        else:
            soft = self._soft_codes(logits_common, self.quantizer.common, size)
            if logits_hq is not None and self.quantizer.hq is not None:
                soft = soft + alpha * self._soft_codes(logits_hq, self.quantizer.hq, size)
            z_f = hard + (soft - soft.detach())
        if self.cfg.adain if adain is None else adain:
            z_f = adaptive_instance_norm(z_f, z_lq)
        fuse = None
        if features is not None and self.cft is not None:
            cft = self.cft

            def fuse(res: int, h: Tensor) -> Tensor:
                return cft(res, features[res].detach(), h, fidelity)

        restored = self.decoder(z_f, fuse)
        return RestorerOutput(z_lq, logits_common, logits_hq, idx_common, idx_hq, z_f, restored)

    def _soft_codes(self, logits: Tensor, vq: VectorQuantizer, size: torch.Size) -> Tensor:
        """(B, h*w, K) logits -> (B, C, h, w) softmax(logits / tau)-weighted code vectors."""
        probs = torch.softmax(logits / self.cfg.soft_temperature, dim=-1)
        codes = probs @ vq.codebook.to(probs.dtype)  # (B, h*w, C)
        return codes.transpose(1, 2).reshape(logits.shape[0], -1, *size)

    def load_stage1(self, state_dict: dict[str, Tensor]) -> None:
        """Copy encoder, codebooks and decoder from a VQAutoEncoder state dict.

        Strict per module: a missing or extra key (e.g. a single-codebook stage 1 for a
        dual-codebook restorer) raises with the key names.
        """
        for name in STAGE1_MODULES:
            prefix = f"{name}."
            sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if not sub:
                raise KeyError(f"the stage-1 state dict has no {prefix!r} weights")
            getattr(self, name).load_state_dict(sub, strict=True)

    def freeze_for_stage2(self) -> Restorer:
        """Official stage 2: decoder, codebooks (and CFT blocks, a later stage's) frozen; encoder,
        embedding and T trained."""
        for name, module in self.named_children():
            module.requires_grad_(name not in ("decoder", "quantizer", "cft"))
        return self
