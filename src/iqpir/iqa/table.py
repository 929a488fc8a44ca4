"""Score tables: ``iqpir score`` scores images with an NR-IQA ensemble into a CSV.

Files
- ``scores.csv``: header ``path,<metric>...,quality,content_hash``. ``path`` is relative to
  the CSV's folder (POSIX separators; absolute when it cannot be made relative), each
  metric column holds the metric's raw native score, ``quality`` is the ensemble S in
  [0, 1] (paper Eq. 4) and ``content_hash`` the first 16 hex digits of the file's sha256.
- ``scores.csv.json`` (the "sidecar"): metrics, normalisation, the per-metric (low, high)
  constants that produced ``quality``, each metric's direction and documented range.
  Training, the quality loss and inference read the constants from here
  (``read_score_table(path).constants``) so that they share them.

Resuming: a file whose resolved path is in the table with the same content hash is skipped;
a changed file is rescored. With ``minmax`` the constants are recomputed over the whole
table (old and new rows) after every run and ``quality`` is rewritten for all rows, so S of
an already scored image can change when new images widen the range. A table keeps the
settings it was made with: asking for other metrics, another normalisation or another
small-image rule than the table holds is an error (write to a new table). Rows of files that
no longer exist are kept (the files may be on a disk that is not mounted) and counted in a
warning.

Small images: NIQE needs two 96x96 blocks. With ``upsample_small`` every image whose shorter
side is under 192 px is scored after a bicubic upsampling to 192 (``iqpir.iqa.upsample_small``,
as the stage-2 quality loss scores its crops); without it such images fail, named, with the
reason. The sidecar records the rule (``small_images``).

Writes are atomic (temporary file, then rename) and happen at the end, at least once a
minute while scoring, and on interruption, so an interrupted run resumes where it stopped.
Input files are only read. Rows: the old rows of files that are not inputs of this run, in
their order, then the inputs' in the order found (not the order in which batches finished).

Sharded jobs (``torchrun --nproc-per-node N -m iqpir score ...``, ``shard=(rank, N)``): each
process scores the inputs that ``iqpir.devices.shard_owner`` gives it (the hash restore uses)
and are neither in the table nor in any part, into its own part ``<table>.rank-R-of-N.csv``
(with its sidecar; a table in every respect, resumed the same way), then writes
``<table>.rank-R-of-N.done``. Rank 0 merges: it folds the parts into the table, recomputes
``minmax`` constants over all rows, writes the table (rows in the one-process order, so the
merged table equals a one-process table) and only then removes the parts. Any later run, one
process or many, folds parts it finds before scoring, so parts left by a job that stopped are
never lost nor scored again; a one-process run takes every part as final (do not run it while
a sharded job writes to the same table).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from iqpir.devices import ShardMeeting, shard_owner
from iqpir.io import FileReport, ImageReadError, atomic_write_text, collect_inputs, file_digest, read_image
from iqpir.iqa.base import SMALL_SIDE, ImageTooSmall, normalize, upsample_small
from iqpir.iqa.ensemble import NORMALIZATIONS, QualityEnsemble
from iqpir.iqa.registry import check_metric_name

TABLE_FORMAT = "iqpir-score-table/1"
SMALL_UPSAMPLED = f"shorter side under {SMALL_SIDE} px: upsampled to {SMALL_SIDE} (bicubic) before scoring"
SMALL_REFUSED = "not upsampled: images a metric cannot score are left out"
HASH_COLUMN = "content_hash"
SAVE_INTERVAL_S = 60.0


@dataclass
class ScoreTable:
    """A score table in memory; every dict is keyed by the resolved absolute path string.

    Attributes:
        quality: S in [0, 1] per image.
        raw: {path: {metric: native score}}.
        metrics: metric names, in column order.
        normalization: "fixed", "minmax", or None for a CSV without sidecar.
        constants: {metric: (low, high)} that produced ``quality``.
        lower_better: {metric: bool} (from the sidecar).
        hashes: {path: content hash}.
        path: the CSV file (None for a table not yet written).
    """

    quality: dict[str, float] = field(default_factory=dict)
    raw: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)
    normalization: str | None = None
    constants: dict[str, tuple[float, float]] = field(default_factory=dict)
    lower_better: dict[str, bool] = field(default_factory=dict)
    native_range: dict[str, tuple[float, float]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    upsample_small: bool = False

    def __len__(self) -> int:
        return len(self.raw) if self.raw else len(self.quality)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and _key(path) in self.quality


def _key(path: str | os.PathLike) -> str:
    return str(Path(path).resolve())


def sidecar_path(table_path: str | os.PathLike) -> Path:
    """The JSON file that holds a table's normalisation constants: ``<table>.json``."""
    return Path(str(table_path) + ".json")


def quality_for(table: ScoreTable, path: str | os.PathLike) -> float:
    """S of one image (looked up by resolved path). Raises KeyError naming the path."""
    key = _key(path)
    try:
        return table.quality[key]
    except KeyError:
        where = f" {table.path}" if table.path is not None else ""
        raise KeyError(f"{path}: not in score table{where} (looked up as {key})") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def read_score_table(path: str | os.PathLike) -> ScoreTable:
    """Read a table written by ``score_files`` (or any CSV with ``path`` and ``quality``).

    Relative paths are resolved against the CSV's folder. Without a sidecar, the metrics
    are the columns other than path/quality/content_hash and normalisation is None.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such score table")
    base = p.resolve().parent
    with open(p, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "path" not in cols or "quality" not in cols:
            raise ValueError(f"{p}: not a score table (needs 'path' and 'quality' columns, has {cols})")
        rows = list(reader)
    table = ScoreTable(path=p)
    table.metrics = [c for c in cols if c not in ("path", "quality", HASH_COLUMN)]
    side = sidecar_path(p)
    if side.is_file():
        meta = json.loads(side.read_text())
        table.metrics = list(meta.get("metrics", table.metrics))
        table.normalization = meta.get("normalization")
        table.constants = {k: (float(v[0]), float(v[1])) for k, v in meta.get("constants", {}).items()}
        table.lower_better = {k: bool(v) for k, v in meta.get("lower_better", {}).items()}
        table.native_range = {k: (float(v[0]), float(v[1])) for k, v in meta.get("native_range", {}).items()}
        table.upsample_small = meta.get("small_images") == SMALL_UPSAMPLED
    for row in rows:
        rel = Path(row["path"])
        key = str((rel if rel.is_absolute() else base / rel).resolve())
        table.quality[key] = _float(row["quality"])
        table.raw[key] = {m: _float(row.get(m, "")) for m in table.metrics}
        if row.get(HASH_COLUMN):
            table.hashes[key] = row[HASH_COLUMN]
    return table


@dataclass
class _MetricFacts:
    """What ``normalize`` needs of a scorer, without building it."""

    name: str
    native_range: tuple[float, float]
    lower_better: bool


def _minmax_constants(table: ScoreTable) -> dict[str, tuple[float, float]]:
    out = {}
    for m in table.metrics:
        vals = [r[m] for r in table.raw.values() if math.isfinite(r.get(m, math.nan))]
        out[m] = (min(vals), max(vals)) if vals else (math.nan, math.nan)
    return out


def _recompute_quality(table: ScoreTable) -> None:
    if not table.raw:
        table.quality = {}
        return
    keys = list(table.raw)
    parts = []
    for m in table.metrics:
        facts = _MetricFacts(m, table.native_range[m], table.lower_better[m])
        lo, hi = table.constants[m]
        raw = torch.tensor([table.raw[k][m] for k in keys], dtype=torch.float64)
        parts.append(normalize(facts, raw, lo, hi))  # type: ignore[arg-type]
    q = torch.stack(parts).mean(0)
    table.quality = {k: float(v) for k, v in zip(keys, q, strict=True)}


def _relative(key: str, base: Path) -> str:
    try:
        return Path(os.path.relpath(key, base)).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(key).as_posix()


def _fmt(v: float) -> str:
    return repr(float(v))


def write_score_table(table: ScoreTable, out: str | os.PathLike) -> None:
    """Write the CSV and its sidecar atomically (CSV last, so a complete CSV has its constants)."""
    out_p = Path(out)
    base = out_p.resolve().parent
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", *table.metrics, "quality", HASH_COLUMN])
    for key, raw in table.raw.items():
        w.writerow(
            [
                _relative(key, base),
                *(_fmt(raw[m]) for m in table.metrics),
                _fmt(table.quality[key]),
                table.hashes.get(key, ""),
            ]
        )
    meta = {
        "format": TABLE_FORMAT,
        "metrics": table.metrics,
        "normalization": table.normalization,
        "constants": {m: list(table.constants[m]) for m in table.metrics},
        "lower_better": {m: table.lower_better[m] for m in table.metrics},
        "native_range": {m: list(table.native_range[m]) for m in table.metrics},
        "quality": "mean over metrics of clamp((raw - low) / (high - low), 0, 1), "
        "taken as 1 - that for lower-better metrics (paper Eq. 4)",
        "paths": "relative to the folder of the CSV",
        "content_hash": "first 16 hex digits of the file's sha256",
        "small_images": SMALL_UPSAMPLED if table.upsample_small else SMALL_REFUSED,
        "rows": len(table.raw),
    }
    atomic_write_text(sidecar_path(out_p), json.dumps(meta, indent=2, allow_nan=True) + "\n")
    atomic_write_text(out_p, buf.getvalue())
    table.path = out_p


def ensemble_from_table(
    table: ScoreTable | str | os.PathLike,
    metrics: list[str] | None = None,
    device: str | torch.device = "cpu",
    weights_dir: str | None = None,
) -> QualityEnsemble:
    """A QualityEnsemble with the table's normalisation and constants.

    ``metrics`` may rename members to variants with the same native scale (e.g.
    ``["niqe_diff"]`` for a table scored with ``niqe``, as the stage-2 loss needs); the
    constants are then taken in order.
    """
    t = table if isinstance(table, ScoreTable) else read_score_table(table)
    names = list(metrics) if metrics is not None else list(t.metrics)
    if len(names) != len(t.metrics):
        raise ValueError(f"the table holds {t.metrics}; {names} does not match it one to one")
    consts = {n: t.constants[m] for n, m in zip(names, t.metrics, strict=True) if m in t.constants}
    return QualityEnsemble(
        names,
        normalization=t.normalization or "fixed",
        constants=consts,
        device=device,
        weights_dir=weights_dir,
    )


@dataclass(frozen=True)
class _Job:
    """The settings of one ``score_files`` call, shared by the table, its parts and the merge."""

    metrics: list[str]
    normalization: str
    batch_size: int
    device: str
    weights_dir: str | None
    progress: bool
    upsample_small: bool


def part_path(out: str | os.PathLike, rank: int, world: int) -> Path:
    """Rank ``rank``'s part of the table ``out`` in a job of ``world`` processes: ``<out>.rank-R-of-W.csv``
    (its sidecar and done marker beside it)."""
    return Path(f"{out}.rank-{rank}-of-{world}.csv")


def _done_marker(part: Path) -> Path:
    return part.with_name(part.name.removesuffix(".csv") + ".done")


def table_parts(out: str | os.PathLike) -> list[Path]:
    """The parts of the table ``out`` on disk, of any job size, ordered by (processes, rank)."""
    out_p = Path(out)
    pattern = re.compile(re.escape(out_p.name) + r"\.rank-(\d+)-of-(\d+)\.csv")
    if not out_p.parent.is_dir():
        return []
    found = []
    for f in out_p.parent.iterdir():
        m = pattern.fullmatch(f.name)
        if m and f.is_file():
            found.append((int(m[2]), int(m[1]), f))
    return [f for _, _, f in sorted(found)]


def score_files(
    inputs: Iterable[str | os.PathLike],
    metrics: list[str],
    out: str | os.PathLike,
    normalization: str = "fixed",
    batch_size: int = 8,
    device: str = "auto",
    weights_dir: str | None = None,
    progress: bool = True,
    upsample_small: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> FileReport:
    """Score image files into a resumable table (see the module docstring for the format).

    Args:
        inputs: files, folders (recursive) or glob patterns.
        metrics: metric names (built-in or pyiqa).
        out: the CSV to write; resumed when it exists.
        normalization: "fixed" or "minmax".
        batch_size: images per forward pass (same-sized images are batched together).
        device: "auto", "cpu", "cuda", "cuda:N".
        weights_dir: local folder of learned-metric weights (pyiqa backend).
        progress: show a progress bar on stderr.
        upsample_small: score images whose shorter side is under 192 px upsampled to 192
            (module docstring); otherwise NIQE fails on images without two 96x96 blocks.
        shard: (rank, processes) of this process in a sharded job (``iqpir.devices.process_shard``
            under torchrun): it scores the inputs that ``shard_owner`` gives it into its part
            of the table, and rank 0 merges the parts into ``out`` (module docstring). Every
            process of the job must make the same call. Explicit rather than read from the
            environment, so that one rank of a training job can score a table alone.

    Returns:
        FileReport: done (scored now), skipped (already in the table), failed (path, why):
        unreadable files, images a metric cannot score, inputs that matched nothing.
        The summary is printed to stderr.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    metrics = list(metrics)
    if not metrics:
        raise ValueError("no metrics given")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"duplicate metric names in {metrics}")
    for m in metrics:
        check_metric_name(m)
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, processes) with 0 <= rank < processes, got {shard}")
    job = _Job(metrics, normalization, batch_size, device, weights_dir, progress, upsample_small)
    out_p = Path(out)
    paths, missing = collect_inputs(list(inputs))
    if world > 1:
        return _score_sharded(paths, missing, out_p, job, rank, world)
    report = FileReport.empty()
    for m in missing:
        report.failed.append((m, "no such file, folder or matching image"))
    _update(out_p, job, paths, paths, table_parts(out_p), report, warn=True)
    print(report.summary("scored"), file=sys.stderr)
    return report


def _open(path: Path, job: _Job, warn: bool) -> ScoreTable:
    """The table at ``path`` to add to, checked against the job's settings, or a new one."""
    if path.exists():
        table = read_score_table(path)
        # A table with rows keeps its settings; an empty one (every image failed) may change them.
        if table.raw:
            _check_settings(table, path, job)
            if warn:
                _warn_gone(table, path)
            return table
    return ScoreTable(metrics=list(job.metrics))


def _check_settings(table: ScoreTable, path: Path, job: _Job) -> None:
    if table.metrics != job.metrics:
        raise ValueError(
            f"{path}: the table holds metrics {table.metrics}, not {job.metrics}; write to a new --out"
        )
    if table.normalization is not None and table.normalization != job.normalization:
        raise ValueError(
            f"{path}: the table is normalised with {table.normalization}, not {job.normalization}; pass "
            f"--normalization {table.normalization} to add to it, or write to a new --out"
        )
    if table.normalization is not None and table.upsample_small != job.upsample_small:
        flag = "pass --upsample-small" if table.upsample_small else "leave out --upsample-small"
        raise ValueError(
            f"{path}: the table was scored {'with' if table.upsample_small else 'without'} "
            f"--upsample-small; {flag} to add to it, or write to a new --out"
        )


def _warn_gone(table: ScoreTable, path: Path) -> None:
    gone = [k for k in table.raw if not Path(k).exists()]
    if gone:
        shown = ", ".join(_relative(k, path.resolve().parent) for k in gone[:3])
        print(
            f"iqpir score: warning: {path} keeps {len(gone)} row{'s' if len(gone) > 1 else ''} of files "
            f"that no longer exist "
            f"({shown}{', ...' if len(gone) > 3 else ''}); write to a new --out to drop them",
            file=sys.stderr,
        )


def _fold(table: ScoreTable, parts: list[Path], job: _Job) -> None:
    """Add the rows of ``parts`` to ``table``; a part's row replaces the table's row of the same
    file (parts hold what was scored after the table was last written: a rescored file)."""
    for part in parts:
        t = _open(part, job, warn=False)
        for key, row in t.raw.items():
            table.raw[key] = row
            if key in t.hashes:
                table.hashes[key] = t.hashes[key]
            else:
                table.hashes.pop(key, None)
        for m in t.lower_better:
            table.lower_better.setdefault(m, t.lower_better[m])
        for m in t.native_range:
            table.native_range.setdefault(m, t.native_range[m])


def _todo(
    paths: list[Path], out_p: Path, table: ScoreTable, known: dict[str, str], report: FileReport
) -> list[tuple[Path, str, str]]:
    """(path, key, content hash) of the files to score: not in ``table`` nor ``known`` (key -> hash)
    with their current content. The others are reported skipped, unreadable ones failed."""
    own = {_key(out_p), _key(sidecar_path(out_p))}
    todo: list[tuple[Path, str, str]] = []
    for p in paths:
        key = _key(p)
        if key in own:
            continue
        try:
            digest = file_digest(p)
        except OSError as exc:
            report.failed.append((str(p), f"cannot read ({exc.strerror or exc})"))
            continue
        if (key in table.raw and table.hashes.get(key) == digest) or known.get(key) == digest:
            report.skipped.append(p)
            continue
        todo.append((p, key, digest))
    return todo


def _ensemble(table: ScoreTable, job: _Job, todo: list) -> QualityEnsemble | None:
    """The scorers, when there is something to score or the table lacks a metric's direction and range."""
    needs_facts = any(m not in table.lower_better or m not in table.native_range for m in job.metrics)
    if not (todo or needs_facts):
        return None
    ensemble = QualityEnsemble(
        job.metrics, normalization="fixed", device=job.device, weights_dir=job.weights_dir
    )
    for s in ensemble.scorers:
        table.lower_better[s.name] = bool(s.lower_better)
        table.native_range[s.name] = (float(s.native_range[0]), float(s.native_range[1]))
    return ensemble


def _finalise(table: ScoreTable, out_p: Path, job: _Job, base: list[str], order: list[str]) -> None:
    """Normalise and write. Rows: those the table had (``base``) of files that are not inputs
    now, then the inputs' in the order found (``order``), then any others (a part's rows of
    files that are not inputs now). The order does not depend on batching, on how many
    processes scored nor on how many runs it took, so that a merged or resumed table equals a
    one-process table of one run."""
    table.normalization = job.normalization
    table.upsample_small = job.upsample_small
    if job.normalization == "fixed":
        table.constants = {m: table.native_range[m] for m in job.metrics}
    else:
        table.constants = _minmax_constants(table)
    inputs = set(order)
    keys = dict.fromkeys([*(k for k in base if k in table.raw and k not in inputs),
                          *(k for k in order if k in table.raw), *table.raw])
    table.raw = {k: table.raw[k] for k in keys}
    _recompute_quality(table)
    write_score_table(table, out_p)


def _remove_part(part: Path) -> None:
    for f in (part, sidecar_path(part), _done_marker(part)):
        f.unlink(missing_ok=True)


def _update(
    out_p: Path,
    job: _Job,
    order: list[Path],
    paths: list[Path],
    parts: list[Path],
    report: FileReport,
    warn: bool,
) -> ScoreTable:
    """Fold ``parts`` into the table ``out_p``, score those of ``paths`` it lacks, write it (rows
    in the order of ``order``, the inputs) and only then remove the parts: nothing is lost if
    this stops half way, the next run folds the parts again."""
    table = _open(out_p, job, warn)
    previous_normalization = table.normalization
    base = list(table.raw)
    _fold(table, parts, job)
    todo = _todo(paths, out_p, table, {}, report)
    ensemble = _ensemble(table, job, todo)
    keys = [_key(p) for p in order]

    def save() -> None:
        _finalise(table, out_p, job, base, keys)

    if todo:
        assert ensemble is not None
        _score_todo(todo, ensemble, table, report, job.batch_size, job.progress, save, job.upsample_small)
    if todo or parts or previous_normalization != job.normalization or not out_p.exists():
        save()
    for part in parts:
        _remove_part(part)
    return table


def _score_share(
    paths: list[Path], missing: list[str], out_p: Path, job: _Job, rank: int, world: int
) -> FileReport:
    """Rank ``rank``'s share: its inputs missing from the table and every part, scored into its
    own part (resumable as a table is), then the part's done marker."""
    report = FileReport.empty()
    if rank == 0:  # inputs that matched nothing are every rank's: one of them names them
        report.failed.extend((m, "no such file, folder or matching image") for m in missing)
    part = part_path(out_p, rank, world)
    _done_marker(part).unlink(missing_ok=True)
    known = dict(_open(out_p, job, warn=rank == 0).hashes)
    for other in table_parts(out_p):
        if other != part:
            try:
                known.update(_open(other, job, warn=False).hashes)
            except FileNotFoundError:  # folded and removed by rank 0 meanwhile: its rows are in the table
                continue
    mine = [p for p in paths if shard_owner(p, world) == rank]
    _say(f"iqpir score: rank {rank} of {world}: {len(mine)} inputs")
    table = _open(part, job, warn=False)
    base = list(table.raw)
    todo = _todo(mine, out_p, table, known, report)
    ensemble = _ensemble(table, job, todo)
    keys = [_key(p) for p in mine]

    def save() -> None:
        _finalise(table, part, job, base, keys)

    if todo:
        assert ensemble is not None
        _score_todo(todo, ensemble, table, report, job.batch_size, job.progress, save, job.upsample_small)
        save()
    if part.exists():  # a share with nothing to score leaves nothing to merge
        atomic_write_text(_done_marker(part), f"rank {rank} of {world} scored its share into {part.name}\n")
    return report


def _say(text: str) -> None:
    """One line to stderr in one write, so that the lines of a job's processes do not interleave."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _status(report: FileReport | None, error: Exception | None) -> str:
    """One line for the other ranks: "" when every file of the share was scored or skipped."""
    if error is not None:
        return f"stopped: {error}"
    assert report is not None
    if not report.failed:
        return ""
    shown = ", ".join(p for p, _ in report.failed[:3])
    return f"{len(report.failed)} failed ({shown}{', ...' if len(report.failed) > 3 else ''})"


def _score_sharded(
    paths: list[Path], missing: list[str], out_p: Path, job: _Job, rank: int, world: int
) -> FileReport:
    """One process of a sharded job: its share into its part, then, once every process has done
    its share, rank 0 merges the parts into the table.

    Under torchrun the processes meet (``ShardMeeting``: a gloo group, joined at the end) after
    their shares, whether a share failed or raised, so no process waits for one that gave up;
    rank 0 names the ranks that failed and merges every part, the parts of ranks that stopped
    half way included (their rows are scores all the same). Without a rendezvous (RANK and
    WORLD_SIZE only) rank 0 cannot know when the others end: it merges the parts whose done
    marker exists when it ends, and the next run (any process count) merges the rest.
    """
    report: FileReport | None = None
    error: Exception | None = None
    try:
        report = _score_share(paths, missing, out_p, job, rank, world)
    except Exception as exc:  # the others must still meet this process, and rank 0 merge their parts
        error = exc
    meeting = ShardMeeting.join()
    statuses = meeting.gather(_status(report, error)) if meeting is not None else None
    try:
        head = f"iqpir score: rank {rank} of {world}: "
        if report is not None:
            _say(head + report.summary("scored"))
        if rank == 0 and error is None:
            for r, status in enumerate(statuses or []):
                if status and r != 0:
                    _say(f"iqpir score: rank {r} of {world}: {status}")
            parts = table_parts(out_p)
            if statuses is None:
                waiting = [p for p in parts if not _done_marker(p).exists()]
                parts = [p for p in parts if p not in waiting]
                if waiting:
                    _say(head + f"{len(waiting)} part{'s' if len(waiting) > 1 else ''} not finished yet "
                         f"({', '.join(p.name for p in waiting)}): the next `iqpir score` merges "
                         f"{'them' if len(waiting) > 1 else 'it'}")
            table = _update(out_p, job, paths, [], parts, FileReport.empty(), warn=False)
            _say(head + f"merged {len(parts)} part{'s' if len(parts) != 1 else ''} into {out_p} "
                 f"({len(table.raw)} rows)")
    finally:
        if meeting is not None:
            meeting.close()
    if error is not None:
        raise error
    assert report is not None
    return report


def _score_todo(
    todo: list[tuple[Path, str, str]],
    ensemble: QualityEnsemble,
    table: ScoreTable,
    report: FileReport,
    batch_size: int,
    progress: bool,
    save: Any,
    upsample: bool = False,
) -> None:
    from tqdm import tqdm

    buckets: dict[tuple[int, int], list[tuple[Path, str, str, torch.Tensor]]] = {}
    bar = tqdm(
        total=len(todo), unit="img", desc="scoring", file=sys.stderr, disable=not progress, dynamic_ncols=True
    )
    last_save = time.monotonic()

    def record(items: list[tuple[Path, str, str, torch.Tensor]], raw: dict[str, torch.Tensor]) -> None:
        for i, (p, key, digest, _) in enumerate(items):
            table.raw[key] = {m: float(raw[m][i]) for m in table.metrics}
            table.hashes[key] = digest
            report.done.append(p)

    def flush(size: tuple[int, int]) -> None:
        nonlocal last_save
        items = buckets.pop(size)
        try:
            with torch.no_grad():
                raw = ensemble.raw(torch.stack([it[3] for it in items]))
            record(items, raw)
        except ImageTooSmall as exc:  # every image of a bucket has one size
            for it in items:
                report.failed.append((str(it[0]), f"cannot score: {exc}; pass --upsample-small to score "
                                      "it upsampled, as the quality loss does"))
        except (ValueError, RuntimeError) as exc:
            if len(items) == 1:
                report.failed.append((str(items[0][0]), f"cannot score ({exc})"))
            else:  # isolate the image that fails
                for it in items:
                    buckets[size] = [it]
                    flush(size)
                return
        bar.update(len(items))
        if time.monotonic() - last_save > SAVE_INTERVAL_S:
            save()
            last_save = time.monotonic()

    try:
        for p, key, digest in todo:
            try:
                rgb = read_image(p).rgb
            except ImageReadError as exc:
                report.failed.append((str(p), exc.reason))
                bar.update(1)
                continue
            if upsample:
                rgb = upsample_small(rgb[None])[0]
            size = (int(rgb.shape[-2]), int(rgb.shape[-1]))
            buckets.setdefault(size, []).append((p, key, digest, rgb))
            if len(buckets[size]) >= batch_size:
                flush(size)
            elif sum(len(b) for b in buckets.values()) >= 4 * batch_size:
                # Many sizes: bound memory by scoring what is buffered, largest groups first.
                for s in sorted(buckets, key=lambda s: -len(buckets[s])):
                    flush(s)
        for s in list(buckets):
            flush(s)
    except BaseException:
        if table.raw:
            save()  # on interruption too: the next run resumes from here
        raise
    finally:
        bar.close()
