"""Plug-and-play quality conditioning for any restoration network (paper 4.3, Tables 7-9).

The paper adds its quality prior to other restorers ("WaveFace+", "CIDNet+", ...): the
restorer is conditioned on the quality S of its training target, optionally trained with the
NR-IQA loss 1 - Q(x), and asked for S = 1 at test time. This module offers that for any
``nn.Module``:

    unet = UNet()                                            # or your own network
    model = QualityConditioned(unet, feature="bottleneck", channels=unet.feature_channels("bottleneck"))
    restored = model(lq, quality=1.0)                        # (B,3,H,W) -> network's output
    recipe = PluginRecipe(model, quality=QualityEnsemble(["niqe_diff"]), quality_weight=0.1)
    terms = recipe.losses(batch, step)                      # {"l1": ..., "quality": ...}

The contract (what is conditioned, and how)
-------------------------------------------
- ``feature`` is the dotted name of a submodule of ``network`` (as in
  ``network.named_modules()``). Its forward OUTPUT must be one tensor of shape
  (B, channels, h, w), with B the batch of ``lq``.
- A forward hook replaces that output by ``output + s(S)`` (paper Eq. 2, Z_l' = Z_l + s),
  every time the submodule runs inside ``QualityConditioned.forward``. Outside it (calling
  ``network`` directly) the hook does nothing, so the plain network stays usable.
- s(S) comes from :class:`iqpir.models.embedding.QualityEmbedding` (binned, official
  floor(10 S) bins, or continuous Fourier features -> MLP):
  * ``size=None`` (default): one learned C-vector per bin, broadcast over (h, w): works at any
    input size (a U-Net on whole photos) and is what a fully convolutional network needs;
  * ``size=k``: one learned (C, k, k) map per bin, as in the paper's restorer; when the
    feature map is not k x k (another input size) the map is resized bilinearly to (h, w).
- ``zero_init=True`` (default) starts the embedding at zero, so at initialisation the
  wrapped network computes exactly the plain network's function (the "+" variant starts
  from the baseline, and a pretrained network is not disturbed); the binned maps still get
  gradients from the first step. ``zero_init=False`` keeps QualityEmbedding's small random
  start (std 0.02), as the stage-2 restorer does.

Training recipe
---------------
:class:`PluginRecipe` maps a batch {"lq", "hq", "quality"} to named loss terms: ``l1`` to the
HQ image and, with a differentiable quality model, ``quality = 1 - Q(x_res)`` (paper Eq. 9,
weight 0.1 as in Eq. 10) from ``quality_start_step`` on. The network is conditioned on the
batch's S (the quality of the HQ target, from the score table), so at test time S = 1 asks
for the best quality it learnt (paper 3.2). A plain network (no wrapper) goes through the
same recipe without the condition: that is the baseline of the comparison. :func:`fit` is a
small deterministic loop over an ``iqpir.data`` dataset for the benchmarks; real projects
plug the recipe into their own trainer.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iqpir.iqa.base import quality_input
from iqpir.models.embedding import QualityEmbedding, check_quality

# --------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------


class QualityConditioned(nn.Module):
    """Wrap ``network`` so that ``s(S)`` is added to the output of its submodule ``feature``.

    Args:
        network: any restoration network, called as ``network(lq)``.
        feature: dotted submodule name whose output (B, channels, h, w) receives s(S).
        channels: C of that feature map.
        size: None (per-channel vector, any h, w) or k (a (C, k, k) map per bin, resized to
            (h, w) when needed).
        kind: "binned" | "continuous" (see QualityEmbedding).
        bins: bins (binned) or basis maps (continuous); the paper uses 10 bins.
        zero_init: start s(S) at zero (the wrapped network then equals the plain one).

    forward(lq, quality) -> whatever ``network(lq)`` returns, with the condition added.
    ``quality`` is a number or a (B,) tensor in [0, 1] (higher = better).
    """

    def __init__(self, network: nn.Module, feature: str | Sequence[str], channels: int | Sequence[int],
                 size: int | None = None, kind: str = "binned", bins: int = 10, zero_init: bool = True) -> None:
        super().__init__()
        if kind not in ("binned", "continuous"):
            raise ValueError(f"kind must be 'binned' or 'continuous', got {kind!r}")
        features = [feature] if isinstance(feature, str) else list(feature)
        widths = [channels] if isinstance(channels, int) else list(channels)
        if len(features) != len(widths) or not features:
            raise ValueError(f"give one channel count per feature: features {features}, channels {widths}")
        modules = dict(network.named_modules())
        for name in features:
            if name not in modules or name == "":
                close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
                hint = f"; did you mean {close}?" if close else ""
                raise ValueError(
                    f"feature {name!r} is not a submodule of {type(network).__name__}{hint} "
                    "(use a name from network.named_modules())")
        self.network = network
        self.features = features
        self.feature = features[0]
        self.channels = widths[0]
        self.size = size
        # One embedding per conditioned feature; the first keeps the name `embedding` (one-feature files).
        self.embedding = QualityEmbedding(kind=kind, bins=bins, channels=widths[0], size=size or 1)
        self.more_embeddings = nn.ModuleList(
            QualityEmbedding(kind=kind, bins=bins, channels=c, size=size or 1) for c in widths[1:])
        if zero_init:
            with torch.no_grad():
                for emb in self.embeddings():
                    emb.maps.zero_()
        self._condition: Tensor | None = None
        self._calls = 0
        self._hooks = [modules[name].register_forward_hook(functools.partial(self._add_condition, i))
                       for i, name in enumerate(features)]

    def embeddings(self) -> list[QualityEmbedding]:
        """The embeddings of ``features``, in order."""
        return [self.embedding, *self.more_embeddings]

    def condition(self, quality: Tensor | float, batch: int, height: int, width: int, index: int = 0) -> Tensor:
        """s(S) of feature ``index`` at a feature map of shape (batch, C, height, width)."""
        embedding = self.embeddings()[index]
        q = check_quality(quality, batch, device=embedding.maps.device)
        s = embedding(q)  # (B, C, k, k)
        if s.shape[-2:] != (height, width):
            if self.size is None:
                s = s.expand(-1, -1, height, width)
            else:
                s = F.interpolate(s, size=(height, width), mode="bilinear", align_corners=False)
        return s

    def _add_condition(self, index: int, module: nn.Module, args, output):
        if self._condition is None:
            return output  # the network called outside QualityConditioned.forward: unchanged
        name = self.features[index]
        if not isinstance(output, Tensor) or output.ndim != 4:
            raise TypeError(f"feature {name!r} must output one (B, C, h, w) tensor, got "
                            f"{type(output).__name__}{'' if not isinstance(output, Tensor) else tuple(output.shape)}")
        b, c, h, w = output.shape
        q = self._condition
        expected = self.embeddings()[index].channels
        if c != expected or b != q.shape[0]:
            raise ValueError(f"feature {name!r} output has shape {tuple(output.shape)}; the embedding "
                             f"expects ({q.shape[0]}, {expected}, h, w)")
        self._calls += 1
        return output + self.condition(q, b, h, w, index).to(output.dtype)

    def forward(self, lq: Tensor, quality: Tensor | float):
        self._condition = check_quality(quality, lq.shape[0], device=lq.device)
        self._calls = 0
        try:
            out = self.network(lq)
        finally:
            self._condition = None
        if self._calls < len(self.features):
            raise RuntimeError(f"a feature of {self.features} did not run in the network's forward; "
                               "the condition was not applied")
        return out


class _Block(nn.Sequential):
    """Two 3x3 convolutions with GroupNorm and SiLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU(),
        )


class UNet(nn.Module):
    """A small reference U-Net restorer: (B, 3, H, W) in [0, 1] -> (B, 3, H, W), residual output.

    ``levels`` resolutions with ``channels * 2**i`` channels; stride-2 convolutions down,
    nearest upsampling + conv up, skip connections by concatenation. Any H, W (reflect-padded
    to a multiple of 2**(levels-1) and cropped back). Named stages for conditioning:
    ``enc0..enc{L-2}``, ``bottleneck`` (C * 2**(L-1) channels at 1/2**(L-1) size),
    ``dec{L-2}..dec0``. The last conv starts at zero, so the untrained network is the identity.

    ``unshuffle=u`` > 1 runs the whole U-Net at 1/u of the input's resolution: pixel-unshuffle
    (space-to-depth, 3 u^2 channels) before the stem, pixel-shuffle after the head. At u = 2 it
    costs about a quarter of the FLOPs at the same widths (what CPU inference needs), and any
    H, W is padded to a multiple of u 2^(L-1).
    """

    def __init__(self, channels: int = 32, levels: int = 3, unshuffle: int = 1) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError("a U-Net needs at least 2 levels")
        if unshuffle < 1:
            raise ValueError(f"unshuffle must be >= 1, got {unshuffle}")
        self.levels = levels
        self.unshuffle = unshuffle
        widths = [channels * 2**i for i in range(levels)]
        pixels = 3 * unshuffle**2
        self.stem = nn.Conv2d(pixels, widths[0], 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i in range(levels - 1):
            self.encoders.append(_Block(widths[i], widths[i]))
            self.downs.append(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1))
        self.bottleneck = _Block(widths[-1], widths[-1])
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in reversed(range(levels - 1)):
            self.ups.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                          nn.Conv2d(widths[i + 1], widths[i], 3, padding=1)))
            self.decoders.append(_Block(2 * widths[i], widths[i]))
        self.head = nn.Conv2d(widths[0], pixels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self._widths = widths

    def feature_channels(self, name: str) -> int:
        """Channels of a named stage's output ("bottleneck", "encoders.0", "decoders.1", ...)."""
        if name == "bottleneck":
            return self._widths[-1]
        kind, _, idx = name.partition(".")
        if kind == "encoders":
            return self._widths[int(idx)]
        if kind == "decoders":
            return self._widths[self.levels - 2 - int(idx)]
        raise ValueError(f"unknown stage {name!r}: use bottleneck, encoders.i or decoders.i")

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        xp = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate") if ph or pw else x
        f = self.stem(F.pixel_unshuffle(xp, self.unshuffle) if self.unshuffle > 1 else xp)
        skips = []
        for enc, down in zip(self.encoders, self.downs):
            f = enc(f)
            skips.append(f)
            f = down(f)
        f = self.bottleneck(f)
        for up, dec in zip(self.ups, self.decoders):
            f = dec(torch.cat([up(f), skips.pop()], dim=1))
        r = self.head(f)
        if self.unshuffle > 1:
            r = F.pixel_shuffle(r, self.unshuffle)
        return (xp + r)[..., :h, :w]

    @property
    def multiple(self) -> int:
        """Inputs are padded to a multiple of this (and cropped back)."""
        return self.unshuffle * 2 ** (self.levels - 1)


def conditioned_unet(channels: int = 24, levels: int = 4, unshuffle: int = 2,
                     embedding: str = "continuous") -> QualityConditioned:
    """A UNet conditioned at its bottleneck and in every decoder block (the packaged default model).

    The condition goes to the bottleneck's output and to the first SiLU of each decoder block,
    whose output still passes a conv, GroupNorm and SiLU: a per-channel shift there changes what
    the block computes, where one added after a block's last SiLU would reach the linear head
    only as a constant offset of the image.
    """
    net = UNet(channels, levels, unshuffle=unshuffle)
    decoders = [f"decoders.{i}" for i in range(levels - 1)]
    features = ["bottleneck", *(f"{d}.2" for d in decoders)]
    widths = [net.feature_channels("bottleneck"), *(net.feature_channels(d) for d in decoders)]
    return QualityConditioned(net, features, widths, kind=embedding)


# --------------------------------------------------------------------------------------
# Training recipe (kept apart from the networks above)
# --------------------------------------------------------------------------------------


class PluginRecipe:
    """Batch -> named loss terms for a (possibly quality-conditioned) restoration network.

    Args:
        model: a QualityConditioned network (called with the batch's S) or a plain network
            (called on lq alone: the baseline).
        quality: a differentiable quality model (e.g. ``QualityEnsemble(["niqe_diff"])``,
            images (N,3,H,W) -> (N,) in [0, 1], higher = better) or None for no quality loss.
        l1_weight, quality_weight: term weights (paper Eq. 10 uses 0.1 for the quality term).
        quality_start_step: the quality term is 0 before this step (official warm-up).

    losses(batch, step) -> {"l1": ..., "quality": ...} ("quality" only with a quality model).
    """

    def __init__(self, model: nn.Module, quality: Callable[[Tensor], Tensor] | None = None,
                 l1_weight: float = 1.0, quality_weight: float = 0.1, quality_start_step: int = 0) -> None:
        self.model = model
        self.quality = quality
        if quality is not None and getattr(quality, "differentiable", True) is False:
            raise ValueError("the quality loss needs a differentiable quality model (e.g. niqe_diff)")
        self.conditioned = isinstance(model, QualityConditioned)
        self.l1_weight = l1_weight
        self.quality_weight = quality_weight
        self.quality_start_step = quality_start_step

    @property
    def loss_names(self) -> list[str]:
        """The names of the terms `losses` returns."""
        return ["l1"] + (["quality"] if self.quality is not None else [])

    def restore(self, lq: Tensor, quality: Tensor | float = 1.0) -> Tensor:
        return self.model(lq, quality) if self.conditioned else self.model(lq)

    def losses(self, batch: dict, step: int) -> dict[str, Tensor]:
        lq, hq = batch["lq"], batch["hq"]
        out = self.restore(lq, batch["quality"])
        terms = {"l1": self.l1_weight * (out - hq).abs().mean()}
        if self.quality is not None:
            if step >= self.quality_start_step:
                q = self.quality(quality_input(out.float().clamp(0, 1)))
                terms["quality"] = self.quality_weight * (1.0 - q).mean()
            else:
                terms["quality"] = out.new_zeros(())
        return terms


def fit(recipe: PluginRecipe, dataset, steps: int, batch_size: int = 4, lr: float = 2e-4, seed: int = 0,
        log: Callable[[int, dict[str, float]], None] | None = None, log_every: int = 50) -> list[dict[str, float]]:
    """Train ``recipe.model`` for ``steps`` Adam steps on ``dataset`` (an iqpir.data dataset).

    The training package's loop runs it (constant learning rate, betas (0.9, 0.99), one process,
    float32, nothing written): sample k of the run is item perm_epoch[k % n] with epoch_seed k,
    deterministic in seed. Returns one {term: value, "loss": total} dict per step; a non-finite
    loss raises RuntimeError.
    """
    from iqpir import config as C
    from iqpir.training.data import PlannedBatches
    from iqpir.training.loop import TrainOptions, run
    from iqpir.training.tasks import RecipeTask

    cfg = C.load(overrides=[f"train.steps={steps}", f"train.batch_size={batch_size}", f"train.lr={lr}",
                            f"train.seed={seed}", "train.lr_schedule=constant", "train.ema_decay=0",
                            "train.betas=[0.9, 0.99]", "train.warmup_steps=0", "train.grad_accum=1"])
    history: list[dict[str, float]] = []

    def on_step(step: int, row: dict[str, float]) -> None:
        history.append({k: v for k, v in row.items() if k in recipe.loss_names} | {"loss": row["loss"]})
        if log is not None and (step % log_every == 0 or step == steps):
            log(step, history[-1])

    def setup(info):
        return RecipeTask(recipe), PlannedBatches(dataset, cfg, info)

    device = next(recipe.model.parameters()).device
    result = run(cfg, setup, None, TrainOptions(device=str(device), progress=False, on_step=on_step))
    recipe.model.eval()
    if not result.completed:
        raise RuntimeError(f"plugin.fit: {result.reason}")
    return history
