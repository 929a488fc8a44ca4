"""Data: degradation pipelines and folder datasets (NCHW float32 in [0, 1])."""

from iqpir.data.datasets import HQFolderDataset, PairedFolderDataset, collate, sample_generator, score_key
from iqpir.data.degradations import DEGRADATIONS, degrade, degrade_files

__all__ = [
    "DEGRADATIONS",
    "HQFolderDataset",
    "PairedFolderDataset",
    "collate",
    "degrade",
    "degrade_files",
    "sample_generator",
    "score_key",
]
