"""Scorers by name: check a name, resolve a device, build a scorer (built in, else pyiqa).

Above names.py and pyiqa_backend.py (which imports pyiqa itself only when a pyiqa metric is
built), below the ensemble that builds its members here.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch

from iqpir.iqa import pyiqa_backend
from iqpir.iqa.base import Scorer
from iqpir.iqa.names import BUILTIN_SCORERS, PYIQA_NR_MODELS, unknown_metric_error


def installed_pyiqa_names() -> list[str] | None:
    """The no-reference model names of the installed pyiqa, read from its default_model_configs.py
    without importing pyiqa (an import takes 10-20 s); None when pyiqa is absent or the file
    does not have the expected shape (`DEFAULT_CONFIGS = OrderedDict({name: {..., 'metric_mode': ...}})`)."""
    try:
        spec = importlib.util.find_spec("pyiqa")  # finds the package without running it
    except ValueError:  # a module put in sys.modules by hand has no spec
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        source = Path(folder) / "default_model_configs.py"
        try:
            tree = ast.parse(source.read_text())
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULT_CONFIGS" for t in node.targets)):
                continue
            table = node.value.args[0] if isinstance(node.value, ast.Call) and node.value.args else node.value
            if not isinstance(table, ast.Dict):
                return None
            names = []
            for key, value in zip(table.keys, table.values):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Dict):
                    mode = {k.value: v.value for k, v in zip(value.keys, value.values)
                            if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}.get("metric_mode")
                    if mode == "NR":
                        names.append(key.value)
            return names or None
    return None


def _pyiqa_present() -> bool:
    if "pyiqa" in sys.modules:
        return sys.modules["pyiqa"] is not None
    return importlib.util.find_spec("pyiqa") is not None


def check_metric_name(name: str) -> None:
    """Raise ValueError (with "did you mean") unless `name` is built in or a pyiqa NR model.

    Without pyiqa installed the names are checked against ``PYIQA_NR_MODELS``. With it, against
    the names its config file lists (read without importing pyiqa); a name close to a known one
    that is not one of them is a typo, reported at once; only a name far from every known one
    imports pyiqa to let its ``list_models()`` decide. A known pyiqa name needs pyiqa only when
    it is built.
    """
    if name in BUILTIN_SCORERS:
        return
    base = name.split(":", 1)[1] if name.startswith("pyiqa:") else name
    if base in PYIQA_NR_MODELS:
        return
    if not _pyiqa_present():
        raise unknown_metric_error(name, PYIQA_NR_MODELS)
    listed = installed_pyiqa_names()
    if listed is not None and base in listed:
        return
    known = [*PYIQA_NR_MODELS, *(listed or [])]
    if difflib.get_close_matches(base, [*BUILTIN_SCORERS, *known], n=1, cutoff=0.75):
        raise unknown_metric_error(name, known)
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
