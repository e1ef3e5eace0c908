"""Distillation losses: target-normalised L2, cosine distance and relational KL, over taps and scales.

All maps are NCHW, ``(B, C, g, g)``; every term is a mean over images and positions, so micro-batches
of equal size average to the full batch exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    l2: float = 1.0
    cos: float = 1.0
    kl: float = 1.0
    tau: float = 0.5
    kl_window: int = 28


def normalized_l2(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Both standardised by the *target* vector's channel mean and std, then the mean squared error:
    ``mean(((pred - mu_t) / sd_t - (target - mu_t) / sd_t) ** 2)``."""
    mu = target.mean(dim=1, keepdim=True)
    sd = target.std(dim=1, keepdim=True, unbiased=False) + eps
    return (((pred - mu) - (target - mu)) / sd).pow(2).mean()


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cos(pred, target)`` per position (over channels), averaged."""
    return (1 - F.cosine_similarity(pred, target, dim=1, eps=1e-8)).mean()


def kl_window_size(grid: int, window: int) -> int:
    """The largest divisor of ``grid`` that is at most ``window`` (windows tile the grid exactly)."""
    return max(d for d in range(1, min(grid, window) + 1) if grid % d == 0)


def _windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """``(B, C, g, g)`` -> ``(B * (g/w)^2, w*w, C)`` positions of each ``w x w`` window."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // w, w, W // w, w).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(-1, w * w, C)


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """``(..., n, n)`` -> ``(..., n, n - 1)``: each row without its diagonal entry."""
    n, batch = m.shape[-1], m.shape[:-2]
    return m.flatten(-2)[..., :-1].reshape(*batch, n - 1, n + 1)[..., 1:].reshape(*batch, n, n - 1)


def relational_kl(pred: torch.Tensor, target: torch.Tensor, tau: float = 0.5, window: int = 28) -> torch.Tensor:
    """KL(softmax(S_target) || softmax(S_pred)) per position, where ``S[i, j] = cos(f_i, f_j) / tau``
    over the other positions of its local window (diagonal masked); averaged.

    Windows of ``kl_window_size(g, window)`` positions per side tile the ``g x g`` grid, so memory is
    ``O(g^2 * window^2)`` instead of ``O(g^4)`` (the reference: chunks of 7x7 blocks of 4x4 queries).
    """
    g = pred.shape[-1]
    w = kl_window_size(g, window)
    if w * w < 2:
        return pred.new_zeros(())
    p = F.normalize(_windows(pred, w), dim=-1)
    t = F.normalize(_windows(target, w), dim=-1)
    log_p = F.log_softmax(_off_diagonal(p @ p.transpose(1, 2)) / tau, dim=-1)
    log_t = F.log_softmax(_off_diagonal(t @ t.transpose(1, 2)) / tau, dim=-1)
    return (log_t.exp() * (log_t - log_p)).sum(-1).mean()


def pool_to(pred: torch.Tensor, grid: int) -> torch.Tensor:
    """Mean-pool a ``(B, C, Q, Q)`` prediction to ``(B, C, grid, grid)`` (``grid`` divides ``Q``)."""
    q = pred.shape[-1]
    return pred if q == grid else F.avg_pool2d(pred, kernel_size=q // grid)


def distillation_loss(
    preds: Sequence[torch.Tensor],
    targets: Sequence[Sequence[torch.Tensor]],
    weights: LossWeights = LossWeights(),
    levels: Sequence[int] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss.

    Args:
        preds: per level, the prediction on the query grid ``(B, C, Q, Q)`` (float32).
        targets: per teacher scale, per level, the teacher map ``(B, C, g, g)``.
        levels: names of the levels in the returned terms (default ``0..L-1``).
    Returns:
        the weighted sum over levels, scales and terms; and detached terms: ``l2``, ``cos``, ``kl``
        (unweighted sums over levels and scales), ``level{k}`` and ``grid{g}`` (weighted sums).
    """
    levels = list(range(len(preds))) if levels is None else list(levels)
    total = preds[0].new_zeros(())
    terms: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        terms[key] = terms.get(key, 0) + value.detach()

    for scale_targets in targets:
        grid = scale_targets[0].shape[-1]
        for level, pred, target in zip(levels, preds, scale_targets, strict=True):
            pooled = pool_to(pred, grid)
            target = target.float()
            l2 = normalized_l2(pooled, target)
            cos = cosine_distance(pooled, target)
            kl = relational_kl(pooled, target, weights.tau, weights.kl_window) if weights.kl else l2.new_zeros(())
            weighted = weights.l2 * l2 + weights.cos * cos + weights.kl * kl
            total = total + weighted
            add("l2", l2)
            add("cos", cos)
            add("kl", kl)
            add(f"level{level}", weighted)
            add(f"grid{grid}", weighted)
    terms["loss"] = total.detach()
    return total, terms


def term_keys(num_levels: int, grids: Sequence[int]) -> list[str]:
    """The names ``distillation_loss`` returns, in a fixed order."""
    return ["loss", "l2", "cos", "kl", *(f"level{k}" for k in range(num_levels)), *(f"grid{g}" for g in grids)]
