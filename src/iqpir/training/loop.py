"""The one training loop, for stage 1 and stage 2, on 1..N devices (`torchrun`).

What goes into each step is planned, not drawn: the k-th sample the run ever sees is the
dataset item at position k of a seeded per-epoch permutation, degraded with a generator
seeded from (seed, k). Rank r of W takes its share of each global batch. Hence

- `--resume` continues exactly: a run stopped at step k and resumed computes the same
  batches, and so the same losses, as an uninterrupted run;
- W processes with batch B equal one process with batch W*B (the gradient is the mean of
  the per-rank means, all-reduced after backward).

The learning-rate schedule is a function of the step, so a checkpoint needs no scheduler
object: the step restores it.
"""

from __future__ import annotations

import csv
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from iqpir import checkpoint as ckpt
from iqpir import config as C
from iqpir.io import atomic_write_text
from iqpir.training import distributed as D
from iqpir.training.tasks import build_task

CHECKPOINT_DIR = "checkpoints"  # iqpir.checkpoint.checkpoint_stem's folder


@dataclass
class TrainResult:
    completed: bool  # reached train.steps
    step: int  # optimiser steps done
    run_dir: Path
    checkpoint: Path | None  # the last checkpoint written
    reason: str = ""  # why the run stopped early


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite."""


# --------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------


def lr_scale(cfg: C.TrainConfig, step: int) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "multistep":
        return cfg.gamma ** sum(step >= m for m in cfg.milestones)
    # cosine from lr down to min_lr over the steps after warm-up (over cosine_steps when set: the
    # official stage 1 anneals over 1.6M iterations; step s gets BasicSR's lr of iteration s + 1)
    span = max(1, (cfg.cosine_steps or cfg.steps) - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------
# Sample plan
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


# --------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a module's floating-point state (trainable parts updated)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self._names = {n for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, value in module.state_dict().items():
            if name in self._names:
                self.shadow[name].mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)
            else:
                self.shadow[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)


# --------------------------------------------------------------------------------------
# Run folder
# --------------------------------------------------------------------------------------


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (stems), oldest first."""
    return [stem for _, stem in ckpt.list_checkpoints(run_dir)] if (run_dir / CHECKPOINT_DIR).is_dir() else []


class MetricsLog:
    """metrics.csv: `step`, `loss`, then each named loss; rows past a resumed step are dropped."""

    def __init__(self, path: Path, names: list[str], resume_step: int | None):
        self.path = path
        self.columns = ["step", "loss", *names, "lr", "seconds"]
        rows: list[dict] = []
        if resume_step is not None and path.exists():
            with path.open(newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def append(self, row: dict) -> None:
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore").writerow(row)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional (extra `tensorboard`)
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the step and exits."""

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:  # a second signal: give up at once
                raise KeyboardInterrupt
            self.requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def train(
    cfg: C.RunConfig,
    data: str | Path,
    out: str | Path,
    lq_data: str | Path | None = None,
    resume: bool = False,
    stage1: str | Path | None = None,
    scores: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    stop_at_step: int | None = None,
    init: str | Path | None = None,
) -> TrainResult:
    """Train `cfg.train.stage` on the images in `data`; write the run to `out`.

    Args:
        cfg: resolved configuration (stored in the run folder and in every checkpoint).
        data: folder of high-quality images (recursive).
        out: run folder; must not hold checkpoints unless `resume`.
        lq_data: folder of real low-quality images paired with `data` by file name.
        resume: continue from the latest checkpoint in `out`.
        stage1: stage-1 run folder or checkpoint (stage 2 only).
        scores: a score table from `iqpir score`; when None the run scores `data` once with
            `cfg.iqa` and keeps the table as `out/scores.csv`.
        device: auto | cpu | cuda | cuda:N | mps.
        stop_at_step: stop (with a checkpoint) after this many steps, as a signal would.
        init: start the network from these weights (a checkpoint, run folder, converted folder or
            released IQPIR/CodeFormer/VQGAN .pth of the stage's architecture): fine-tuning.
    """
    info = D.setup(device)
    try:
        return _train(cfg, Path(data), Path(out), lq_data, resume, stage1, scores, info, progress, stop_at_step,
                      init)
    finally:
        D.cleanup(info)


def _train(cfg, data, run_dir, lq_data, resume, stage1, scores, info, progress, stop_at_step, init) -> TrainResult:
    tc = cfg.train
    if not data.is_dir():
        raise FileNotFoundError(f"training data folder not found: {data}")
    existing = checkpoint_paths(run_dir) if run_dir.exists() else []
    if existing and not resume:
        raise FileExistsError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another --out")
    if resume and not existing:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / CHECKPOINT_DIR}")
    if tc.stage == 2 and stage1 is None and not resume:
        raise ValueError("stage 2 needs --stage1 RUN_OR_CHECKPOINT (a stage-1 run)")
    if resume:
        done = int(json.loads(existing[-1].with_suffix(".json").read_text())["step"])
        if done > tc.steps:
            raise ValueError(f"--resume: {run_dir} is at step {done}, past --steps {tc.steps} (steps count from "
                             f"the start of the run); pass --steps above {done} to train on")
        if done == tc.steps:
            if info.is_main:
                print(f"iqpir train: {run_dir} is already at step {done} = --steps: nothing to do (steps count "
                      f"from the start of the run; pass --steps above {done} to train on). Checkpoint: "
                      f"{existing[-1]}", file=sys.stderr)
            return TrainResult(completed=True, step=done, run_dir=run_dir, checkpoint=existing[-1],
                               reason="already complete")
    if info.is_main:
        (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    D.barrier(info)

    # One seed on every rank: the networks start identical everywhere (and equal to a
    # one-process run), which is what DDP's initial broadcast would otherwise ensure.
    torch.manual_seed(tc.seed)
    from iqpir.data import collate
    from iqpir.training.data import build_dataset, quality_table

    table = quality_table(cfg, data, lq_data, run_dir, scores, info)
    dataset = build_dataset(cfg, data, lq_data, table.quality)
    if info.is_main and tc.stage == 2:
        for line in quality_coverage(cfg.model, list(table.quality.values())):
            print(f"iqpir train: {line}", file=sys.stderr)

    # The stage-2 quality loss normalises like the table that gives S (its sidecar's constants).
    task = build_task(cfg, info.device, stage1=stage1, score_table=table)
    if init is not None and not resume:
        load_init_weights(task.generator, init, task.arch)
    gen_params = [p for p in task.generator.parameters() if p.requires_grad]
    optimizers = {"generator": torch.optim.Adam(gen_params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)}
    base_lr = {"generator": tc.lr}
    disc_params: list = []
    if task.discriminator is not None:
        disc_params = [p for p in task.discriminator.parameters() if p.requires_grad]
        optimizers["discriminator"] = torch.optim.Adam(disc_params, lr=tc.disc_lr, betas=tuple(tc.betas))
        base_lr["discriminator"] = tc.disc_lr
    ema = EMA(task.generator, tc.ema_decay) if tc.ema_decay > 0 else None

    start = 0
    if resume:
        start = _load_state(existing[-1], cfg, task, optimizers, ema, info)

    if info.is_main:
        atomic_write_text(run_dir / "config.yaml", C.to_yaml(cfg))
        log = MetricsLog(run_dir / "metrics.csv", task.loss_names + task.aux_names, start if resume else None)
        writer = _tensorboard(run_dir)
    amp = info.device.type == "cuda" and tc.amp in ("auto", "bf16")

    loader = torch.utils.data.DataLoader(
        PlannedSamples(dataset, tc.seed),
        batch_sampler=_BatchPlan(start, tc, info),
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        pin_memory=info.device.type == "cuda",
    )
    batches = iter(loader)
    if not resume:
        # Data-dependent set-up from the first global batch, made on rank 0 and broadcast so
        # every rank (and a one-process run) starts from the same weights.
        first = PlannedSamples(dataset, tc.seed)
        task.prepare(_to_device(collate([first[p] for p in range(tc.batch_size * info.world_size)]), info.device))
        D.broadcast_module(task.generator, info)
    last_ckpt: Path | None = existing[-1] if existing else None
    reason = ""
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc=f"stage {tc.stage}", dynamic_ncols=True, file=sys.stderr)

    step = start
    t0 = time.perf_counter()
    with _StopRequest() as stop:
        while step < tc.steps:
            scale = lr_scale(tc, step)
            for name, opt in optimizers.items():
                for group in opt.param_groups:
                    group["lr"] = base_lr[name] * scale
                opt.zero_grad(set_to_none=True)

            sums: dict[str, float] = {}
            bad = ""
            for _ in range(tc.grad_accum):
                batch = _to_device(next(batches), info.device)
                with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=amp):
                    terms = task.losses(batch, step)
                for name, value in terms.items():
                    if not torch.isfinite(value).all():
                        bad = bad or name
                total = sum(terms.values())
                if not bad:
                    (total / tc.grad_accum).backward()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) / tc.grad_accum
            if D.broadcast_flag(bool(bad), info):
                reason = f"non-finite loss {bad or 'on another rank'!s} at step {step + 1}; the last good checkpoint is {last_ckpt}"
                print(f"iqpir train: stopped: {reason}", file=sys.stderr)
                break

            D.average_gradients(gen_params, info)
            D.average_gradients(disc_params, info)
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(gen_params, tc.grad_clip)
            for opt in optimizers.values():
                opt.step()
            if ema is not None:
                ema.update(task.generator)
            step += 1

            values = D.mean_across(sums, info)
            if info.is_main:
                row = {"step": step, "loss": sum(v for k, v in values.items() if k in task.loss_names),
                       **values, "lr": tc.lr * scale, "seconds": round(time.perf_counter() - t0, 3)}
                if step % tc.log_every == 0 or step == tc.steps:
                    log.append(row)
                    if writer is not None:
                        for k, v in row.items():
                            if k != "step":
                                writer.add_scalar(f"train/{k}", v, step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)

            stopping = D.broadcast_flag(stop.requested or (stop_at_step is not None and step >= stop_at_step), info)
            if step % tc.ckpt_every == 0 or step == tc.steps or stopping:
                last_ckpt = _save_state(run_dir, cfg, task, optimizers, ema, step, info)
            if stopping:
                reason = f"stopped at step {step} on request; resume with --resume"
                print(f"iqpir train: {reason} (checkpoint {last_ckpt})", file=sys.stderr)
                break
    if bar is not None:
        bar.close()
    if info.is_main and writer is not None:
        writer.close()
    completed = step >= tc.steps and not reason.startswith("non-finite")
    if info.is_main and completed:
        then = (f"train stage 2 with --stage1 {run_dir}" if tc.stage == 1
                else f"restore with `iqpir restore IMAGES --checkpoint {run_dir} --out DIR`")
        print(f"iqpir train: done, step {step}; checkpoint {last_ckpt} (.safetensors, .json); {then}",
              file=sys.stderr)
    return TrainResult(completed=completed, step=step, run_dir=run_dir, checkpoint=last_ckpt, reason=reason)


def quality_bin_counts(qualities: list[float], bins: int) -> list[int]:
    """Training images per bin of the binned embedding (floor(bins * S), S = 1.0 in the top bin)."""
    counts = [0] * bins
    for q in qualities:
        counts[min(int(q * bins), bins - 1)] += 1
    return counts


def quality_coverage(model: C.ModelConfig, qualities: list[float]) -> list[str]:
    """Warnings about quality conditions the training set never shows the binned embedding.

    A bin without training images keeps its random initial map, so restoring at such an S
    (S = 1.0 is the top bin) uses an untrained condition.
    """
    if model.quality_embedding != "binned" or not qualities:
        return []
    bins = model.quality_bins
    counts = quality_bin_counts(qualities, bins)
    empty = [f"[{i / bins:.2f}, {(i + 1) / bins:.2f}{']' if i == bins - 1 else ')'}" for i, c in enumerate(counts) if c == 0]
    if not empty:
        return []
    msg = f"no training image has a quality S in {', '.join(empty)}: those conditions stay untrained"
    if counts[-1] == 0:
        msg += ("; restoring at S = 1.0 uses one of them. Spread the scores over [0, 1] with min-max "
                "normalisation (--set iqa.normalization=minmax when the run scores its data, or `iqpir score "
                "--normalization minmax` for a --scores table), or use --set model.quality_embedding=continuous")
    return [msg]


def load_init_weights(model: torch.nn.Module, path: str | Path, arch: str) -> None:
    """Copy a checkpoint's network weights into `model` (the `--init` of fine-tuning).

    The file must hold the same architecture as the run's config builds (the stage-1 VQGAN for
    stage 1, the restorer for stage 2); any key or shape that differs is named.
    """
    from iqpir import official
    from iqpir.checkpoint import load_model

    if official.is_official_file(path):
        source, _, weights = official.load_official(path)
        source_arch = "vqgan" if weights.kind == "vqgan" else "restorer"
    else:
        source, _ = load_model(path)
        source_arch = "restorer" if hasattr(source, "transformer") else "vqgan"
    if source_arch != arch:
        raise ValueError(f"--init {path} holds a {source_arch} network; this stage trains a {arch}")
    state = source.state_dict()
    official.check_state(model, state, path)
    model.load_state_dict(state, strict=True)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------
# Checkpoints: model, EMA, optimisers, step and RNG states
# --------------------------------------------------------------------------------------


def _save_state(run_dir, cfg, task, optimizers, ema, step, info) -> Path | None:
    if not info.is_main:
        D.barrier(info)
        return None
    tensors: dict[str, dict[str, torch.Tensor]] = {"model": task.generator.state_dict()}
    if ema is not None:
        tensors["ema"] = ema.state_dict()
    tensors.update({f"extra.{k}": v for k, v in task.extra_state().items()})
    skeletons = {}
    for name, opt in optimizers.items():
        flat, skeleton = ckpt.flatten_state(opt.state_dict())
        tensors[f"optim.{name}"] = flat
        skeletons[name] = skeleton
    rng_tensors, rng_json = ckpt.flatten_state(ckpt.rng_state())
    tensors["rng"] = rng_tensors
    meta = {
        "arch": task.arch,
        "stage": cfg.train.stage,
        "step": step,
        "config": C.to_dict(cfg),
        "optimizers": skeletons,
        "rng": rng_json,
        "task": task.meta(),
    }
    path = ckpt.save_checkpoint(ckpt.checkpoint_stem(run_dir, step), tensors, meta)
    old = checkpoint_paths(run_dir)[: -cfg.train.keep_checkpoints] if cfg.train.keep_checkpoints > 0 else []
    for stem in old:  # the JSON first: a stem without it is not a checkpoint any more
        for suffix in (".json", ".safetensors"):
            stem.with_suffix(suffix).unlink(missing_ok=True)
    D.barrier(info)
    return path


def _load_state(path, cfg, task, optimizers, ema, info) -> int:
    tensors, meta = ckpt.load_checkpoint(path)
    saved = C.from_dict(meta["config"])
    if saved.model != cfg.model or saved.train.stage != cfg.train.stage:
        raise ValueError(f"--resume: the model or stage in {path} differs from the given config; resume with the run's config.yaml")
    task.generator.load_state_dict(tensors["model"])
    task.load_extra_state({k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
    if ema is not None and "ema" in tensors:
        ema.load_state_dict(tensors["ema"])
    for name, opt in optimizers.items():
        opt.load_state_dict(ckpt.unflatten_state(tensors[f"optim.{name}"], meta["optimizers"][name]))
    ckpt.set_rng_state(ckpt.unflatten_state(tensors["rng"], meta["rng"]))
    return int(meta["step"])
