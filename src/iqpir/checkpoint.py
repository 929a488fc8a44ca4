"""Checkpoints: safetensors for tensors, a JSON sidecar for everything else. Nothing is unpickled.

A checkpoint is two files with one stem:

    STEM.safetensors   tensors, flat keys "group/name" (e.g. "model/encoder.conv_in.weight")
    STEM.json          {"format": "iqpir-checkpoint", "version": 1, "groups": [...] | null, ...meta}

Inside a run folder, checkpoints are RUN/checkpoints/step_00001000.{safetensors,json}; the
run's latest checkpoint is the one with the highest step whose two files both exist. The
JSON is written after the tensors, each file atomically (temp file + os.replace), so a
crash never leaves a checkpoint that looks complete but is not.

Conventions shared with the training loop:
- tensor groups: "model" (the network, needed by `load_model`), "ema" (preferred by
  `load_model` when present), "discriminator", "optimizer", "rng", ... any names without "/";
- meta keys: "config" (iqpir.config.to_dict of the run config, needed by `load_model`),
  "step", "arch" ("vqgan" | "restorer"; default from config train.stage), and the JSON
  skeletons of flattened states (`flatten_state`), e.g. "optimizer".
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from iqpir.config import RunConfig, from_dict
from iqpir.devices import weights_outside_the_heap
from iqpir.io import atomic_write

FORMAT = "iqpir-checkpoint"
VERSION = 1
SUFFIX = ".safetensors"
_STEP_RE = re.compile(r"^step_(\d+)$")


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------


def checkpoint_stem(run_dir: str | Path, step: int) -> Path:
    """RUN/checkpoints/step_00001000 (no suffix) for `step`."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def _stem(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (SUFFIX, ".json") else p


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (both files present) of a run folder as (step, stem), by step."""
    run = Path(run_dir)
    folder = run / "checkpoints" if (run / "checkpoints").is_dir() else run
    found = []
    for f in folder.glob(f"step_*{SUFFIX}"):
        m = _STEP_RE.match(f.name[: -len(SUFFIX)])
        if m and f.with_suffix(".json").is_file():
            found.append((int(m.group(1)), f.with_suffix("")))
    return sorted(found)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint), a stem, or either file -> the stem (no suffix).

    Raises FileNotFoundError naming what was looked for.
    """
    p = Path(path)
    if p.is_dir():
        found = list_checkpoints(p)
        if not found:
            raise FileNotFoundError(
                f"no checkpoint in {p} (expected {p}/checkpoints/step_NNNNNNNN{SUFFIX} with its .json)"
            )
        return found[-1][1]
    stem = _stem(p)
    for f in (stem.with_suffix(SUFFIX), stem.with_suffix(".json")):
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {f}")
    return stem


# --------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then move it onto `path` in one step (same folder, same disk)."""
    atomic_write(path, write, fsync=True)


def _plain_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors, none sharing memory (safetensors refuses shared ones)."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"checkpoint tensor {name!r} is a {type(t).__name__}, not a Tensor")
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def save_checkpoint(
    path: str | Path,
    tensors: dict[str, Tensor] | dict[str, dict[str, Tensor]],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write STEM.safetensors and STEM.json; return the stem.

    path: a stem or either file name; or an existing folder (a run folder), in which case the
        checkpoint goes to RUN/checkpoints/step_NNNNNNNN from meta["step"].
    tensors: a flat state dict, or groups of state dicts {"model": ..., "optimizer": ...}.
    meta: JSON-serialisable extras (config, step, skeletons from `flatten_state`, ...).
    """
    meta = dict(meta or {})
    p = Path(path)
    if p.is_dir():
        if not isinstance(meta.get("step"), int):
            raise ValueError(f"saving into the run folder {p} needs an integer meta['step']")
        p = checkpoint_stem(p, meta["step"])
    stem = _stem(p)
    stem.parent.mkdir(parents=True, exist_ok=True)

    nested = bool(tensors) and all(isinstance(v, dict) for v in tensors.values())
    if nested:
        flat = {}
        for group, sd in tensors.items():
            if "/" in group:
                raise ValueError(f"tensor group name {group!r} must not contain '/'")
            flat.update({f"{group}/{k}": v for k, v in sd.items()})
        groups: list[str] | None = list(tensors)
    else:
        flat, groups = dict(tensors), None
    reserved = {"format", "version", "groups"} & set(meta)
    if reserved:
        raise ValueError(f"checkpoint meta keys {sorted(reserved)} are reserved")
    header = {"format": FORMAT, "version": VERSION, "groups": groups, **meta}
    try:
        text = json.dumps(header, indent=2)
    except TypeError as exc:
        raise TypeError(f"checkpoint meta must be JSON-serialisable: {exc}") from exc

    plain = _plain_tensors(flat)
    _atomic_write(stem.with_suffix(SUFFIX), lambda tmp: save_file(plain, tmp))
    _atomic_write(stem.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))
    return stem


class CorruptCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be read (truncated, garbage); names the file."""


def _corrupt(file: Path, what: str, exc: Exception) -> CorruptCheckpointError:
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return CorruptCheckpointError(f"{file}: {what} ({detail}); the file is damaged or not a checkpoint")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(file, "unreadable checkpoint JSON", exc) from None
    if not isinstance(meta, dict):
        raise _corrupt(file, "unreadable checkpoint JSON", TypeError(f"a {type(meta).__name__}, not an object"))
    return meta


def _read_tensors(file: Path, device: str | torch.device) -> dict[str, Tensor]:
    try:
        return load_file(str(file), device=str(device))
    except SafetensorError as exc:
        raise _corrupt(file, "unreadable safetensors file", exc) from None


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """One plain .safetensors file (a data set, the packaged weights), written atomically.

    metadata: the header's str -> str map (e.g. {"iqpir": json.dumps(...)}).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = _plain_tensors(tensors)
    _atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=metadata))
    return path


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of one plain .safetensors file; a damaged file is named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tensor file not found: {path}")
    return _read_tensors(path, device)


def read_tensor_bytes(data: bytes) -> dict[str, Tensor]:
    """The tensors of a safetensors file's bytes (a file packaged as a resource: NIQE's pristine model)."""
    return load_bytes(data)


def read_pickled_tensors(path: str | Path) -> Any:
    """What a PyTorch weights file (.pth, .pt, ...) holds, unpickled with `weights_only=True`: plain
    tensors and containers only, so a file that needs code to unpickle raises (pickle.UnpicklingError,
    naming the global it wanted) instead of running it. Released networks' weights (iqpir.official)
    and the face detectors' weights are read here."""
    with weights_outside_the_heap():
        return torch.load(Path(path), map_location="cpu", weights_only=True)


def load_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a checkpoint (run folder, stem or file), without reading tensors."""
    stem = resolve_checkpoint(path)
    meta = _read_json(stem.with_suffix(".json"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{stem}.json is not an iqpir checkpoint (format {meta.get('format')!r})")
    return meta


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor] | dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Read a checkpoint (run folder, stem or file) -> (tensors, meta), as saved.

    Tensors come back in the structure given to `save_checkpoint` (flat or grouped; every
    saved group is present, even an empty one). Only safetensors and JSON are read.
    """
    stem = resolve_checkpoint(path)
    meta = _read_json(stem.with_suffix(".json"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{stem}.json is not an iqpir checkpoint (format {meta.get('format')!r})")
    flat = _read_tensors(stem.with_suffix(SUFFIX), device)
    groups = meta.pop("groups")
    meta.pop("format")
    meta.pop("version")
    if groups is None:
        return flat, meta
    nested: dict[str, dict[str, Tensor]] = {g: {} for g in groups}
    for key, t in flat.items():
        group, name = key.split("/", 1)
        nested[group][name] = t
    return nested, meta


def load_model(
    path: str | Path, weights: str = "auto", device: str | torch.device = "cpu"
) -> tuple[nn.Module, RunConfig]:
    """Rebuild the network of a checkpoint from the checkpoint alone -> (model in eval mode, RunConfig).

    The config comes from meta["config"]; the architecture from meta["arch"] or, failing
    that, config train.stage (1: VQAutoEncoder, 2: Restorer). weights: "auto" (the "ema"
    group when present, else "model"), "ema" or "model".
    """
    model, cfg, _ = read_network(path, weights, device)
    return model, cfg


def read_network(
    path: str | Path, weights: str = "auto", device: str | torch.device = "cpu"
) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """`load_model` and the checkpoint's meta (its source, step, ...), from one read of the files."""
    from iqpir.models import ARCHS  # deferred: reading tensors needs no network code

    tensors, meta = load_checkpoint(path, device="cpu")
    if "config" not in meta:
        raise ValueError(f"checkpoint {resolve_checkpoint(path)} has no config; it cannot rebuild its model")
    cfg = from_dict(meta["config"])
    arch = meta.get("arch") or ("vqgan" if cfg.train.stage == 1 else "restorer")
    if arch not in ("vqgan", "restorer"):
        raise ValueError(f"checkpoint arch {arch!r} is not a restoration network (vqgan or restorer)")
    if all(isinstance(v, Tensor) for v in tensors.values()):
        state = tensors
    else:
        group = ("ema" if "ema" in tensors else "model") if weights == "auto" else weights
        if group not in tensors:
            raise KeyError(f"checkpoint has no {group!r} weights; it has {sorted(tensors)}")
        state = tensors[group]
    model = ARCHS[arch](cfg.model)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg, meta


# --------------------------------------------------------------------------------------
# Nested states (optimizers, schedulers, RNG) -> tensors + JSON skeleton
# --------------------------------------------------------------------------------------

_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


def flatten_state(obj: Any) -> tuple[dict[str, Tensor], Any]:
    """Split a nested state (e.g. optimizer.state_dict()) into (tensors, JSON skeleton).

    Tensors are replaced by {"__tensor__": name}; tuples by {"__tuple__": [...]}; dicts with
    non-string keys (the optimizer's integer parameter ids) by {"__dict__": [[key, value], ...]}.
    Lists, str-keyed dicts, str, int, float, bool and None stay as they are. Names are the
    dotted paths ("state.0.exp_avg"). `unflatten_state` inverts it exactly (types included).
    """
    tensors: dict[str, Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, Tensor):
            name = path or "tensor"
            while name in tensors:
                name += "_"
            tensors[name] = x
            return {_TENSOR: name}
        if isinstance(x, tuple):
            return {_TUPLE: [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(x)]
        if isinstance(x, dict):
            plain = all(isinstance(k, str) and not k.startswith("__") for k in x)
            for k in x:
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise TypeError(f"cannot store dict key {k!r} ({type(k).__name__}) at {path or '<root>'}")
            items = [(k, walk(v, f"{path}.{k}" if path else str(k))) for k, v in x.items()]
            return dict(items) if plain else {_DICT: [list(kv) for kv in items]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store {type(x).__name__} at {path or '<root>'} in a checkpoint")

    return tensors, walk(obj, "")


def unflatten_state(tensors: dict[str, Tensor], skeleton: Any) -> Any:
    """Inverse of `flatten_state`."""

    def walk(x: Any) -> Any:
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            if set(x) == {_TENSOR}:
                return tensors[x[_TENSOR]]
            if set(x) == {_TUPLE}:
                return tuple(walk(v) for v in x[_TUPLE])
            if set(x) == {_DICT}:
                return {k: walk(v) for k, v in x[_DICT]}
            return {k: walk(v) for k, v in x.items()}
        return x

    return walk(skeleton)


# --------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The global RNG states: torch CPU (uint8 tensor), CUDA (one per device), Python, NumPy.

    The result goes through `flatten_state` into a checkpoint.
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states from `rng_state` (CUDA states only where devices exist)."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)
