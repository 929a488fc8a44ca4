"""The paper-style results table: metric directions and display names, the Markdown table
with the best value per column in bold, and the results CSV (read, and append one row under
a lock with an atomic rewrite).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

#: Which way is better, per metric name: "higher" or "lower". NR-IQA models built through
#: `iqpir.iqa.build_scorer` report their own direction (`lower_better`), which takes
#: precedence; the entries for learned models are here so that a table read back from a
#: CSV can still mark the best values when those models are not built in this process.
METRIC_DIRECTIONS: dict[str, str] = {
    "psnr": "higher",
    "ssim": "higher",
    "psnr_y": "higher",
    "ssim_y": "higher",
    "lpips": "lower",
    "fid": "lower",
    "uciqe": "higher",
    "uiqm": "higher",
    "niqe": "lower",
    "piqe": "lower",
    "brisque": "lower",
    "mdfs": "lower",
    "biqe": "lower",
    "musiq": "higher",
    "musiq-ava": "higher",
    "musiq-gfiqa": "higher",
    "topiq_nr": "higher",
    "topiq_nr-face": "higher",
    "topiq_nr-face-v1": "higher",
    "arniqa": "higher",
    "qalign": "higher",
    "clipiqa": "higher",
    "clipiqa+": "higher",
    "maniqa": "higher",
}

_DISPLAY_NAMES = {
    "psnr": "PSNR",
    "ssim": "SSIM",
    "psnr_y": "PSNR-Y",
    "ssim_y": "SSIM-Y",
    "lpips": "LPIPS",
    "fid": "FID",
    "uciqe": "UCIQE",
    "uiqm": "UIQM",
    "niqe": "NIQE",
    "piqe": "PIQE",
    "brisque": "BRISQUE",
    "musiq": "MUSIQ",
    "musiq-ava": "MUSIQ-A",
    "topiq_nr-face": "TOPIQ-G",
    "topiq_nr-face-v1": "TOPIQ-G",
    "arniqa": "ARNIQA",
    "qalign": "Q-Align",
    "clipiqa": "CLIP-IQA",
}

#: Leading CSV columns; metric columns follow.
ID_COLUMNS = ("method", "dataset", "n_images")


def _to_float(v: object) -> float | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _decimals(values: Iterable[float]) -> int:
    # The paper prints PSNR/FID/MUSIQ with 2 decimals and SSIM/LPIPS/TOPIQ with 3.
    finite = [abs(v) for v in values if math.isfinite(v)]
    return 2 if finite and max(finite) >= 10 else 3


def _fmt(v: float | None, decimals: int) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{decimals}f}"


def display_name(metric: str) -> str:
    return _DISPLAY_NAMES.get(metric, metric.upper())


def _best_cells(
    rows: Sequence[Mapping[str, object]],
    values: Mapping[str, list[float | None]],
    text: Mapping[str, list[str]],
    dirs: Mapping[str, str],
    group_by: str | None,
) -> set[tuple[int, str]]:
    """(row index, metric) of the best value per metric with a direction, within each group.

    A value alone in its group (one method on a dataset) is best of nothing: it is not marked.
    """
    groups: dict[object, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.get(group_by, "") if group_by else "", []).append(i)
    bold: set[tuple[int, str]] = set()
    for m in values:
        d = dirs.get(m)
        if d not in ("higher", "lower"):
            continue
        for idx in groups.values():
            # Compare the printed values, so that rows that print the same tie.
            cand = [(float(text[m][i]), i) for i in idx if values[m][i] is not None]
            if len(cand) < 2:
                continue
            best = max(v for v, _ in cand) if d == "higher" else min(v for v, _ in cand)
            bold.update((i, m) for v, i in cand if v == best)
    return bold


def markdown_table(
    rows: Sequence[Mapping[str, object]],
    directions: Mapping[str, str] | None = None,
    group_by: str | None = "dataset",
) -> str:
    """A Markdown table like the paper's Tables 1-4.

    Args:
        rows: dicts with optional `method`, `dataset`, `n_images` and one key per metric
            (numbers or numeric strings; missing or empty -> "-").
        directions: metric -> "higher" | "lower" (default METRIC_DIRECTIONS). Metrics with a
            direction get an arrow in the header (PSNR ↑, NIQE ↓) and their best value in
            bold; ties at the printed precision are all bold.
        group_by: the best value is marked within each group of rows sharing this column
            (the paper marks the best per dataset); None marks it over all rows.
    """
    dirs = dict(METRIC_DIRECTIONS)
    if directions:
        dirs.update(directions)
    id_cols = [c for c in ID_COLUMNS if any(c in r for r in rows)]
    metric_cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in ID_COLUMNS and k not in metric_cols:
                metric_cols.append(k)
    values = {m: [_to_float(r.get(m)) for r in rows] for m in metric_cols}
    decimals = {m: _decimals(v for v in values[m] if v is not None) for m in metric_cols}
    text = {m: [_fmt(v, decimals[m]) for v in values[m]] for m in metric_cols}

    bold = _best_cells(rows, values, text, dirs, group_by)
    head_names = {"method": "Method", "dataset": "Dataset", "n_images": "N"}
    header = [head_names[c] for c in id_cols]
    for m in metric_cols:
        arrow = {"higher": " ↑", "lower": " ↓"}.get(dirs.get(m, ""), "")
        header.append(display_name(m) + arrow)
    rule = "|" + "|".join(["---"] * len(id_cols) + ["---:"] * len(metric_cols)) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    for i, r in enumerate(rows):
        cells = [str(r.get(c, "") if r.get(c) is not None else "") for c in id_cols]
        for m in metric_cols:
            t = text[m][i]
            cells.append(f"**{t}**" if (i, m) in bold else t)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format_value(v: object) -> str:
    if isinstance(v, float):
        return "inf" if v == math.inf else ("nan" if math.isnan(v) else f"{v:.6g}")
    return "" if v is None else str(v)


def read_results(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and rows of a results CSV ([], [] when it does not exist)."""
    p = Path(path)
    if not p.is_file():
        return [], []
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = list(reader.fieldnames or [])
        rows = [dict(r) for r in reader]
    return cols, rows


def append_result(path: str | os.PathLike, row: Mapping[str, object]) -> list[dict[str, str]]:
    """Append one row to a results CSV; returns every row now in the file.

    The file is created with a header when it does not exist. When the row has columns the
    file lacks (or lacks columns the file has), the file is rewritten with the union of the
    columns (existing order first, then new ones; missing cells empty), so nothing is lost.
    Every write is atomic (temporary file + rename), under an advisory lock where the
    platform has one (a hidden `.NAME.lock` file next to the CSV, left in place), so
    concurrent runs do not drop each other's rows.
    """
    from iqpir.io import atomic_write_text

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    new = {k: _format_value(v) for k, v in row.items()}
    lock_path = p.with_name(f".{p.name}.lock")
    with _FileLock(lock_path):
        cols, rows = read_results(p)
        for k in new:
            if k not in cols:
                cols.append(k)
        rows.append(new)
        import io as _io

        buf = _io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, restval="", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") or "" for k in cols})
        atomic_write_text(p, buf.getvalue())
    return [{k: r.get(k, "") or "" for k in cols} for r in rows]


class _FileLock:
    """Advisory exclusive lock on a side file (fcntl on POSIX; a no-op elsewhere)."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; the atomic rename still protects the file
            return self
        self.fh = open(self.path, "a")
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            import fcntl

            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            # The lock file stays: unlinking it would let a waiting and a new process lock
            # two different files at once.
        return False

