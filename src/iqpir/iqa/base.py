"""The scorer protocol shared by every NR-IQA model, and the normalisation to [0, 1].

A scorer maps a batch (N, 3, H, W) float in [0, 1] to (N,) native scores. Its
``native_range`` is the documented range that ``fixed`` normalisation maps to [0, 1]
(clamped), and ``lower_better`` says which end is good. Normalised scores are always
higher = better (paper section 3.2: "each model's raw score is mapped to [0, 1]").
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn


class ImageTooSmall(ValueError):
    """An image is smaller than a metric can score; the message says the least size it needs."""

    def __init__(self, metric: str, size: tuple[int, int], needs: str):
        self.metric, self.size, self.needs = metric, tuple(size), needs
        super().__init__(f"too small for {metric.upper()}: {size[1]}x{size[0]} px, it needs {needs}")

    def __reduce__(self) -> tuple:
        return (type(self), (self.metric, self.size, self.needs))


@runtime_checkable
class Scorer(Protocol):
    """What the ensemble, the score table and the quality loss need from an NR-IQA model.

    Attributes:
        name: the registry name ("niqe", "piqe", "niqe_diff", or a pyiqa metric name).
        native_range: (low, high), the documented range used by ``fixed`` normalisation.
        lower_better: True when a smaller native score means a better image.
        differentiable: True when the gradient of the score reaches the input meaningfully.
    """

    name: str
    native_range: tuple[float, float]
    lower_better: bool
    differentiable: bool

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float in [0, 1] -> (N,) native scores (float32)."""
        ...

    def to(self, device: torch.device | str) -> Scorer: ...


class ScorerModule(nn.Module):
    """Base class of the built-in scorers: an nn.Module (so ``.to(device)`` works) with the
    protocol's attributes. Subclasses implement ``forward``."""

    name: str = ""
    native_range: tuple[float, float] = (0.0, 1.0)
    lower_better: bool = False
    differentiable: bool = False

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, native_range={self.native_range}, "
            f"lower_better={self.lower_better}, differentiable={self.differentiable}"
        )


SMALL_SIDE = 192  # NIQE's 96-px blocks: a shorter side of 192 holds 2 x 2 of them


def upsample_small(images: torch.Tensor, min_side: int = SMALL_SIDE) -> torch.Tensor:
    """(N, 3, H, W) -> upsampled (bicubic, clamped to [0, 1]) so the shorter side is at least
    `min_side`; larger images pass unchanged. The stage-2 quality loss scores its crops this
    way, so a score table of small images scored through it is on the loss's footing."""
    side = min(images.shape[-2:])
    if side >= min_side:
        return images
    scale = min_side / side
    size = (max(min_side, round(images.shape[-2] * scale)), max(min_side, round(images.shape[-1] * scale)))
    return torch.nn.functional.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def normalize(
    scorer: Scorer,
    raw: torch.Tensor,
    low: float | None = None,
    high: float | None = None,
) -> torch.Tensor:
    """Map native scores to [0, 1], higher = better, clamped.

    s = (raw - low) / (high - low), flipped to 1 - s for lower-better metrics, then clamped
    to [0, 1]. ``low``/``high`` default to ``scorer.native_range`` (the ``fixed``
    normalisation); pass min-max constants for ``minmax``. NaN scores (e.g. NIQE of a flat
    image, which has no natural-scene statistics) map to 0, the worst quality; a degenerate
    range (low == high, e.g. min-max over one image) maps every score to 0.5.

    The clamp passes gradients inside (low, high) only, as ``torch.clamp`` does.
    """
    lo, hi = scorer.native_range if low is None and high is None else (low, high)
    if lo is None or hi is None:
        raise ValueError(f"{scorer.name}: give both low and high, or neither")
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        # No finite score was seen for this metric (min-max over flat images): worst, like NaN.
        return torch.zeros_like(raw, dtype=torch.float32)
    if not hi > lo:
        # A degenerate min-max range (one image, or identical scores): every image is equal.
        return torch.full_like(raw, 0.5, dtype=torch.float32)
    s = (raw.float() - lo) / (hi - lo)
    if scorer.lower_better:
        s = 1.0 - s
    s = torch.nan_to_num(s, nan=0.0)
    return s.clamp(0.0, 1.0)


QUALITY_MIN_SIDE = 192  # NIQE's 96-pixel blocks at two scales need two blocks at half size


def quality_input(images: torch.Tensor, min_side: int = QUALITY_MIN_SIDE) -> torch.Tensor:
    """Upsample (bicubic, differentiable) so the shorter side is at least `min_side`.

    The built-in quality models work on 96x96 blocks; tiny-preset crops (64x64) are scored
    after upsampling. Paper-sized crops (512) pass unchanged.
    """
    side = min(images.shape[-2:])
    if side >= min_side:
        return images
    scale = min_side / side
    size = (round(images.shape[-2] * scale), round(images.shape[-1] * scale))
    return torch.nn.functional.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
