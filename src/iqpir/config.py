"""Typed configuration: dataclasses hold every setting with the paper's default.

YAML files only override the defaults. Loading is strict: unknown keys, duplicated keys and
values of the wrong type are errors that name the dotted key. `--set section.key=value`
overrides on the command line go through the same checks.

A YAML file may start from a preset (`preset: tiny`); the defaults are the `paper` preset
(IQPIR section 4 / the official configs: 512x512 input, 16x16x256 latent, two 1024x256
codebooks, a 9-layer width-512 Transformer).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, duplicated or has the wrong type or value."""


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass
class TransformerConfig:
    """Code-prediction Transformer T (paper 3.2; CodeFormer's sizes)."""

    layers: int = 9
    width: int = 512
    heads: int = 8
    mlp: int = 1024
    dropout: float = 0.0


@dataclass
class UNetConfig:
    """The quality-conditioned U-Net of model.arch=conditioned_unet: the arguments of
    ``iqpir.plugin.conditioned_unet`` (the packaged default model's network)."""

    channels: int = 24
    levels: int = 4
    unshuffle: int = 2
    embedding: Literal["binned", "continuous"] = "continuous"


@dataclass
class ModelConfig:
    """Networks of stage 1 (dual-codebook VQ autoencoder) and stage 2 (restorer), or a U-Net."""

    # "iqpir": the paper's two-stage network (the fields below); "conditioned_unet": the
    # plug-and-play route of paper 4.3 (`unet`), trained in one stage by
    # iqpir.training.default_model; of the fields below it uses image_size (its training crop).
    arch: Literal["iqpir", "conditioned_unet"] = "iqpir"
    unet: UNetConfig = field(default_factory=UNetConfig)
    image_size: int = 512  # training crop / aligned-face size; restore tiles at this size
    base_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4, 4, 8])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    latent_channels: int = 256
    # GroupNorm before the last conv of the encoder (-> Z) and of the decoder (-> image), as in
    # VQGAN/CodeFormer (official). With few channels per group (the tiny preset's 32-64 channels
    # in 32 groups) it removes each crop's mean and contrast per channel at the latent and at the
    # output, and a small autoencoder then learns absolute colour very slowly: off in tiny.
    final_norm: bool = True
    codebook_size: int = 1024
    dual_codebook: bool = True  # False: the single-codebook ablation (Table 5 a/b)
    hq_threshold: float = 0.70  # S_thr (official): HQ+ branch used when S > S_thr
    alpha: float = 0.8  # fusion weight Zq = Zq1 + alpha * Zq2 (official)
    beta: float = 0.25  # VQ commitment weight (VQ-VAE)
    # Where beta goes: "commitment" -> ||sg(z_q) - z||^2 * beta + ||z_q - sg(z)||^2 (VQ-VAE paper,
    # taming's legacy=False); "codebook" -> ||sg(z_q) - z||^2 + beta * ||z_q - sg(z)||^2 (official:
    # the code of taming's legacy quantizer that CodeFormer and IQPIR inherit, which disagrees
    # with its comment). The tiny preset keeps "commitment".
    beta_on: Literal["commitment", "codebook"] = "codebook"
    # How the codes learn (iqpir.models.quantizer): "loss" (official: the gradient of the codebook
    # term) or "ema" (moving averages of the encoder outputs assigned to each code, decay
    # codebook_decay); codebook_restart > 0 moves a code whose moving average of assignments
    # falls below that fraction of the mean onto an encoder output of the batch (0 = off, official).
    codebook_update: Literal["loss", "ema"] = "loss"
    codebook_decay: float = 0.99
    codebook_restart: float = 0.0
    quality_embedding: Literal["binned", "continuous", "none"] = "binned"
    quality_bins: int = 10  # official: floor(10 * S), S = 1.0 clamped into the top bin
    fourier_features: int = 16  # continuous embedding: sin/cos pairs of S
    # Gradient through the discrete lookup in stage 2: "straight_through" (official; reaches E and
    # the embedding) or "soft" (softmax-weighted codebook; reaches T's logits as well).
    gradient_path: Literal["straight_through", "soft"] = "straight_through"
    soft_temperature: float = 1.0
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    # Initialisation of the stage-2 additions: "official" (PyTorch defaults for the Transformer,
    # zero position embedding, N(0, 1) quality maps, as CodeFormer/IQPIR) or "small" (N(0, 0.02)).
    init: Literal["official", "small"] = "official"
    # CodeFormer's controllable feature transformation (CFT): decoder resolutions that fuse encoder
    # features with fidelity weight w (official: 32, 64, 128, 256; skipped entirely at w = 0).
    cft_resolutions: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    # Official inference re-normalises the looked-up code features to the channel statistics of the
    # (quality-conditioned) encoder features (AdaIN) before decoding: on for official weights.
    adain: bool = False
    # What the network restores: "faces" (aligned 512x512 faces: `restore --faces`) or "general"
    # (any photo, through tiles).
    task: Literal["faces", "general"] = "faces"
    disc_channels: int = 64
    disc_layers: int = 4

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.channel_mult) - 1)


@dataclass
class BFRDegradation:
    """CodeFormer stage-II degradation (blind face restoration)."""

    kernel_size: int = 41
    blur_sigma: list[float] = field(default_factory=lambda: [1.0, 15.0])
    downsample: list[float] = field(default_factory=lambda: [4.0, 30.0])
    noise: list[float] = field(default_factory=lambda: [0.0, 20.0])  # sigma in /255 units
    jpeg_quality: list[int] = field(default_factory=lambda: [30, 80])


@dataclass
class LowLightDegradation:
    """Exposure / gamma darkening with shot and read noise."""

    exposure: list[float] = field(default_factory=lambda: [0.05, 0.3])  # multiplicative gain
    gamma: list[float] = field(default_factory=lambda: [1.0, 2.0])
    shot_noise: list[float] = field(default_factory=lambda: [0.0005, 0.005])  # Poisson-like variance per unit signal
    read_noise: list[float] = field(default_factory=lambda: [0.002, 0.02])  # Gaussian sigma


@dataclass
class UnderwaterDegradation:
    """Underwater image formation: I = J * t + B * (1 - t), t = exp(-beta_c * d)."""

    depth: list[float] = field(default_factory=lambda: [1.0, 6.0])  # metres
    # attenuation coefficients (1/m) for R, G, B; red is absorbed fastest
    beta_red: list[float] = field(default_factory=lambda: [0.3, 0.6])
    beta_green: list[float] = field(default_factory=lambda: [0.05, 0.15])
    beta_blue: list[float] = field(default_factory=lambda: [0.03, 0.12])
    # relative change of the depth across the image along a random direction (0 = flat scene)
    depth_gradient: list[float] = field(default_factory=lambda: [0.0, 0.5])
    backscatter: list[float] = field(default_factory=lambda: [0.2, 0.6])  # veiling-light brightness
    # colour of the veiling light (times backscatter): blue-green, little red
    veil_red: list[float] = field(default_factory=lambda: [0.05, 0.3])
    veil_green: list[float] = field(default_factory=lambda: [0.6, 1.0])
    veil_blue: list[float] = field(default_factory=lambda: [0.6, 1.0])


@dataclass
class BacklitDegradation:
    """A bright background with an under-exposed subject (tone curve over a smooth mask)."""

    subject_gain: list[float] = field(default_factory=lambda: [0.15, 0.45])
    background_gain: list[float] = field(default_factory=lambda: [1.1, 1.6])
    mask_smoothness: list[float] = field(default_factory=lambda: [0.1, 0.3])  # fraction of image size
    subject_size: list[float] = field(default_factory=lambda: [0.2, 0.4])  # blob semi-axes, fraction of the shorter side


@dataclass
class DegradationConfig:
    preset: Literal["bfr", "lowlight", "underwater", "backlit"] = "bfr"
    bfr: BFRDegradation = field(default_factory=BFRDegradation)
    lowlight: LowLightDegradation = field(default_factory=LowLightDegradation)
    underwater: UnderwaterDegradation = field(default_factory=UnderwaterDegradation)
    backlit: BacklitDegradation = field(default_factory=BacklitDegradation)


@dataclass
class DataConfig:
    # "crop": random crops of model.image_size (general images); "resize": whole image
    # resized to model.image_size (aligned faces, FFHQ).
    mode: Literal["crop", "resize"] = "resize"
    hflip: bool = True
    num_workers: int = 0
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    # The conditioned U-Net's recipe only: the fraction of training pairs whose input is the clean
    # crop itself and whose target is that crop at any S (drawn uniformly), so that an input
    # already better than the S asked for comes back unchanged instead of degraded to S.
    clean_inputs: float = 0.0


@dataclass
class IQAConfig:
    """Quality prior (paper 3.2, Eq. 4): S is the mean of the members' normalised scores."""

    metrics: list[str] = field(default_factory=lambda: ["niqe", "piqe"])
    normalization: Literal["fixed", "minmax"] = "fixed"
    # Differentiable members of the stage-2 quality loss (L_quality = 1 - Q(x_res)).
    loss_metrics: list[str] = field(default_factory=lambda: ["niqe_diff"])
    weights_dir: str = ""  # local weights for learned (pyiqa) models; "" = pyiqa's cache


@dataclass
class TrainConfig:
    stage: int = 1
    steps: int = 200_000
    batch_size: int = 4  # per device
    grad_accum: int = 1
    lr: float = 7e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine", "multistep"] = "cosine"
    warmup_steps: int = 0
    min_lr: float = 6e-5  # cosine floor (official stage 1: 7e-5 -> 6e-5)
    milestones: list[int] = field(default_factory=lambda: [400_000, 450_000])
    gamma: float = 0.5
    grad_clip: float = 0.0  # 0 = off
    ema_decay: float = 0.995  # 0 = no EMA
    # Arithmetic of the forward pass and the losses; the weights, gradients and optimiser states
    # stay float32 (master weights) either way. "bf16": bf16 autocast on any device; "auto": bf16
    # where iqpir.devices.native_bf16 says the device computes it natively (AVX512-BF16/AMX CPUs,
    # bf16-capable CUDA GPUs), else float32. float32 is the default: reproducible on every machine.
    precision: Literal["float32", "bf16", "auto"] = "float32"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 1000
    # Steps between held-out evaluations, for runs that have a held-out set (the default model's
    # recipe writes curve.jsonl); 0 = none.
    eval_every: int = 0
    keep_checkpoints: int = 2
    # Length of the cosine schedule in steps; 0 = train.steps. The official stage 1 anneals over
    # 1.6M iterations and its authors took the checkpoint at 200k.
    cosine_steps: int = 0
    # stage 1 (paper 3.1; the official recipe, docs/recipe.md; the tiny preset keeps the
    # small-run choices noted there)
    l1_weight: float = 1.0
    # Image range the L1 term is measured in: "signed" = [-1, 1] (official; twice the [0, 1] value
    # relative to the codebook terms), "unit" = [0, 1].
    l1_range: Literal["signed", "unit"] = "signed"
    perceptual_weight: float = 1.0  # needs local VGG/LPIPS weights; off with a message when absent
    # What LPIPS receives: "imagenet" = (x - ImageNet mean) / std (official: LPIPSLoss with
    # range_norm and use_input_norm), "lpips" = 2x - 1, the [-1, 1] range LPIPS documents.
    perceptual_input: Literal["imagenet", "lpips"] = "imagenet"
    gan_weight: float = 0.8  # scale of the adaptive GAN weight (official disc_weight)
    gan_weight_max: float = 1.0  # the adaptive weight is clamped to [0, this] before the scale (official)
    # The GAN and the discriminator train at iterations (counted from 1) strictly greater than
    # this (official net_d_start_iter: 30001, so from iteration 30002).
    gan_start_step: int = 30_001
    disc_lr: float = 7e-5
    codebook_weight: float = 1.0
    # Extra factor on the HQ+ codebook's loss. Official (the released code): 1.0; the authors'
    # 2024 research commits used alpha (0.8) here.
    hq_codebook_weight: float = 1.0
    # Codebook start: "uniform" = U(-1/K, 1/K) as constructed (official); "first_batch" = encoder
    # outputs of the first batch (tiny preset: no dead codes in short runs).
    codebook_init: Literal["uniform", "first_batch"] = "uniform"
    # stage 2 (paper Eq. 10)
    feat_weight: float = 1.0
    index_weight: float = 0.5
    quality_weight: float = 0.1
    # The quality loss is on from this iteration (counted from 1; official: current_iter >= 100000).
    quality_start_step: int = 100_000
    # CodeFormer's fidelity blocks (model.cft_resolutions) trained in stage 2 at this fidelity
    # weight w, with an L1 term (l1_weight, l1_range) between the image restored at w and the
    # ground truth (CodeFormer's stage III, Zhou et al. 2022, Sec. 3.4; IQPIR's released network
    # keeps these blocks, its paper trains no stage for them). 0 = official IQPIR stage 2: the
    # blocks stay frozen and unused. Restoring at --fidelity w then keeps more of the input.
    fidelity: float = 0.0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    iqa: IQAConfig = field(default_factory=IQAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        validate(self)


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------

# Overrides over the paper defaults. `tiny` makes a training step take well under a second
# on 2 CPU cores: 64x64 input, 16x16x64 latent, two 256x64 codebooks, a 2-layer Transformer.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "tiny": {
        "model": {
            "image_size": 64,
            "base_channels": 32,
            "channel_mult": [1, 2, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [16],
            "latent_channels": 64,
            "codebook_size": 256,
            "transformer": {"layers": 2, "width": 128, "heads": 4, "mlp": 256},
            "disc_channels": 32,
            "disc_layers": 2,
            "init": "small",
            "cft_resolutions": [],
            "task": "general",
            "beta_on": "commitment",
        },
        "data": {"mode": "crop"},
        "train": {
            # First-batch codebooks (no dead codes in short runs); L1, LPIPS input and beta
            # placement as before the official recipe was adopted (docs/recipe.md).
            "codebook_init": "first_batch",
            "l1_range": "unit",
            "perceptual_input": "lpips",
            "steps": 200,
            "batch_size": 4,
            "lr": 2e-4,
            "disc_lr": 2e-4,
            "lr_schedule": "constant",
            "gan_start_step": 100,
            "quality_start_step": 50,
            "ckpt_every": 100,
            "ema_decay": 0.0,
            "log_every": 10,
        },
    },
    # The packaged default model's recipe (iqpir.training.default_model): the conditioned U-Net
    # on 128-px patches, L1 to a target of known quality S, the input a fresh draw of a BFR
    # degradation wider than the evaluation's; Adam 5e-4, 200 warm-up steps, cosine to 2e-5.
    "default-model": {
        "model": {"arch": "conditioned_unet", "image_size": 128, "task": "general"},
        "data": {"degradation": {"preset": "bfr", "bfr": {
            "kernel_size": 21, "blur_sigma": [0.5, 3.5], "downsample": [1.0, 4.0], "noise": [0.0, 12.0],
            "jpeg_quality": [40, 90]}}},
        "train": {
            "steps": 20000,
            "batch_size": 8,
            "lr": 5e-4,
            "min_lr": 2e-5,
            "warmup_steps": 200,
            "lr_schedule": "cosine",
            "ema_decay": 0.0,
            "l1_range": "unit",
            "perceptual_weight": 0.0,
            "gan_weight": 0.0,
            "quality_weight": 0.0,
            "ckpt_every": 250,
            "log_every": 50,
            "eval_every": 1000,
        },
    },
}


def validate(cfg: RunConfig) -> None:
    """Cross-field rules that a type check cannot express."""
    if cfg.model.arch == "conditioned_unet":
        _validate_unet(cfg)
    else:
        _validate_iqpir_model(cfg.model)
        if cfg.data.clean_inputs:
            raise ConfigError("data.clean_inputs is a setting of the conditioned U-Net's recipe (model.arch="
                              "conditioned_unet); the IQPIR stages take their pairs from the data folders")
    if not 0.0 <= cfg.data.clean_inputs <= 1.0:
        raise ConfigError(f"data.clean_inputs={cfg.data.clean_inputs} must be in [0, 1]")
    t = cfg.train
    if t.stage not in (1, 2):
        raise ConfigError(f"train.stage={t.stage} must be 1 or 2")
    for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1")
    if t.eval_every < 0:
        raise ConfigError("train.eval_every must be >= 0 (0 = no evaluation)")
    if not 0.0 <= t.fidelity <= 1.0:
        raise ConfigError(f"train.fidelity={t.fidelity} must be in [0, 1]")
    if t.fidelity > 0 and not cfg.model.cft_resolutions:
        raise ConfigError("train.fidelity > 0 trains the CFT blocks: set model.cft_resolutions (e.g. [64])")
    if t.cosine_steps < 0:
        raise ConfigError("train.cosine_steps must be >= 0 (0 = train.steps)")
    if t.gan_weight_max < 0:
        raise ConfigError("train.gan_weight_max must be >= 0")
    if not cfg.iqa.metrics:
        raise ConfigError("iqa.metrics must name at least one metric")
    for key in ("betas",):
        if len(getattr(t, key)) != 2:
            raise ConfigError(f"train.{key} must have two values")


def _validate_iqpir_model(m: ModelConfig) -> None:
    if m.image_size % 2 ** (len(m.channel_mult) - 1):
        raise ConfigError(
            f"model.image_size={m.image_size} must be divisible by 2**(len(model.channel_mult)-1)"
        )
    if not 0.0 <= m.hq_threshold <= 1.0:
        raise ConfigError(f"model.hq_threshold={m.hq_threshold} must be in [0, 1]")
    if m.transformer.width % m.transformer.heads:
        raise ConfigError("model.transformer.width must be divisible by model.transformer.heads")
    if not 0.0 <= m.codebook_decay < 1.0:
        raise ConfigError(f"model.codebook_decay={m.codebook_decay} must be in [0, 1)")
    if m.codebook_restart < 0:
        raise ConfigError(f"model.codebook_restart={m.codebook_restart} must be >= 0 (0 = off)")
    if m.quality_bins < 1:
        raise ConfigError("model.quality_bins must be >= 1")
    sizes = [m.image_size // 2**i for i in range(len(m.channel_mult))]
    for r in m.cft_resolutions:
        if r not in sizes:
            raise ConfigError(f"model.cft_resolutions: {r} is not a decoder resolution ({sorted(sizes)})")


def _validate_unet(cfg: RunConfig) -> None:
    u = cfg.model.unet
    if u.levels < 2 or u.unshuffle < 1 or u.channels < 1:
        raise ConfigError(f"model.unet: levels >= 2, unshuffle >= 1 and channels >= 1 (got {u})")
    if cfg.train.stage != 1:
        raise ConfigError("model.arch=conditioned_unet trains in one stage: train.stage must be 1")
    if cfg.model.image_size < 1:
        raise ConfigError("model.image_size (the training patch) must be >= 1")


# --------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated within one mapping."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicated key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_value(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _merge(obj: Any, overrides: dict, prefix: str = "") -> None:
    """Apply a nested dict of overrides to dataclass `obj` in place, strictly."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _check_value(value, tp, dotted)
            _merge(getattr(obj, key), value, prefix=f"{dotted}.")
        else:
            setattr(obj, key, _check_value(value, tp, dotted))


def _deep_update(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# train.amp ("auto": bf16 on CUDA | "bf16" | "off") became train.precision; configs stored in
# earlier checkpoints and run folders still load.
_AMP_TO_PRECISION = {"auto": "auto", "bf16": "bf16", "off": "float32"}


def _legacy_keys(data: dict) -> dict:
    train = data.get("train")
    if isinstance(train, dict) and "amp" in train:
        train = dict(train)
        amp = train.pop("amp")
        if amp not in _AMP_TO_PRECISION:
            raise ConfigError(f"train.amp: {amp!r} is not one of {list(_AMP_TO_PRECISION)}")
        if "precision" not in train:
            warnings.warn("train.amp is now train.precision (float32 | bf16 | auto)", DeprecationWarning,
                          stacklevel=3)
            train["precision"] = _AMP_TO_PRECISION[amp]
        data["train"] = train
    return data


def from_dict(data: dict) -> RunConfig:
    """Build a RunConfig from a nested dict (an optional top-level `preset` key first)."""
    data = _legacy_keys(dict(data))
    preset = data.pop("preset", "paper")
    if preset not in PRESETS:
        raise ConfigError(f"preset: {preset!r} is not one of {sorted(PRESETS)}")
    cfg = RunConfig.__new__(RunConfig)
    for f in dataclasses.fields(RunConfig):
        setattr(cfg, f.name, f.default_factory())  # type: ignore[misc]
    _merge(cfg, _deep_update(PRESETS[preset], data))
    validate(cfg)
    return cfg


def from_preset(name: str) -> RunConfig:
    return from_dict({"preset": name})


def parse_yaml(text: str, source: str = "<string>") -> dict:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    return data


def parse_overrides(items: list[str]) -> dict:
    """['train.lr=2e-4', 'model.alpha=1'] -> nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is set twice")
        node[parts[-1]] = value
    return out


def load(path: str | Path | None = None, overrides: list[str] | None = None, preset: str | None = None) -> RunConfig:
    """Load a YAML file (or a preset), then apply dotted `overrides`."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = parse_yaml(p.read_text(), source=str(p))
    if preset is not None:
        if "preset" in data and data["preset"] != preset:
            raise ConfigError(f"preset given twice: {data['preset']!r} in the file and {preset!r}")
        data["preset"] = preset
    if overrides:
        data = _deep_update(data, parse_overrides(overrides))
    return from_dict(data)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
