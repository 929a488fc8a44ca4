"""Metric names: the built-in scorers, the names pyiqa knows, and the error for any other name.

The bottom of iqpir.iqa's names (registry.py builds scorers from them, pyiqa_backend.py
raises their error); it imports only the built-in scorers.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

from iqpir.iqa.base import ScorerModule
from iqpir.iqa.niqe import NIQE, NIQEDiff
from iqpir.iqa.piqe import PIQE

# The no-reference models pyiqa registers (the names in its default_model_configs.py), less
# the set-level ones (fid, sfid, fid_dinov2, inception_score) and clipscore (it needs captions).
# Names are checked against this list when pyiqa is not installed, so that a typo is reported
# as a typo, not as a missing package; with pyiqa installed, its own list_models() decides.
PYIQA_NR_MODELS = (
    "afine_nr", "arniqa", "arniqa-clive", "arniqa-csiq", "arniqa-flive", "arniqa-kadid", "arniqa-live",
    "arniqa-spaq", "arniqa-tid", "brisque", "brisque_matlab", "clipiqa", "clipiqa+", "clipiqa+_rn50_512",
    "clipiqa+_vitL14_512", "cnniqa", "compare2score", "dbcnn", "entropy", "hyperiqa", "ilniqe", "laion_aes",
    "liqe", "liqe_mix", "maclip", "maniqa", "maniqa-kadid", "maniqa-pipal", "musiq", "musiq-ava",
    "musiq-paq2piq", "musiq-spaq", "nima", "nima-koniq", "nima-spaq", "nima-vgg16-ava", "niqe", "niqe_matlab",
    "nrqm", "paq2piq", "pi", "piqe", "qalign", "qalign_4bit", "qalign_8bit", "qualiclip", "qualiclip+",
    "qualiclip+-clive", "qualiclip+-flive", "qualiclip+-spaq", "tres", "tres-flive", "topiq_iaa",
    "topiq_iaa_res50", "topiq_nr", "topiq_nr-face", "topiq_nr-face-v1", "topiq_nr-flive", "topiq_nr-spaq",
    "topiq_nr_swin-face", "unique", "uranker", "wadiqam_nr",
)
# Full-reference models of pyiqa: they compare with a reference image, so they cannot score alone.
PYIQA_FR_MODELS = (
    "afine_all", "afine_all_scale", "afine_fr", "ahiq", "ckdn", "cw_ssim", "deepdc", "dists", "dmm", "fsim",
    "gmsd", "lpips", "lpips+", "lpips-vgg", "lpips-vgg+", "mad", "ms_ssim", "msswd", "nlpd", "pieapp", "psnr",
    "psnry", "ssim", "ssimc", "stlpips", "stlpips-vgg", "topiq_fr", "topiq_fr-pipal", "vif", "vsi",
    "wadiqam_fr",
)

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
