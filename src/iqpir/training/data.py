"""Training data for the loop: the quality table and the dataset of a run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from iqpir import config as C
from iqpir.training import distributed as D

if TYPE_CHECKING:
    from iqpir.iqa.table import ScoreTable

SCORES_FILE = "scores.csv"


def quality_table(cfg: C.RunConfig, data: Path, lq_data, run_dir: Path, scores, info: D.DistInfo) -> ScoreTable:
    """The score table of the run: `.quality` is S of every training image, keyed by resolved path.

    `scores` (a table from `iqpir score`) wins; else the run's own `scores.csv` (kept from an
    earlier start of this run); else rank 0 scores `data` once with `cfg.iqa` and keeps the
    table in the run folder, so that training, the loss and inference share its constants.
    """
    from iqpir.iqa.table import read_score_table, score_files

    if scores is not None:
        path = Path(scores)
        if not path.is_file():
            raise FileNotFoundError(f"--scores: no such file: {path}")
    else:
        path = run_dir / SCORES_FILE
        if info.is_main:
            print(f"iqpir train: scoring {data} with {','.join(cfg.iqa.metrics)} -> {path}", file=sys.stderr)
            report = score_files(
                [str(data)],
                metrics=cfg.iqa.metrics,
                out=str(path),
                normalization=cfg.iqa.normalization,
                device=str(info.device),
                weights_dir=cfg.iqa.weights_dir or None,
            )
            if report.failed:
                print(f"iqpir train: {len(report.failed)} training images could not be scored; they are left out",
                      file=sys.stderr)
        D.barrier(info)
    return read_score_table(path)


def build_dataset(cfg: C.RunConfig, data: Path, lq_data, quality: dict[str, float]):
    """HQ folder with on-the-fly degradation, or real LQ/HQ pairs when `lq_data` is given."""
    from iqpir.data import HQFolderDataset, PairedFolderDataset

    if lq_data is not None:
        return PairedFolderDataset(
            lq_root=lq_data, hq_root=data, size=cfg.model.image_size, mode=cfg.data.mode,
            hflip=cfg.data.hflip, quality=quality, seed=cfg.train.seed,
        )
    stage2 = cfg.train.stage == 2  # stage 1 reconstructs HQ images: no degradation to pay for
    return HQFolderDataset(
        root=data, size=cfg.model.image_size, mode=cfg.data.mode, hflip=cfg.data.hflip,
        degradation=cfg.data.degradation if stage2 else None,
        preset=cfg.data.degradation.preset if stage2 else None, quality=quality, seed=cfg.train.seed,
    )
