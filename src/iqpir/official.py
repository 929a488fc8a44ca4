"""The released IQPIR and CodeFormer weights: read them safely, map them onto iqpir's modules.

Three kinds of official files are recognised from their keys:

- "iqpir": IQPIR's network (github.com/fengyang1399-pixel/IQPIR): two codebooks (`quantize`,
  `quantize_aesthetic`), the score embedding `score_embed`, a 2K-wide head, CFT blocks;
- "codeformer": CodeFormer's network (github.com/sczhou/CodeFormer, `codeformer.pth`): one
  codebook, a K-wide head, CFT blocks;
- "vqgan": a stage-1 autoencoder (`vqgan_code1024.pth`): encoder, quantizer(s), generator only.

Releases store the state dict as {"params_ema": ...} or {"params": ...} (preferred in that
order) or bare. Files are read with `torch.load(weights_only=True)`: a file that needs code to
unpickle is refused, never run. The architecture is the same code as iqpir's own networks
(DESIGN.md), so the mapping below is a renaming, plus three layout changes:

- attention q, k, v 1x1 convs (official) <-> one fused `qkv` conv (rows [q; k; v]);
- the IQPIR head's (2K, width) matrix read per token as (K, 2) <-> `head_hq` = rows 0::2 and
  `head_common` = rows 1::2;
- the score embedding (bins, C*h*w) <-> quality maps (bins, C, h, w) (same memory order).

The weights are the authors' and carry their licence (S-Lab License 1.0: non-commercial use);
iqpir records it with every converted file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from iqpir import config as C
from iqpir import models
from iqpir.checkpoint import (
    checkpoint_stem,
    list_checkpoints,
    read_pickled_tensors,
    save_checkpoint,
)
from iqpir.io import atomic_write_text

LICENCE_NOTE = (
    "S-Lab License 1.0 (NTU): the released IQPIR and CodeFormer weights are for non-commercial use "
    "only; see the LICENSE of github.com/sczhou/CodeFormer and github.com/fengyang1399-pixel/IQPIR"
)
KINDS = ("iqpir", "codeformer", "vqgan")
OFFICIAL_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
WEIGHT_KEYS = ("params_ema", "params")

# Official stage-2 sizes that the keys do not reveal (CodeFormer's constructor defaults).
OFFICIAL_HEADS = 8
OFFICIAL_ALPHA = 0.8  # IQPIR's aesthetic_weight in the paper and the authors' runs


class OfficialCheckpointError(ValueError):
    """An official weights file that iqpir cannot use; the message is one line naming the file."""


@dataclass
class OfficialWeights:
    """A recognised official file: its kind, the state dict in official keys, and provenance."""

    kind: str
    state: dict[str, Tensor]
    group: str  # "params_ema" | "params" | "" (a bare state dict)
    path: Path

    def sha256(self) -> str:
        h = hashlib.sha256()
        with self.path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


def is_official_file(path: str | Path) -> bool:
    """True for a file with a PyTorch-pickle suffix (.pth, .pt, .ckpt, .bin)."""
    p = Path(path)
    return p.suffix.lower() in OFFICIAL_SUFFIXES and not p.is_dir()


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.strip().rstrip(".")
    return text.splitlines()[0].strip().rstrip(".") if text else type(exc).__name__


def read_official(path: str | Path) -> OfficialWeights:
    """Load an official .pth safely and recognise its kind (see the module docstring)."""
    state, group = read_state(path)
    return OfficialWeights(detect_kind(state, path), state, group, Path(path))


def read_state(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """A PyTorch weights file's state dict, read safely (weights_only: no code runs), and the group
    it came from ('params_ema', 'params', ... or '' for a bare state dict)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {p}")
    try:
        obj = read_pickled_tensors(p)
    except Exception as exc:  # noqa: BLE001 - every reason maps to one line naming the file
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise OfficialCheckpointError(
                f"{p}: refused: the file needs code to unpickle ({_one_line(exc)}); iqpir loads only "
                "plain tensors (torch.load weights_only=True)"
            ) from None
        raise OfficialCheckpointError(f"{p}: not a readable PyTorch weights file ({_one_line(exc)})") from None
    return _state_dict(obj, p)


def _state_dict(obj, path: Path) -> tuple[dict[str, Tensor], str]:
    if isinstance(obj, dict):
        for key in WEIGHT_KEYS:
            if key in obj and isinstance(obj[key], dict):
                state, group = obj[key], key
                break
        else:
            state, group = obj, ""
        bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
        if not bad:
            return dict(state), group
        raise OfficialCheckpointError(
            f"{path}: no state dict found: expected 'params_ema', 'params' or tensors, got entry {bad[0]!r} "
            f"({type(state[bad[0]]).__name__})"
        )
    raise OfficialCheckpointError(f"{path}: no state dict found (the file holds a {type(obj).__name__})")


def detect_kind(state: dict[str, Tensor], path: str | Path = "<state dict>") -> str:
    """'iqpir' | 'codeformer' | 'vqgan' from the keys; OfficialCheckpointError otherwise."""
    has = lambda prefix: any(k.startswith(prefix) for k in state)  # noqa: E731
    if not (has("encoder.blocks.") and has("generator.blocks.") and "quantize.embedding.weight" in state):
        raise OfficialCheckpointError(
            f"{path}: not an IQPIR, CodeFormer or VQGAN state dict (no encoder.blocks / quantize.embedding / "
            "generator.blocks keys)"
        )
    if not has("ft_layers."):
        return "vqgan"
    return "iqpir" if "quantize_aesthetic.embedding.weight" in state or "score_embed.weight" in state else "codeformer"


# --------------------------------------------------------------------------------------
# The configuration an official file implies
# --------------------------------------------------------------------------------------


def official_config(kind: str, state: dict[str, Tensor]) -> C.RunConfig:
    """The iqpir config of an official network: the paper preset with the file's sizes.

    Sizes the keys reveal (codebook, latent width, Transformer width/depth/MLP, quality bins,
    CFT resolutions) come from the tensors; the rest is the official architecture, and the
    one-to-one key and shape check of `to_project` catches any file that differs.
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {list(KINDS)}")
    codebook = state["quantize.embedding.weight"]
    model: dict = {
        "codebook_size": int(codebook.shape[0]),
        "latent_channels": int(codebook.shape[1]),
        "dual_codebook": "quantize_aesthetic.embedding.weight" in state,
        "alpha": OFFICIAL_ALPHA,
        "task": "faces",
        "init": "official",
        "adain": kind != "vqgan",
        "cft_resolutions": sorted({int(m.group(1)) for k in state if (m := re.match(r"fuse_convs_dict\.(\d+)\.", k))}),
    }
    if kind != "vqgan":
        layers = {int(m.group(1)) for k in state if (m := re.match(r"ft_layers\.(\d+)\.", k))}
        width = int(state["feat_emb.weight"].shape[0])
        model["transformer"] = {
            "layers": max(layers) + 1,
            "width": width,
            "heads": OFFICIAL_HEADS,
            "mlp": int(state["ft_layers.0.linear1.weight"].shape[0]),
        }
        model["quality_embedding"] = "binned" if "score_embed.weight" in state else "none"
        if "score_embed.weight" in state:
            model["quality_bins"] = int(state["score_embed.weight"].shape[0])
    return C.from_dict({"preset": "paper", "model": model, "train": {"stage": 1 if kind == "vqgan" else 2}})


# --------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------

_RES_RENAME = {"conv_out": "skip", "proj_out": "proj"}
# Tensors that only change their name (official -> iqpir).
_RENAME = {
    "quantize.embedding.weight": "quantizer.common.codebook",
    "quantize_aesthetic.embedding.weight": "quantizer.hq.codebook",
    "position_emb": "transformer.pos_emb",
    "feat_emb.weight": "transformer.proj_in.weight",
    "feat_emb.bias": "transformer.proj_in.bias",
    "idx_pred_layer.0.weight": "transformer.norm_out.weight",
    "idx_pred_layer.0.bias": "transformer.norm_out.bias",
}
_LAYER_RENAME = {
    "self_attn.in_proj_weight": "attn.qkv.weight",
    "self_attn.in_proj_bias": "attn.qkv.bias",
    "self_attn.out_proj.weight": "attn.proj.weight",
    "self_attn.out_proj.bias": "attn.proj.bias",
    "linear1.weight": "mlp.0.weight",
    "linear1.bias": "mlp.0.bias",
    "linear2.weight": "mlp.3.weight",
    "linear2.bias": "mlp.3.bias",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
}


def _count_blocks(state: dict[str, Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _conv_stack_key(rest: str, index: int, n: int, ours: str) -> str:
    """official `{encoder|generator}.blocks.{index}.{rest}` -> ours (`ours` = encoder|decoder)."""
    if index == 0:
        return f"{ours}.conv_in.{rest}"
    if index == n - 2:
        return f"{ours}.norm_out.{rest}"
    if index == n - 1:
        return f"{ours}.conv_out.{rest}"
    head, _, leaf = rest.rpartition(".")
    head = _RES_RENAME.get(head, head)
    return f"{ours}.blocks.{index - 1}.{head + '.' if head else ''}{leaf}"


def to_project(state: dict[str, Tensor], kind: str, origins: dict[str, str] | None = None) -> dict[str, Tensor]:
    """Official state dict -> iqpir's (Restorer for iqpir/codeformer, VQAutoEncoder for vqgan).

    Keys iqpir does not know are kept under their own names, so that the strict check reports
    them. `origins`, when given, is filled with {iqpir key: official key(s)} for messages.
    """
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {} if origins is None else origins
    n_enc, n_gen = _count_blocks(state, "encoder.blocks."), _count_blocks(state, "generator.blocks.")
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, t in state.items():
        before = set(out)
        if m := re.match(r"(encoder|generator)\.blocks\.(\d+)\.(.+)$", key):
            part, index, rest = m.group(1), int(m.group(2)), m.group(3)
            ours = "encoder" if part == "encoder" else "decoder"
            n = n_enc if part == "encoder" else n_gen
            if re.match(r"[qkv]\.(weight|bias)$", rest):
                fused = f"{ours}.blocks.{index - 1}.qkv.{rest[2:]}"
                qkv.setdefault(fused, {})[rest[0]] = t
                origin[fused] = f"{part}.blocks.{index}.{{q,k,v}}.{rest[2:]}"
                continue
            out[_conv_stack_key(rest, index, n, ours)] = t
        elif key in _RENAME:
            out[_RENAME[key]] = t
        elif key == "score_embed.weight":
            lat = int(state["quantize.embedding.weight"].shape[1])
            side = int(round((t.shape[1] // lat) ** 0.5))
            out["quality_embedding.maps"] = t.reshape(t.shape[0], lat, side, side)
        elif (m := re.match(r"ft_layers\.(\d+)\.(.+)$", key)) and m.group(2) in _LAYER_RENAME:
            out[f"transformer.layers.{m.group(1)}.{_LAYER_RENAME[m.group(2)]}"] = t
        elif key == "idx_pred_layer.1.weight":
            if "quantize_aesthetic.embedding.weight" in state:
                out["transformer.head_hq.weight"] = t[0::2]
                out["transformer.head_common.weight"] = t[1::2]
            else:
                out["transformer.head_common.weight"] = t
        elif m := re.match(r"fuse_convs_dict\.(\d+)\.encode_enc\.(.+)$", key):
            head, _, leaf = m.group(2).rpartition(".")
            out[f"cft.blocks.{m.group(1)}.encode.{_RES_RENAME.get(head, head)}.{leaf}"] = t
        elif m := re.match(r"fuse_convs_dict\.(\d+)\.((?:scale|shift)\.\d+\.(?:weight|bias))$", key):
            out[f"cft.blocks.{m.group(1)}.{m.group(2)}"] = t
        else:
            out[key] = t
        for new in set(out) - before:
            origin[new] = key
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise OfficialCheckpointError(f"missing key(s) {', '.join(origin[key].replace('{q,k,v}', m) for m in missing)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def from_project(state: dict[str, Tensor], kind: str, n_blocks: int) -> dict[str, Tensor]:
    """iqpir state dict -> official keys (the inverse of `to_project`; `n_blocks` is the
    official length of encoder.blocks, e.g. 25 at the paper size)."""
    inv_layer = {v: k for k, v in _LAYER_RENAME.items()}
    inv_res = {v: k for k, v in _RES_RENAME.items()}
    inv_rename = {v: k for k, v in _RENAME.items()}
    out: dict[str, Tensor] = {}
    heads: dict[str, Tensor] = {}
    for key, t in state.items():
        if m := re.match(r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(weight|bias)$", key):
            part = "encoder" if m.group(1) == "encoder" else "generator"
            index = {"conv_in": 0, "norm_out": n_blocks - 2, "conv_out": n_blocks - 1}[m.group(2)]
            out[f"{part}.blocks.{index}.{m.group(3)}"] = t
        elif m := re.match(r"(encoder|decoder)\.blocks\.(\d+)\.(.+)$", key):
            part = "encoder" if m.group(1) == "encoder" else "generator"
            index, rest = int(m.group(2)) + 1, m.group(3)
            if rest.startswith("qkv."):
                for name, chunk in zip("qkv", t.chunk(3, dim=0)):
                    out[f"{part}.blocks.{index}.{name}.{rest[4:]}"] = chunk
                continue
            head, _, leaf = rest.rpartition(".")
            out[f"{part}.blocks.{index}.{inv_res.get(head, head) + '.' if head else ''}{leaf}"] = t
        elif key in inv_rename:
            out[inv_rename[key]] = t
        elif key == "quality_embedding.maps":
            out["score_embed.weight"] = t.reshape(t.shape[0], -1)
        elif (m := re.match(r"transformer\.layers\.(\d+)\.(.+)$", key)) and m.group(2) in inv_layer:
            out[f"ft_layers.{m.group(1)}.{inv_layer[m.group(2)]}"] = t
        elif m := re.match(r"transformer\.head_(hq|common)\.weight$", key):
            heads[m.group(1)] = t
        elif m := re.match(r"cft\.blocks\.(\d+)\.encode\.(.+)$", key):
            head, _, leaf = m.group(2).rpartition(".")
            out[f"fuse_convs_dict.{m.group(1)}.encode_enc.{inv_res.get(head, head)}.{leaf}"] = t
        elif m := re.match(r"cft\.blocks\.(\d+)\.(.+)$", key):
            out[f"fuse_convs_dict.{m.group(1)}.{m.group(2)}"] = t
        else:
            out[key] = t
    if "hq" in heads:
        out["idx_pred_layer.1.weight"] = torch.stack([heads["hq"], heads["common"]], dim=1).flatten(0, 1)
    elif "common" in heads:
        out["idx_pred_layer.1.weight"] = heads["common"]
    return out


# --------------------------------------------------------------------------------------
# Building the network
# --------------------------------------------------------------------------------------


def check_state(
    model: nn.Module,
    state: dict[str, Tensor],
    source: str | Path,
    origins: dict[str, str] | None = None,
    file_name: Callable[[str, Tensor], str] | None = None,
) -> None:
    """What load_state_dict(strict=True) checks, as one line naming the first offending key
    in the file's own names: an unexpected key (with its shape), a missing key, a wrong shape.
    `origins` maps a mapped key back to the file's key, `file_name(key, tensor)` names a
    missing one. Works on meta modules."""
    own = model.state_dict()
    name = (origins or {}).get
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if unexpected:
        k = unexpected[0]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise OfficialCheckpointError(
            f"{source}: unexpected key {name(k, k)!r} with shape {tuple(state[k].shape)}{more}"
        )
    if missing:
        k = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        label = file_name(k, own[k]) if file_name else k
        raise OfficialCheckpointError(f"{source}: missing key {label!r} (expected shape {tuple(own[k].shape)}){more}")
    for k, t in own.items():
        if state[k].shape != t.shape:
            alias = f" (iqpir's {k!r})" if name(k, k) != k else ""
            raise OfficialCheckpointError(
                f"{source}: wrong shape for {name(k, k)!r}{alias}: {tuple(state[k].shape)} in the file, "
                f"{tuple(t.shape)} expected"
            )


def build_official(weights: OfficialWeights) -> tuple[nn.Module, C.RunConfig]:
    """-> (network in eval mode with the file's weights, its iqpir config)."""
    try:
        cfg = official_config(weights.kind, weights.state)
    except (KeyError, IndexError, C.ConfigError) as exc:
        raise OfficialCheckpointError(f"{weights.path}: an unsupported {weights.kind} layout ({exc})") from None
    with torch.device("meta"):
        model = models.build_vqgan(cfg.model) if weights.kind == "vqgan" else models.build_restorer(cfg.model)
    origins: dict[str, str] = {}
    try:
        state = to_project(weights.state, weights.kind, origins)
    except OfficialCheckpointError as exc:
        raise OfficialCheckpointError(f"{weights.path}: {exc}") from None
    # Keys and shapes are checked on the meta network, before any memory is spent.
    n_blocks = len(model.encoder.blocks) + 3  # + conv_in, norm_out, conv_out

    def file_name(key: str, t: Tensor) -> str:
        return ", ".join(from_project({key: t}, weights.kind, n_blocks))

    check_state(model, state, weights.path, origins, file_name)
    # The file's tensors become the parameters (assign=True), so the weights are held once, not
    # twice (the file's dict and a network copied from it: 2 x 376 MB at the paper size).
    own = model.state_dict()
    model.load_state_dict({k: _own_tensor(t, own[k]) for k, t in state.items()}, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # tensors no state dict holds
        raise OfficialCheckpointError(f"{weights.path}: the {weights.kind} network has tensors the file cannot fill")
    return model.eval(), cfg


def _own_tensor(t: Tensor, like: Tensor) -> Tensor:
    """`t` as a parameter like `like` (dtype, contiguous), owning its memory: views that share a
    storage (the IQPIR head's row slices) or a dtype the network does not use are copied."""
    t = t.to(like.dtype)
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def load_official(path: str | Path) -> tuple[nn.Module, C.RunConfig, OfficialWeights]:
    """Read, check and build an official file -> (model, config, the weights' provenance).

    The provenance's `state` is emptied: the network holds the file's tensors, and the few it
    does not (the q, k, v convs, fused into one) are released with it.
    """
    weights = read_official(path)
    model, cfg = build_official(weights)
    weights.state = {}
    return model, cfg, weights


def convert(path: str | Path, out: str | Path) -> Path:
    """Write an official file as an iqpir checkpoint folder `out` (safetensors + JSON, step 0).

    The folder works wherever a run folder does: `restore --checkpoint`, `train --init`
    (stage 2) or `train --stage1` (a converted VQGAN). The JSON records the source file's
    SHA-256, its kind and the weights' licence. An existing checkpoint is never overwritten.
    """
    out = Path(out)
    if out.exists() and list_checkpoints(out):
        raise FileExistsError(f"{out} already holds a checkpoint; choose another --out")
    model, cfg, weights = load_official(path)
    meta = {
        "arch": "vqgan" if weights.kind == "vqgan" else "restorer",
        "step": 0,
        "config": C.to_dict(cfg),
        "source": {
            "file": weights.path.name,
            "sha256": weights.sha256(),
            "kind": weights.kind,
            "weights": weights.group or "state_dict",
            "licence": LICENCE_NOTE,
        },
    }
    stem = save_checkpoint(checkpoint_stem(out, 0), {"model": model.state_dict()}, meta)
    atomic_write_text(out / "config.yaml", C.to_yaml(cfg))
    return stem

