"""The knob rule: where each inference setting's value comes from, decided in one place.

    knobs = resolve_knobs(described, quality=0.6)      # {"quality": Knob(0.6, "flag"), ...}
    record(knobs)                                       # {"quality": {"value": 0.6, "from": "flag"}, ...}

A knob's value is the first of
  1. the flag: what the caller asked for (`--quality`, a form field, a keyword argument);
  2. the checkpoint: the value the file records that the network was trained or evaluated at
     (DescribedModel.trained: an iqpir checkpoint's train.fidelity and model.alpha, a graph's
     copy of them);
  3. the default: the model's own (quality 1.0, the best restoration, paper 3.3; alpha the
     network's fusion weight; fidelity 0, the IQPIR authors' w; blend 1, the restoration as it is).
A knob the model lacks has the value None, and a flag for it is refused with one line saying
why. Every path that restores (photos, faces, video, the app, int8 graphs, background models)
asks `Restorer.knobs`, which asks this function; restore.json and the app's X-Knobs header
write `record`'s form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The knobs, with the range a flag must lie in.
RANGES = {"quality": (0.0, 1.0), "alpha": (0.0, 2.0), "fidelity": (0.0, 1.0), "blend": (0.0, 1.0)}
KNOBS = tuple(RANGES)
SOURCES = ("flag", "checkpoint", "default")


@dataclass(frozen=True)
class Knob:
    """One resolved setting: its value (None: the model has no such knob) and where it came from
    ("flag" | "checkpoint" | "default")."""

    value: float | None
    source: str


def supports(described: Any, name: str) -> bool:
    """Whether the described model (iqpir.inference.files.DescribedModel) takes knob `name`."""
    if name == "quality":
        return bool(described.quality)
    if name == "alpha":
        return described.alpha is not None
    if name == "fidelity":
        return bool(described.fidelity)
    return True  # blend acts on the output, whatever the model


def model_default(described: Any, name: str) -> float | None:
    """The model's own value of a knob it takes, when the file records none."""
    if not supports(described, name):
        return None
    return {"quality": 1.0, "alpha": described.alpha, "fidelity": described.default_fidelity, "blend": 1.0}[name]


def check_flag(described: Any, name: str, value: float) -> float:
    """A flag's value as a float, or ValueError: out of its range, or a knob the model lacks."""
    low, high = RANGES[name]
    if not low <= float(value) <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value}")
    if not supports(described, name) and (name != "fidelity" or float(value) != 0.0):
        raise ValueError(described.refusal(name))  # w = 0 is what a model without CFT blocks does
    return float(value)


def resolve(described: Any, name: str, flag: float | None = None) -> Knob:
    """One knob by the rule: flag > the checkpoint's trained value > the model's default."""
    if flag is not None:
        value = check_flag(described, name, flag)
        return Knob(value if supports(described, name) else None, "flag")
    trained = described.trained.get(name)
    if trained is not None and supports(described, name):
        return Knob(float(trained), "checkpoint")
    return Knob(model_default(described, name), "default")


def resolve_knobs(described: Any, quality: float | None = None, alpha: float | None = None,
                  fidelity: float | None = None, blend: float | None = None) -> dict[str, Knob]:
    """Every knob by `resolve`, in KNOBS order; None flags are not given."""
    flags = {"quality": quality, "alpha": alpha, "fidelity": fidelity, "blend": blend}
    return {name: resolve(described, name, flags[name]) for name in KNOBS}


def record(knobs: dict[str, Knob]) -> dict[str, dict]:
    """The JSON form of resolved knobs: {name: {"value": v, "from": source}}."""
    return {name: {"value": k.value, "from": k.source} for name, k in knobs.items()}
