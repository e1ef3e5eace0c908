"""ViT-Up: predict a ViT's own features at any image coordinate from its intermediate hidden states.

Per image, once: the image is normalised, then resized (bilinear, no antialiasing by default, as the
reference) to the backbone input (``h x w`` tokens, 28 per side by default) for the hidden states at the
taps, and to a ``224 x 224`` token grid for the query-embedding grid (the patch embedding alone).
Per query ``xy``: ``q0`` is a bilinear sample of that grid; six blocks each read one tap
(transition MLP, cross-attention with continuous 2D RoPE, FeatX, fusion MLP); one decoder per tap maps
``q0`` and each block's output into that tap's feature space. Queries run in chunks against the cache,
so memory is bounded at any output resolution and results do not depend on the chunk size.

Every convention follows the public reference (github krispinwandel/vit-up) number for number, so the
official weights load as they are: log-spaced Fourier bands with the channel order (raw, sin, cos); RoPE
on adjacent channel pairs, x frequencies in the first half of each head and y in the second; the nearest
token rounds half to even at exact token boundaries.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitup_cli.backbones import Backbone
from vitup_cli.errors import VitupError
from vitup_cli.models.base import Upsampler, _as_size, grid_xy, sample_map
from vitup_cli.models.registry import Capabilities, Preprocessing, UpsamplerSpec, register_upsampler


@dataclass
class ViTUpConfig:
    """ViT-Up hyperparameters; the defaults are the paper's."""

    num_blocks: int = 6
    input_tokens: int = 28  # backbone input, tokens per side (448 px at patch 16)
    query_grid: int = 224  # query-embedding grid, tokens per side (3584 px at patch 16)
    num_heads: int | None = None  # None: C // 64 (6 for a 384-d backbone)
    fourier_bands: int = 16
    fourier_max_res: float = 10.0
    rope_base: float = 100.0
    window: int | None = None  # cross-attention window in tokens; None = global
    chunk_queries: int = 112 * 112
    transition_ratio: int = 2
    mlp_ratio: int = 4
    #: antialias when resizing the image to the backbone input and the query grid. False is the
    #: reference's behaviour (and what the official weights were trained with); True is smoother on
    #: large photos. Recorded in checkpoints and stores.
    antialias: bool = False

    @property
    def code_dim(self) -> int:
        return 2 + 2 * 2 * self.fourier_bands


# -- position codes ---------------------------------------------------------------------------------
def fourier_freqs(bands: int = 16, max_res: float = 10.0) -> torch.Tensor:
    """Log-spaced band frequencies ``exp(linspace(0, ln max_res, bands))``: 1 .. ``max_res``, ``(bands,)``."""
    return torch.exp(torch.linspace(0.0, math.log(max_res), bands))


def fourier_code(offset: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Fourier features of an offset ``(..., 2)`` -> ``(..., 2 + 4 * bands)``.

    Channel order: the raw offset (x, y), then sin of (x bands, y bands), then cos likewise;
    the angle of band ``f`` is ``pi * f * offset``.
    """
    angles = offset.unsqueeze(-1) * freqs.to(offset) * math.pi  # (..., 2, bands)
    return torch.cat([offset, angles.sin().flatten(-2), angles.cos().flatten(-2)], dim=-1)


def rope_angles(pos: torch.Tensor, head_dim: int, base: float = 100.0) -> torch.Tensor:
    """Continuous 2D RoPE angles: positions ``(..., 2)`` in token units -> ``(..., head_dim // 2)``.

    One angle per rotation pair: the first ``head_dim // 4`` pairs follow x, the rest follow y; periods
    run from 1 to ``base`` tokens (angle = 2 pi * coordinate / period).
    """
    n = head_dim // 4
    inv_freq = 1.0 / (base ** (torch.arange(n, device=pos.device, dtype=torch.float32) / n))
    ang = 2 * math.pi * pos.float().unsqueeze(-1) * inv_freq  # (..., 2, n)
    return ang.flatten(-2)


def apply_rope(t: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate ``t`` ``(B, heads, N, D)`` by ``angles`` ``(B, 1, N, D/2)``: pair ``i`` is channels
    ``(2i, 2i + 1)`` (adjacent pairs, so x occupies the first half of each head, y the second)."""
    return rotate_pairs(t, angles.cos(), angles.sin())


def rotate_pairs(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` with the angles' ``cos`` and ``sin`` computed once (the decoder shares them
    between its blocks)."""
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    even, odd = t[..., 0::2], t[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def nearest_token(xy: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token nearest to each ``xy`` ``(B, N, 2)`` in ``[0, 1]`` on an ``h x w`` grid.

    Returns flat token ids ``(B, N)`` and the offset from that token's centre in token units ``(B, N, 2)``.
    Exact ties (a query on a token boundary) round half to even, as the reference does.
    """
    size = xy.new_tensor([w, h])
    cell = torch.round(xy * size - 0.5).long()
    cx, cy = cell[..., 0].clamp(0, w - 1), cell[..., 1].clamp(0, h - 1)
    centre = (torch.stack([cx, cy], dim=-1).to(xy.dtype) + 0.5) / size
    return cy * w + cx, (xy - centre) / (1.0 / size)


def token_centres(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Token-centre positions in token units, row-major: ``(h * w, 2)`` as (x, y)."""
    ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


def window_index(h: int, w: int, window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """For each token, the flat indices of the ``window x window`` tokens around it, shifted to stay
    inside the grid: ``(h * w, wy * wx)``."""
    return _window_index(h, w, window, str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=32)
def _window_index(h: int, w: int, window: int, device: str) -> torch.Tensor:
    wy, wx = min(window, h), min(window, w)
    sy = (torch.arange(h, device=device) - wy // 2).clamp(0, h - wy)
    sx = (torch.arange(w, device=device) - wx // 2).clamp(0, w - wx)
    rows = sy[:, None] + torch.arange(wy, device=device)  # (h, wy)
    cols = sx[:, None] + torch.arange(wx, device=device)  # (w, wx)
    idx = rows[:, None, :, None] * w + cols[None, :, None, :]  # (h, w, wy, wx)
    return idx.reshape(h * w, wy * wx)


def _accumulate(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, in place on ``fresh`` (a new output no one else holds) when the sum keeps its
    dtype and shape; otherwise (autocast mixing bf16 and float32, say) out of place, promoting as ``+`` does."""
    if fresh.shape == other.shape and fresh.dtype == torch.result_type(fresh, other):
        return fresh.add_(other)
    return fresh + other


def _mlp(dim: int, hidden: int, out: int | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out or dim))


# -- layers -----------------------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """Queries at continuous positions attend to a token grid; 2D RoPE on q and k; optional windows."""

    def __init__(self, dim: int, num_heads: int, rope_base: float, window: int | None) -> None:
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 4:
            raise ValueError(f"width {dim} with {num_heads} heads: head dim must be a multiple of 4")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.rope_base, self.window = rope_base, window
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=True)
        self.k = nn.Linear(dim, dim, bias=True)
        self.v = nn.Linear(dim, dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def query_rotation(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) ``(B, 1, N, D/2)`` for queries at ``pos`` ``(B, N, 2)`` in token units."""
        angles = rope_angles(pos, self.head_dim, self.rope_base)[:, None]
        return angles.cos(), angles.sin()

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, h, w)`` -> RoPE'd keys and values ``(B, heads, h*w, D)``, once per image."""
        h, w = tokens.shape[-2:]
        normed = self.norm_kv(tokens.flatten(2).transpose(1, 2))
        k, v = self.k(normed), self.v(normed)
        ang = rope_angles(token_centres(h, w, tokens.device), self.head_dim, self.rope_base)
        return apply_rope(self._heads(k), ang[None, None]), self._heads(v)

    def forward(
        self,
        x: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        nearest: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """x ``(B, N, C)``; ``rotation`` the (cos, sin) of ``query_rotation`` at the queries' positions;
        ``nearest`` ``(B, N)`` flat token ids."""
        B, N, C = x.shape
        q = rotate_pairs(self._heads(self.q(self.norm_q(x))), *rotation)
        k, v = kv
        h, w = grid
        if self.window is None or (self.window >= h and self.window >= w):
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = self._windowed(q, k, v, nearest, window_index(h, w, self.window, x.device))
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    @staticmethod
    def _windowed(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nearest: torch.Tensor, windows: torch.Tensor
    ) -> torch.Tensor:
        """Group queries by their nearest token; each group attends to that token's window.

        Cost is one gather per (image, token) rather than per query.
        """
        B, H, N, D = q.shape
        T = k.shape[2]
        group = (torch.arange(B, device=q.device)[:, None] * T + nearest).reshape(-1)
        order = torch.argsort(group, stable=True)
        uniq, counts = torch.unique_consecutive(group[order], return_counts=True)
        members = torch.repeat_interleave(torch.arange(len(uniq), device=q.device), counts)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(B * N, device=q.device) - torch.repeat_interleave(starts, counts)
        q_sorted = q.permute(0, 2, 1, 3).reshape(B * N, H, D)[order]
        grouped = q.new_zeros(len(uniq), int(counts.max()), H, D)
        grouped[members, rank] = q_sorted
        img, tok = uniq // T, uniq % T
        win = windows[tok]  # (U, W)
        k_win = k.permute(0, 2, 1, 3)[img[:, None], win]  # (U, W, H, D)
        v_win = v.permute(0, 2, 1, 3)[img[:, None], win]
        out = F.scaled_dot_product_attention(
            grouped.transpose(1, 2), k_win.transpose(1, 2), v_win.transpose(1, 2)
        ).transpose(1, 2)  # (U, G, H, D)
        result = torch.empty_like(q_sorted)
        result[order] = out[members, rank]
        return result.reshape(B, N, H, D).permute(0, 2, 1, 3)


class FeatX(nn.Module):
    """Sub-token detail: the nearest token, FiLM-modulated by its offset code, through an MLP."""

    def __init__(self, dim: int, code_dim: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.film = _mlp(code_dim, dim, 2 * dim)
        nn.init.zeros_(self.film[-1].weight)
        nn.init.zeros_(self.film[-1].bias)
        self.norm_mid = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, mlp_ratio * dim)
        self.norm_out = nn.LayerNorm(dim)

    def modulate(self, token: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """``(1 + gamma) * token + beta`` with (gamma, beta) from the offset code; identity at init.

        ``token`` is already ``norm_in``-normalised (done once per image, see ``ViTUp.decode``)."""
        gamma, beta = self.film(code).chunk(2, dim=-1)
        return (1 + gamma) * token + beta

    def forward(self, token: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.mlp(self.norm_mid(self.modulate(token, code))))


class ViTUpBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, config: ViTUpConfig) -> None:
        super().__init__()
        self.norm_transition = nn.LayerNorm(dim)
        self.transition = _mlp(dim, config.transition_ratio * dim)
        self.attn = CrossAttention(dim, num_heads, config.rope_base, config.window)
        self.featx = FeatX(dim, config.code_dim, config.mlp_ratio)
        self.norm_fusion = nn.LayerNorm(dim)
        self.fusion = _mlp(dim, config.mlp_ratio * dim)

    def forward(
        self,
        q: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor],
        code: torch.Tensor,
        nearest: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        tokens: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """q ``(B, N, C)`` -> ``(B, N, C)``; ``tokens`` ``(B, h*w, C)``: this block's tap, ``featx.norm_in``'d.

        The residual sums are taken in place on fresh outputs (same values, the same order of additions):
        at 112^2 queries each new ``(N, C)`` buffer is page-faulted in again, which costs more than the add."""
        x = _accumulate(self.transition(self.norm_transition(q)), q)
        token = torch.gather(tokens, 1, nearest.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        fused = _accumulate(_accumulate(self.attn(x, rotation, kv, nearest, grid), x), self.featx(token, code))
        return _accumulate(self.fusion(self.norm_fusion(fused)), fused)


@dataclass
class ViTUpCache:
    """Per-image state, computed once: ``states[k]`` ``(B, C, h, w)`` at ``taps[k]``;
    ``query_grid`` ``(B, C, Q, Q)``."""

    states: list[torch.Tensor]
    query_grid: torch.Tensor


class ViTUp(Upsampler):
    """The ViT-Up upsampler over a (LoRA-adapted) backbone. ``levels`` index ``backbone.taps``:
    level 0 decodes ``q0``, level t decodes block t's output."""

    name = "vitup"
    compile_parts = ("blocks", "decoders")

    def __init__(self, backbone: Backbone, config: ViTUpConfig | None = None) -> None:
        config = config or ViTUpConfig()
        super().__init__(backbone, config.input_tokens * backbone.patch_size)
        if len(backbone.taps) != config.num_blocks + 1:
            raise VitupError(
                f"ViT-Up with {config.num_blocks} blocks needs {config.num_blocks + 1} taps, got {backbone.taps}"
            )
        self.config = config
        dim = backbone.embed_dim
        heads = config.num_heads or max(1, dim // 64)
        self.blocks = nn.ModuleList(ViTUpBlock(dim, heads, config) for _ in range(config.num_blocks))
        self.register_buffer("fourier_freqs", fourier_freqs(config.fourier_bands, config.fourier_max_res), False)
        self.decoders = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(config.num_blocks + 1)
        )

    def upsampler_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The upsampler's own parameters (blocks, decoders), without the backbone."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def level_of(self, tap: int | None) -> int:
        taps = self.backbone.taps
        if tap is None:
            return len(taps) - 1
        if tap not in taps:
            raise VitupError(f"--tap {tap}: this ViT-Up decodes taps {taps}")
        return len(taps) - 1 - taps[::-1].index(tap)

    def _resize(self, x: torch.Tensor, side: int) -> torch.Tensor:
        if x.shape[-2:] == (side, side):
            return x
        aa = self.config.antialias
        return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=aa)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> normalised, then resized to the backbone input ``(B, 3, S, S)``."""
        return self._resize(self.backbone.normalize(images), self.input_size)

    def encode(self, images: torch.Tensor) -> ViTUpCache:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> hidden states at every tap and the query-embedding grid.

        The image is normalised once, before both resizes (the same result as after, with one
        full-size copy less: the query grid's image is 3584 px for patch 16)."""
        x = self.backbone.normalize(images)
        states = self.backbone.hidden_states(self._resize(x, self.input_size))
        big = self._resize(x, self.config.query_grid * self.backbone.patch_size)
        del x
        return ViTUpCache(states=states, query_grid=self.backbone.patch_embed_grid(big))

    def decode(
        self,
        cache: ViTUpCache,
        xy: torch.Tensor,
        levels: Sequence[int] | None = None,
        chunk: int | None = None,
    ) -> list[torch.Tensor]:
        """Features at ``xy`` ``(B, N, 2)`` for each level -> list of ``(B, N, C)``, chunk by chunk."""
        levels = [len(self.decoders) - 1] if levels is None else list(levels)
        depth = max(levels)
        h, w = cache.states[0].shape[-2:]
        kv = [self.blocks[t - 1].attn.keys_values(cache.states[t]) for t in range(1, depth + 1)]
        # LN(gather(tokens)) == gather(LN(tokens)): normalise the h*w tokens once, not every query
        normed = [
            self.blocks[t - 1].featx.norm_in(cache.states[t].flatten(2).transpose(1, 2)) for t in range(1, depth + 1)
        ]
        chunk = chunk or self.config.chunk_queries
        outs: list[list[torch.Tensor]] = [[] for _ in levels]
        for start in range(0, xy.shape[1], chunk):
            part = xy[:, start : start + chunk]
            q = sample_map(cache.query_grid, part)
            rotation = self.blocks[0].attn.query_rotation(part * part.new_tensor([w, h])) if depth else None
            nearest, offset = nearest_token(part, h, w)
            code = fourier_code(offset, self.fourier_freqs)
            decoded = {0: self.decoders[0](q)} if 0 in levels else {}
            for t in range(1, depth + 1):
                q = self.blocks[t - 1](q, rotation, code, nearest, kv[t - 1], normed[t - 1], (h, w))
                if t in levels:
                    decoded[t] = self.decoders[t](q)
            for i, level in enumerate(levels):
                outs[i].append(decoded[level])
        return [torch.cat(o, dim=1) for o in outs]

    def query(self, images: torch.Tensor, xy: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        return self.decode(self.encode(images), xy, [self.level_of(tap)])[0]

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return self._own_and_adapter_tensors()

    def check_tap(self, tap: int) -> None:
        self.level_of(tap)  # raises with the taps it can decode

    def teacher_tokens(self, images: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        with self.backbone.adapters_disabled():
            return self.tokens(images, tap)

    def bands(
        self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None, chunk: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """One cache per batch, then rows of the output grid decoded about ``chunk`` queries at a time
        (default ``config.chunk_queries``): bands ``(r0, r1, (B, C, r1 - r0, W))``."""
        height, width = _as_size(size)
        level = self.level_of(tap)
        cache = self.encode(images)
        B = images.shape[0]
        rows = max(1, (chunk or self.config.chunk_queries) // width)
        xy_all = grid_xy(height, width, device=images.device)
        for r0 in range(0, height, rows):
            r1 = min(height, r0 + rows)
            xy = xy_all[r0 * width : r1 * width].expand(B, -1, -1)
            part = self.decode(cache, xy, [level], chunk=xy.shape[1])[0]  # (B, n, C)
            yield r0, r1, part.transpose(1, 2).reshape(B, -1, r1 - r0, width)


def parameter_summary(model: ViTUp) -> str:
    """``"24.27M upsampler + 0.61M LoRA = 24.88M parameters"`` (the paper's count for dinov3_s+)."""
    upsampler = sum(p.numel() for _, p in model.upsampler_parameters())
    lora = sum(p.numel() for _, p in model.backbone.lora_parameters())
    return f"{upsampler / 1e6:.2f}M upsampler + {lora / 1e6:.2f}M LoRA = {(upsampler + lora) / 1e6:.2f}M parameters"


register_upsampler(
    UpsamplerSpec(
        name="vitup",
        model_class=ViTUp,
        build=lambda backbone, config=None, input_size=None: ViTUp(backbone, config),
        config_class=ViTUpConfig,
        capabilities=Capabilities(trained=True, any_tap=False, banded=True),
        preprocessing=Preprocessing(resize_filter="bicubic", antialias=False),
        summary="coordinate-conditioned prediction from the ViT's own hidden states",
        paper="Wandel, Wang and Wang 2026 (ViT-Up)",
        licence="reference code: krispinwandel/vit-up",
    )
)
