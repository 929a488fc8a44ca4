"""Evaluation metrics and the paper-style results table (IQPIR section 4, Tables 1-4).

- `reference`: full-reference `psnr`, `ssim`; LPIPS and FID when their weights are present.
- `underwater`: no-reference `uciqe`, `uiqm` (Table 3). Other NR-IQA models (NIQE, PIQE,
  ...) come from `iqpir.iqa.build_scorer`.
- `folder`: `evaluate_folder`, which scores a folder of restored images (optionally against
  references), appends one row per call to a CSV and returns the table of every row.
- `table`: metric directions, `markdown_table` (best value per column in bold), the CSV.

Images: (N, 3, H, W) float in [0, 1], RGB; one value per image, shape (N,). Optional
dependencies (lpips, torchvision, torch-fidelity) are imported inside the functions that need
them; importing this package loads torch and numpy only. Every name is importable from here.
"""

from iqpir.metrics.folder import EvaluationReport, evaluate_folder
from iqpir.metrics.reference import (
    FID_INCEPTION_FILE,
    FULL_REFERENCE,
    LPIPS_BACKBONE_FILE,
    MetricUnavailable,
    build_fid_features,
    build_lpips,
    frechet_distance,
    psnr,
    rgb_to_y,
    ssim,
)
from iqpir.metrics.table import (
    ID_COLUMNS,
    METRIC_DIRECTIONS,
    append_result,
    display_name,
    markdown_table,
    read_results,
)
from iqpir.metrics.underwater import LOCAL_NO_REFERENCE, _uicm, _uiconm, _uism, rgb_to_lab, uciqe, uiqm

__all__ = [
    "EvaluationReport",
    "evaluate_folder",
    "FID_INCEPTION_FILE",
    "FULL_REFERENCE",
    "LPIPS_BACKBONE_FILE",
    "MetricUnavailable",
    "build_fid_features",
    "build_lpips",
    "frechet_distance",
    "psnr",
    "rgb_to_y",
    "ssim",
    "ID_COLUMNS",
    "METRIC_DIRECTIONS",
    "append_result",
    "display_name",
    "markdown_table",
    "read_results",
    "LOCAL_NO_REFERENCE",
    "rgb_to_lab",
    "uciqe",
    "uiqm",
]
