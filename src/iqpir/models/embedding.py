"""Quality embedding s(S): a latent-shaped map added to the encoder output (paper 3.2, Eq. 2).

    Z_l' = Z_l + s(S),    S in [0, 1] (higher = better), s(S) of shape (C, h, w)

Two forms:
- "binned" (official): S is bucketed with floor(bins * S) and each bin owns a learned
  (C, h, w) map. S = 1.0 would index bin `bins` (out of range in the official code), so it is
  clamped into the top bin.
- "continuous": Fourier features of S -> small MLP -> weights of `bins` learned basis maps.
  Any S in [0, 1] gives a distinct condition that varies smoothly with S, with about the
  binned form's parameter count (a direct MLP -> C*h*w output would cost C*h*w*hidden
  parameters: 16.8M at the paper size).
- "none": no condition (s(S) = 0; the paper's "w/o quality prior" ablation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from iqpir.models.init import normal_

QUALITY_EMBEDDINGS = ("binned", "continuous", "none")


def check_quality(quality: Tensor | float, batch: int, device: torch.device | None = None) -> Tensor:
    """Validate a quality score and return it as a float32 tensor of shape (batch,).

    `quality` is a number (used for the whole batch), a 0-d tensor or a (batch,) tensor, in
    [0, 1]. NaN or values outside [0, 1] raise ValueError: an unnormalised score (e.g. a raw
    MUSIQ score of 70) would otherwise silently pick the top bin.
    """
    q = torch.as_tensor(quality, dtype=torch.float32, device=device)
    if q.ndim == 0:
        q = q.expand(batch)
    if q.shape != (batch,):
        raise ValueError(
            f"quality must be a number or a tensor of shape ({batch},), got shape {tuple(q.shape)}"
        )
    # NaN fails both comparisons, so it is caught here too; one host sync per call.
    ok = (q >= 0) & (q <= 1)
    if not bool(ok.all()):
        bad = q[~ok]
        raise ValueError(f"quality must be in [0, 1] (normalised score, higher = better); got {bad.tolist()}")
    return q


class QualityEmbedding(nn.Module):
    """Map quality S (B,) in [0, 1] to an additive condition s(S) of shape (B, C, size, size).

    Args:
        kind: "binned" | "continuous" | "none" (see the module docstring).
        bins: number of bins (binned) or of learned basis maps (continuous).
        channels, size: the latent shape C, h = w = size.
        fourier_features: number of sin/cos frequency pairs of the continuous form.
        hidden: width of the continuous form's MLP.
        init_std: standard deviation of the maps' normal initialisation: 1.0 is the official
            one (nn.Embedding's default N(0, 1)), 0.02 a small start.
    """

    def __init__(
        self,
        kind: str,
        bins: int,
        channels: int,
        size: int,
        fourier_features: int = 16,
        hidden: int = 128,
        init_std: float = 1.0,
    ) -> None:
        super().__init__()
        if kind not in QUALITY_EMBEDDINGS:
            raise ValueError(f"quality embedding kind {kind!r} is not one of {list(QUALITY_EMBEDDINGS)}")
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.kind = kind
        self.bins = bins
        self.channels = channels
        self.size = size
        self.fourier_features = fourier_features
        if kind == "none":
            return
        # A random start (not zeros) so that S changes the Transformer's input, and hence its
        # logits, from the first step; zero-initialised maps would leave the condition inert
        # until the first update.
        self.maps = nn.Parameter(torch.empty(bins, channels, size, size))
        normal_(self.maps, std=init_std)
        if kind == "continuous":
            # Features [S, sin(k*pi*S)/k, cos(k*pi*S)/k] for k = 1..F: a sine/cosine basis on
            # [0, 1], so the MLP sees a smooth, injective code of S. The 1/k damping makes the
            # initial condition vary slowly with S (no feature moves faster than pi per unit S);
            # training can still weight the high frequencies up.
            self.mlp = nn.Sequential(
                nn.Linear(2 * fourier_features + 1, hidden),
                nn.SiLU(),
                nn.Linear(hidden, bins),
            )

    def fourier(self, quality: Tensor) -> Tensor:
        """(B,) -> (B, 2F+1) features [S, sin(k pi S)/k, cos(k pi S)/k], k = 1..F."""
        k = torch.arange(1, self.fourier_features + 1, device=quality.device, dtype=quality.dtype)
        angles = math.pi * quality[:, None] * k
        return torch.cat([quality[:, None], torch.sin(angles) / k, torch.cos(angles) / k], dim=1)

    def bin_index(self, quality: Tensor) -> Tensor:
        """(B,) in [0, 1] -> (B,) long bin index floor(bins * S), with S = 1.0 in the top bin."""
        return torch.floor(quality * self.bins).long().clamp_(max=self.bins - 1)

    def forward(self, quality: Tensor | float, batch: int | None = None) -> Tensor:
        """quality (B,) in [0, 1] (or a number with `batch` given) -> s(S) (B, C, size, size).

        The output uses the maps' dtype and device; "none" returns float32 zeros on the
        device of `quality` (CPU for a number).
        """
        if batch is None:
            batch = torch.as_tensor(quality).numel()
        if self.kind == "none":
            device = quality.device if isinstance(quality, Tensor) else None
            q = check_quality(quality, batch, device=device)
            return torch.zeros(batch, self.channels, self.size, self.size, device=q.device)
        q = check_quality(quality, batch, device=self.maps.device)
        if self.kind == "binned":
            return self.maps[self.bin_index(q)]
        weights = self.mlp(self.fourier(q).to(self.maps.dtype))  # (B, bins)
        return torch.einsum("bk,kchw->bchw", weights, self.maps)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, bins={self.bins}, channels={self.channels}, size={self.size}"
