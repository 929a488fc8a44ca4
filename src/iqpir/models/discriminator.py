"""PatchGAN discriminator for the stage-1 hinge GAN loss (paper 3.1; pix2pix / VQGAN lineage).

Layout (CodeFormer's: 4 layers, 64 base channels): conv4x4/2 + LeakyReLU, then `layers - 1`
conv4x4/2 + norm + LeakyReLU with channels doubling up to 8x, one conv4x4/1 + norm +
LeakyReLU, and a conv4x4/1 to one logit per patch.

Normalisation: CodeFormer uses BatchNorm. We default to GroupNorm because BatchNorm
- makes the output of a sample depend on the rest of its batch, and real and fake images
  are scored in separate batches, so the batch statistics themselves tell them apart;
- computes per-device statistics under DDP (results change with the number of GPUs unless
  converted to SyncBatchNorm) and carries running buffers that DDP re-broadcasts every step;
- behaves differently in train and eval mode.
GroupNorm is per sample: the same image gives the same logits whatever the batch, device
count or mode. norm="batch" keeps CodeFormer's choice for comparison.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from iqpir.models.init import normal_

NORMS = ("group", "batch")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """images (B, 3, H, W) in [0, 1] -> patch logits (B, 1, H', W') (real > 0 > fake for hinge).

    With H = 512 and 4 layers, H' = 30 and each logit sees a 142x142 patch (70x70 with 3).
    """

    def __init__(
        self, channels: int = 64, layers: int = 4, norm: str = "group", in_channels: int = 3
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm {norm!r} is not one of {list(NORMS)}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for n in range(1, layers + 1):
            out_ch = channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            # No conv bias before a normalisation layer: the norm's shift replaces it.
            mods += [nn.Conv2d(ch, out_ch, 4, stride=stride, padding=1, bias=False), _norm(norm, out_ch)]
            mods.append(nn.LeakyReLU(0.2))
            ch = out_ch
        mods.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*mods)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # DCGAN initialisation, as in the pix2pix/VQGAN discriminators.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images * 2.0 - 1.0)
