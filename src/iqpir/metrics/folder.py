"""`evaluate_folder`: score a folder of restored images (optionally against references),
append the row to a results CSV and make the table. The steps: check the folders and metric
names, build each metric once, pair and read the images, score them, aggregate the row,
write it, report.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from iqpir.metrics.reference import (
    FULL_REFERENCE,
    MetricUnavailable,
    build_fid_features,
    build_lpips,
    frechet_distance,
    psnr,
    ssim,
)
from iqpir.metrics.table import ID_COLUMNS, METRIC_DIRECTIONS, append_result, markdown_table, read_results
from iqpir.metrics.underwater import LOCAL_NO_REFERENCE, uciqe, uiqm


@dataclass
class EvaluationReport:
    """What `evaluate_folder` did.

    done: restored images that were scored. skipped: (path, reason) for images left out on
    purpose (no reference with the same name, size differs from the reference). failed:
    (path, reason) for files that could not be read or scored. row: the CSV row (method,
    dataset, n_images, then metric -> mean over the scored images; fid is a set-level value).
    per_image: path -> metric -> value. table: the Markdown table of every row in the CSV.
    notes: one line per metric that was left out (weights or package missing).
    """

    done: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    row: dict[str, object] = field(default_factory=dict)
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    table: str = ""
    notes: list[str] = field(default_factory=list)
    directions: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"{len(self.done)} scored, {len(self.skipped)} skipped, {len(self.failed)} failed"
        lines = [text]
        lines += [f"  skipped: {p}: {why}" for p, why in self.skipped]
        lines += [f"  failed: {p}: {why}" for p, why in self.failed]
        return "\n".join(lines)


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _reference_index(reference: Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Reference images keyed by relative path without extension, and by bare stem."""
    from iqpir.io import collect_inputs

    paths, _ = collect_inputs([reference])
    by_rel: dict[str, list[Path]] = {}
    by_stem: dict[str, list[Path]] = {}
    for p in paths:
        rel = p.relative_to(reference).with_suffix("").as_posix()
        by_rel.setdefault(rel, []).append(p)
        by_stem.setdefault(p.stem, []).append(p)
    return by_rel, by_stem


def _match_reference(
    restored: Path, root: Path, by_rel: dict[str, list[Path]], by_stem: dict[str, list[Path]]
) -> tuple[Path | None, str]:
    rel = restored.relative_to(root).with_suffix("").as_posix()
    cands = by_rel.get(rel) or by_stem.get(restored.stem) or []
    if not cands:
        return None, f"no reference named {restored.stem}.* in the reference folder"
    if len(cands) > 1:
        return None, "ambiguous reference: " + ", ".join(str(c) for c in cands)
    return cands[0], ""


def _column_name(metric: str, y_channel: bool) -> str:
    # PSNR/SSIM on Y and on RGB differ by dB: they get their own columns so a table never mixes them.
    return f"{metric}_y" if y_channel and metric in ("psnr", "ssim") else metric


def _split_metrics(metrics: Sequence[str] | None, has_reference: bool) -> list[str]:
    if metrics is None:
        return ["psnr", "ssim", "niqe", "piqe"] if has_reference else ["niqe", "piqe"]
    out: list[str] = []
    for m in metrics:
        m = m.strip().lower()
        if m and m not in out:
            out.append(m)
    if not out:
        raise ValueError("no metrics given")
    if not has_reference:
        need = [m for m in out if m in FULL_REFERENCE]
        if need:
            verb = "needs" if len(need) == 1 else "need"
            raise ValueError(f"{', '.join(need)} {verb} reference images (--reference DIR)")
    return out


def _build_nr_scorer(name: str, device: torch.device):
    """An NR-IQA scorer from the quality-prior module, or raise MetricUnavailable / ValueError."""
    try:
        from iqpir.iqa import UnknownMetric, build_scorer, unknown_metric_error
    except ImportError as exc:
        raise MetricUnavailable(f"{name} skipped: NR-IQA module iqpir.iqa not available ({exc})") from exc
    try:
        return build_scorer(name, device=device, weights_dir=None)
    except UnknownMetric as exc:
        # A typo is the user's error, not a missing optional part: say so, with the closest name.
        from iqpir.iqa.names import PYIQA_FR_MODELS, PYIQA_NR_MODELS

        if name in PYIQA_FR_MODELS:
            raise ValueError(f"unknown metric {name!r}: evaluate computes {', '.join(FULL_REFERENCE)} with a "
                             "reference, and no-reference models by name") from None
        raise unknown_metric_error(name, PYIQA_NR_MODELS, others=FULL_REFERENCE + LOCAL_NO_REFERENCE) from exc
    except (KeyError, ValueError) as exc:
        raise ValueError(f"unknown metric {name!r}: {exc}") from exc
    except (ImportError, OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MetricUnavailable(f"{name} skipped: {first}") from exc


@dataclass
class _MetricSet:
    """The metrics of one evaluation, each built once: the row's metric columns in order, a
    function per per-image metric (restored, reference or None) -> (1,), and the FID feature
    extractor (None: no FID)."""

    columns: list[str]
    per_image: dict[str, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]]
    fid_features: Callable[[torch.Tensor], torch.Tensor] | None


@dataclass
class _Scores:
    """What scoring the images collected: values per metric, the (path, reason) of each image
    a metric could not score, and the FID features of the restored and reference images."""

    values: dict[str, list[float]]
    failures: dict[str, list[tuple[str, str]]]
    feats_restored: list[torch.Tensor] = field(default_factory=list)
    feats_reference: list[torch.Tensor] = field(default_factory=list)


def _check_folders(
    restored: str | os.PathLike, reference: str | os.PathLike | None
) -> tuple[Path, Path | None]:
    root = Path(restored)
    if not root.is_dir():
        raise FileNotFoundError(f"restored folder not found: {root}")
    ref_root = Path(reference) if reference is not None else None
    if ref_root is not None and not ref_root.is_dir():
        raise FileNotFoundError(f"reference folder not found: {ref_root}")
    return root, ref_root


def _build_metrics(
    names: list[str], y_channel: bool, crop_border: int, dev: torch.device, report: EvaluationReport
) -> _MetricSet:
    """Build what each metric needs once; optional ones that cannot run leave a one-line note.
    Sets `report.directions`."""
    per_image_fns: dict[str, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = {}
    directions: dict[str, str] = {}
    fid_features = None
    columns = [_column_name(m, y_channel) for m in names]
    for m, col in zip(names, columns):
        directions[col] = METRIC_DIRECTIONS.get(col, "")
        try:
            if m == "psnr":
                per_image_fns[col] = lambda x, y: psnr(x, y, y_channel=y_channel, crop_border=crop_border)
            elif m == "ssim":
                per_image_fns[col] = lambda x, y: ssim(x, y, y_channel=y_channel, crop_border=crop_border)
            elif m == "uciqe":
                per_image_fns[m] = lambda x, y: uciqe(x)
            elif m == "uiqm":
                per_image_fns[m] = lambda x, y: uiqm(x)
            elif m == "lpips":
                lp = build_lpips(dev)
                per_image_fns[m] = lambda x, y, lp=lp: lp(x, y)
            elif m == "fid":
                fid_features = build_fid_features(dev)
            else:
                scorer = _build_nr_scorer(m, dev)
                directions[m] = "lower" if getattr(scorer, "lower_better", False) else "higher"
                per_image_fns[m] = lambda x, y, s=scorer: s(x)
        except MetricUnavailable as exc:
            report.notes.append(str(exc))
            directions.pop(col, None)
    report.directions = {k: v for k, v in directions.items() if v}
    return _MetricSet(columns, per_image_fns, fid_features)


def _read_pair(
    path: Path,
    root: Path,
    ref_root: Path | None,
    index: tuple[dict[str, list[Path]], dict[str, list[Path]]],
    dev: torch.device,
    report: EvaluationReport,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A restored image and its reference (None without a reference folder), each (1, 3, H, W)
    on `dev`; or None, with the reason in `report.failed` or `report.skipped`."""
    from iqpir.io import ImageReadError, load_rgb

    # Read first: an unreadable file is a failure even when it has no reference.
    try:
        img = load_rgb(path).unsqueeze(0).to(dev)
    except ImageReadError as exc:
        report.failed.append((str(path), exc.reason))
        return None
    if ref_root is None:
        return img, None
    ref_path, why = _match_reference(path, root, *index)
    if ref_path is None:
        report.skipped.append((str(path), why))
        return None
    try:
        ref_img = load_rgb(ref_path).unsqueeze(0).to(dev)
    except ImageReadError as exc:
        report.failed.append((str(path), f"its reference {ref_path}: {exc.reason}"))
        return None
    if ref_img.shape != img.shape:
        report.skipped.append(
            (
                str(path),
                f"size {img.shape[-1]}x{img.shape[-2]} differs from reference "
                f"{ref_path} {ref_img.shape[-1]}x{ref_img.shape[-2]}",
            )
        )
        return None
    return img, ref_img


def _score_image(
    path: Path, img: torch.Tensor, ref_img: torch.Tensor | None, metric_set: _MetricSet, scores: _Scores
) -> dict[str, float]:
    """Every per-image metric of one image, and its FID features into `scores`; a metric that
    cannot score it is recorded in `scores.failures` and left out of the result."""
    out: dict[str, float] = {}
    with torch.no_grad():
        for m, fn in metric_set.per_image.items():
            try:
                v = float(fn(img, ref_img).reshape(-1)[0])
            except (ValueError, RuntimeError) as exc:  # too small, degenerate, ...
                scores.failures[m].append((str(path), str(exc).strip().splitlines()[0]))
                continue
            if math.isnan(v):  # e.g. NIQE of a flat image; a NaN would poison the mean
                scores.failures[m].append((str(path), f"{m} is NaN for this image"))
                continue
            out[m] = v
        if metric_set.fid_features is not None:
            try:
                fr, fq = metric_set.fid_features(img), metric_set.fid_features(ref_img)
            except (ValueError, RuntimeError) as exc:
                why = str(exc).strip().splitlines()[0]
                scores.failures.setdefault("fid", []).append((str(path), why))
            else:
                scores.feats_restored.append(fr)
                scores.feats_reference.append(fq)
    return out


def _score_folder(
    root: Path,
    ref_root: Path | None,
    metric_set: _MetricSet,
    dev: torch.device,
    report: EvaluationReport,
    quiet: bool,
) -> tuple[list[Path], _Scores]:
    """Pair, read and score every image under `root`, one at a time; returns the files found."""
    from tqdm import tqdm

    from iqpir.io import collect_inputs

    files, _ = collect_inputs([root])
    index: tuple[dict[str, list[Path]], dict[str, list[Path]]] = ({}, {})
    if ref_root is not None:
        index = _reference_index(ref_root)
    # A metric that cannot score an image (too small for NIQE, NaN) leaves that metric out of
    # the row, named in a note; the image still counts for the other metrics.
    scores = _Scores({m: [] for m in metric_set.per_image}, {m: [] for m in metric_set.per_image})
    # disable=None: a progress bar on a terminal, none in logs and CI.
    bar = tqdm(files, desc="evaluate", unit="img", disable=True if quiet else None, file=sys.stderr)
    for path in bar:
        pair = _read_pair(path, root, ref_root, index, dev, report)
        if pair is None:
            continue
        image_scores = _score_image(path, pair[0], pair[1], metric_set, scores)
        for m, v in image_scores.items():
            scores.values[m].append(v)
        report.done.append(path)
        report.per_image[str(path)] = image_scores
    return files, scores


def _drop_failed_metrics(scores: _Scores, report: EvaluationReport) -> None:
    """A metric that missed any image is left out of the row, so every column covers the same images."""
    for m, fails in scores.failures.items():
        if fails:
            report.notes.append(
                f"{m} left out of the row: it could not score {len(fails)} of {len(report.done)} images "
                "(every column of a row covers the same images):\n"
                + "\n".join(f"  {p}: {why}" for p, why in fails)
            )
            scores.values[m] = []


def _make_row(
    method: str, dataset: str | None, metric_set: _MetricSet, scores: _Scores, report: EvaluationReport
) -> dict[str, object]:
    """The CSV row: method, dataset, n_images, then the mean per metric (fid: one set-level value)."""
    row: dict[str, object] = {"method": method, "dataset": dataset or "", "n_images": len(report.done)}
    for m in metric_set.columns:
        if m in scores.values and scores.values[m]:
            row[m] = sum(scores.values[m]) / len(scores.values[m])
        elif m == "fid" and metric_set.fid_features is not None and not scores.failures.get("fid"):
            if len(scores.feats_restored) >= 2:
                row[m] = frechet_distance(torch.cat(scores.feats_restored), torch.cat(scores.feats_reference))
            else:
                report.notes.append("fid skipped: needs at least 2 scored images")
    return row


def _write_row(report: EvaluationReport, out: str | os.PathLike | None, root: Path, found_files: bool) -> None:
    """Append `report.row` to the CSV when anything was scored; `report.table` shows every row."""
    row = report.row
    if report.done and set(row) - set(ID_COLUMNS):
        rows = append_result(out, row) if out is not None else [row]
    else:
        rows = read_results(out)[1] if out is not None else []
        if found_files:
            what = "image" if not report.done else "metric"
            report.failed.append((str(root), f"no {what} could be scored; no row written"))
    report.table = markdown_table(rows, report.directions) if rows else ""


def _print_report(report: EvaluationReport) -> None:
    for note in report.notes:
        print(note, file=sys.stderr)
    for p, why in report.skipped:
        print(f"skipped: {p}: {why}", file=sys.stderr)
    for p, why in report.failed:
        print(f"failed: {p}: {why}", file=sys.stderr)
    if report.table:
        print(report.table)


def _load_metrics(names: list[str], y_channel: bool, crop_border: int, dev: torch.device, report: EvaluationReport,
                  quiet: bool) -> _MetricSet:
    """`_build_metrics`, saying what loads: LPIPS, FID's Inception or a pyiqa model can take a minute."""
    if not quiet:
        print(f"evaluate: loading {', '.join(names)} on {dev}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    metric_set = _build_metrics(names, y_channel, crop_border, dev, report)
    if not quiet:
        print(f"evaluate: metrics ready in {time.perf_counter() - t0:.1f} s; scoring", file=sys.stderr, flush=True)
    return metric_set


def evaluate_folder(
    restored: str | os.PathLike,
    reference: str | os.PathLike | None = None,
    metrics: Sequence[str] | None = None,
    name: str | None = None,
    dataset: str | None = None,
    out: str | os.PathLike | None = None,
    y_channel: bool = False,
    device: str | torch.device = "auto",
    crop_border: int = 0,
    quiet: bool = False,
) -> EvaluationReport:
    """Score a folder of restored images; append one row to a results CSV; make the table.

    Matching: a restored image matches the reference with the same relative path without
    extension (`a/x.png` <-> `a/x.jpg`), else the one reference with the same file stem
    anywhere in the reference folder (so `x.png` <-> `x.jpg`; no suffix stripping such as
    `x_restored`). Restored images without a reference, or whose size differs from it, are
    named and skipped (`report.skipped`); unreadable files are named, skipped and counted as
    failures (`report.failed`). With a reference folder, every metric is computed on the
    same matched images. Images are scored one at a time, so sizes may differ.

    Metrics (default: psnr, ssim, niqe, piqe with a reference; niqe, piqe without):
    psnr, ssim (RGB; with y_channel, BT.601 Y in columns psnr_y, ssim_y), lpips and fid
    (when their weights are present; else a one-line note and no column), uciqe, uiqm, and
    any NR-IQA model name that `iqpir.iqa.build_scorer` knows. The row holds the mean over images per metric
    (fid: one value for the whole set, restored vs reference).

    Args:
        restored: folder (searched recursively) of restored images.
        reference: folder of reference images, or None for no-reference evaluation.
        metrics: metric names; None for the default.
        name: the row's method name (default: the restored folder's name).
        dataset: the row's dataset name (default: empty).
        out: results CSV; one row is appended per call (None: write nothing).
        y_channel: PSNR/SSIM on the Y channel instead of RGB.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
        crop_border: pixels removed from each side for PSNR/SSIM.
        quiet: do not print the table, notes and problems.

    Returns:
        EvaluationReport (`.failed`, `.skipped`, `.row`, `.table`, `.notes`).

    Raises:
        FileNotFoundError: the restored or reference folder does not exist.
        ValueError: an unknown metric, or a full-reference metric without a reference.
    """
    root, ref_root = _check_folders(restored, reference)
    names = _split_metrics(metrics, ref_root is not None)
    dev = _resolve_device(device)
    report = EvaluationReport()
    metric_set = _load_metrics(names, y_channel, crop_border, dev, report, quiet)
    files, scores = _score_folder(root, ref_root, metric_set, dev, report, quiet)
    _drop_failed_metrics(scores, report)
    if not files:
        report.failed.append((str(root), "no images found"))
    method = name if name is not None else root.resolve().name
    report.row = _make_row(method, dataset, metric_set, scores, report)
    _write_row(report, out, root, bool(files))
    if not quiet:
        _print_report(report)
    return report
