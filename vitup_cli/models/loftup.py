"""LoftUp (Huang et al. 2025): pixels of the guidance image query every low-resolution token.

Per image: the backbone's last-layer tokens ``(B, C, h, w)``, ChannelNorm'ed, concatenated with a
20-channel sine encoding of the token grid (``D = C + 20`` channels), are the keys and values. The
queries are the pixels of the guidance image (the image at the output size): a 203-channel Fourier
embedding of ``[y, x, r, g, b]`` (min-max scaled RGB, 20 frequencies ``exp(linspace(-2, 10))``,
learnable phases), then two full-resolution 3x3 convs with BatchNorm. Two pre-norm cross-attention
blocks (4 heads, no attention among pixels), a final LayerNorm, a 1x1 conv to ``C`` channels and a
channels-first LayerNorm. The output is in that LayerNorm's space, not the raw backbone space.

``LoftUpNet`` keeps the published state-dict layout (``channelnorm.norm.*``, ``upsampler.*``: the
reference's ``UpsamplerwithChannelNorm``), so the official ``haiwen/loftup-*`` weights load as they are.

Memory: the reference materialises the ``H*W x h*w`` attention of every head. Here the output is made in
bands of rows: the two convs run on the band plus a 2-pixel halo (exact: only the halo's outer ring
sees the wrong padding, and it is cropped), and fused attention (``scaled_dot_product_attention``)
runs per band. Queries never attend to each other, so banding is exact: the result does not depend on
the band size (eval mode; in training mode the whole map is one band, as BatchNorm's batch statistics
need).

Min-max scaling of the guidance image: the reference takes each channel's min and max over the whole
batch, so an image's features depend on its batch-mates. ``minmax="image"`` (vitup's default) takes
them per image, a documented deviation that extraction records; ``minmax="batch"`` reproduces the
reference exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitup_cli.backbones import Backbone
from vitup_cli.errors import VitupError
from vitup_cli.models.base import Upsampler, _as_size
from vitup_cli.models.registry import Capabilities, Preprocessing, UpsamplerSpec, register_upsampler

MINMAX_MODES = ("image", "batch")


@dataclass
class LoftUpConfig:
    """LoftUp hyperparameters; the defaults are the released model's (``lr_pe_type="sine"``)."""

    n_freqs: int = 20  # pixel Fourier frequencies
    lr_freqs: int = 5  # token-grid sine encoding frequencies (20 channels)
    num_heads: int = 4
    num_layers: int = 2
    minmax: str = "image"  # "image" (vitup default, per image) or "batch" (the reference)
    chunk_pixels: int = 112 * 112  # output pixels per band (all images of the batch together)

    def __post_init__(self) -> None:
        if self.minmax not in MINMAX_MODES:
            raise VitupError(f"--minmax {self.minmax}: use image (per-image scaling) or batch (the reference's)")
        if self.chunk_pixels < 1:
            raise VitupError(f"--chunk-pixels {self.chunk_pixels}: must be at least 1")

    @property
    def pixel_channels(self) -> int:
        return 5 * self.n_freqs * 2 + 3

    @property
    def pe_channels(self) -> int:
        return 2 * self.lr_freqs * 2


# -- small layers (named as the published weights name them) ---------------------------------------
class ChannelNorm(nn.Module):
    """``nn.LayerNorm`` over the channels of a ``(B, C, H, W)`` map (key ``norm.*``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ChannelsFirstLayerNorm(nn.Module):
    """ConvNeXt's channels-first LayerNorm (eps 1e-6, keys ``weight``, ``bias``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MinMaxScale(nn.Module):
    """Per channel to ``[-0.5, 0.5]``: min and max per image (``"image"``) or over the batch (``"batch"``)."""

    def __init__(self, mode: str = "image") -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, c, H, W)`` -> same shape."""
        dims = (2, 3) if self.mode == "image" else (0, 2, 3)
        lo = x.amin(dim=dims, keepdim=True)
        span = x.amax(dim=dims, keepdim=True) - lo
        return (x - lo) / span.clamp_min(1e-4) - 0.5


class FourierFeatures(nn.Module):
    """``sin`` and ``cos`` of ``values * exp(linspace(-2, 10, F))`` plus learnable phases.

    ``biases`` is stored ``(2, n_in, F)`` (index 0 inside the sin, 1 inside the cos) but read in memory
    order as ``(F, n_in)``, as the published weights were trained: a reshape, not a transpose.
    """

    def __init__(self, n_in: int, n_freqs: int) -> None:
        super().__init__()
        self.n_in, self.n_freqs = n_in, n_freqs
        self.biases = nn.Parameter(torch.randn(2, n_in, n_freqs))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """``(B, n_in, H, W)`` -> ``(B, 2 * F * n_in, H, W)``: all sins, then all cosines (channel ``f * n_in + i``)."""
        B, _, H, W = values.shape
        freqs = torch.exp(torch.linspace(-2, 10, self.n_freqs, device=values.device)).view(1, self.n_freqs, 1, 1, 1)
        angles = values.unsqueeze(1) * freqs  # (B, F, n_in, H, W)
        phase = self.biases.reshape(2, 1, self.n_freqs, self.n_in, 1, 1)
        sin = torch.sin(angles + phase[0]).reshape(B, -1, H, W)
        cos = torch.cos(angles + phase[1]).reshape(B, -1, H, W)
        return torch.cat([sin, cos], dim=1)


def _coords(rows: torch.Tensor, cols: torch.Tensor, batch: int) -> torch.Tensor:
    """``(B, 2, len(rows), len(cols))``: y and x channels (``ij`` meshgrid)."""
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([yy, xx]).unsqueeze(0).expand(batch, -1, -1, -1)


class PackedAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout (packed ``in_proj``,
    ``out_proj``), computed with fused ``scaled_dot_product_attention`` and never a full weight matrix."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise VitupError(f"LoftUp: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        return x.view(B, N, self.heads, D // self.heads).transpose(1, 2)

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised tokens ``(B, N, D)`` -> keys and values ``(B, heads, N, D / heads)``."""
        w_k, w_v = self.in_proj_weight.chunk(3)[1:]
        b_k, b_v = self.in_proj_bias.chunk(3)[1:]
        return self._split(F.linear(kv, w_k, b_k)), self._split(F.linear(kv, w_v, b_v))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` ``(B, P, D)`` (normalised) against ``keys_values`` -> ``(B, P, D)``."""
        w_q, b_q = self.in_proj_weight.chunk(3)[0], self.in_proj_bias.chunk(3)[0]
        q = self._split(F.linear(q, w_q, b_q))
        head_dim = q.shape[-1]
        scale = 1.0 / math.sqrt(head_dim)
        pad = (-head_dim) % 8 if q.is_cuda else 0  # head dims 101/197: pad so fused GPU kernels apply (exact)
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        if pad:
            out = out[..., :head_dim]
        B, _, P, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, P, -1))


class CrossAttention(nn.Module):
    """``norm_q`` for the pixels, one ``norm_kv`` shared by keys and values, then attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attention = PackedAttention(dim, heads)

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attention.keys_values(self.norm_kv(tokens))

    def forward(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.attention(self.norm_q(q), *kv)


class FeedForward(nn.Module):
    """``LN -> Linear(D, hidden) -> GELU -> Linear(hidden, D)`` (keys ``net.0``, ``net.1``, ``net.4``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.Linear(hidden, dim),
            nn.Dropout(0.0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttentionStack(nn.Module):
    """``depth`` pre-norm blocks ``q += CA(q, kv); q += FF(q)``, then a final LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([CrossAttention(dim, heads), FeedForward(dim, mlp_dim)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def keys_values(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block, the keys and values of ``(B, N, D)`` tokens: computed once, shared by every band."""
        return [attn.keys_values(tokens) for attn, _ in self.layers]

    def forward(self, q: torch.Tensor, kvs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        for (attn, ff), kv in zip(self.layers, kvs, strict=True):
            q = attn(q, kv) + q
            q = ff(q) + q
        return self.norm(q)


class LoftUpCore(nn.Module):
    """The reference's ``LoftUp`` module (keys ``fourier_feat``, ``lr_pe``, ``first_conv``,
    ``ca_transformer``, ``final_conv``); its input tokens are already ChannelNorm'ed."""

    def __init__(self, dim: int, config: LoftUpConfig) -> None:
        super().__init__()
        width = dim + config.pe_channels
        start = config.pixel_channels
        self.config = config
        self.fourier_feat = nn.Sequential(MinMaxScale(config.minmax), FourierFeatures(5, config.n_freqs))
        self.lr_pe = FourierFeatures(2, config.lr_freqs)  # coordinates only: 20 channels for 5 frequencies
        self.first_conv = nn.Sequential(
            ChannelNorm(start),
            nn.Conv2d(start, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.ca_transformer = CrossAttentionStack(width, config.num_layers, config.num_heads, dim)
        self.final_conv = nn.Sequential(nn.Conv2d(width, dim, kernel_size=1), ChannelsFirstLayerNorm(dim))

    def token_encoding(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` normalised tokens -> ``(B, h*w, C + 20)`` with the grid's sine encoding."""
        B, _, h, w = tokens.shape
        dev = tokens.device
        coords = _coords(torch.linspace(-1, 1, h, device=dev), torch.linspace(-1, 1, w, device=dev), B)
        pe = self.lr_pe(coords.to(tokens.dtype))
        return torch.cat([tokens, pe], dim=1).flatten(2).transpose(1, 2)

    def pixel_features(self, scaled: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``(B, 3, r, W)`` min-max scaled RGB at grid coordinates ``rows``, ``cols`` -> ``(B, 203, r, W)``."""
        coords = _coords(rows, cols, scaled.shape[0]).to(scaled.dtype)
        fourier = self.fourier_feat[1](torch.cat([coords, scaled], dim=1))
        return torch.cat([fourier, scaled], dim=1)

    def band(
        self, kvs: list[tuple[torch.Tensor, torch.Tensor]], scaled: torch.Tensor, r0: int, r1: int
    ) -> torch.Tensor:
        """Output rows ``[r0, r1)`` of the full map: ``scaled`` ``(B, 3, H, W)`` -> ``(B, C, r1 - r0, W)``."""
        B, _, H, W = scaled.shape
        dev = scaled.device
        e0, e1 = max(0, r0 - 2), min(H, r1 + 2)  # two 3x3 convs: a 2-row halo makes the band exact
        rows = torch.linspace(-1, 1, H, device=dev)[e0:e1]
        cols = torch.linspace(-1, 1, W, device=dev)
        x = self.first_conv(self.pixel_features(scaled[:, :, e0:e1], rows, cols))[:, :, r0 - e0 : r1 - e0]
        q = self.ca_transformer(x.flatten(2).transpose(1, 2), kvs)  # (B, P, D)
        conv = self.final_conv[0]
        out = F.linear(q, conv.weight.flatten(1), conv.bias)  # the 1x1 conv, per pixel
        out = out.transpose(1, 2).reshape(B, -1, r1 - r0, W)
        return self.final_conv[1](out)


class LoftUpNet(nn.Module):
    """The published ``UpsamplerwithChannelNorm``: ``channelnorm`` then ``upsampler`` (``LoftUpCore``)."""

    def __init__(self, dim: int, config: LoftUpConfig | None = None) -> None:
        super().__init__()
        self.config = config or LoftUpConfig()
        self.dim = dim
        self.channelnorm = ChannelNorm(dim)
        self.upsampler = LoftUpCore(dim, self.config)

    def set_minmax(self, mode: str) -> None:
        """Switch the guidance image's min-max scaling: ``"image"`` or ``"batch"`` (the reference)."""
        self.config.minmax = LoftUpConfig(minmax=mode).minmax  # validates
        self.upsampler.fourier_feat[0].mode = mode

    def prepare(self, tokens: torch.Tensor, guidance: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Raw tokens ``(B, C, h, w)`` and guidance ``(B, 3, H, W)`` -> per-block keys/values and scaled RGB."""
        if tokens.shape[1] != self.dim:
            raise VitupError(f"LoftUp for {self.dim}-d features was given {tokens.shape[1]}-d tokens")
        up = self.upsampler
        kvs = up.ca_transformer.keys_values(up.token_encoding(self.channelnorm(tokens)))
        return kvs, up.fourier_feat[0](guidance)

    def bands(
        self, tokens: torch.Tensor, guidance: torch.Tensor, chunk_pixels: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(r0, r1, rows r0..r1 of the output (B, C, r1 - r0, W))`` band by band."""
        kvs, scaled = self.prepare(tokens, guidance)
        B, _, H, W = scaled.shape
        chunk = self.config.chunk_pixels if chunk_pixels is None else chunk_pixels
        step = H if self.training else max(1, min(H, chunk // max(1, B * W)))
        for r0 in range(0, H, step):
            r1 = min(H, r0 + step)
            yield r0, r1, self.upsampler.band(kvs, scaled, r0, r1)

    def forward(self, tokens: torch.Tensor, guidance: torch.Tensor, chunk_pixels: int | None = None) -> torch.Tensor:
        """Raw backbone tokens ``(B, C, h, w)``, guidance image ``(B, 3, H, W)`` -> ``(B, C, H, W)``."""
        parts = [band for _, _, band in self.bands(tokens, guidance, chunk_pixels)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


# -- weights (the published key layout) -------------------------------------------------------------
def config_from_state(state: dict[str, torch.Tensor], **overrides: Any) -> tuple[int, LoftUpConfig]:
    """The feature width and the architecture a published-layout state dict implies."""
    dim = int(state["channelnorm.norm.weight"].shape[0])
    n_freqs = int(state["upsampler.fourier_feat.1.biases"].shape[-1])
    lr_freqs = int(state["upsampler.lr_pe.biases"].shape[-1]) if "upsampler.lr_pe.biases" in state else 5
    layers = {k.split(".")[3] for k in state if k.startswith("upsampler.ca_transformer.layers.")}
    return dim, LoftUpConfig(n_freqs=n_freqs, lr_freqs=lr_freqs, num_layers=len(layers) or 2, **overrides)


def load_state(net: LoftUpNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a published-layout state dict into ``net``: every key, every shape, or one clear error."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise VitupError(
            f"--checkpoint {source}: does not match LoftUp's layout (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, value in state.items():
        if own[name].shape != value.shape:
            raise VitupError(
                f"--checkpoint {source}: {name} has shape {tuple(value.shape)}, LoftUp expects {tuple(own[name].shape)}"
            )
    net.load_state_dict(state)


# -- the upsampler ----------------------------------------------------------------------------------
class LoftUp(Upsampler):
    """LoftUp over a backbone's last layer.

    ``features(images, size)`` runs natively: the guidance image is ``images`` resized to ``size``
    (bilinear, antialiased), the tokens come from ``images`` at ``input_size``. ``query`` computes the
    dense map at the images' own size band by band and samples it bilinearly (border clamped).
    """

    name = "loftup"
    compile_parts = ("net.upsampler.first_conv", "net.upsampler.ca_transformer", "net.upsampler.final_conv")

    def __init__(
        self,
        backbone: Backbone,
        config: LoftUpConfig | None = None,
        input_size: int | None = None,
        *,
        source: str | None = None,
        weights_sha256: str | None = None,
    ) -> None:
        super().__init__(backbone, input_size)
        self.config = config or LoftUpConfig()
        self.net = LoftUpNet(backbone.embed_dim, self.config)
        self.source = source  # where the weights came from (release name, hf:, path); None = untrained
        self.weights_sha256 = weights_sha256

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """LoftUp's own tensors in the published layout (no backbone)."""
        return self.net.state_dict()

    def settings(self) -> dict[str, Any]:
        """What an output made with this model records about it."""
        return {
            "loftup": asdict(self.config),
            "minmax_note": (
                "per-image min-max scaling of the guidance image (vitup default; the reference scales per batch)"
                if self.config.minmax == "image"
                else "per-batch min-max scaling (the reference): features depend on the batch"
            ),
            "weights": self.source,
        }

    def check_tap(self, tap: int | None) -> None:
        if tap is not None and tap != self.backbone.depth:
            raise VitupError(f"--tap {tap}: LoftUp upsamples the last layer only (tap {self.backbone.depth})")

    def guidance(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> the normalised guidance image ``(B, 3, *size)``."""
        if tuple(images.shape[-2:]) != tuple(size):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.backbone.normalize(images)

    def bands(
        self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None, chunk: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """The output ``(B, C, *size)`` band by band: ``(r0, r1, (B, C, r1 - r0, W))``, about ``chunk``
        pixels a band (default ``config.chunk_pixels``)."""
        self.check_tap(tap)
        size = _as_size(size)
        tokens = self.backbone.hidden_states(self.prepare(images), [self.backbone.depth])[0]
        yield from self.net.bands(tokens, self.guidance(images, size), chunk)

    def features(self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None) -> torch.Tensor:
        parts = [band for _, _, band in self.bands(images, size, tap)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def query(self, images: torch.Tensor, xy: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        """Bilinear samples ``(B, N, C)`` of the dense map at the images' size, made one band at a time."""
        B, N, _ = xy.shape
        H, W = images.shape[-2:]
        px = (xy[..., 0] * W - 0.5).clamp(0, W - 1)
        py = (xy[..., 1] * H - 0.5).clamp(0, H - 1)
        y0 = py.floor().long().clamp(max=max(H - 2, 0))
        out = torch.zeros(B, N, self.dim, device=images.device)
        self.check_tap(tap)
        tokens = self.backbone.hidden_states(self.prepare(images), [self.backbone.depth])[0]
        kvs, scaled = self.net.prepare(tokens, self.guidance(images, (H, W)))
        step = max(1, self.config.chunk_pixels // max(1, B * W))
        for r0 in range(0, H, step):
            r1 = min(H, r0 + step)
            hit = (y0 >= r0) & (y0 < r1)
            if not bool(hit.any()):
                continue
            band = self.net.upsampler.band(kvs, scaled, r0, min(H, r1 + 1))  # +1 row: the lower neighbour
            for b in range(B):
                idx = hit[b].nonzero(as_tuple=True)[0]
                if idx.numel():
                    out[b, idx] = _bilinear(band[b], px[b, idx], py[b, idx] - r0)
        return out


def _bilinear(fmap: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """``(C, h, w)`` at pixel coordinates inside the map -> ``(n, C)`` (same as ``grid_sample`` border)."""
    _, h, w = fmap.shape
    x0 = px.floor().long().clamp(0, w - 1)
    y0 = py.floor().long().clamp(0, h - 1)
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    wx, wy = (px - x0).unsqueeze(1), (py - y0).unsqueeze(1)
    top = fmap[:, y0, x0].T * (1 - wx) + fmap[:, y0, x1].T * wx
    bottom = fmap[:, y1, x0].T * (1 - wx) + fmap[:, y1, x1].T * wx
    return top * (1 - wy) + bottom * wy


def count_parameters(dim: int, config: LoftUpConfig | None = None) -> int:
    """LoftUp's parameter count for a ``dim``-d backbone (ChannelNorm included)."""
    return sum(p.numel() for p in LoftUpNet(dim, config).parameters())


register_upsampler(
    UpsamplerSpec(
        name="loftup",
        model_class=LoftUp,
        build=lambda backbone, config=None, input_size=None: LoftUp(backbone, config, input_size),
        config_class=LoftUpConfig,
        capabilities=Capabilities(
            trained=True,
            input_size_from_weights=False,
            final_tap_only=True,
            any_tap=False,
            channel_space="normalised",
            banded=True,
            default_release=True,
        ),
        # the reference pipeline resizes with PIL bilinear (torchvision's default), not bicubic
        preprocessing=Preprocessing(resize_filter="bilinear"),
        summary="pixel Fourier embedding + convs + cross-attention to all tokens",
        paper="Huang et al. 2025 (LoftUp)",
        licence="reference code MIT (andrehuang/loftup)",
    )
)
