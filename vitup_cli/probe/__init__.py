"""Linear probes (``vitup probe``): datasets, metrics, heads, streaming training from stores, reports."""

from vitup_cli.probe.datasets import DATASETS, ProbeDataset, open_dataset, open_splits
from vitup_cli.probe.metrics import DepthMetrics, SegMetrics, confusion_matrix, seg_scores
from vitup_cli.probe.run import ProbeConfig, ProbeReport, UpsamplerResult, run_probe

__all__ = [
    "DATASETS",
    "DepthMetrics",
    "ProbeConfig",
    "ProbeDataset",
    "ProbeReport",
    "SegMetrics",
    "UpsamplerResult",
    "confusion_matrix",
    "open_dataset",
    "open_splits",
    "run_probe",
    "seg_scores",
]
