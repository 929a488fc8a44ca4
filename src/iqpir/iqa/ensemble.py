"""The quality prior: S = mean of the members' normalised scores (paper section 3.2, Eq. 4).

Two normalisations map each member's native score to [0, 1], higher = better:
- ``fixed`` (default): the member's documented ``native_range`` (or ``constants`` given),
  clamped; the same image gets the same S in every run and every dataset;
- ``minmax``: (low, high) = (min, max) of the member's scores over a scored set, as the
  authors did over FFHQ. The constants come from a score table
  (``read_score_table(path).constants``) or ``fit_minmax``; training, the stage-2 loss and
  inference must use the same ones, so they are saved with the table.

When every member is differentiable, ``QualityEnsemble(...)(x)`` keeps the graph and
``1 - Q(x_res).mean()`` is the stage-2 quality loss (paper Eq. 8).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from iqpir.iqa.base import Scorer, normalize
from iqpir.iqa.registry import build_scorer, resolve_device

NORMALIZATIONS = ("fixed", "minmax")


class QualityEnsemble:
    """An ensemble of NR-IQA scorers producing the quality S in [0, 1].

    Args:
        metrics: scorer names (built-in "niqe", "piqe", "niqe_diff", or pyiqa metric names).
        normalization: "fixed" or "minmax".
        constants: per-metric (low, high). ``fixed``: overrides the documented ranges.
            ``minmax``: required before scoring (from a table or ``fit_minmax``).
        device: where the scorers run ("auto" = cuda when available).
        weights_dir: local folder of learned-metric weights (pyiqa backend).
        scorers: already built scorers to use instead of building ``metrics`` (tests, reuse).

    Not an nn.Module on purpose: the scorers stay out of a trained model's parameters and
    train/eval switches (their parameters are frozen).
    """

    def __init__(
        self,
        metrics: list[str],
        normalization: str = "fixed",
        constants: Mapping[str, tuple[float, float]] | None = None,
        device: str | torch.device = "cpu",
        weights_dir: str | None = None,
        scorers: list[Scorer] | None = None,
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if not metrics:
            raise ValueError("an ensemble needs at least one metric")
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"duplicate metric names in {metrics}")
        self.metrics = list(metrics)
        self.normalization = normalization
        self.device = resolve_device(device)
        if scorers is None:
            scorers = [build_scorer(m, device=self.device, weights_dir=weights_dir) for m in self.metrics]
        if [s.name for s in scorers] != self.metrics:
            raise ValueError(f"scorer names {[s.name for s in scorers]} do not match metrics {self.metrics}")
        for s in scorers:
            if isinstance(s, torch.nn.Module):
                s.eval()
                s.requires_grad_(False)
        self.scorers = list(scorers)
        self.constants: dict[str, tuple[float, float]] = {}
        given = dict(constants or {})
        unknown = set(given) - set(self.metrics)
        if unknown:
            raise ValueError(f"constants given for metrics not in the ensemble: {sorted(unknown)}")
        for s in self.scorers:
            if s.name in given:
                lo, hi = given[s.name]
                self.constants[s.name] = (float(lo), float(hi))
            elif normalization == "fixed":
                self.constants[s.name] = tuple(float(v) for v in s.native_range)  # type: ignore[assignment]

    @property
    def differentiable(self) -> bool:
        """True when every member is differentiable (then S carries a gradient)."""
        return all(s.differentiable for s in self.scorers)

    def to(self, device: str | torch.device) -> QualityEnsemble:
        self.device = resolve_device(device)
        self.scorers = [s.to(self.device) for s in self.scorers]
        return self

    def raw(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) in [0, 1] -> {metric: (N,) native scores}, on ``self.device``."""
        x = images.to(self.device)
        return {s.name: s(x).to(self.device) for s in self.scorers}

    def fit_minmax(self, raw: Mapping[str, torch.Tensor | list[float]]) -> dict[str, tuple[float, float]]:
        """Set (and return) min-max constants from raw scores over a set (non-finite ignored)."""
        out = {}
        for name in self.metrics:
            vals = torch.as_tensor(raw[name], dtype=torch.float64).flatten()
            vals = vals[torch.isfinite(vals)]
            if vals.numel() == 0:
                raise ValueError(f"{name}: no finite scores to fit min-max constants")
            out[name] = (float(vals.min()), float(vals.max()))
        self.constants = out
        return dict(out)

    def normalize_raw(self, raw: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{metric: (N,) native} -> (N,) S = mean of normalised scores, in [0, 1]."""
        missing = [m for m in self.metrics if m not in self.constants]
        if missing:
            raise ValueError(
                f"minmax normalisation needs constants for {missing}: load them from the score table "
                "(iqpir.iqa.table.read_score_table(path).constants) or call fit_minmax(raw)"
            )
        parts = []
        for s in self.scorers:
            lo, hi = self.constants[s.name]
            parts.append(normalize(s, torch.as_tensor(raw[s.name]), lo, hi))
        return torch.stack(parts, dim=0).mean(dim=0)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N,) S in [0, 1] (differentiable when all members are)."""
        return self.normalize_raw(self.raw(images))

    def __repr__(self) -> str:
        consts = {
            k: tuple(round(v, 6) if math.isfinite(v) else v for v in c) for k, c in self.constants.items()
        }
        return (
            f"QualityEnsemble(metrics={self.metrics}, normalization={self.normalization!r}, "
            f"constants={consts})"
        )
