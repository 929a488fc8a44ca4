"""Training data for the loop: the quality table and the dataset of a stage run, and the plan
of what goes into each step.

The plan: the k-th sample a run ever sees is the dataset item at position k of a seeded
per-epoch permutation, degraded with a generator seeded from (seed, k); rank r of W takes its
share of each global batch. A resumed run therefore computes the same batches as an
uninterrupted one, and W processes with batch B see the batches of one process with W*B.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from iqpir import config as C
from iqpir.training import distributed as D

if TYPE_CHECKING:
    from iqpir.iqa.table import ScoreTable

SCORES_FILE = "scores.csv"


def _say(info: D.DistInfo, text: str) -> None:
    if info.is_main:
        print(f"iqpir train: {text}", file=sys.stderr)


def _named(items: list[tuple[str, str]], limit: int = 5) -> str:
    lines = [f"  {p}: {why}" for p, why in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return "\n".join(lines)


def quality_table(cfg: C.RunConfig, data: Path, lq_data, run_dir: Path, scores, info: D.DistInfo) -> ScoreTable:
    """The score table of the run; its `.quality` is S of every training image that has one,
    keyed by resolved path (the images of `data` only).

    `scores` (a table from `iqpir score`) wins; else the run's own `scores.csv` (kept from an
    earlier start of this run); else rank 0 scores `data` once with `cfg.iqa` (images under
    192 px upsampled, as the quality loss scores its crops) and keeps the table in the run
    folder, so that training, the loss and inference share its constants.

    Images of `data` that the table lacks by path are looked up by content hash (a table made
    from a copy of the folder). Images with no score at all (unreadable, too small, not in
    the table) are named on stderr and left out of training by `build_dataset`.
    """
    from iqpir.io import collect_inputs
    from iqpir.iqa.table import read_score_table

    path, failed = _table_file(cfg, data, run_dir, scores, info)
    table = read_score_table(path)
    quality = {k: v for k, v in table.quality.items() if math.isfinite(v)}
    images, _ = collect_inputs([data])
    unmatched = [p for p in images if str(p.resolve()) not in quality and str(p.resolve()) not in failed]
    if unmatched and table.hashes:
        quality.update(_matched_by_content(table, quality, unmatched, path, info))
    missing = [p for p in images if str(p.resolve()) not in quality]
    if missing:
        why = [(str(p), failed.get(str(p.resolve()), f"not in {path}")) for p in missing]
        if len(missing) == len(images):
            raise ValueError(f"none of the {len(images)} images in {data} has a quality score in {path}:\n{_named(why)}")
        hint = f"add them with `iqpir score {data} --out {path}`" if scores is not None else "they cannot be scored"
        _say(info, f"{len(missing)} of {len(images)} training images have no quality score and are left out "
                   f"({hint}):\n{_named(why)}")
    keys = (str(p.resolve()) for p in images)
    table.quality = {k: quality[k] for k in keys if k in quality}
    return table


def _table_file(cfg: C.RunConfig, data: Path, run_dir: Path, scores, info: D.DistInfo) -> tuple[Path, dict[str, str]]:
    """The score table to read -> (its path, {resolved image: why it has no score} of a scoring here).

    `scores` when given; else rank 0 scores `data` into the run folder (kept for later starts).
    """
    from iqpir.iqa.table import score_files

    if scores is not None:
        path = Path(scores)
        if not path.is_file():
            raise FileNotFoundError(f"--scores: no such file: {path}")
        return path, {}
    path = run_dir / SCORES_FILE
    failed: dict[str, str] = {}
    if info.is_main:
        _say(info, f"scoring {data} with {','.join(cfg.iqa.metrics)} -> {path}")
        report = score_files(
            [str(data)],
            metrics=cfg.iqa.metrics,
            out=str(path),
            normalization=cfg.iqa.normalization,
            device=str(info.device),
            weights_dir=cfg.iqa.weights_dir or None,
            upsample_small=True,
        )
        failed = {str(Path(p).resolve()): why for p, why in report.failed}
    D.barrier(info)
    return path, failed


def _matched_by_content(table: ScoreTable, quality: dict[str, float], unmatched: list[Path], path: Path,
                        info: D.DistInfo) -> dict[str, float]:
    """Scores of images the table lacks by path, found by content hash (a table of a copied folder)."""
    from iqpir.io import file_digest

    by_hash: dict[str, float] = {}
    for key, digest in table.hashes.items():
        if key in quality:
            by_hash.setdefault(digest, quality[key])
    if not by_hash:
        return {}
    _say(info, f"{len(unmatched)} images are not in {path} by path: matching them by content")
    found = {}
    for p in unmatched:
        try:
            digest = file_digest(p)
        except OSError:
            continue
        if digest in by_hash:
            found[str(p.resolve())] = by_hash[digest]
    return found


def build_dataset(cfg: C.RunConfig, data: Path, lq_data, quality: dict[str, float]):
    """HQ folder with on-the-fly degradation, or real LQ/HQ pairs when `lq_data` is given.

    Images without a quality score (named by `quality_table`) are left out.
    """
    from iqpir.data import HQFolderDataset, PairedFolderDataset

    if lq_data is not None:
        return PairedFolderDataset(
            lq_root=lq_data, hq_root=data, size=cfg.model.image_size, mode=cfg.data.mode,
            hflip=cfg.data.hflip, quality=quality, seed=cfg.train.seed, skip_unscored=True,
        )
    stage2 = cfg.train.stage == 2  # stage 1 reconstructs HQ images: no degradation to pay for
    return HQFolderDataset(
        root=data, size=cfg.model.image_size, mode=cfg.data.mode, hflip=cfg.data.hflip,
        degradation=cfg.data.degradation if stage2 else None,
        preset=cfg.data.degradation.preset if stage2 else None, quality=quality, seed=cfg.train.seed,
        skip_unscored=True,
    )


# --------------------------------------------------------------------------------------
# The sample plan
# --------------------------------------------------------------------------------------


class PlannedSamples(torch.utils.data.Dataset):
    """Position k of the run's sample stream -> a training sample (deterministic in k)."""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:  # positions are unbounded; DataLoader only needs the batch sampler
        return 2**62

    def index_at(self, position: int) -> int:
        n = len(self.dataset)
        epoch = position // n
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(n, generator=g))
        return int(self._perm[1][position % n])

    def __getitem__(self, position: int) -> dict:
        return self.dataset.sample(self.index_at(position), epoch_seed=position)


def positions(step: int, micro: int, cfg: C.TrainConfig, info: D.DistInfo) -> list[int]:
    """Stream positions of rank `info.rank`'s share of micro-batch `micro` of step `step`."""
    global_batch = cfg.batch_size * info.world_size
    start = (step * cfg.grad_accum + micro) * global_batch + info.rank * cfg.batch_size
    return list(range(start, start + cfg.batch_size))


class _BatchPlan(torch.utils.data.Sampler):
    def __init__(self, first_step: int, cfg: C.TrainConfig, info: D.DistInfo):
        self.first_step, self.cfg, self.info = first_step, cfg, info

    def __iter__(self):
        for step in range(self.first_step, self.cfg.steps):
            for micro in range(self.cfg.grad_accum):
                yield positions(step, micro, self.cfg, self.info)

    def __len__(self) -> int:
        return max(0, self.cfg.steps - self.first_step) * self.cfg.grad_accum


class PlannedBatches:
    """The batch source of an iqpir.data dataset: the micro-batches of `positions`, on the device."""

    def __init__(self, dataset, cfg: C.RunConfig, info: D.DistInfo):
        self.samples = PlannedSamples(dataset, cfg.train.seed)
        self.cfg, self.info = cfg, info

    def batches(self, first_step: int) -> Iterator[dict]:
        from iqpir.data import collate

        loader = torch.utils.data.DataLoader(
            self.samples,
            batch_sampler=_BatchPlan(first_step, self.cfg.train, self.info),
            num_workers=self.cfg.data.num_workers,
            collate_fn=collate,
            pin_memory=self.info.device.type == "cuda",
        )
        return (to_device(batch, self.info.device) for batch in loader)

    def first_global_batch(self) -> dict:
        """The samples of step 0 of every rank (data-dependent set-up, `task.prepare`)."""
        from iqpir.data import collate

        n = self.cfg.train.batch_size * self.info.world_size
        return to_device(collate([self.samples[p] for p in range(n)]), self.info.device)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
