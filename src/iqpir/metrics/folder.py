"""`evaluate_folder`: score a folder of restored images (optionally against references),
append the row to a results CSV and make the table. The steps: check the folders and metric
names, build each metric once, pair and read the images, score them, aggregate the row,
write it, report.
"""

from __future__ import annotations

import math
import os
import sys
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
        from iqpir.iqa.pyiqa_backend import PYIQA_FR_MODELS, PYIQA_NR_MODELS

        if name in PYIQA_FR_MODELS:
            raise ValueError(f"unknown metric {name!r}: evaluate computes {', '.join(FULL_REFERENCE)} with a "
                             "reference, and no-reference models by name") from None
        raise unknown_metric_error(name, PYIQA_NR_MODELS, others=FULL_REFERENCE + LOCAL_NO_REFERENCE) from exc
    except (KeyError, ValueError) as exc:
        raise ValueError(f"unknown metric {name!r}: {exc}") from exc
    except (ImportError, OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MetricUnavailable(f"{name} skipped: {first}") from exc


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
    from tqdm import tqdm

    from iqpir.io import ImageReadError, collect_inputs, load_rgb

    root = Path(restored)
    if not root.is_dir():
        raise FileNotFoundError(f"restored folder not found: {root}")
    ref_root = Path(reference) if reference is not None else None
    if ref_root is not None and not ref_root.is_dir():
        raise FileNotFoundError(f"reference folder not found: {ref_root}")
    names = _split_metrics(metrics, ref_root is not None)
    dev = _resolve_device(device)
    report = EvaluationReport()

    # Build what each metric needs once; optional ones that cannot run leave a one-line note.
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
    fid_wanted = fid_features is not None

    files, _ = collect_inputs([root])
    by_rel: dict[str, list[Path]] = {}
    by_stem: dict[str, list[Path]] = {}
    if ref_root is not None:
        by_rel, by_stem = _reference_index(ref_root)

    values: dict[str, list[float]] = {m: [] for m in per_image_fns}
    # A metric that cannot score an image (too small for NIQE, NaN) leaves that metric out of
    # the row, named in a note; the image still counts for the other metrics.
    metric_failures: dict[str, list[tuple[str, str]]] = {m: [] for m in per_image_fns}
    feats_restored: list[torch.Tensor] = []
    feats_reference: list[torch.Tensor] = []
    # disable=None: a progress bar on a terminal, none in logs and CI.
    bar = tqdm(files, desc="evaluate", unit="img", disable=True if quiet else None, file=sys.stderr)
    for path in bar:
        ref_img = None
        # Read first: an unreadable file is a failure even when it has no reference.
        try:
            img = load_rgb(path).unsqueeze(0).to(dev)
        except ImageReadError as exc:
            report.failed.append((str(path), exc.reason))
            continue
        if ref_root is not None:
            ref_path, why = _match_reference(path, root, by_rel, by_stem)
            if ref_path is None:
                report.skipped.append((str(path), why))
                continue
            try:
                ref_img = load_rgb(ref_path).unsqueeze(0).to(dev)
            except ImageReadError as exc:
                report.failed.append((str(path), f"its reference {ref_path}: {exc.reason}"))
                continue
            if ref_img.shape != img.shape:
                report.skipped.append(
                    (
                        str(path),
                        f"size {img.shape[-1]}x{img.shape[-2]} differs from reference "
                        f"{ref_path} {ref_img.shape[-1]}x{ref_img.shape[-2]}",
                    )
                )
                continue
        scores = {}
        with torch.no_grad():
            for m, fn in per_image_fns.items():
                try:
                    v = float(fn(img, ref_img).reshape(-1)[0])
                except (ValueError, RuntimeError) as exc:  # too small, degenerate, ...
                    metric_failures[m].append((str(path), str(exc).strip().splitlines()[0]))
                    continue
                if math.isnan(v):  # e.g. NIQE of a flat image; a NaN would poison the mean
                    metric_failures[m].append((str(path), f"{m} is NaN for this image"))
                    continue
                scores[m] = v
            if fid_wanted:
                try:
                    fr, fq = fid_features(img), fid_features(ref_img)
                except (ValueError, RuntimeError) as exc:
                    metric_failures.setdefault("fid", []).append((str(path), str(exc).strip().splitlines()[0]))
                else:
                    feats_restored.append(fr)
                    feats_reference.append(fq)
        for m, v in scores.items():
            values[m].append(v)
        report.done.append(path)
        report.per_image[str(path)] = scores
    for m, fails in metric_failures.items():
        if fails:
            report.notes.append(
                f"{m} left out of the row: it could not score {len(fails)} of {len(report.done)} images "
                "(every column of a row covers the same images):\n"
                + "\n".join(f"  {p}: {why}" for p, why in fails)
            )
            values[m] = []
    if not files:
        report.failed.append((str(root), "no images found"))

    row: dict[str, object] = {
        "method": name if name is not None else root.resolve().name,
        "dataset": dataset or "",
        "n_images": len(report.done),
    }
    for m in columns:
        if m in values and values[m]:
            row[m] = sum(values[m]) / len(values[m])
        elif m == "fid" and fid_wanted and not metric_failures.get("fid"):
            if len(feats_restored) >= 2:
                row[m] = frechet_distance(torch.cat(feats_restored), torch.cat(feats_reference))
            else:
                report.notes.append("fid skipped: needs at least 2 scored images")
    report.row = row

    if report.done and set(row) - set(ID_COLUMNS):
        rows = append_result(out, row) if out is not None else [row]
    else:
        rows = read_results(out)[1] if out is not None else []
        if files:
            what = "image" if not report.done else "metric"
            report.failed.append((str(root), f"no {what} could be scored; no row written"))
    report.table = markdown_table(rows, report.directions) if rows else ""

    if not quiet:
        for note in report.notes:
            print(note, file=sys.stderr)
        for p, why in report.skipped:
            print(f"skipped: {p}: {why}", file=sys.stderr)
        for p, why in report.failed:
            print(f"failed: {p}: {why}", file=sys.stderr)
        if report.table:
            print(report.table)
    return report
