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

import difflib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from iqpir.iqa.base import ImageTooSmall, Scorer, ScorerModule, normalize, upsample_small
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


class UnknownMetric(ValueError):
    """A metric name that is neither built in nor a pyiqa no-reference model."""

    def __init__(self, name: str, message: str):
        self.name = name
        super().__init__(message)

    def __reduce__(self) -> tuple:
        return (type(self), (self.name, str(self)))


def unknown_metric_error(name: str, pyiqa_names: Iterable[str] = (), others: Iterable[str] = ()) -> UnknownMetric:
    """The error for a metric name nobody knows, with the closest known name (like config keys);
    `others` are further names the caller computes itself (evaluate: psnr, ssim, ...)."""
    from iqpir.iqa.pyiqa_backend import PYIQA_FR_MODELS

    base = name.split(":", 1)[1] if name.startswith("pyiqa:") else name
    if base in PYIQA_FR_MODELS:
        return UnknownMetric(
            name,
            f"{name!r} is a full-reference metric (it compares with a reference image) and cannot score "
            "an image alone; use a no-reference one, or iqpir evaluate --reference for full-reference scores"
        )
    builtin = [*others, *BUILTIN_SCORERS]
    close = difflib.get_close_matches(base, [*builtin, *pyiqa_names], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UnknownMetric(
        name,
        f"unknown metric {name!r}{hint}: built in are {', '.join(builtin)}; any other name must be a "
        "no-reference model of pyiqa (extra iqa), e.g. musiq, topiq_nr, clipiqa"
    )


def check_metric_name(name: str) -> None:
    """Raise ValueError (with "did you mean") unless `name` is built in or a pyiqa NR model.

    Without pyiqa installed the names are checked against ``PYIQA_NR_MODELS``; with it,
    against ``pyiqa.list_models()``. A known pyiqa name needs pyiqa only when it is built.
    """
    from iqpir.iqa.pyiqa_backend import PYIQA_NR_MODELS

    if name in BUILTIN_SCORERS:
        return
    base = name.split(":", 1)[1] if name.startswith("pyiqa:") else name
    if base in PYIQA_NR_MODELS:
        return
    from iqpir.iqa.pyiqa_backend import import_pyiqa

    try:  # an installed pyiqa (perhaps newer than the list) decides
        pyiqa_names = list(import_pyiqa().list_models(metric_mode="NR"))
    except ImportError:
        pyiqa_names = []
    if base in pyiqa_names:
        return
    raise unknown_metric_error(name, pyiqa_names or PYIQA_NR_MODELS)


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
        ValueError: the name is neither built in nor a pyiqa no-reference metric (the message
            suggests the closest known name).
    """
    check_metric_name(name)
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
    "ImageTooSmall",
    "UnknownMetric",
    "available_metrics",
    "build_scorer",
    "check_metric_name",
    "normalize",
    "resolve_device",
    "upsample_small",
]
