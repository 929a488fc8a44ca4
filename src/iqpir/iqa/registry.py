"""Scorers by name: check a name, resolve a device, build a scorer (built in, else pyiqa).

Above names.py and pyiqa_backend.py (which imports pyiqa itself only when a pyiqa metric is
built), below the ensemble that builds its members here.
"""

from __future__ import annotations

from typing import Any

import torch

from iqpir.iqa import pyiqa_backend
from iqpir.iqa.base import Scorer
from iqpir.iqa.names import BUILTIN_SCORERS, PYIQA_NR_MODELS, unknown_metric_error


def check_metric_name(name: str) -> None:
    """Raise ValueError (with "did you mean") unless `name` is built in or a pyiqa NR model.

    Without pyiqa installed the names are checked against ``PYIQA_NR_MODELS``; with it,
    against ``pyiqa.list_models()``. A known pyiqa name needs pyiqa only when it is built.
    """
    if name in BUILTIN_SCORERS:
        return
    base = name.split(":", 1)[1] if name.startswith("pyiqa:") else name
    if base in PYIQA_NR_MODELS:
        return
    try:  # an installed pyiqa (perhaps newer than the list) decides
        pyiqa_names = list(pyiqa_backend.import_pyiqa().list_models(metric_mode="NR"))
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
        scorer = pyiqa_backend.PyiqaScorer(name, device=dev, weights_dir=weights_dir, **kwargs)
    scorer = scorer.to(dev).eval()
    scorer.requires_grad_(False)
    return scorer
