"""The IQPIR networks: stage-1 VQ autoencoder, stage-2 restorer, PatchGAN discriminator.

Builders take a `ModelConfig`; `ARCHS` maps the architecture names stored in checkpoints to
them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from iqpir.config import ModelConfig
from iqpir.models.discriminator import PatchDiscriminator
from iqpir.models.embedding import QualityEmbedding, check_quality
from iqpir.models.quantizer import (
    DualCodebookQuantizer,
    DualQuantizerOutput,
    QuantizerOutput,
    VectorQuantizer,
)
from iqpir.models.restorer import Restorer, RestorerOutput
from iqpir.models.transformer import CodeTransformer
from iqpir.models.vqgan import CodeTargets, Decoder, Encoder, VQAutoEncoder, VQAutoEncoderOutput

__all__ = [
    "ARCHS",
    "CodeTargets",
    "CodeTransformer",
    "Decoder",
    "DualCodebookQuantizer",
    "DualQuantizerOutput",
    "Encoder",
    "PatchDiscriminator",
    "QualityEmbedding",
    "QuantizerOutput",
    "Restorer",
    "RestorerOutput",
    "VQAutoEncoder",
    "VQAutoEncoderOutput",
    "VectorQuantizer",
    "build_discriminator",
    "build_restorer",
    "build_vqgan",
    "check_quality",
    "parameter_counts",
]


def build_vqgan(cfg: ModelConfig) -> VQAutoEncoder:
    """Stage-1 dual-codebook VQ autoencoder."""
    return VQAutoEncoder(cfg)


def build_restorer(cfg: ModelConfig) -> Restorer:
    """Stage-2 quality-conditioned restorer (the inference network)."""
    return Restorer(cfg)


def build_discriminator(cfg: ModelConfig) -> PatchDiscriminator:
    """Stage-1 PatchGAN discriminator (GroupNorm; see discriminator.py)."""
    return PatchDiscriminator(channels=cfg.disc_channels, layers=cfg.disc_layers)


ARCHS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "vqgan": build_vqgan,
    "restorer": build_restorer,
    "discriminator": build_discriminator,
}


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts per module of the restorer (and the discriminator, separately).

    `total_params` is the inference network: encoder + quality embedding + Transformer +
    heads + both codebooks + decoder + CFT blocks (CodeFormer's, when configured). `vqgan_params` is the stage-1 network (encoder,
    codebooks, decoder); `stage2_trainable` what stage 2 trains (encoder, embedding,
    Transformer, heads). The networks are built on the meta device: no memory, no init cost.
    """
    with torch.device("meta"):
        restorer = Restorer(cfg)
        disc = build_discriminator(cfg)
    t = restorer.transformer
    counts = {
        "encoder": _count(restorer.encoder),
        "quality_embedding": _count(restorer.quality_embedding),
        "transformer": _count(t) - _count(t.head_common) - _count(t.head_hq),
        "heads": _count(t.head_common) + _count(t.head_hq),
        "codebook_common": _count(restorer.quantizer.common),
        "codebook_hq": _count(restorer.quantizer.hq),
        "decoder": _count(restorer.decoder),
        "cft": _count(restorer.cft),
    }
    counts["total_params"] = sum(counts.values())
    counts["vqgan_params"] = (
        counts["encoder"] + counts["codebook_common"] + counts["codebook_hq"] + counts["decoder"]
    )
    counts["stage2_trainable"] = (
        counts["encoder"] + counts["quality_embedding"] + counts["transformer"] + counts["heads"]
    )
    counts["discriminator"] = _count(disc)
    return counts
