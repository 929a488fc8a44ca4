"""NR-IQA scorers and the quality prior ensemble (paper section 3.2).

Built in (batched torch, offline, CPU and GPU, no optional dependency):
- ``niqe``: NIQE with LIVE's pristine model, reproducing the LIVE MATLAB release;
- ``piqe``: PIQE reproducing MATLAB's ``piqe``;
- ``niqe_diff``: a differentiable NIQE, the stage-2 quality loss without learned weights.
Any other name is a pyiqa metric, built lazily by ``iqpir.iqa.pyiqa_backend`` (extra
``iqa``); ``pyiqa:NAME`` forces the pyiqa version of a built-in name.

    from iqpir.iqa import QualityEnsemble
    q = QualityEnsemble(["niqe_diff"])          # S in [0, 1], higher = better
    loss_quality = 1 - q(restored).mean()       # paper Eq. 8

Importing this package imports neither pyiqa, torchvision nor cv2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from iqpir.iqa.base import Scorer, ScorerModule, normalize
from iqpir.iqa.ensemble import QualityEnsemble
from iqpir.iqa.niqe import NIQE, NIQEDiff
from iqpir.iqa.piqe import PIQE

BUILTIN_SCORERS: dict[str, Callable[..., ScorerModule]] = {
    "niqe": NIQE,
    "piqe": PIQE,
    "niqe_diff": NIQEDiff,
}


def available_metrics() -> list[str]:
    """Names of the built-in metrics (pyiqa's are listed by ``pyiqa.list_models()``)."""
    return list(BUILTIN_SCORERS)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """ "auto" (or None) -> cuda when available, else cpu; anything else -> torch.device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_scorer(
    name: str,
    device: str | torch.device = "cpu",
    weights_dir: str | None = None,
    **kwargs: Any,
) -> Scorer:
    """A scorer by name, on ``device``, in eval mode with frozen parameters.

    Built-in names take ``kwargs`` of their class (e.g. ``dtype``); other names go to the
    pyiqa backend with ``weights_dir`` and ``kwargs`` (e.g. ``pretrained=False``).

    Raises:
        ImportError: a pyiqa metric was asked for and pyiqa is not installed.
        MissingWeightsError (a FileNotFoundError): its weights are not available locally.
        ValueError: the name is neither built in nor a pyiqa metric.
    """
    dev = resolve_device(device)
    if name in BUILTIN_SCORERS:
        scorer: Any = BUILTIN_SCORERS[name](**kwargs)
    else:
        from iqpir.iqa.pyiqa_backend import PyiqaScorer

        scorer = PyiqaScorer(name, device=dev, weights_dir=weights_dir, **kwargs)
    scorer = scorer.to(dev).eval()
    scorer.requires_grad_(False)
    return scorer


__all__ = [
    "NIQE",
    "PIQE",
    "NIQEDiff",
    "QualityEnsemble",
    "Scorer",
    "ScorerModule",
    "available_metrics",
    "build_scorer",
    "normalize",
    "resolve_device",
]
