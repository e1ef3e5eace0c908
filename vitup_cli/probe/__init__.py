"""Probes (``vitup probe``): linear probes (datasets, metrics, heads, streaming training from stores, reports)
and semantic correspondence (``correspondence``: SPair-71k and your own keypoint pairs, PCK)."""

from vitup_cli.probe.correspondence import CorrespondenceConfig, CorrespondenceReport, run_correspondence
from vitup_cli.probe.datasets import DATASETS, ProbeDataset, open_dataset, open_splits
from vitup_cli.probe.metrics import DepthMetrics, SegMetrics, confusion_matrix, seg_scores
from vitup_cli.probe.run import ProbeConfig, ProbeReport, UpsamplerResult, run_probe

__all__ = [
    "DATASETS",
    "CorrespondenceConfig",
    "CorrespondenceReport",
    "DepthMetrics",
    "ProbeConfig",
    "ProbeDataset",
    "ProbeReport",
    "SegMetrics",
    "UpsamplerResult",
    "confusion_matrix",
    "open_dataset",
    "open_splits",
    "run_correspondence",
    "run_probe",
    "seg_scores",
]
