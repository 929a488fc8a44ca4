"""CodeFormer's controllable feature transformation (CFT; Zhou et al., NeurIPS 2022, Sec. 3.3).

At a decoder resolution r, encoder features F_e of the degraded input modulate the decoder
features F_d (spatial feature transform, Wang et al. 2018):

    alpha, beta = P(concat(F_e, F_d))
    F_d' = F_d + w * (F_d * alpha + beta)

with fidelity weight w in [0, 1]: w = 0 is the pure codebook prior (best quality), larger w
keeps more of the input (fidelity). IQPIR's released network keeps these blocks; its authors
run it at w = 0, where they are skipped entirely.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from iqpir.models.vqgan import ResBlock


class FuseBlock(nn.Module):
    """(enc (B, C, H, W), dec (B, C, H, W), w) -> (B, C, H, W) modulated decoder features."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.encode = ResBlock(2 * channels, channels)
        self.scale = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(channels, channels, 3, padding=1)
        )
        self.shift = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(channels, channels, 3, padding=1)
        )

    def forward(self, enc: Tensor, dec: Tensor, w: float) -> Tensor:
        h = self.encode(torch.cat([enc, dec], dim=1))
        return dec + w * (dec * self.scale(h) + self.shift(h))


class FeatureTransform(nn.Module):
    """One FuseBlock per resolution in `resolutions`; `channels[r]` is the feature width at r."""

    def __init__(self, resolutions: list[int], channels: dict[int, int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({str(r): FuseBlock(channels[r]) for r in resolutions})

    def resolutions(self) -> list[int]:
        return [int(r) for r in self.blocks]

    def forward(self, res: int, enc: Tensor, dec: Tensor, w: float) -> Tensor:
        key = str(res)
        return self.blocks[key](enc, dec, w) if key in self.blocks else dec
