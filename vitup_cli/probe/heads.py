"""Probe heads and losses: the 1x1-conv segmentation head and the JAFAR/DINOv2 binned depth head.

Both heads take features at the stored resolution and return predictions at the label size. A 1x1 conv
and bilinear resizing are both linear (and resizing weights sum to one), so convolving first and
resizing the result equals resizing the features first and convolving, the protocol's order: the result
is the same while the work and memory are ``K / C`` of it (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (pixel centres, no antialiasing: a fixed linear map), a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class LinearHead(nn.Module):
    """Segmentation probe: a 1x1 conv ``C -> K`` applied to features resized to the label size."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(B, C, h, w)`` -> logits ``(B, K, H, W)``."""
        return resize(self.conv(feats), size)


class DepthHead(nn.Module):
    """JAFAR's depth probe (DINOv2's linear depth head, classification-style binning).

    A 1x1 conv from ``[features, L2-normalised CLS token broadcast over the map]`` (``2C`` channels) to
    ``bins`` logits; ``ReLU + 0.1``, normalised over bins, expectation over ``linspace(min_depth,
    max_depth, bins)`` metres. Without a CLS token (``use_cls=False``) the conv sees the features only.
    """

    def __init__(
        self, channels: int, bins: int = 256, min_depth: float = 1e-3, max_depth: float = 10.0, use_cls: bool = True
    ) -> None:
        super().__init__()
        self.use_cls = use_cls
        self.conv = nn.Conv2d(channels * (2 if use_cls else 1), bins, kernel_size=1)
        self.register_buffer("bin_centres", torch.linspace(min_depth, max_depth, bins), persistent=False)

    def logits(self, feats: torch.Tensor, cls: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        """The conv's output at the label size, before the ReLU: ``(B, bins, H, W)``."""
        c = feats.shape[1]
        out = F.conv2d(feats, self.conv.weight[:, :c], self.conv.bias)
        if self.use_cls:
            if cls is None:
                raise ValueError("this depth head needs the CLS token")
            tok = F.normalize(cls.float(), dim=-1)
            out = out + (tok @ self.conv.weight[:, c:, 0, 0].T)[:, :, None, None]
        return resize(out, size)

    def forward(self, feats: torch.Tensor, cls: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        """``(B, C, h, w)`` features and ``(B, C)`` CLS tokens -> depth ``(B, 1, H, W)`` in metres."""
        x = F.relu(self.logits(feats, cls, size)) + 0.1
        x = x / x.sum(dim=1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", x, self.bin_centres.to(x.dtype)).unsqueeze(1)


# -- depth losses ---------------------------------------------------------------------------------
_EPS = 1e-3


def _valid(target: torch.Tensor, max_depth: float | None) -> torch.Tensor:
    mask = target > 0
    return mask & (target <= max_depth) if max_depth is not None else mask


def sig_loss(
    pred: torch.Tensor, target: torch.Tensor, max_depth: float | None = 10.0, warm_up: bool = False
) -> torch.Tensor:
    """Scale-invariant log loss (AdaBins; DINOv2's and JAFAR's ``SigLoss``) over valid pixels of the batch.

    ``g = log(pred + eps) - log(gt + eps)``; ``sqrt(var(g) + 0.15 * mean(g)^2)``. During warm-up (JAFAR's
    first 100 iterations) only the mean term: ``sqrt(0.15 * mean(g)^2)``.
    """
    mask = _valid(target, max_depth)
    if not bool(mask.any()):
        return pred.sum() * 0
    g = torch.log(pred[mask] + _EPS) - torch.log(target[mask] + _EPS)
    if warm_up:
        return torch.sqrt(0.15 * g.mean() ** 2)
    var = g.var() if g.numel() > 1 else g.new_zeros(())
    return torch.sqrt(var + 0.15 * g.mean() ** 2)


def gradient_loss(pred: torch.Tensor, target: torch.Tensor, max_depth: float | None = 10.0) -> torch.Tensor:
    """Multi-scale log-depth gradient matching (MegaDepth; DINOv2's ``GradientLoss``).

    At strides 1, 2, 4, 6: the absolute difference of the log-error between pixels two apart, vertically
    and horizontally, where both are valid, summed and divided by the number of valid pixels at that
    scale. Works on ``(..., H, W)``; the differences are taken over the image axes. (JAFAR's copy slices
    the first two axes of its ``(B, 1, H, W)`` tensors, i.e. compares images of the batch; this is the
    loss as it was meant.)
    """
    total = pred.new_zeros(())
    for stride in (1, 2, 4, 6):
        p, t = pred[..., ::stride, ::stride], target[..., ::stride, ::stride]
        mask = _valid(t, max_depth)
        n = mask.sum()
        if n == 0:
            continue
        m = mask.to(p.dtype)
        diff = (torch.log(p + _EPS) - torch.log(t + _EPS)) * m
        v = (diff[..., :-2, :] - diff[..., 2:, :]).abs() * m[..., :-2, :] * m[..., 2:, :]
        h = (diff[..., :, :-2] - diff[..., :, 2:]).abs() * m[..., :, :-2] * m[..., :, 2:]
        total = total + (v.sum() + h.sum()) / n
    return total


def depth_loss(pred: torch.Tensor, target: torch.Tensor, max_depth: float = 10.0, warm_up: bool = False,
               gradient_weight: float = 0.5) -> torch.Tensor:  # fmt: skip
    """JAFAR's depth objective: ``SigLoss + 0.5 * GradientLoss``."""
    return sig_loss(pred, target, max_depth, warm_up) + gradient_weight * gradient_loss(pred, target, max_depth)


# -- schedules ------------------------------------------------------------------------------------
SCHEDULES = ("cosine", "jafar")


def lr_at(step: int, base_lr: float, total_steps: int, epochs: int, schedule: str = "cosine") -> float:
    """The learning rate used for iteration ``step`` (0-based).

    ``cosine``: one half-cosine from ``base_lr`` to 0 over all iterations (the protocol).
    ``jafar``: JAFAR's probe script built ``CosineAnnealingLR(T_max=epochs)`` but stepped it every
    iteration, so the rate follows a cosine of period ``2 * epochs`` *iterations*, oscillating all through
    training. Published JAFAR-family tables were made that way; use it to reproduce them.
    """
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    if schedule == "jafar":
        return base_lr * 0.5 * (1 + math.cos(math.pi * step / max(epochs, 1)))
    raise ValueError(f"unknown schedule {schedule!r}: use one of {SCHEDULES}")
