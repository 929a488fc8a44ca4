"""Encoder E, decoder D and the stage-1 dual-codebook VQ autoencoder (paper 3.1).

The architecture is CodeFormer's VQGAN (Zhou et al., NeurIPS 2022), which IQPIR keeps: a 3x3
conv in; per level `num_res_blocks` residual blocks (GroupNorm + SiLU), self-attention after
each residual block at the resolutions in `attn_resolutions`, a stride-2 conv between levels
(zero-padded on the right and bottom only); a middle ResBlock-Attention-ResBlock; GroupNorm
and a 3x3 conv to the latent (no activation between them, unlike taming-transformers). The
decoder mirrors it with nearest-neighbour x2 upsampling. `final_norm=False` (model.final_norm,
not official) drops the GroupNorm before the encoder's and the decoder's last conv: see
ModelConfig.final_norm. Paper preset: 512x512x3 -> 16x16x256
with channels [1, 2, 2, 4, 4, 8] x 64 and attention at 16x16. Official state dicts map onto
these modules one to one (`iqpir.official`).

Image convention at the boundaries: RGB NCHW in [0, 1]. The encoder maps its input to
[-1, 1] internally (the range the VQGAN lineage trains in) and the decoder maps back, so
callers never see [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iqpir.config import ModelConfig
from iqpir.models.quantizer import DualCodebookQuantizer, DualQuantizerOutput


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor of `channels` below that."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """(B, in_ch, H, W) -> (B, out_ch, H, W): two norm-SiLU-conv3x3 steps plus a skip."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, (B, C, H, W) -> same, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), softmax(q k^T / sqrt(C)) v
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2) for even H, W.

    As in VQGAN/CodeFormer the input is zero-padded by one pixel on the right and bottom only
    and the conv has no padding of its own, so output pixel (i, j) sees input rows 2i..2i+2.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """E: images (B, 3, H, W) in [0, 1] -> latent Z (B, latent_channels, H/2^(L-1), W/2^(L-1)).

    L = len(channel_mult). Attention blocks are placed where the resolution, counted from
    `image_size`, is in `attn_resolutions`; other input sizes divisible by 2^(L-1) also work.

    `taps` maps a resolution to the index in `blocks` whose output CodeFormer's feature
    transformation reads: the last residual block of that level (before the attention block at
    the latent resolution).
    """

    def __init__(
        self,
        image_size: int,
        base_channels: int,
        channel_mult: list[int],
        num_res_blocks: int,
        attn_resolutions: list[int],
        latent_channels: int,
        in_channels: int = 3,
        final_norm: bool = True,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        blocks: list[nn.Module] = []
        self.taps: dict[int, int] = {}
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            out_ch = base_channels * mult
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out_ch))
                self.taps[res] = len(blocks) - 1
                ch = out_ch
                if res in attn_resolutions:
                    blocks.append(AttnBlock(ch))
            if level != len(channel_mult) - 1:
                blocks.append(Downsample(ch))
                res //= 2
        blocks += [ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch)]
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = group_norm(ch) if final_norm else nn.Identity()
        self.conv_out = nn.Conv2d(ch, latent_channels, 3, padding=1)

    def forward(self, images: Tensor, features: dict[int, Tensor] | None = None) -> Tensor:
        """features: when a dict, filled with {resolution: feature map} at `taps` (see class doc)."""
        h = self.conv_in(images * 2.0 - 1.0)
        want = {} if features is None else {i: r for r, i in self.taps.items()}
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in want:
                features[want[i]] = h
        return self.conv_out(self.norm_out(h))


class Decoder(nn.Module):
    """D: latent (B, latent_channels, h, w) -> images (B, 3, h*2^(L-1), w*2^(L-1)) in [0, 1] scale.

    The output is not clamped (losses want the raw values); clamp to [0, 1] for display.
    `fuse_points` maps an index in `blocks` to the resolution at which CodeFormer's feature
    transformation modulates the decoder after that block: the first residual block of each
    level, the last one at the latent resolution (before its attention block).
    """

    def __init__(
        self,
        image_size: int,
        base_channels: int,
        channel_mult: list[int],
        num_res_blocks: int,
        attn_resolutions: list[int],
        latent_channels: int,
        out_channels: int = 3,
        final_norm: bool = True,
    ) -> None:
        super().__init__()
        ch = base_channels * channel_mult[-1]
        res = image_size // 2 ** (len(channel_mult) - 1)
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        blocks: list[nn.Module] = [ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch)]
        self.fuse_points: dict[int, int] = {}
        latent_res = res
        for level in reversed(range(len(channel_mult))):
            out_ch = base_channels * channel_mult[level]
            for j in range(num_res_blocks):
                blocks.append(ResBlock(ch, out_ch))
                if (res == latent_res and j == num_res_blocks - 1) or (res != latent_res and j == 0):
                    self.fuse_points[len(blocks) - 1] = res
                ch = out_ch
                if res in attn_resolutions:
                    blocks.append(AttnBlock(ch))
            if level != 0:
                blocks.append(Upsample(ch))
                res *= 2
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = group_norm(ch) if final_norm else nn.Identity()
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor, fuse: Callable[[int, Tensor], Tensor] | None = None) -> Tensor:
        """fuse: optional fuse(resolution, h) -> h, called at `fuse_points` (CodeFormer's CFT)."""
        h = self.conv_in(z)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if fuse is not None and i in self.fuse_points:
                h = fuse(self.fuse_points[i], h)
        return (self.conv_out(self.norm_out(h)) + 1.0) * 0.5


def _arch_kwargs(cfg: ModelConfig) -> dict:
    return dict(
        image_size=cfg.image_size,
        base_channels=cfg.base_channels,
        channel_mult=list(cfg.channel_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=list(cfg.attn_resolutions),
        latent_channels=cfg.latent_channels,
        final_norm=cfg.final_norm,
    )


def build_encoder(cfg: ModelConfig) -> Encoder:
    return Encoder(**_arch_kwargs(cfg))


def build_decoder(cfg: ModelConfig) -> Decoder:
    return Decoder(**_arch_kwargs(cfg))


def build_quantizer(cfg: ModelConfig) -> DualCodebookQuantizer:
    return DualCodebookQuantizer(
        num_codes=cfg.codebook_size,
        dim=cfg.latent_channels,
        beta=cfg.beta,
        beta_on=cfg.beta_on,
        alpha=cfg.alpha,
        threshold=cfg.hq_threshold,
        dual=cfg.dual_codebook,
        update=cfg.codebook_update,
        decay=cfg.codebook_decay,
        restart=cfg.codebook_restart,
    )


@dataclass
class VQAutoEncoderOutput:
    """reconstruction: (B, 3, H, W) in [0, 1] scale, unclamped. z: (B, C, h, w) encoder output.
    quant: the dual quantizer's result (indices, per-sample losses, HQ+ mask)."""

    reconstruction: Tensor
    z: Tensor
    quant: DualQuantizerOutput


@dataclass
class CodeTargets:
    """Stage-2 targets from a frozen stage-1 model (paper Eqs. 6 and 8).

    indices_common, indices_hq: (B, h, w) long (indices_hq None with a single codebook).
    z_q: (B, C, h, w) Zq1 + alpha * Zq2, the L_feat target.
    """

    indices_common: Tensor
    indices_hq: Tensor | None
    z_q: Tensor


class VQAutoEncoder(nn.Module):
    """Stage 1: encoder + dual-codebook quantizer + decoder (paper 3.1, Eq. 1).

    forward(images (B, 3, H, W) in [0, 1], quality (B,) in [0, 1]) -> VQAutoEncoderOutput.
    The stage-1 loss is reconstruction + perceptual + GAN on `reconstruction` plus
    `quant.loss` (per sample; take the mean).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        self.quantizer = build_quantizer(cfg)
        self.decoder = build_decoder(cfg)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight, for the adaptive GAN weight (VQGAN)."""
        return self.decoder.conv_out.weight

    def forward(self, images: Tensor, quality: Tensor | float | None = None) -> VQAutoEncoderOutput:
        if self.quantizer.dual and quality is None:
            raise ValueError("the dual-codebook autoencoder needs each image's quality S (paper Eq. 1)")
        z = self.encoder(images)
        quant = self.quantizer(z, quality)
        return VQAutoEncoderOutput(self.decoder(quant.quantized), z, quant)

    @torch.no_grad()
    def code_targets(self, images: Tensor, quality: Tensor | float | None = None) -> CodeTargets:
        """HQ images (B, 3, H, W) in [0, 1] -> stage-2 targets.

        quality=None (default) uses the HQ+ codes for every image, as the official stage 2
        does; passing the scores masks Zq2 where S <= S_thr (paper Eq. 8 read literally).
        """
        quant = self.quantizer(self.encoder(images), quality)
        return CodeTargets(quant.indices_common, quant.indices_hq, quant.quantized)
