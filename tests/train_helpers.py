"""Small training configs and run-folder readers shared by the training and DDP tests."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from iqpir import config as C
from iqpir.io import write_image

# 32x32 images, 8x8 latent: a loss evaluation takes milliseconds.
SMALL_MODEL = [
    "model.image_size=32",
    "model.base_channels=16",
    "model.latent_channels=32",
    "model.codebook_size=64",
    "model.transformer.width=32",
    "model.transformer.heads=2",
    "model.transformer.mlp=64",
    "model.disc_channels=16",
]
# ... and a training step a few tens of milliseconds on 2 cores.
SMALL = [
    *SMALL_MODEL,
    "train.batch_size=2",
    "train.log_every=1",
    "train.ckpt_every=100",
    "iqa.metrics=[piqe]",
]


def small_cfg(stage: int, *extra: str) -> C.RunConfig:
    return C.load(preset="tiny", overrides=[*SMALL, f"train.stage={stage}", *extra])


def write_train_images(root: Path) -> Path:
    """Six 96x96 synthetic photos: smooth gradients, edges and texture."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 96), indexing="ij")
    for i in range(6):
        base = torch.stack([xx * (i + 1) / 6, yy, (xx + yy) / 2])
        stripes = 0.2 * torch.sin((xx * 20 + yy * 7 * i) * 3.14)[None]
        img = (base + stripes + 0.05 * torch.rand(3, 96, 96, generator=g)).clamp(0, 1)
        write_image(root / f"img{i}.png", img)
    return root


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))
