"""The one training loop: stage 1, stage 2, the packaged default model and `iqpir.plugin.fit`,
on 1..N devices (`torchrun`).

A run is a config (`iqpir.config.RunConfig`, stored in every checkpoint), a task that maps a
batch to named loss terms and owns the networks (`iqpir.training.tasks`), and a batch source
that says what goes into each step. The loop owns the rest: the optimisers, the learning-rate
schedule, EMA, the precision of the forward pass, gradient averaging across processes, logs,
checkpoints (`iqpir.checkpoint`: safetensors + JSON) and resume.

What goes into each step is planned, not drawn (`iqpir.training.data.PlannedBatches`, the
default model's `CropBatches`): a function of the seed, the step and the rank. Hence

- `--resume` continues exactly: a run stopped at step k and resumed computes the same
  batches, and so the same losses, as an uninterrupted run (the checkpoint holds the
  weights, optimiser states and RNG states);
- W processes with batch B equal one process with batch W*B (the gradient is the mean of
  the per-rank means, all-reduced after backward).

The learning-rate schedule is a function of the step, so a checkpoint needs no scheduler
object: the step restores it.
"""

from __future__ import annotations

import csv
import functools
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from iqpir import checkpoint as ckpt
from iqpir import config as C
from iqpir.devices import native_bf16, process_shard
from iqpir.io import atomic_write_text
from iqpir.training import distributed as D
from iqpir.training.data import PlannedBatches, build_dataset, quality_table
from iqpir.training.tasks import build_task

CHECKPOINT_DIR = "checkpoints"  # iqpir.checkpoint.checkpoint_stem's folder


@dataclass
class TrainResult:
    completed: bool  # reached train.steps
    step: int  # optimiser steps done
    run_dir: Path | None
    checkpoint: Path | None  # the last checkpoint written
    reason: str = ""  # why the run stopped early


@dataclass
class TrainOptions:
    """How one invocation runs, beside the config it stores (which alone makes a run reproducible).

    lq_data, stage1, scores and init are the inputs of a stage run (see `train`); the others
    apply to every run of the loop.
    """

    lq_data: str | Path | None = None
    stage1: str | Path | None = None
    scores: str | Path | None = None
    init: str | Path | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    resume: bool = False  # continue from the latest checkpoint in the run folder
    progress: bool = True  # a progress bar on stderr (main process)
    stop_at_step: int | None = None  # stop (with a checkpoint) after this many steps, as a signal would
    # Called on the main process after each step with the logged row (step, loss, terms, lr, seconds).
    on_step: Callable[[int, dict[str, float]], None] | None = None


class Task(Protocol):
    """What the loop trains: networks and a batch -> named loss terms (iqpir.training.tasks)."""

    arch: str  # stored in each checkpoint's JSON
    generator: torch.nn.Module
    discriminator: torch.nn.Module | None  # trained by its own optimiser (train.disc_lr)
    loss_names: list[str]  # terms summed into the logged loss
    aux_names: list[str]  # terms logged apart (the discriminator's)

    def losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]: ...

    def extra_state(self) -> dict[str, dict[str, torch.Tensor]]: ...

    def load_extra_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None: ...

    def meta(self) -> dict: ...


class BatchSource(Protocol):
    """What goes into each step: this process's micro-batches of steps first_step, first_step + 1, ..."""

    def batches(self, first_step: int) -> Iterator[dict]: ...


# Builds the task and the batch source of a run once the run folder is checked and the global
# RNG seeded (so that the networks start the same on every rank and at every start).
Setup = Callable[[D.DistInfo], tuple[Task, BatchSource]]


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
# Precision and optimisers
# --------------------------------------------------------------------------------------


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """train.precision -> the autocast dtype of the forward pass and the losses; None = float32.

    "auto" takes bf16 only where the device computes it natively (iqpir.devices.native_bf16):
    emulated bf16 is slower than float32 and only loses precision.
    """
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


class Optimisers:
    """Adam for the generator's trainable parameters and, when the task has one, the discriminator's.

    The parameters stay float32 whatever train.precision says: the master weights, their
    gradients and Adam's moments.
    """

    def __init__(self, task: Task, tc: C.TrainConfig):
        self.tc = tc
        self.params = {"generator": [p for p in task.generator.parameters() if p.requires_grad]}
        self.base_lr = {"generator": tc.lr}
        if task.discriminator is not None:
            self.params["discriminator"] = [p for p in task.discriminator.parameters() if p.requires_grad]
            self.base_lr["discriminator"] = tc.disc_lr
        self.optimizers = {
            name: torch.optim.Adam(params, lr=self.base_lr[name], betas=tuple(tc.betas),
                                   weight_decay=tc.weight_decay if name == "generator" else 0.0)
            for name, params in self.params.items()
        }

    def begin(self, step: int) -> float:
        """Clear the gradients and set step `step`'s learning rates; returns the schedule's factor."""
        scale = lr_scale(self.tc, step)
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["lr"] = self.base_lr[name] * scale
            opt.zero_grad(set_to_none=True)
        return scale

    def finish(self, info: D.DistInfo) -> None:
        """Average the gradients over the processes, clip the generator's (train.grad_clip), step."""
        for params in self.params.values():
            D.average_gradients(params, info)
        if self.tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params["generator"], self.tc.grad_clip)
        for opt in self.optimizers.values():
            opt.step()

    def state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """(tensor groups "optim.NAME", their JSON skeletons by NAME) for a checkpoint."""
        tensors, skeletons = {}, {}
        for name, opt in self.optimizers.items():
            tensors[f"optim.{name}"], skeletons[name] = ckpt.flatten_state(opt.state_dict())
        return tensors, skeletons

    def load(self, tensors: dict[str, dict[str, torch.Tensor]], skeletons: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(ckpt.unflatten_state(tensors[f"optim.{name}"], skeletons[name]))


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def run(cfg: C.RunConfig, setup: Setup, out: Path | None, opts: TrainOptions) -> TrainResult:
    """Train the task that `setup` builds as `cfg.train` says, to train.steps or a stop.

    out: the run folder (config.yaml, metrics.csv, checkpoints/); None writes nothing and
    cannot resume (`iqpir.plugin.fit`). Joins the torchrun process group when there is one.
    """
    info = D.setup(opts.device)
    try:
        return _run(cfg, setup, out, opts, info)
    finally:
        D.cleanup(info)


def _run(cfg: C.RunConfig, setup: Setup, run_dir: Path | None, opts: TrainOptions, info: D.DistInfo) -> TrainResult:
    existing, start, finished = _open_run_folder(run_dir, cfg.train, opts.resume, info)
    if finished is not None:
        return finished
    # One seed on every rank: the networks start identical everywhere (and equal to a
    # one-process run), which is what DDP's initial broadcast would otherwise ensure.
    torch.manual_seed(cfg.train.seed)
    task, source = setup(info)
    state = _Run(cfg, task, run_dir, opts, info)
    # The batch source starts before the checkpoint's RNG states are restored (a DataLoader
    # draws its base seed from the global generator), so they are those of the uninterrupted run.
    batches = source.batches(start)
    if existing:
        state.load(existing[-1])
    state.open_logs(start)
    try:
        step, reason = _steps(state, batches, start)
    finally:
        state.close_logs()
    completed = step >= cfg.train.steps and not reason.startswith("non-finite")
    return TrainResult(completed=completed, step=step, run_dir=run_dir, checkpoint=state.last_checkpoint,
                       reason=reason)


def _open_run_folder(run_dir: Path | None, tc: C.TrainConfig, resume: bool,
                     info: D.DistInfo) -> tuple[list[Path], int, TrainResult | None]:
    """(the run's checkpoints, the step to start from, a result when a resumed run is already done).

    Refuses to start over a run's checkpoints without `resume`, and to resume nothing.
    """
    if run_dir is None:
        if resume:
            raise ValueError("resume needs a run folder")
        return [], 0, None
    existing = checkpoint_paths(run_dir) if run_dir.exists() else []
    if existing and not resume:
        raise FileExistsError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another --out")
    if resume and not existing:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / CHECKPOINT_DIR}")
    start = int(ckpt.load_checkpoint_meta(existing[-1])["step"]) if resume else 0
    if start > tc.steps:
        raise ValueError(f"--resume: {run_dir} is at step {start}, past --steps {tc.steps} (steps count from "
                         f"the start of the run); pass --steps above {start} to train on")
    if resume and start == tc.steps:
        if info.is_main:
            print(f"iqpir train: {run_dir} is already at step {start} = --steps: nothing to do (steps count "
                  f"from the start of the run; pass --steps above {start} to train on). Checkpoint: "
                  f"{existing[-1]}", file=sys.stderr)
        return existing, start, TrainResult(completed=True, step=start, run_dir=run_dir, checkpoint=existing[-1],
                                            reason="already complete")
    if info.is_main:
        (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    D.barrier(info)
    return existing, start, None


def _steps(run: _Run, batches: Iterator[dict], start: int) -> tuple[int, str]:
    """Optimiser steps from `start` until train.steps or a stop -> (steps done, why it stopped early)."""
    tc, info, opts = run.tc, run.info, run.opts
    step = start
    with _StopRequest() as stop:
        while step < tc.steps:
            scale = run.optim.begin(step)
            sums, bad = run.accumulate(batches, step)
            if D.broadcast_flag(bool(bad), info):
                reason = (f"non-finite loss {bad or 'on another rank'!s} at step {step + 1}; the last good "
                          f"checkpoint is {run.last_checkpoint}")
                print(f"iqpir train: stopped: {reason}", file=sys.stderr)
                return step, reason
            run.optim.finish(info)
            if run.ema is not None:
                run.ema.update(run.task.generator)
            step += 1
            run.record(step, D.mean_across(sums, info), tc.lr * scale)
            stopping = D.broadcast_flag(stop.requested or (opts.stop_at_step is not None and step >= opts.stop_at_step),
                                        info)
            if step % tc.ckpt_every == 0 or step == tc.steps or stopping:
                run.save(step)
            if stopping:
                reason = f"stopped at step {step} on request; resume with --resume"
                print(f"iqpir train: {reason} (checkpoint {run.last_checkpoint})", file=sys.stderr)
                return step, reason
    return step, ""


class _Run:
    """One run of the loop: its task, optimisers, EMA, precision, clocks, logs and checkpoints."""

    def __init__(self, cfg: C.RunConfig, task: Task, run_dir: Path | None, opts: TrainOptions, info: D.DistInfo):
        self.cfg, self.tc, self.task, self.run_dir, self.opts, self.info = cfg, cfg.train, task, run_dir, opts, info
        self.optim = Optimisers(task, cfg.train)
        self.ema = EMA(task.generator, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        dtype = autocast_dtype(cfg.train.precision, info.device)
        self.autocast = functools.partial(torch.autocast, info.device.type, dtype=torch.bfloat16,
                                          enabled=dtype is not None)
        self.spent = {"wall_s": 0.0, "cpu_s": 0.0}  # by the earlier starts of a resumed run
        self._clock = (time.perf_counter(), time.process_time())
        self.last_checkpoint: Path | None = None
        self.log: MetricsLog | None = None
        self.writer = None
        self.bar = None

    def elapsed(self) -> dict[str, float]:
        """Wall and CPU seconds of the run so far, all its starts together."""
        wall, cpu = self._clock
        return {"wall_s": self.spent["wall_s"] + time.perf_counter() - wall,
                "cpu_s": self.spent["cpu_s"] + time.process_time() - cpu}

    def accumulate(self, batches: Iterator[dict], step: int) -> tuple[dict[str, float], str]:
        """Forward and backward of step `step`'s micro-batches -> (each term's mean, the first non-finite term or "")."""
        sums: dict[str, float] = {}
        bad = ""
        n = self.tc.grad_accum
        for _ in range(n):
            batch = next(batches)  # made outside autocast: the data do not depend on the precision
            with self.autocast():
                terms = self.task.losses(batch, step)
            for name, value in terms.items():
                if not torch.isfinite(value).all():
                    bad = bad or name
            if not bad:
                (sum(terms.values()) / n).backward()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / n
        return sums, bad

    def open_logs(self, start: int) -> None:
        if not self.info.is_main:
            return
        if self.run_dir is not None:
            atomic_write_text(self.run_dir / "config.yaml", C.to_yaml(self.cfg))
            self.log = MetricsLog(self.run_dir / "metrics.csv", self.task.loss_names + self.task.aux_names,
                                  start if self.opts.resume else None)
            self.writer = _tensorboard(self.run_dir)
        if self.opts.progress:
            from tqdm import tqdm

            desc = f"stage {self.tc.stage}" if self.cfg.model.arch == "iqpir" else self.cfg.model.arch
            self.bar = tqdm(total=self.tc.steps, initial=start, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def record(self, step: int, values: dict[str, float], lr: float) -> None:
        """Step `step`'s values: metrics.csv and TensorBoard every train.log_every steps, the bar and on_step every step."""
        if not self.info.is_main:
            return
        row = {"step": step, "loss": sum(v for k, v in values.items() if k in self.task.loss_names),
               **values, "lr": lr, "seconds": round(self.elapsed()["wall_s"], 3)}
        if self.log is not None and (step % self.tc.log_every == 0 or step == self.tc.steps):
            self.log.append(row)
            if self.writer is not None:
                for k, v in row.items():
                    if k != "step":
                        self.writer.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)
        if self.opts.on_step is not None:
            self.opts.on_step(step, row)

    def close_logs(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def save(self, step: int) -> None:
        """Checkpoint `step`: model, EMA, the task's extra state, optimisers, RNG states, config."""
        if self.run_dir is None:
            return
        if not self.info.is_main:
            self.last_checkpoint = None
            D.barrier(self.info)
            return
        tensors: dict[str, dict[str, torch.Tensor]] = {"model": self.task.generator.state_dict()}
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        tensors.update({f"extra.{k}": v for k, v in self.task.extra_state().items()})
        optim, skeletons = self.optim.state()
        tensors.update(optim)
        tensors["rng"], rng_json = ckpt.flatten_state(ckpt.rng_state())
        meta = {"arch": self.task.arch, "stage": self.tc.stage, "step": step, "config": C.to_dict(self.cfg),
                "optimizers": skeletons, "rng": rng_json, "task": self.task.meta(), "elapsed": self.elapsed()}
        self.last_checkpoint = ckpt.save_checkpoint(ckpt.checkpoint_stem(self.run_dir, step), tensors, meta)
        keep = self.tc.keep_checkpoints
        for stem in checkpoint_paths(self.run_dir)[:-keep] if keep > 0 else []:
            for suffix in (".json", ".safetensors"):  # the JSON first: a stem without it is not a checkpoint any more
                stem.with_suffix(suffix).unlink(missing_ok=True)
        D.barrier(self.info)

    def load(self, path: Path) -> int:
        """Restore a checkpoint of this run (`save`'s groups and the RNG states) -> its step."""
        tensors, meta = ckpt.load_checkpoint(path)
        saved = C.from_dict(meta["config"])
        if saved.model != self.cfg.model or saved.train.stage != self.tc.stage:
            raise ValueError(f"--resume: the model or stage in {path} differs from the given config; resume with "
                             "the run's config.yaml")
        self.task.generator.load_state_dict(tensors["model"])
        self.task.load_extra_state({k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
        if self.ema is not None and "ema" in tensors:
            self.ema.load_state_dict(tensors["ema"])
        self.optim.load(tensors, meta["optimizers"])
        ckpt.set_rng_state(ckpt.unflatten_state(tensors["rng"], meta["rng"]))
        self.spent = {k: float(meta.get("elapsed", {}).get(k, 0.0)) for k in self.spent}
        self.last_checkpoint = path
        return int(meta["step"])


# --------------------------------------------------------------------------------------
# Stage runs: a folder of images -> stage 1 or stage 2 of the paper's network
# --------------------------------------------------------------------------------------


def train(cfg: C.RunConfig, data: str | Path, out: str | Path, options: TrainOptions | None = None,
          **fields: Any) -> TrainResult:
    """Train `cfg.train.stage` on the images in `data`; write the run to `out`.

    Args:
        cfg: resolved configuration (stored in the run folder and in every checkpoint).
        data: folder of high-quality images (recursive).
        out: run folder; must not hold checkpoints unless resuming.
        options: how this invocation runs (TrainOptions), or its fields as keywords instead:
            lq_data: folder of real low-quality images paired with `data` by file name.
            stage1: stage-1 run folder or checkpoint (stage 2 only).
            scores: a score table from `iqpir score`; when None the run scores `data` once with
                `cfg.iqa` and keeps the table as `out/scores.csv`.
            init: start the network from these weights (a checkpoint, run folder, converted folder
                or released IQPIR/CodeFormer/VQGAN .pth of the stage's architecture): fine-tuning.
            resume, device, progress, stop_at_step, on_step: as TrainOptions says.
    """
    if options is not None and fields:
        raise TypeError("train: give TrainOptions or its fields as keywords, not both")
    opts = options if options is not None else TrainOptions(**fields)
    if cfg.model.arch != "iqpir":
        raise ValueError(f"model.arch={cfg.model.arch} is not a stage of the paper's network; train it with "
                         "`python -m iqpir.training.default_model train`")
    data, run_dir = Path(data), Path(out)
    if not data.is_dir():
        raise FileNotFoundError(f"training data folder not found: {data}")
    if cfg.train.stage == 2 and opts.stage1 is None and not opts.resume:
        raise ValueError("stage 2 needs --stage1 RUN_OR_CHECKPOINT (a stage-1 run)")
    result = run(cfg, functools.partial(_stage_setup, cfg, data, run_dir, opts), run_dir, opts)
    if result.completed and not result.reason and process_shard()[0] == 0:
        then = (f"train stage 2 with --stage1 {run_dir}" if cfg.train.stage == 1
                else f"restore with `iqpir restore IMAGES --checkpoint {run_dir} --out DIR`")
        print(f"iqpir train: done, step {result.step}; checkpoint {result.checkpoint} (.safetensors, .json); {then}",
              file=sys.stderr)
    return result


def _stage_setup(cfg: C.RunConfig, data: Path, run_dir: Path, opts: TrainOptions,
                 info: D.DistInfo) -> tuple[Task, PlannedBatches]:
    """The score table, dataset, task and batch source of a stage run; a new run also takes its
    weights from --init and its data-dependent start (`task.prepare`), the same on every rank."""
    table = quality_table(cfg, data, opts.lq_data, run_dir, opts.scores, info)
    dataset = build_dataset(cfg, data, opts.lq_data, table.quality)
    if info.is_main and cfg.train.stage == 2:
        for line in quality_coverage(cfg.model, list(table.quality.values())):
            print(f"iqpir train: {line}", file=sys.stderr)
    # The stage-2 quality loss normalises like the table that gives S (its sidecar's constants).
    task = build_task(cfg, info.device, stage1=opts.stage1, score_table=table)
    source = PlannedBatches(dataset, cfg, info)
    if not opts.resume:
        if opts.init is not None:
            load_init_weights(task.generator, opts.init, task.arch)
        # Data-dependent set-up from the first global batch, made on rank 0 and broadcast so
        # every rank (and a one-process run) starts from the same weights.
        task.prepare(source.first_global_batch())
        D.broadcast_module(task.generator, info)
    return task, source


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
