"""Learned NR-IQA models (MUSIQ, TOPIQ, CLIP-IQA, ARNIQA, Q-Align, BRISQUE, ...) through the
optional ``pyiqa`` package (extra ``iqa``; pyiqa is non-commercial and never vendored).

Weights are read from local files only:
- pyiqa's own files (checkpoints, .mat/.pth parameter files) from ``weights_dir`` when it
  is given, else from pyiqa's cache ``$TORCH_HOME/hub/pyiqa`` (default
  ``~/.cache/torch/hub/pyiqa``), under the file name of their download URL;
- torchvision backbones from ``$TORCH_HOME/hub/checkpoints``; CLIP from the folder pyiqa's
  CLIP loader names; timm backbones from the Hugging Face cache (``$HF_HUB_CACHE``).
While a metric is built (and while it scores, since some load lazily) every download
function pyiqa reaches is replaced by one that raises ``MissingWeightsError``, whose one-line
message names the missing file, the folder to put it in and the URL it comes from. Pass
``allow_download=True`` to let pyiqa download as it normally does.

Nothing here is imported by ``import iqpir`` or ``import iqpir.iqa``: pyiqa (and the
torchvision/cv2 it imports) load only when a pyiqa metric is built.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from iqpir.io import check_batch
from iqpir.iqa.base import ScorerModule
from iqpir.iqa.names import unknown_metric_error


class MissingWeightsError(FileNotFoundError):
    """A learned metric's weights file is not available locally (downloads are off)."""

    def __init__(
        self, metric: str, filename: str, folder: str, url: str | None = None, weights_dir_hint: bool = True
    ) -> None:
        self.metric, self.filename, self.folder, self.url = metric, filename, folder, url
        self.weights_dir_hint = weights_dir_hint
        src = f" (download it from {url})" if url else ""
        alt = ", or pass --weights-dir DIR holding it" if weights_dir_hint else ""
        self.message = (
            f"pyiqa metric {metric!r} needs the weights file {filename!r}, which is not in {folder}: "
            f"put it there{src}{alt}"
        )
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple:
        return (type(self), (self.metric, self.filename, self.folder, self.url, self.weights_dir_hint))


@dataclass(frozen=True)
class MetricInfo:
    """Normalisation facts of a pyiqa metric: documented range, direction, gradient."""

    native_range: tuple[float, float]
    lower_better: bool
    differentiable: bool


# Ranges used by `fixed` normalisation. Sources: pyiqa `default_model_configs.py`
# (`score_range`, `lower_better`), docs/ModelCard.md, and the metric papers; see
# notes/iqa-ecosystem.md section 1.3/1.5. pyiqa calls its ranges rough, so scores outside
# are clamped. `differentiable` = the score's gradient reaches the input with pyiqa's
# defaults (TOPIQ-face only with align_crop_face=False: the face-alignment path is numpy).
PYIQA_METRICS: dict[str, MetricInfo] = {
    "musiq": MetricInfo((0.0, 100.0), False, True),
    "musiq-spaq": MetricInfo((0.0, 100.0), False, True),
    "musiq-paq2piq": MetricInfo((0.0, 100.0), False, True),
    "musiq-ava": MetricInfo((1.0, 10.0), False, True),
    "topiq_nr": MetricInfo((0.0, 1.0), False, True),
    "topiq_nr-face": MetricInfo((0.0, 1.0), False, False),
    "topiq_nr-face-v1": MetricInfo((0.0, 1.0), False, False),
    "topiq_nr_swin-face": MetricInfo((0.0, 1.0), False, False),
    "clipiqa": MetricInfo((0.0, 1.0), False, True),
    "clipiqa+": MetricInfo((0.0, 1.0), False, True),
    "arniqa": MetricInfo((0.0, 1.0), False, True),
    "maniqa": MetricInfo((0.0, 1.0), False, True),
    "hyperiqa": MetricInfo((0.0, 1.0), False, True),
    "liqe": MetricInfo((1.0, 5.0), False, True),
    "liqe_mix": MetricInfo((1.0, 5.0), False, True),
    "qalign": MetricInfo((1.0, 5.0), False, False),
    "brisque": MetricInfo((0.0, 100.0), True, False),
    "brisque_matlab": MetricInfo((0.0, 100.0), True, False),
    "niqe": MetricInfo((0.0, 20.0), True, False),
    "niqe_matlab": MetricInfo((0.0, 20.0), True, False),
    "piqe": MetricInfo((0.0, 100.0), True, False),
}


def parse_score_range(text: str | None) -> tuple[float, float] | None:
    """pyiqa's free-text ``score_range`` ("~0, ~100", "1, 5") -> (low, high), or None."""
    if not text:
        return None
    nums = re.findall(r"-?\d+(?:\.\d+)?", str(text))
    if len(nums) != 2:
        return None
    lo, hi = float(nums[0]), float(nums[1])
    return (lo, hi) if hi > lo else None


def pyiqa_cache_dir() -> str:
    """pyiqa's weights cache: ``$TORCH_HOME/hub/pyiqa`` (what ``load_file_from_url`` uses)."""
    return os.path.join(torch.hub.get_dir(), "pyiqa")


def import_pyiqa() -> Any:
    try:
        import pyiqa  # noqa: F401  (optional dependency, non-commercial licence)
    except ImportError as exc:
        raise ImportError(
            "learned NR-IQA metrics need the optional pyiqa backend: pip install 'iqpir[iqa]' "
            f"(built-in metrics without it: niqe, piqe, niqe_diff) [{exc}]"
        ) from exc
    return pyiqa


# Guard state. Modules imported while a guard is active may bind the replacement download
# functions for good (``from torch.hub import download_url_to_file``), so the replacements
# delegate to the originals whenever no guard is active.
_ACTIVE: list[tuple[str, str]] = []  # (metric, pyiqa weights folder)
_ORIGINALS: dict[str, Any] = {}


def _guarded_download(url: str, dst: str, *args: Any, **kwargs: Any) -> Any:
    if not _ACTIVE:
        return _ORIGINALS["download_url_to_file"](url, dst, *args, **kwargs)
    metric, pyiqa_dir = _ACTIVE[-1]
    folder = os.path.dirname(os.path.abspath(dst))
    hint = os.path.abspath(folder) == os.path.abspath(pyiqa_dir)
    raise MissingWeightsError(metric, os.path.basename(dst), folder, url, weights_dir_hint=hint)


def _guarded_urlopen(url: Any, *args: Any, **kwargs: Any) -> Any:
    if not _ACTIVE:
        return _ORIGINALS["urlopen"](url, *args, **kwargs)
    u = str(getattr(url, "full_url", url))
    name = os.path.basename(urlparse(u).path)
    folder = os.path.join(torch.hub.get_dir(), "clip") + " (pyiqa's CLIP cache)"
    raise MissingWeightsError(_ACTIVE[-1][0], name, folder, u, weights_dir_hint=False)


@contextlib.contextmanager
def offline_downloads(metric: str, weights_dir: str | None) -> Iterator[None]:
    """Within the block, pyiqa reads weights locally and every download raises MissingWeightsError.

    ``weights_dir`` replaces pyiqa's cache folder (``$TORCH_HOME/hub/pyiqa``) for pyiqa's own files.
    """
    import urllib.request

    import pyiqa.utils.download_util as dl

    if not _ORIGINALS:
        _ORIGINALS["download_url_to_file"] = torch.hub.download_url_to_file
        _ORIGINALS["urlopen"] = urllib.request.urlopen
    saved_cache = dl.DEFAULT_CACHE_DIR
    pyiqa_dir = os.path.abspath(weights_dir) if weights_dir is not None else saved_cache
    dl.download_url_to_file = _guarded_download
    torch.hub.download_url_to_file = _guarded_download
    urllib.request.urlopen = _guarded_urlopen
    dl.DEFAULT_CACHE_DIR = pyiqa_dir
    _ACTIVE.append((metric, pyiqa_dir))
    try:
        yield
    finally:
        _ACTIVE.pop()
        dl.DEFAULT_CACHE_DIR = saved_cache
        if not _ACTIVE:
            dl.download_url_to_file = _ORIGINALS["download_url_to_file"]
            torch.hub.download_url_to_file = _ORIGINALS["download_url_to_file"]
            urllib.request.urlopen = _ORIGINALS["urlopen"]


def _hub_error(metric: str, exc: BaseException) -> MissingWeightsError | None:
    """Hugging Face hub 'not cached / offline' errors (timm backbones, Q-Align) -> our error."""
    names = {type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    if not names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "EntryNotFoundError"}:
        return None
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    m = re.search(r"huggingface\.co/([^/\s]+/[^/\s]+)/resolve/[^/\s]+/(\S+?)[\s'\")]", str(exc) + " ")
    filename = f"{m.group(1)}/{m.group(2)}" if m else text
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub"
    )
    return MissingWeightsError(metric, filename, f"the Hugging Face cache {hub}", weights_dir_hint=False)


class PyiqaScorer(ScorerModule):
    """A pyiqa metric behind the Scorer protocol.

    Args:
        name: a pyiqa metric name (``pyiqa.list_models()``); a ``pyiqa:`` prefix is accepted.
        device: torch device.
        weights_dir: folder holding pyiqa's weight files by name (instead of its cache).
        allow_download: let pyiqa download missing files (off: raise MissingWeightsError).
        **metric_kwargs: passed to ``pyiqa.create_metric`` (e.g. ``pretrained=False``,
            ``backbone_pretrain=False``, ``pretrained_model_path=...``, ``align_crop_face=False``).

    The metric network is frozen and kept in eval mode; scores respect the caller's grad mode.
    """

    lower_better = False
    differentiable = False

    def __init__(
        self,
        name: str,
        device: str | torch.device = "cpu",
        weights_dir: str | os.PathLike | None = None,
        allow_download: bool = False,
        **metric_kwargs: Any,
    ) -> None:
        super().__init__()
        pyiqa_name = name.split(":", 1)[1] if name.startswith("pyiqa:") else name
        self.name = name
        self.pyiqa_name = pyiqa_name
        self.weights_dir = None if weights_dir is None else str(Path(weights_dir))
        self.allow_download = allow_download
        pyiqa = import_pyiqa()
        if pyiqa_name not in pyiqa.list_models(metric_mode="NR"):
            raise unknown_metric_error(name, pyiqa.list_models(metric_mode="NR"))
        quiet = contextlib.redirect_stdout(io.StringIO()) if not allow_download else contextlib.nullcontext()
        with self._guard(), quiet:  # pyiqa prints "Downloading: ..." before the refused download
            model = pyiqa.create_metric(pyiqa_name, device=torch.device(device), **metric_kwargs)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        info = PYIQA_METRICS.get(pyiqa_name)
        if info is None:
            rng = parse_score_range(getattr(model, "score_range", None)) or (0.0, 1.0)
            info = MetricInfo(rng, bool(getattr(model, "lower_better", False)), False)
        self.native_range = info.native_range
        self.lower_better = bool(getattr(model, "lower_better", info.lower_better))
        differentiable = info.differentiable
        if "face" in pyiqa_name and metric_kwargs.get("align_crop_face") is False:
            differentiable = True
        self.differentiable = differentiable

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        if self.allow_download:
            yield
            return
        try:
            with offline_downloads(self.name, self.weights_dir):
                yield
        except MissingWeightsError:
            raise
        except Exception as exc:  # noqa: BLE001 - only hub 'not cached' errors are translated
            err = _hub_error(self.name, exc)
            if err is None:
                raise
            raise err from exc

    def train(self, mode: bool = True) -> PyiqaScorer:
        # Metric archs change behaviour in train mode (MUSIQ/TOPIQ crops): always eval.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N,) native scores (float32)."""
        check_batch(images, self.name, check_range=False)
        device = next((b.device for b in self.model.buffers()), None) or next(
            (p.device for p in self.model.parameters()), images.device
        )
        x = images.to(device)
        with self._guard():
            net = getattr(self.model, "net", None)
            if net is not None and getattr(self.model, "metric_mode", "NR") == "NR":
                # Call the network directly: InferenceModel.forward forces grad on/off itself.
                with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
                    out = net(x.clamp(0, 1))
            else:
                out = self.model(x.clamp(0, 1))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(images.shape[0], -1)[:, 0].to(torch.float32)
