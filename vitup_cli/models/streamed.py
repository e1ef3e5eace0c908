"""AnyUp's and JAFAR's guidance encoders made row chunk by row chunk, exactly: no full-resolution map held.

Both methods encode the guidance image (at the output size) with a first conv, residual blocks of
``GroupNorm -> SiLU -> 1x1 conv`` and a 2-D rotary encoding of the pixel grid, then branch: a query encoder
whose map is average-pooled to the output size (JAFAR then GroupNorms it without affine) and a key encoder
pooled to the token grid. All of it is pointwise (the first conv: a window of ``k`` rows) except GroupNorm,
whose per-(image, group) mean and variance span the whole map. ``StreamedGuidance`` therefore learns the
GroupNorms one at a time: each in a pass over row chunks of the guidance image that recomputes the layers
before it with the statistics already learnt (``GroupNormStats``: float64 sums combined chunk by chunk,
float32 on MPS, torch's biased variance and ``eps``). The pass that first completes the key encoder pools
the keys chunk by chunk (adaptive pooling bins, overlapping ones included, as ``adaptive_avg_pool2d``
draws them); then any rows of the query map are made on demand (``rows``), so the 3x3 query conv of a
band needs its rows and a one-row halo only (``conv_rows``).

No tensor larger than a chunk (``chunk_pixels`` pixels of all images together, times the channels) is
held at any time; the result is the whole-map evaluation up to float summation order. The price is
compute: one pass over the guidance image per GroupNorm of the image encoder and per GroupNorm of the
deeper of the two branches (query and key encoders advance together), each recomputing the 1x1 convs
before that norm, plus the queries' recomputation per band.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

#: per (image, group): the mean and ``1 / sqrt(var + eps)``, each ``(B, G)``
Stats = tuple[torch.Tensor, torch.Tensor]


def _accumulator(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, stats: Stats | None = None) -> torch.Tensor:
    """``norm(x)``; with ``stats`` given, normalised by those (the whole map's) instead of ``x``'s own."""
    if stats is None:
        return norm(x)
    mean, rstd = stats
    B, C = x.shape[:2]
    per_group = C // norm.num_groups
    dtype = torch.promote_types(x.dtype, torch.float32)  # as GroupNorm under autocast: float32 at least
    scale = rstd.to(dtype).repeat_interleave(per_group, dim=1)  # (B, C)
    shift = -mean.to(dtype).repeat_interleave(per_group, dim=1) * scale
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    return torch.addcmul(shift.view(B, C, 1, 1), x, scale.view(B, C, 1, 1))


class NormBlock(Protocol):
    """A residual block ``x + f(norm2(hidden(x)))`` of the streamed encoders (AnyUp's and JAFAR's ``ResBlock``)."""

    norms: tuple[nn.GroupNorm, nn.GroupNorm]

    def hidden(self, x: torch.Tensor, stats: Stats | None = None) -> torch.Tensor: ...
    def __call__(self, x: torch.Tensor, stats: tuple[Stats, Stats] | None = None) -> torch.Tensor: ...


class GroupNormStats:
    """GroupNorm statistics over a map seen in chunks: ``collect`` each chunk, ``settle`` after the pass."""

    def __init__(self) -> None:
        self.known: dict[nn.GroupNorm, Stats] = {}
        self._running: dict[nn.GroupNorm, tuple[int, torch.Tensor, torch.Tensor]] = {}  # count, mean, sum sq dev

    def knows(self, *modules: nn.Module) -> bool:
        """Whether every GroupNorm inside ``modules`` has its statistics."""
        return all(m in self.known for module in modules for m in module.modules() if isinstance(m, nn.GroupNorm))

    def collect(self, norm: nn.GroupNorm, x: torch.Tensor) -> None:
        """Add a chunk of ``norm``'s input ``(B, C, rows, W)`` (Chan et al.'s pairwise combination)."""
        values = x.reshape(x.shape[0], norm.num_groups, -1).to(_accumulator(x.device))
        var, mean = torch.var_mean(values, dim=-1, correction=0)
        n, m2 = values.shape[-1], var * values.shape[-1]
        if norm in self._running:
            n0, mean0, m20 = self._running[norm]
            delta, total = mean - mean0, n0 + n
            mean, m2, n = mean0 + delta * (n / total), m20 + m2 + delta * delta * (n0 * n / total), total
        self._running[norm] = (n, mean, m2)

    def settle(self) -> None:
        """The statistics collected in this pass become known."""
        for norm, (n, mean, m2) in self._running.items():
            self.known[norm] = (mean, (m2 / n + norm.eps).rsqrt())
        self._running.clear()

    def blocks(self, blocks: Sequence[NormBlock], x: torch.Tensor) -> torch.Tensor | None:
        """``x`` through ``blocks`` with the statistics known; at the first unknown norm its input is
        collected instead and ``None`` returned."""
        for block in blocks:
            n1, n2 = block.norms
            if n1 in self.known and n2 in self.known:
                x = block(x, (self.known[n1], self.known[n2]))
            elif n1 in self.known:
                self.collect(n2, block.hidden(x, self.known[n1]))
                return None
            else:
                self.collect(n1, x)
                return None
        return x


def conv_rows(conv: nn.Conv2d, rows: Callable[[int, int], torch.Tensor], n_rows: int, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0..r1`` of ``conv(x)`` (stride 1, size-preserving padding, zeros or reflect) for a map ``x`` of
    ``n_rows`` rows of which ``rows(a, b)`` makes rows ``a..b``: the rows with a halo of ``padding`` rows,
    padded only at the map's true borders."""
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or isinstance(conv.padding, str):
        raise ValueError(f"conv_rows: a stride-1, undilated conv with explicit padding, not {conv}")
    ph, pw = conv.padding
    lo, hi = max(0, r0 - ph), min(n_rows, r1 + ph)
    x = rows(lo, hi)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    if ph or pw:
        x = F.pad(x, (pw, pw, ph - (r0 - lo), ph - (hi - r1)), mode=mode)
    return F.conv2d(x, conv.weight, conv.bias, groups=conv.groups)


def pool_weights(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """``(n_out, n_in)`` float32: adaptive average pooling along one axis (bin ``i`` spans
    ``floor(i * n_in / n_out)`` to ``ceil((i + 1) * n_in / n_out)``, as ``adaptive_avg_pool2d``'s)."""
    i = torch.arange(n_out, device=device)
    start, end = (i * n_in) // n_out, ((i + 1) * n_in + n_out - 1) // n_out
    j = torch.arange(n_in, device=device)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.float() / (end - start).float()[:, None]


def pool_rows(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weights (n, rows)`` applied to the rows of ``x (B, C, rows, W)`` -> ``(B, C, n, W)``, in float32."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.matmul(weights, x.float())


class StreamedGuidance:
    """A guidance image's pooled keys and, on demand, rows of its query map, made in row chunks.

    ``image_encoder``, ``query_encoder`` and ``key_encoder`` are ``Sequential(first conv, *NormBlocks)``;
    ``rope(x, row0, height)`` rotates rows ``row0..`` of a ``height``-row map; ``query_norm`` (JAFAR) is
    applied to the query map after its pooling to ``size``. ``keys``: ``(B, D, *low)`` float32, the key
    encoder's map average-pooled to the token grid ``low``."""

    def __init__(
        self,
        guidance: torch.Tensor,
        size: tuple[int, int],
        low: tuple[int, int],
        image_encoder: nn.Sequential,
        rope: Callable[[torch.Tensor, int, int], torch.Tensor],
        query_encoder: nn.Sequential,
        key_encoder: nn.Sequential,
        chunk_pixels: int,
        query_norm: nn.GroupNorm | None = None,
    ) -> None:
        self.guidance, self.size = guidance, (int(size[0]), int(size[1]))
        self.image_encoder, self.rope = image_encoder, rope
        self.query_encoder, self.key_encoder = query_encoder, key_encoder
        self.query_norm = query_norm
        self.stats = GroupNormStats()
        B, _, Hg, Wg = guidance.shape
        H, W = self.size
        self.same = (Hg, Wg) == (H, W)  # the query pooling is the identity (vitup's guidance is at the output size)
        self._row_weights = None if self.same else pool_weights(Hg, H, guidance.device)
        self.keys = self._learn(tuple(low), max(1, chunk_pixels // max(1, B * Wg)))
        if query_norm is not None and not self.same:  # its statistics are over the pooled map: a pass over it
            step = max(1, chunk_pixels // max(1, B * W))
            for a in range(0, H, step):
                self.stats.collect(query_norm, self.rows(a, min(H, a + step), normed=False))
            self.stats.settle()

    def _encoded(self, r0: int, r1: int) -> torch.Tensor | None:
        """Rows ``r0..r1`` of the rotary-encoded image encoding (``None`` while a statistic is collected)."""
        first, *blocks = self.image_encoder
        Hg = self.guidance.shape[-2]
        x = self.stats.blocks(blocks, conv_rows(first, lambda a, b: self.guidance[:, :, a:b], Hg, r0, r1))
        return None if x is None else self.rope(x, r0, Hg)

    def _branch(self, encoder: nn.Sequential, x: torch.Tensor) -> torch.Tensor | None:
        first, *blocks = encoder  # a 1x1 conv: no padding to apply (a reflect-mode module would copy x)
        return self.stats.blocks(blocks, conv_rows(first, lambda a, b: x, x.shape[-2], 0, x.shape[-2]))

    def _learn(self, low: tuple[int, int], step: int) -> torch.Tensor:
        """Pass after pass over the guidance rows: every statistic of the guidance-resolution map, and the keys."""
        Hg = self.guidance.shape[-2]
        queries = [self.query_encoder]
        if self.query_norm is not None and self.same:
            queries.append(self.query_norm)
        rows = pool_weights(Hg, low[0], self.guidance.device)
        keys = None
        while keys is None or not self.stats.knows(*queries):
            complete = keys is None and self.stats.knows(self.image_encoder, self.key_encoder)
            total = None
            for r0 in range(0, Hg, step):
                r1 = min(Hg, r0 + step)
                encoded = self._encoded(r0, r1)
                if encoded is None:
                    continue
                if not self.stats.knows(*queries):
                    q = self._branch(self.query_encoder, encoded)
                    if q is not None and self.query_norm is not None:  # JAFAR at the output size: its input
                        self.stats.collect(self.query_norm, q)
                if keys is None:
                    k = self._branch(self.key_encoder, encoded)
                    if complete:
                        part = pool_rows(rows[:, r0:r1], F.adaptive_avg_pool2d(k, (r1 - r0, low[1])))
                        total = part if total is None else total + part
            keys = total if complete else keys
            self.stats.settle()
        return keys

    def rows(self, a: int, b: int, normed: bool = True) -> torch.Tensor:
        """Rows ``a..b`` of the query map at ``size`` ``(B, D, b - a, W)`` (``query_norm``'ed when there is one)."""
        H, W = self.size
        if self.same:
            s, t = a, b
        else:  # the guidance rows their pooling bins span
            Hg = self.guidance.shape[-2]
            s, t = (a * Hg) // H, (b * Hg + H - 1) // H
        q = self._branch(self.query_encoder, self._encoded(s, t))
        if not self.same:
            q = pool_rows(self._row_weights[a:b, s:t], F.adaptive_avg_pool2d(q, (t - s, W)))
        if normed and self.query_norm is not None:
            q = group_norm(q, self.query_norm, self.stats.known[self.query_norm])
        return q
