"""FeatSharp (Ranzinger et al., 2025): a JBU upsampling of the global view, refined by one local-attention
block that also sees a mosaic of backbone tiles.

Written from the paper and vitup's research notes (``research/peers.md`` section 4); the reference code
(NVlabs/FeatSharp) is under a non-commercial licence and none of it is used here.

Per image, at upsample factor ``u`` and backbone resolution ``r`` (``h = r / patch`` tokens per side):

1. the image at ``u * r`` px is resized to ``r`` (the global view) and cut into ``u x u`` tiles of ``r``;
   all ``1 + u^2`` views go through the backbone in one batch (final features, tap ``depth``);
2. every view is PHI-S normalised (``alpha * R (x - mu)``, statistics fitted once on a sample of images)
   and the learned de-bias buffer ``g`` ``(1, C, h, h)`` is added (tiles included);
3. the global view is upsampled by a stack of FeatUp JBU levels (one per prime factor of ``u``, image as
   guidance); the tiles are stitched into a ``(C, u h, u h)`` mosaic plus a learned vector per tile;
4. one pre-norm transformer block on ``[base, mosaic]`` (``2C`` channels): 2D local attention in 7x7
   windows with ALiBi-style penalties (even heads ``|d row|``, odd heads ``|d col|``), a SwiGLU FFN that
   maps ``2C -> C``, LayerScale ``1e-6``; the first ``C`` channels of the residual stream are kept, so an
   untrained FeatSharp returns its base upsampler's features;
5. the result is mapped back to the backbone's feature space (inverse PHI-S).

Native output: ``u h x u h`` tokens (56 x 56 at ``u = 2`` over 448 px); other sizes are a bilinear resize.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitup_cli.backbones import Backbone
from vitup_cli.errors import VitupError
from vitup_cli.models.base import Upsampler, _as_size, sample_map
from vitup_cli.models.registry import Capabilities, UpsamplerSpec, register_upsampler

FACTORS = (2, 4)


@dataclass
class FeatSharpConfig:
    """FeatSharp hyperparameters; the defaults are the paper's configuration (JBU + tiles, one block)."""

    factor: int = 2  # u: native output = u x the backbone's token grid; 1 + u^2 backbone passes
    input_tokens: int = 28  # the global view's tokens per side (448 px at patch 16)
    window: int = 7  # local attention window (tokens per side)
    num_heads: int = 16
    mlp_ratio: float = 4.0  # SwiGLU hidden = 2/3 of mlp_ratio * 2C, rounded up to a multiple of 8
    layerscale_init: float = 1e-6
    jbu_radius: int = 3  # 7x7 JBU kernels
    jbu_key_dim: int = 32
    debias: bool = True
    attention_block: int = 8  # query block side of the exact windowed attention (speed/memory only)


# =================================================================================================
# PHI-S
# =================================================================================================
def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _paley(q: int) -> np.ndarray:
    """Paley construction I: a Hadamard matrix of order ``q + 1`` for a prime ``q = 3 (mod 4)``."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)])
    jac = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])  # skew: chi(-1) = -1
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return s + np.eye(q + 1, dtype=np.int64)


def hadamard(n: int) -> np.ndarray | None:
    """A normalised Hadamard matrix of order ``n`` (Sylvester x Paley), or None if neither builds one."""
    base, twos = n, 0
    while base % 2 == 0 and base > 1:
        base //= 2
        twos += 1
    core = None
    if base == 1:
        core = np.ones((1, 1), dtype=np.int64)
    else:
        for k in range(twos + 1):  # base * 2^k = q + 1 for a Paley prime q
            m = base * 2**k
            if _is_prime(m - 1) and (m - 1) % 4 == 3:
                core, twos = _paley(m - 1), twos - k
                break
    if core is None:
        return None
    h = core
    for _ in range(twos):
        h = np.block([[h, h], [h, -h]])
    out = h.astype(np.float64) / math.sqrt(n)
    assert np.allclose(out @ out.T, np.eye(n))
    return out


def equalising_rotation(eigenvalues: np.ndarray) -> np.ndarray:
    """An orthogonal ``Q`` with ``diag(Q diag(lambda) Q^T)`` constant (= mean lambda), by Givens rotations.

    Used when no Hadamard matrix of order ``C`` is at hand; each rotation sets one diagonal entry to the mean.
    """
    a = np.diag(np.asarray(eigenvalues, dtype=np.float64))
    n = a.shape[0]
    q = np.eye(n)
    target = float(np.trace(a)) / n
    tol = 1e-12 * max(1.0, abs(target))
    for _ in range(n):
        d = np.diag(a)
        above, below = np.flatnonzero(d > target + tol), np.flatnonzero(d < target - tol)
        if not len(above) or not len(below):
            break
        i, j = int(above[0]), int(below[0])
        ai, aj, b = a[i, i], a[j, j], a[i, j]
        # a_ii(theta) = (ai + aj)/2 + (ai - aj)/2 cos 2t + b sin 2t; solve a_ii(theta) = target
        amp = math.hypot((ai - aj) / 2, b)
        phi = math.atan2(b, (ai - aj) / 2)
        two_t = phi + math.acos(max(-1.0, min(1.0, (target - (ai + aj) / 2) / amp)))
        c, s = math.cos(two_t / 2), math.sin(two_t / 2)
        g = np.eye(n)
        g[i, i], g[i, j], g[j, i], g[j, j] = c, s, -s, c
        rows = [i, j]
        a[rows, :] = g[np.ix_(rows, rows)] @ a[rows, :]
        a[:, rows] = a[:, rows] @ g[np.ix_(rows, rows)].T
        q[rows, :] = g[np.ix_(rows, rows)] @ q[rows, :]
    return q


class MomentAccumulator:
    """Running mean and scatter matrix of feature vectors in float64 (Chan et al.'s pairwise update)."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, feats: torch.Tensor) -> None:
        """Add ``(B, C, h, w)`` feature maps (every position is one sample)."""
        x = feats.detach().permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).to("cpu", torch.float64)
        self.merge(x.shape[0], x.mean(0), (x - x.mean(0)).T @ (x - x.mean(0)))

    def merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.m2 += m2 + torch.outer(delta, delta) * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total

    def covariance(self) -> torch.Tensor:
        return self.m2 / max(1, self.count - 1)


class PhiS(nn.Module):
    """PHI-S standardisation ``x' = alpha R (x - mu)``: ``R = H V^T`` rotates into the covariance's eigenbasis
    and then by a normalised Hadamard matrix ``H``, ``alpha = 1 / sqrt(mean eigenvalue)``. Every output
    channel then has unit variance on the statistics sample and the map is a similarity (MSEs scale by
    ``alpha^2``). When no Hadamard matrix of order ``C`` exists, ``H`` is a Givens-built rotation with the
    same property (``equalising_rotation``). The buffers are stored with the checkpoint.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("rotation", torch.eye(dim))
        self.register_buffer("alpha", torch.ones(()))
        self.register_buffer("samples", torch.zeros((), dtype=torch.int64))  # feature vectors seen; 0 = unfitted

    @property
    def fitted(self) -> bool:
        return int(self.samples) > 0

    @torch.no_grad()
    def fit(self, stats: MomentAccumulator) -> None:
        """Set ``mu``, ``R``, ``alpha`` from accumulated float64 statistics."""
        if stats.count < 2:
            raise VitupError("PHI-S needs at least two feature vectors to estimate a covariance")
        lam, vecs = torch.linalg.eigh(stats.covariance())
        lam = lam.clamp_min(0)
        # a canonical sign per eigenvector (largest entry positive): the same statistics, the same rotation
        signs = torch.sign(vecs.gather(0, vecs.abs().argmax(0, keepdim=True)))
        vecs = vecs * torch.where(signs == 0, 1.0, signs)
        if not float(lam.mean()) > 0:
            raise VitupError("PHI-S: the sampled features have zero variance (constant images?)")
        mixer = hadamard(lam.shape[0])
        mixer = torch.from_numpy(mixer if mixer is not None else equalising_rotation(lam.numpy()))
        self.mean.copy_(stats.mean)
        self.rotation.copy_(mixer @ vecs.T)
        self.alpha.copy_(1.0 / lam.mean().sqrt())
        self.samples.fill_(stats.count)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` backbone features -> PHI-S space (in the input's dtype, never autocast)."""
        with torch.autocast(x.device.type, enabled=False):
            rot = self.rotation.to(x.dtype) * self.alpha.to(x.dtype)
            return torch.einsum("dc,bchw->bdhw", rot, x - self.mean.to(x.dtype)[:, None, None])

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` PHI-S features -> the backbone's space (``R^T y / alpha + mu``)."""
        with torch.autocast(y.device.type, enabled=False):
            rot = self.rotation.to(y.dtype) / self.alpha.to(y.dtype)
            return torch.einsum("dc,bdhw->bchw", rot, y) + self.mean.to(y.dtype)[:, None, None]


# =================================================================================================
# JBU (FeatUp's joint bilateral upsampler), plain PyTorch
# =================================================================================================
def _prime_factors(n: int) -> list[int]:
    out, d = [], 2
    while n > 1:
        while n % d == 0:
            out.append(d)
            n //= d
        d += 1
    return out


class JBULevel(nn.Module):
    """One JBU level: bilinear upsampling refined by a per-pixel ``(2r+1)^2`` kernel = softmax range kernel
    on a learned projection of the guidance x a Gaussian spatial kernel with learned sigma, normalised."""

    def __init__(self, guidance_dim: int = 3, key_dim: int = 32, radius: int = 3) -> None:
        super().__init__()
        self.radius = radius
        self.range_proj = nn.Sequential(
            nn.Conv2d(guidance_dim, key_dim, 1), nn.GELU(), nn.Conv2d(key_dim, key_dim, 1)
        )  # fmt: skip
        self.range_temp = nn.Parameter(torch.tensor(0.0))
        self.range_alpha = nn.Parameter(torch.tensor(0.0))
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0))
        self.spatial_alpha = nn.Parameter(torch.tensor(0.0))

    def _offsets(self) -> list[tuple[int, int]]:
        d = 2 * self.radius + 1
        return [(i, j) for i in range(d) for j in range(d)]

    def kernel(self, guidance: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` guidance -> normalised kernels ``(B, (2r+1)^2, H, W)`` (row-major offsets)."""
        r, (H, W) = self.radius, guidance.shape[-2:]
        key = self.range_proj(guidance)
        padded = F.pad(key, [r] * 4, mode="reflect")
        logits = torch.stack([(padded[:, :, i : i + H, j : j + W] * key).sum(1) for i, j in self._offsets()], 1)
        temp = self.range_temp.exp().clamp(1e-4, 1e4)
        range_k = self.range_alpha.exp() * torch.softmax(temp * logits, dim=1)
        grid = torch.linspace(-1, 1, 2 * r + 1, device=guidance.device, dtype=guidance.dtype)
        yy, xx = torch.meshgrid(grid, grid, indexing="ij")
        spatial = self.spatial_alpha.exp() * torch.exp(-(xx**2 + yy**2) / (2 * self.sigma_spatial**2))
        combined = range_k * spatial.reshape(1, -1, 1, 1)
        return combined / combined.sum(1, keepdim=True).clamp_min(1e-7)

    def forward(self, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` features, ``(B, 3, H, W)`` guidance -> ``(B, C, H, W)``."""
        r, (H, W) = self.radius, guidance.shape[-2:]
        k = self.kernel(guidance)
        up = F.interpolate(source, size=(H, W), mode="bilinear", align_corners=False)
        padded = F.pad(up, [r] * 4, mode="reflect")
        out = torch.zeros_like(up)
        for n, (i, j) in enumerate(self._offsets()):  # an adaptive convolution, one offset at a time
            out = out + padded[:, :, i : i + H, j : j + W] * k[:, n : n + 1]
        return out


class JBUStack(nn.Module):
    """One JBU level per prime factor of ``factor``; guidance = the image area-pooled to each level's size."""

    def __init__(self, factor: int, key_dim: int = 32, radius: int = 3) -> None:
        super().__init__()
        self.factors = _prime_factors(factor)
        self.levels = nn.ModuleList(JBULevel(3, key_dim, radius) for _ in self.factors)

    def forward(self, source: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        for f, level in zip(self.factors, self.levels, strict=True):
            size = (source.shape[-2] * f, source.shape[-1] * f)
            source = level(source, F.adaptive_avg_pool2d(image, size))
        return source


# =================================================================================================
# the refinement block
# =================================================================================================
def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Penalty slopes per head: 1/2, 1/2, 1/4, 1/4, ... (even heads rows, odd heads columns)."""
    return 1.0 / 2.0 ** ((torch.arange(num_heads) + 2) // 2).float()


def local_bias(height: int, width: int, num_heads: int, window: int) -> torch.Tensor:
    """The exact additive mask of 2D local attention on an ``H x W`` grid: ``(heads, N, N)``, ``-inf``
    outside the ``window x window`` neighbourhood (truncated at the borders), else ``-slope * |d|``."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dr, dc = (ys[:, None] - ys[None]).abs(), (xs[:, None] - xs[None]).abs()
    rad = window // 2
    inside = (dr <= rad) & (dc <= rad)
    dist = torch.stack([dr if h % 2 == 0 else dc for h in range(num_heads)]).float()
    bias = -alibi_slopes(num_heads)[:, None, None] * dist
    return bias.masked_fill(~inside, float("-inf"))


@functools.lru_cache(maxsize=16)
def _block_bias(
    height: int, width: int, num_heads: int, window: int, block: int, device: str, dtype: torch.dtype
) -> torch.Tensor:
    """Mask for block-local attention: query blocks of ``block x block`` tokens attend to their halo of
    ``(block + 2 rad)^2`` keys. ``(1, nb * heads, block^2, halo^2)`` additive, exact (see ``local_bias``)."""
    rad = window // 2
    halo = block + 2 * rad
    nbh, nbw = -(-height // block), -(-width // block)
    qi, qj = torch.meshgrid(torch.arange(block), torch.arange(block), indexing="ij")
    ki, kj = torch.meshgrid(torch.arange(halo), torch.arange(halo), indexing="ij")
    qi, qj, ki, kj = qi.reshape(-1, 1), qj.reshape(-1, 1), ki.reshape(1, -1) - rad, kj.reshape(1, -1) - rad
    dr, dc = (qi - ki).abs(), (qj - kj).abs()
    rel = torch.stack([dr if h % 2 == 0 else dc for h in range(num_heads)]).float()
    rel = -alibi_slopes(num_heads)[:, None, None] * rel  # (heads, block^2, halo^2)
    inside = (dr <= rad) & (dc <= rad)
    by, bx = torch.meshgrid(torch.arange(nbh), torch.arange(nbw), indexing="ij")
    by, bx = by.reshape(-1, 1, 1) * block, bx.reshape(-1, 1, 1) * block  # block origins
    key_ok = (by + ki >= 0) & (by + ki < height) & (bx + kj >= 0) & (bx + kj < width)  # (nb, 1, halo^2)
    query_pad = (by + qi >= height) | (bx + qj >= width)  # (nb, block^2, 1): padding queries
    self_key = (qi == ki) & (qj == kj)  # a padding query attends to itself (a zero key) and is dropped later
    allowed = inside & (key_ok | (query_pad & self_key))  # (nb, block^2, halo^2)
    bias = rel[None].masked_fill(~allowed[:, None], float("-inf"))  # (nb, heads, block^2, halo^2)
    return bias.reshape(1, -1, block * block, halo * halo).to(device=device, dtype=dtype)


class LocalAttention(nn.Module):
    """Multi-head 2D local attention with ALiBi-style row/column penalties, on ``(B, H, W, D)`` tokens.

    Query/key heads are padded to the next power of two (as the reference does for its kernels) while
    values keep ``D / heads`` channels; the softmax scale is ``(D / heads)^-0.5``. Computed exactly by
    block-local SDPA: each block of queries attends to its halo of keys under an additive mask
    (``_block_bias``), so it runs forward and backward on any device without flex attention.
    """

    def __init__(self, dim: int, num_heads: int, window: int, block: int = 8) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        if window % 2 == 0:
            raise ValueError(f"local attention window {window} must be odd")
        self.num_heads, self.window, self.block = num_heads, window, block
        self.v_dim = dim // num_heads
        self.qk_dim = 2 ** math.ceil(math.log2(self.v_dim))
        self.qkv = nn.Linear(dim, num_heads * (2 * self.qk_dim + self.v_dim), bias=False)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, H, W, _ = x.shape
        nh, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        qkv = self.qkv(x)
        q, k, v = qkv.split([nh * dq, nh * dq, nh * dv], dim=-1)
        to_heads = lambda t, d: t.reshape(B, H, W, nh, d).permute(0, 3, 1, 2, 4)
        return to_heads(q, dq), to_heads(k, dq), to_heads(v, dv)  # (B, heads, H, W, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, D = x.shape
        nh, blk, rad = self.num_heads, self.block, self.window // 2
        q, k, v = self._split(x)
        nbh, nbw = -(-H // blk), -(-W // blk)
        ph, pw = nbh * blk - H, nbw * blk - W
        halo = blk + 2 * rad

        def queries(t: torch.Tensor) -> torch.Tensor:  # (B, nh, H, W, d) -> (B, nb*nh, blk^2, d)
            t = F.pad(t, (0, 0, 0, pw, 0, ph))
            t = t.reshape(B, nh, nbh, blk, nbw, blk, -1).permute(0, 2, 4, 1, 3, 5, 6)
            return t.reshape(B, nbh * nbw * nh, blk * blk, -1)

        def halos(t: torch.Tensor) -> torch.Tensor:  # (B, nh, H, W, d) -> (B, nb*nh, halo^2, d)
            t = F.pad(t, (0, 0, rad, rad + pw, rad, rad + ph))
            t = t.unfold(2, halo, blk).unfold(3, halo, blk)  # (B, nh, nbh, nbw, d, halo, halo)
            t = t.permute(0, 2, 3, 1, 5, 6, 4)
            return t.reshape(B, nbh * nbw * nh, halo * halo, -1)

        bias = _block_bias(H, W, nh, self.window, blk, str(x.device), q.dtype)
        out = F.scaled_dot_product_attention(
            queries(q), halos(k), halos(v), attn_mask=bias, scale=self.v_dim**-0.5
        )  # (B, nb*nh, blk^2, dv)
        out = out.reshape(B, nbh, nbw, nh, blk, blk, self.v_dim).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, nbh * blk, nbw * blk, D)[:, :H, :W]
        return self.proj(out)

    def naive(self, x: torch.Tensor) -> torch.Tensor:
        """The same attention as a full ``N x N`` masked attention (for tests; quadratic memory)."""
        B, H, W, D = x.shape
        q, k, v = (t.flatten(2, 3) for t in self._split(x))  # (B, heads, N, d)
        logits = q @ k.transpose(-1, -2) * self.v_dim**-0.5
        logits = logits + local_bias(H, W, self.num_heads, self.window).to(logits)
        out = torch.softmax(logits, -1) @ v  # (B, heads, N, dv)
        return self.proj(out.permute(0, 2, 1, 3).reshape(B, H, W, D))


class SwiGLU(nn.Module):
    """``w3(silu(a) * b)`` with ``[a, b] = w12(x)``."""

    def __init__(self, dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class RefineBlock(nn.Module):
    """Pre-norm block on ``(B, H, W, G)`` -> ``(B, H, W, C)``: ``x + ls1 * attn(LN x)``, then the first ``C``
    channels of that plus ``ls2 * SwiGLU(LN x)`` (the FFN maps ``G -> C``)."""

    def __init__(self, dim_in: int, dim_out: int, config: FeatSharpConfig) -> None:
        super().__init__()
        self.dim_out = dim_out
        self.norm1 = nn.LayerNorm(dim_in)
        self.attn = LocalAttention(dim_in, config.num_heads, config.window, config.attention_block)
        self.ls1 = nn.Parameter(torch.full((dim_in,), config.layerscale_init))
        self.norm2 = nn.LayerNorm(dim_in)
        hidden = (int(config.mlp_ratio * dim_in * 2 / 3) + 7) // 8 * 8
        self.ffn = SwiGLU(dim_in, hidden, dim_out)
        self.ls2 = nn.Parameter(torch.full((dim_out,), config.layerscale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x))
        return x[..., : self.dim_out] + self.ls2 * self.ffn(self.norm2(x))


class FeatSharpHead(nn.Module):
    """Everything FeatSharp learns: de-bias buffer, JBU stack, tile positions, refinement block."""

    def __init__(self, dim: int, tokens: int, config: FeatSharpConfig) -> None:
        super().__init__()
        u = config.factor
        self.debias = nn.Parameter(torch.zeros(1, dim, tokens, tokens)) if config.debias else None
        self.jbu = JBUStack(u, config.jbu_key_dim, config.jbu_radius)
        self.tile_pos = nn.Parameter(torch.zeros(1, dim, u, u))
        self.block = RefineBlock(2 * dim, dim, config)

    def add_bias(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` PHI-S features + the de-bias buffer (bilinearly resized if the grid differs)."""
        if self.debias is None:
            return feats
        g = self.debias
        if g.shape[-2:] != feats.shape[-2:]:
            g = F.interpolate(g, size=feats.shape[-2:], mode="bilinear", align_corners=False)
        return feats + g.to(feats.dtype)

    def forward(self, lowres: torch.Tensor, mosaic: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """lowres ``(B, C, h, h)``, mosaic ``(B, C, u h, u h)``, guidance image ``(B, 3, S, S)`` ->
        ``(B, C, u h, u h)`` (all features in PHI-S space, de-biased)."""
        base = self.jbu(lowres, guidance)
        tiles = mosaic + self.tile_pos.repeat_interleave(lowres.shape[-2], 2).repeat_interleave(lowres.shape[-1], 3)
        x = torch.cat([base, tiles], dim=1).permute(0, 2, 3, 1)
        return self.block(x).permute(0, 3, 1, 2)


def parameter_counts(head: FeatSharpHead) -> dict[str, int]:
    """Parameters per part of a FeatSharp head, and the total."""
    parts = {
        "refine_block": sum(p.numel() for p in head.block.parameters()),
        "jbu": sum(p.numel() for p in head.jbu.parameters()),
        "tile_pos": head.tile_pos.numel(),
        "debias": head.debias.numel() if head.debias is not None else 0,
    }
    return {**parts, "total": sum(parts.values())}


# =================================================================================================
# the upsampler
# =================================================================================================
class FeatSharp(Upsampler):
    """FeatSharp over a frozen backbone: takes images at ``u * r`` px (``input_size``), runs the backbone
    on the global view at ``r`` (``backbone_size``) and on ``u x u`` tiles; native output ``u h x u h``."""

    name = "featsharp"
    compile_parts = ("head.jbu", "head.block")

    def __init__(self, backbone: Backbone, config: FeatSharpConfig | None = None) -> None:
        config = config or FeatSharpConfig()
        if config.factor not in FACTORS:
            raise VitupError(f"--factor {config.factor}: FeatSharp is built for factors {', '.join(map(str, FACTORS))}")
        if config.input_tokens < 4:
            raise VitupError(f"FeatSharp needs at least 4 tokens per side (got {config.input_tokens})")
        super().__init__(backbone, config.factor * config.input_tokens * backbone.patch_size)
        self.config = config
        self.tap = backbone.depth  # the final features (after the final norm)
        self.phis = PhiS(backbone.embed_dim)
        self.head = FeatSharpHead(backbone.embed_dim, config.input_tokens, config)

    # -- geometry ----------------------------------------------------------------------------------
    @property
    def factor(self) -> int:
        return self.config.factor

    @property
    def backbone_size(self) -> int:
        """The global view's side in pixels (``r``); ``input_size`` is ``u * r``."""
        return self.config.input_tokens * self.backbone.patch_size

    @property
    def token_grid(self) -> tuple[int, int]:
        """The global view's token grid ``(h, h)`` (what ``tokens`` returns)."""
        return self.config.input_tokens, self.config.input_tokens

    @property
    def native_grid(self) -> tuple[int, int]:
        side = self.config.factor * self.config.input_tokens
        return side, side

    def upsampler_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable parameters (de-bias, JBU, tile positions, block), without the backbone."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def parameter_counts(self) -> dict[str, int]:
        return parameter_counts(self.head)

    # -- views ---------------------------------------------------------------------------------------
    def views(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, 3, u r, u r)`` -> the ``1 + u^2`` views ``(B (1 + u^2), 3, r, r)``:
        first the ``B`` global views, then each image's tiles in row-major order."""
        B, u, r = x.shape[0], self.factor, self.backbone_size
        glob = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        tiles = x.reshape(B, 3, u, r, u, r).permute(0, 2, 4, 1, 3, 5).reshape(B * u * u, 3, r, r)
        return torch.cat([glob, tiles])

    def backbone_features(self, views: torch.Tensor) -> torch.Tensor:
        """Normalised ``(N, 3, r, r)`` views -> the backbone's final features ``(N, C, h, h)``."""
        return self.backbone.hidden_states(views, [self.tap])[0]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``(B, 3, u r, u r)`` -> (global ``(B, C, h, h)``, mosaic ``(B, C, u h, u h)``), both
        PHI-S normalised and de-biased."""
        self.require_statistics()
        B, u = x.shape[0], self.factor
        with torch.no_grad():  # the backbone is frozen: no graph through it
            raw = self.backbone_features(self.views(x)).float()
        feats = self.head.add_bias(self.phis.normalize(raw))
        lowres, tiles = feats[:B], feats[B:]
        C, h, w = tiles.shape[1:]
        mosaic = tiles.reshape(B, u, u, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, u * h, u * w)
        return lowres, mosaic

    def upsample_normalized(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` -> native features in PHI-S space ``(B, C, u h, u h)``."""
        x = self.prepare(images)
        lowres, mosaic = self.encode(x)
        return self.head(lowres, mosaic, x)

    def base_normalized(self, images: torch.Tensor) -> torch.Tensor:
        """The base upsampler alone (JBU of the de-biased global view), in PHI-S space."""
        x = self.prepare(images)
        lowres, _ = self.encode(x)
        return self.head.jbu(lowres, x)

    def target_features(self, views: torch.Tensor) -> torch.Tensor:
        """Training targets: normalised ``(N, 3, r, r)`` views -> de-biased PHI-S features ``(N, C, h, h)``."""
        self.require_statistics()
        with torch.no_grad():
            raw = self.backbone_features(views).float()
        return self.head.add_bias(self.phis.normalize(raw))

    # -- PHI-S ---------------------------------------------------------------------------------------
    def require_statistics(self) -> None:
        if not self.phis.fitted:
            raise VitupError(
                "this FeatSharp has no PHI-S statistics: load a checkpoint written by "
                "`vitup train --method featsharp` (or call fit_statistics on a sample of images first)"
            )

    @torch.no_grad()
    def accumulate_statistics(self, images: torch.Tensor, stats: MomentAccumulator) -> None:
        """Add the global views' backbone features of ``(B, 3, H, W)`` images in ``[0, 1]`` to ``stats``."""
        x = self.prepare(images)
        r = self.backbone_size
        glob = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        stats.update(self.backbone_features(glob).float())

    def fit_statistics(self, batches: Iterable[torch.Tensor]) -> int:
        """Fit PHI-S on image batches ``(B, 3, H, W)`` in ``[0, 1]``; returns the number of feature vectors."""
        stats = MomentAccumulator(self.dim)
        for images in batches:
            self.accumulate_statistics(images.to(self.phis.mean.device), stats)
        self.phis.fit(stats)
        return stats.count

    # -- the Upsampler interface -------------------------------------------------------------------
    def tokens(self, images: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        """The global view's backbone tokens ``(B, C, h, h)`` (raw, at ``backbone_size``)."""
        tap = self.backbone.taps[-1] if tap is None else tap
        x = self.prepare(images)
        r = self.backbone_size
        glob = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return self.backbone.hidden_states(glob, [tap])[0]

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return self._own_and_adapter_tensors()

    def check_tap(self, tap: int | None) -> None:
        if tap not in (None, self.tap):
            raise VitupError(f"--tap {tap}: FeatSharp upsamples the backbone's final features only (tap {self.tap})")

    def native(self, images: torch.Tensor) -> torch.Tensor:
        """Native features in the backbone's space: ``(B, 3, H, W)`` -> ``(B, C, u h, u h)``."""
        return self.phis.denormalize(self.upsample_normalized(images))

    def features(self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, C, size)``: native, or the native map bilinearly resized."""
        self.check_tap(tap)
        out = self.native(images)
        size = _as_size(size)
        if tuple(out.shape[-2:]) != size:
            shrink = size[0] < out.shape[-2] or size[1] < out.shape[-1]
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False, antialias=shrink)
        return out

    def query(self, images: torch.Tensor, xy: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        """Bilinear samples of the native map at ``xy`` ``(B, N, 2)`` -> ``(B, N, C)``."""
        self.check_tap(tap)
        return sample_map(self.native(images), xy)


register_upsampler(
    UpsamplerSpec(
        name="featsharp",
        model_class=FeatSharp,
        build=lambda backbone, config=None, input_size=None: FeatSharp(backbone, config),
        config_class=FeatSharpConfig,
        capabilities=Capabilities(trained=True, final_tap_only=True, any_tap=False),
        summary="tiles of the backbone + JBU + one local-attention block, PHI-S, de-bias",
        paper="Ranzinger et al. 2025 (FeatSharp)",
        licence="reference code non-commercial (NVlabs/FeatSharp); vitup's is its own",
    )
)
