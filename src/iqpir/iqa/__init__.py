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

from iqpir.iqa.base import ImageTooSmall, Scorer, ScorerModule, normalize, upsample_small
from iqpir.iqa.ensemble import QualityEnsemble
from iqpir.iqa.names import BUILTIN_SCORERS, UnknownMetric, available_metrics, unknown_metric_error
from iqpir.iqa.niqe import NIQE, NIQEDiff
from iqpir.iqa.piqe import PIQE
from iqpir.iqa.registry import build_scorer, check_metric_name, resolve_device

__all__ = [
    "NIQE",
    "PIQE",
    "NIQEDiff",
    "QualityEnsemble",
    "Scorer",
    "ScorerModule",
    "ImageTooSmall",
    "UnknownMetric",
    "BUILTIN_SCORERS",
    "available_metrics",
    "build_scorer",
    "check_metric_name",
    "unknown_metric_error",
    "normalize",
    "resolve_device",
    "upsample_small",
]
