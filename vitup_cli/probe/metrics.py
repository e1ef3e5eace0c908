"""Probe metrics: a confusion matrix for segmentation, per-image depth errors.

Segmentation (the mmsegmentation convention, which the JAFAR/ViT-Up tables use through torchmetrics'
micro accuracy and IoU): pixels whose target is ``255`` are ignored; the confusion matrix counts
``(ground truth, prediction)`` pairs over the others; a class's IoU is ``TP / (TP + FP + FN)``; a class that
is neither in the ground truth nor predicted anywhere in the split has no IoU (NaN) and is left out of the
mean, while a class that is predicted but absent from the ground truth scores 0. Pixel accuracy is
``trace / total`` over non-ignored pixels.

Depth (JAFAR's ``eval_metrics``): on pixels with ``min_depth < gt < max_depth``, per image, averaged over
images: ``delta_k`` = share of pixels with ``max(pred / gt, gt / pred) < 1.25 ** k``; ``abs_rel`` = mean
``|pred - gt| / gt``; ``rmse`` = ``sqrt(mean((pred - gt) ** 2))`` in metres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vitup_cli.probe.datasets import IGNORE


def confusion_matrix(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE) -> np.ndarray:  # fmt: skip
    """``(K, K)`` int64 counts, rows = ground truth, columns = prediction, over pixels whose target is
    not ``ignore_index`` (targets outside ``0..K-1`` are ignored too)."""
    p = torch.as_tensor(pred).reshape(-1).to(torch.int64)
    t = torch.as_tensor(target).reshape(-1).to(torch.int64)
    keep = (t != ignore_index) & (t >= 0) & (t < num_classes)
    p, t = p[keep], t[keep]
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predictions must lie in 0..{num_classes - 1}")
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


@dataclass
class SegScores:
    """Scores from a confusion matrix (fractions in ``[0, 1]``)."""

    miou: float
    accuracy: float
    iou: list[float]  # per class, NaN when the class is neither present nor predicted
    present: list[bool]  # per class: occurs in the ground truth
    pixels: int  # non-ignored pixels scored

    def to_json(self, class_names: list[str]) -> dict[str, object]:
        return {
            "miou": self.miou,
            "accuracy": self.accuracy,
            "pixels": self.pixels,
            "per_class_iou": {n: (None if math.isnan(v) else v) for n, v in zip(class_names, self.iou, strict=True)},
            "absent_classes": [n for n, p in zip(class_names, self.present, strict=True) if not p],
        }


def seg_scores(confusion: np.ndarray) -> SegScores:
    """mIoU, pixel accuracy and per-class IoU of a ``(K, K)`` confusion matrix (rows = ground truth)."""
    conf = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(conf)
    gt = conf.sum(1)
    union = gt + conf.sum(0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    total = conf.sum()
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    acc = float(tp.sum() / total) if total > 0 else float("nan")
    return SegScores(miou, acc, iou.tolist(), (gt > 0).tolist(), int(total))


class SegMetrics:
    """Accumulates a confusion matrix over batches: ``update(pred, target)`` then ``scores()``."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """``pred`` class ids and ``target`` (same shape; ``ignore_index`` skipped)."""
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def scores(self) -> SegScores:
        return seg_scores(self.confusion)


def majority_baseline(train_counts: np.ndarray, val_confusion: np.ndarray) -> tuple[int, SegScores]:
    """Scores of predicting the most frequent training class everywhere on the validation pixels."""
    cls = int(np.argmax(train_counts))
    gt = np.asarray(val_confusion).sum(1)
    conf = np.zeros_like(val_confusion)
    conf[:, cls] = gt
    return cls, seg_scores(conf)


DEPTH_KEYS = ("d1", "d2", "d3", "abs_rel", "rmse")


def depth_errors(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor, min_depth: float = 1e-3,
                 max_depth: float = 10.0) -> dict[str, float] | None:  # fmt: skip
    """Metrics of one image (``(H, W)`` metres) on its valid pixels, or None when it has none."""
    p = torch.as_tensor(pred, dtype=torch.float64).reshape(-1)
    g = torch.as_tensor(gt, dtype=torch.float64).reshape(-1)
    keep = (g > min_depth) & (g < max_depth) & torch.isfinite(g)
    if not bool(keep.any()):
        return None
    p, g = p[keep].clamp_min(1e-6), g[keep]
    ratio = torch.maximum(g / p, p / g)
    return {
        "d1": float((ratio < 1.25).double().mean()),
        "d2": float((ratio < 1.25**2).double().mean()),
        "d3": float((ratio < 1.25**3).double().mean()),
        "abs_rel": float(((p - g).abs() / g).mean()),
        "rmse": float(((p - g) ** 2).mean().sqrt()),
    }


class DepthMetrics:
    """Per-image depth metrics averaged over images (images without valid pixels are skipped)."""

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0) -> None:
        self.min_depth, self.max_depth = min_depth, max_depth
        self.sums = dict.fromkeys(DEPTH_KEYS, 0.0)
        self.images = 0

    def update(self, pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> None:
        """A batch ``(B, H, W)`` (or one ``(H, W)`` image) of predictions and ground truth in metres."""
        p, g = (torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else torch.as_tensor(a) for a in (pred, gt))
        if p.ndim == 2:
            p, g = p[None], g[None]
        for pi, gi in zip(p, g, strict=True):
            errs = depth_errors(pi, gi, self.min_depth, self.max_depth)
            if errs is not None:
                self.images += 1
                for k in DEPTH_KEYS:
                    self.sums[k] += errs[k]

    def scores(self) -> dict[str, float]:
        n = max(self.images, 1)
        out = {k: (v / n if self.images else float("nan")) for k, v in self.sums.items()}
        out["images"] = float(self.images)
        return out
