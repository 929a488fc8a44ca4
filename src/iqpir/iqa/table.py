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
Input files are only read.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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
    out_p = Path(out)
    report = FileReport.empty()
    paths, missing = collect_inputs(list(inputs))
    for m in missing:
        report.failed.append((m, "no such file, folder or matching image"))

    if out_p.exists() and read_score_table(out_p).raw:
        # A table with rows keeps its settings; an empty one (every image failed) may change them.
        table = read_score_table(out_p)
        if table.metrics != metrics:
            raise ValueError(
                f"{out_p}: the table holds metrics {table.metrics}, not {metrics}; write to a new --out"
            )
        if table.normalization is not None and table.normalization != normalization:
            raise ValueError(
                f"{out_p}: the table is normalised with {table.normalization}, not {normalization}; pass "
                f"--normalization {table.normalization} to add to it, or write to a new --out"
            )
        if table.normalization is not None and table.upsample_small != upsample_small:
            flag = "pass --upsample-small" if table.upsample_small else "leave out --upsample-small"
            raise ValueError(
                f"{out_p}: the table was scored {'with' if table.upsample_small else 'without'} "
                f"--upsample-small; {flag} to add to it, or write to a new --out"
            )
        gone = [k for k in table.raw if not Path(k).exists()]
        if gone:
            shown = ", ".join(_relative(k, out_p.resolve().parent) for k in gone[:3])
            print(
                f"iqpir score: warning: {out_p} keeps {len(gone)} row{'s' if len(gone) > 1 else ''} of files that no "
                f"longer exist "
                f"({shown}{', ...' if len(gone) > 3 else ''}); write to a new --out to drop them",
                file=sys.stderr,
            )
    else:
        table = ScoreTable(metrics=metrics)
    previous_normalization = table.normalization
    table.upsample_small = upsample_small

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
        if key in table.raw and table.hashes.get(key) == digest:
            report.skipped.append(p)
            continue
        todo.append((p, key, digest))

    ensemble: QualityEnsemble | None = None
    needs_facts = any(m not in table.lower_better or m not in table.native_range for m in metrics)
    if todo or needs_facts:
        ensemble = QualityEnsemble(metrics, normalization="fixed", device=device, weights_dir=weights_dir)
        for s in ensemble.scorers:
            table.lower_better[s.name] = bool(s.lower_better)
            table.native_range[s.name] = (float(s.native_range[0]), float(s.native_range[1]))

    def finalise() -> None:
        table.normalization = normalization
        if normalization == "fixed":
            table.constants = {m: table.native_range[m] for m in metrics}
        else:
            table.constants = _minmax_constants(table)
        _recompute_quality(table)
        write_score_table(table, out_p)

    if todo:
        assert ensemble is not None
        _score_todo(todo, ensemble, table, report, batch_size, progress, finalise, upsample_small)
    if todo or previous_normalization != normalization or not out_p.exists():
        finalise()
    print(report.summary("scored"), file=sys.stderr)
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
