"""AnyUp (Wimmer et al., ICLR 2026): one upsampler for the features of any backbone, at any layer.

Per image (``D = qk_dim``, 128 in the releases; every convolution of the encoders is 1x1):

- **Image encoder** at the guidance image's resolution: a 1x1 conv (3 -> D) and two residual blocks
  (GroupNorm(8) -> SiLU -> 1x1 conv, twice), then a 2D rotary encoding of the pixel grid (RoPE over
  ``linspace(0, 1)`` row and column coordinates, learned frequencies ``rope.freqs``).
- **Queries**: a query encoder (1x1 conv + two residual blocks) on that map, average-pooled to the output
  size (the identity when the guidance image is at the output size, as vitup feeds it), then a 3x3 conv.
- **Keys**: a key encoder on the same map, average-pooled to the token grid ``h x w``, concatenated with
  the *feature unification* of the L2-normalised tokens (each of the ``C`` channels convolved on its own
  with a learned basis of D 5x5 kernels, zero padding divided by the in-image tap count, a softmax and a
  mean: D channels whatever ``C`` is; ``FeatureUnification`` says how the reference groups them), then
  an aggregation block (3x3 conv with reflect padding, 2D -> D, and two residual blocks).
- **Attention**: RMS-normalised queries and keys, ``nn.MultiheadAttention``'s q/k projections (4 heads),
  each query restricted to the tokens of a window of ``window_ratio`` of the image around it; the weights
  averaged over the heads mix the *raw* tokens: the output is a convex combination of the input features,
  in their own space. The MHA's value and output projections are in the published files but unused.

``AnyUpNet`` keeps the published state-dict layout (``image_encoder.*``, ``key_encoder.*``,
``query_encoder.*``, ``key_features_encoder.*``, ``cross_decode.*``, ``aggregation.*``, ``rope.freqs``), so
the released ``anyup_paper.pth`` / ``anyup_multi_backbone.pth`` load as they are.

Memory: the reference builds the whole ``H*W x h*w`` attention and its boolean window mask (AnyUp issue #22:
out of memory at 2048^2), and its encoders hold several ``D``-channel maps at the output size. Here nothing of
either size is held. The output is made in bands of rows (``chunk_pixels`` output pixels a band, all images
together): the window mask is computed for the band's rows only, and the attention of a band holds
``B * heads * band_pixels * h * w`` floats; queries never attend to each other, so the result does not depend
on the band size. The encoders are streamed (``models.streamed.StreamedGuidance``): each GroupNorm's
statistics are learnt in a pass over row chunks of the guidance image (``chunk_pixels`` pixels a chunk), the
key encoder's map is pooled to the token grid chunk by chunk, and each band's query rows (with the 3x3 conv's
one-row halo, zero padding at the true borders only) are made on demand from the guidance image. Exact up to
float summation order; the price is compute: 9 passes over the image before the first band, each recomputing
the 1x1 convs before the norm it learns (about 4.5x the encoders' arithmetic). The feature unification runs
over ``channel_chunk`` channels at a time. Working memory at a 896^2 output is that at 224^2
(``benchmarks/memory.py``).
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
from vitup_cli.models.base import Upsampler, _as_size, sample_map
from vitup_cli.models.registry import Capabilities, Preprocessing, UpsamplerSpec, register_upsampler
from vitup_cli.models.streamed import Stats, StreamedGuidance, conv_rows, group_norm


@dataclass
class AnyUpConfig:
    """AnyUp's architecture and vitup's memory knobs; the defaults are the released models'."""

    qk_dim: int = 128
    num_heads: int = 4
    window_ratio: float = 0.1
    lfu_kernel: int = 5
    chunk_pixels: int = 112 * 112  # output pixels per attention band (all images of the batch together)
    channel_chunk: int = 256  # input channels per step of the feature unification

    def __post_init__(self) -> None:
        if self.qk_dim % self.num_heads or self.qk_dim % 8:
            raise VitupError(f"AnyUp: qk_dim {self.qk_dim} must be divisible by 8 and by {self.num_heads} heads")
        if self.chunk_pixels < 1 or self.channel_chunk < 1:
            raise VitupError("AnyUp: chunk_pixels and channel_chunk must be at least 1")


# -- layers (named as the published weights name them) ----------------------------------------------
class ResBlock(nn.Module):
    """``x + [GN(8) -> SiLU -> 1x1 conv] x 2`` (keys ``block.0``, ``block.2``, ``block.3``, ``block.5``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(8, dim),
            nn.SiLU(),
            nn.Conv2d(dim, dim, 1, bias=False),
            nn.GroupNorm(8, dim),
            nn.SiLU(),
            nn.Conv2d(dim, dim, 1, bias=False),
        )

    @property
    def norms(self) -> tuple[nn.GroupNorm, nn.GroupNorm]:
        return self.block[0], self.block[3]

    def hidden(self, x: torch.Tensor, stats: Stats | None = None) -> torch.Tensor:
        """The first half, ``conv(SiLU(GN(x)))`` (GroupNorm by ``stats`` when given: ``streamed.group_norm``)."""
        return self.block[2](self.block[1](group_norm(x, self.block[0], stats)))

    def forward(self, x: torch.Tensor, stats: tuple[Stats, Stats] | None = None) -> torch.Tensor:
        s1, s2 = (None, None) if stats is None else stats
        return self.block[5](self.block[4](group_norm(self.hidden(x, s1), self.block[3], s2))) + x


class FeatureUnification(nn.Module):
    """Any number of channels -> ``dim``: each channel convolved alone with every kernel of ``basis``
    ``(dim, 1, k, k)`` (zero padding, divided by the number of taps inside the map), softmax, mean.

    The reference lays the ``C * dim`` responses out channel-major (response ``j`` is channel ``j // dim``
    with kernel ``j % dim``) and then reads them as ``(dim, C)``: its softmax runs over the responses
    ``j = a * C + b`` of one ``b``, a mix of channels and kernels, and the mean over ``b``. That is what the
    released weights were trained with, so it is kept exactly; the ``b`` are taken ``channel_chunk`` at a time.
    """

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.basis = nn.Parameter(torch.randn(dim, 1, kernel, kernel))

    def forward(self, feats: torch.Tensor, channel_chunk: int = 256) -> torch.Tensor:
        B, C, h, w = feats.shape
        dim, _, k, _ = self.basis.shape
        p = k // 2
        ones = torch.ones(1, 1, h, w, dtype=feats.dtype, device=feats.device)
        taps = F.conv2d(F.pad(ones, (p, p, p, p)), torch.ones(1, 1, k, k, dtype=feats.dtype, device=feats.device))
        padded = F.pad(feats, (p, p, p, p))
        total = torch.zeros(B, dim, h, w, dtype=feats.dtype, device=feats.device)
        a = torch.arange(dim, device=feats.device)
        for b0 in range(0, C, channel_chunk):
            b = torch.arange(b0, min(C, b0 + channel_chunk), device=feats.device)
            j = (a[:, None] * C + b[None, :]).reshape(-1)  # (dim * nb): the responses of these b
            resp = F.conv2d(padded[:, j // dim], self.basis[j % dim], groups=j.numel()) / taps
            total += resp.view(B, dim, b.numel(), h, w).softmax(dim=1).sum(dim=2)
        return total / C


class RoPE2d(nn.Module):
    """Rotary encoding of ``(row, col)`` coordinates with learned frequencies ``freqs`` ``(2, D)``; rotates
    the two halves of the channels against each other."""

    def __init__(self, dim: int, theta: float = 100.0) -> None:
        super().__init__()
        f1 = theta ** torch.linspace(0, -1, dim // 4)
        f1 = torch.cat([f1, f1])
        freqs = torch.zeros(2, dim)
        freqs[0, : dim // 2] = f1
        freqs[1, -dim // 2 :] = f1
        self.freqs = nn.Parameter(freqs * 2 * math.pi)

    def forward(self, x: torch.Tensor, row0: int = 0, height: int | None = None) -> torch.Tensor:
        """``(B, D, H, W)`` -> same, each pixel rotated by its grid position (``linspace(0, 1)``, ends included);
        ``x`` may be rows ``row0..row0 + H`` of a map of ``height`` rows."""
        _, D, H, W = x.shape
        # positions and angles in float32 at least: in bfloat16 (autocast) neighbouring rows of a large map
        # would share one position; float32 and float64 inputs are computed as the reference does
        dtype = torch.promote_types(x.dtype, torch.float32)
        rows = torch.linspace(0.0, 1.0, height or H, device=x.device, dtype=dtype)[row0 : row0 + H]
        cols = torch.linspace(0.0, 1.0, W, device=x.device, dtype=dtype)
        yy, xx = torch.meshgrid(rows, cols, indexing="ij")
        with torch.autocast(x.device.type, enabled=False):  # the product too: autocast would make it bfloat16
            angle = torch.stack([yy, xx], -1).view(H * W, 2) @ self.freqs.to(dtype)  # (HW, D)
        angle = angle.T.reshape(1, D, H, W)
        a, b = x.chunk(2, dim=1)
        return (x * angle.cos() + torch.cat([-b, a], dim=1) * angle.sin()).to(x.dtype)


class PackedProjections(nn.Module):
    """``nn.MultiheadAttention``'s parameters (``in_proj_weight``, ``in_proj_bias``, ``out_proj``); AnyUp
    uses the query and key projections only (its values are the raw tokens)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)


class CrossAttention(nn.Module):
    """Keys ``norm_q``, ``norm_k`` (RMSNorm) and ``attention`` (the packed projections)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_q = nn.RMSNorm(dim)
        self.norm_k = nn.RMSNorm(dim)
        self.attention = PackedProjections(dim)


class CrossDecode(nn.Module):
    """Keys ``cross_attn.*`` and ``conv2d`` (the queries' 3x3 conv, zero padding)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.cross_attn = CrossAttention(dim)
        self.conv2d = nn.Conv2d(dim, dim, 3, padding=1, bias=False)


def _encoder(in_ch: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, dim, 1, bias=False), ResBlock(dim), ResBlock(dim))


def window_bounds(n_out: int, n_low: int, ratio: float, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For output rows (or columns) ``start..stop`` of ``n_out``: the first and one-past-last token index
    of their windows on ``n_low`` tokens (pixel centres, ``+-ratio`` clamped to ``[0, 1]``)."""
    pos = ((torch.arange(n_out, dtype=torch.float32) + 0.5) / n_out)[start:stop]
    lo = ((pos - ratio).clamp(0.0, 1.0) * n_low).floor().long()
    hi = ((pos + ratio).clamp(0.0, 1.0) * n_low).ceil().long()
    return lo, hi


class AnyUpNet(nn.Module):
    """AnyUp in the published layout: ``(guidance (B, 3, Hg, Wg), tokens (B, C, h, w), size) -> (B, C, *size)``."""

    def __init__(self, config: AnyUpConfig | None = None) -> None:
        super().__init__()
        self.config = config or AnyUpConfig()
        d = self.config.qk_dim
        self.image_encoder = _encoder(3, d)
        self.key_encoder = _encoder(d, d)
        self.query_encoder = _encoder(d, d)
        self.key_features_encoder = nn.Sequential(
            FeatureUnification(d, self.config.lfu_kernel), ResBlock(d), ResBlock(d)
        )
        self.cross_decode = CrossDecode(d)
        self.aggregation = nn.Sequential(
            nn.Conv2d(2 * d, d, 3, padding=1, padding_mode="reflect", bias=False), ResBlock(d), ResBlock(d)
        )
        self.rope = RoPE2d(d)

    def prepare(
        self, guidance: torch.Tensor, tokens: torch.Tensor, size: tuple[int, int], chunk_pixels: int | None = None
    ) -> tuple[StreamedGuidance, torch.Tensor]:
        """The queries before their 3x3 conv (``StreamedGuidance``: rows ``(B, D, r, W)`` on demand, never the
        whole map) and the projected keys ``(B, heads, h*w, D/heads)``. The encoders run over the guidance in
        chunks of about ``chunk_pixels`` pixels (default ``config.chunk_pixels``)."""
        chunk = self.config.chunk_pixels if chunk_pixels is None else chunk_pixels
        h, w = tokens.shape[-2:]
        queries = StreamedGuidance(
            guidance, size, (h, w), self.image_encoder, self.rope, self.query_encoder, self.key_encoder, chunk
        )
        lfu, *blocks = self.key_features_encoder
        unified = lfu(F.normalize(tokens, dim=1), self.config.channel_chunk)
        for block in blocks:
            unified = block(unified)
        k = self.aggregation(torch.cat([queries.keys.to(unified.dtype), unified], dim=1))
        attn = self.cross_decode.cross_attn
        w_k = attn.attention.in_proj_weight.chunk(3)[1]
        b_k = attn.attention.in_proj_bias.chunk(3)[1]
        k = F.linear(attn.norm_k(k.flatten(2).transpose(1, 2)), w_k, b_k)
        return queries, self._heads(k)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        heads = self.config.num_heads
        return x.view(B, N, heads, D // heads).transpose(1, 2)

    def band(
        self,
        queries: StreamedGuidance,
        keys: torch.Tensor,
        values: torch.Tensor,
        low: tuple[int, int],
        r0: int,
        r1: int,
    ) -> torch.Tensor:
        """Output rows ``[r0, r1)``: queries (their rows ``r0 - 1 .. r1 + 1`` made for the 3x3 conv), keys,
        values ``(B, h*w, C)`` -> ``(B, C, r1 - r0, W)``."""
        H, W = queries.size
        x = conv_rows(self.cross_decode.conv2d, queries.rows, H, r0, r1)  # zero padding at the true borders only
        B = x.shape[0]
        attn = self.cross_decode.cross_attn
        w_q, b_q = attn.attention.in_proj_weight.chunk(3)[0], attn.attention.in_proj_bias.chunk(3)[0]
        x = self._heads(F.linear(attn.norm_q(x.flatten(2).transpose(1, 2)), w_q, b_q))  # (B, heads, P, d)
        scale = 1.0 / math.sqrt(x.shape[-1])
        logits = (x * scale) @ keys.transpose(-2, -1)  # (B, heads, P, h*w)
        h, w = low
        ratio = self.config.window_ratio
        if ratio > 0:
            rlo, rhi = window_bounds(H, h, ratio, r0, r1)
            clo, chi = window_bounds(W, w, ratio, 0, W)
            rows, cols = torch.arange(h), torch.arange(w)
            row_ok = (rows >= rlo[:, None]) & (rows < rhi[:, None])  # (r, h)
            col_ok = (cols >= clo[:, None]) & (cols < chi[:, None])  # (W, w)
            allowed = (row_ok[:, None, :, None] & col_ok[None, :, None, :]).reshape((r1 - r0) * W, h * w)
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        weights = logits.softmax(dim=-1).mean(dim=1)  # (B, P, h*w): averaged over the heads
        out = weights @ values  # (B, P, C)
        return out.transpose(1, 2).reshape(B, -1, r1 - r0, W)

    def bands(
        self,
        guidance: torch.Tensor,
        tokens: torch.Tensor,
        size: int | tuple[int, int] | None = None,
        chunk_pixels: int | None = None,
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(r0, r1, rows r0..r1 of the output (B, C, r1 - r0, W))`` band by band."""
        size = tuple(guidance.shape[-2:]) if size is None else _as_size(size)
        chunk = self.config.chunk_pixels if chunk_pixels is None else chunk_pixels
        queries, keys = self.prepare(guidance, tokens, size, chunk)
        values = tokens.flatten(2).transpose(1, 2)
        B = tokens.shape[0]
        H, W = size
        step = max(1, min(H, chunk // max(1, B * W)))
        low = tuple(tokens.shape[-2:])
        for r0 in range(0, H, step):
            r1 = min(H, r0 + step)
            yield r0, r1, self.band(queries, keys, values, low, r0, r1)

    def forward(
        self,
        guidance: torch.Tensor,
        tokens: torch.Tensor,
        size: int | tuple[int, int] | None = None,
        chunk_pixels: int | None = None,
    ) -> torch.Tensor:
        """Normalised guidance ``(B, 3, Hg, Wg)``, raw tokens ``(B, C, h, w)`` -> ``(B, C, *size)`` (default:
        the guidance's size), as the reference's ``AnyUp(image, features, output_size)``."""
        parts = [band for _, _, band in self.bands(guidance, tokens, size, chunk_pixels)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


# -- weights (the published key layout) -------------------------------------------------------------
def config_from_state(state: dict[str, torch.Tensor], **overrides: Any) -> AnyUpConfig:
    """The architecture a published-layout state dict implies (``qk_dim``, the unification kernel)."""
    qk_dim = int(state["image_encoder.0.weight"].shape[0])
    kernel = int(state["key_features_encoder.0.basis"].shape[-1])
    return AnyUpConfig(qk_dim=qk_dim, lfu_kernel=kernel, **overrides)


def load_state(net: AnyUpNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a published-layout state dict into ``net``: every key, every shape, or one clear error."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise VitupError(
            f"--checkpoint {source}: does not match AnyUp's layout (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, value in state.items():
        if own[name].shape != value.shape:
            raise VitupError(
                f"--checkpoint {source}: {name} has shape {tuple(value.shape)}, AnyUp expects {tuple(own[name].shape)}"
            )
    net.load_state_dict(state)


# -- the upsampler ----------------------------------------------------------------------------------
class AnyUp(Upsampler):
    """AnyUp over any backbone and any tap.

    ``features(images, size)``: the tokens come from ``images`` at ``input_size``; the guidance image is
    ``images`` resized to ``size`` (bilinear, antialiased) and normalised as the backbone's input (AnyUp
    was trained with the backbone's mean/std, ImageNet's for DINO), as ViT-Up's evaluation feeds it.
    ``query`` samples the dense map at the images' own size bilinearly (border clamped).
    """

    name = "anyup"
    #: the encoders' residual blocks: what the streamed encoders call as modules (``models.streamed``)
    compile_parts = tuple(f"net.{e}_encoder.{i}" for e in ("image", "query", "key") for i in (1, 2))

    def __init__(
        self,
        backbone: Backbone,
        config: AnyUpConfig | None = None,
        input_size: int | None = None,
        *,
        source: str | None = None,
        weights_sha256: str | None = None,
    ) -> None:
        super().__init__(backbone, input_size)
        self.config = config or AnyUpConfig()
        self.net = AnyUpNet(self.config)
        self.source = source  # where the weights came from (release name, path); None = untrained
        self.weights_sha256 = weights_sha256

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """AnyUp's own tensors in the published layout (no backbone)."""
        return self.net.state_dict()

    def settings(self) -> dict[str, Any]:
        return {"anyup": asdict(self.config), "weights": self.source}

    def guidance(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> the normalised guidance image ``(B, 3, *size)``."""
        if tuple(images.shape[-2:]) != tuple(size):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.backbone.normalize(images)

    def bands(
        self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None, chunk: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """The output ``(B, C, *size)`` band by band, about ``chunk`` pixels a band (default
        ``config.chunk_pixels``)."""
        if tap is not None:
            self.check_tap(tap)
        size = _as_size(size)
        tokens = self.tokens(images, tap)
        yield from self.net.bands(self.guidance(images, size), tokens, size, chunk)

    def features(self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None) -> torch.Tensor:
        parts = [band for _, _, band in self.bands(images, size, tap)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def query(self, images: torch.Tensor, xy: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        """Bilinear samples ``(B, N, C)`` of the dense map at the images' own size."""
        return sample_map(self.features(images, tuple(images.shape[-2:]), tap), xy)


def count_parameters(config: AnyUpConfig | None = None) -> int:
    """AnyUp's parameter count (the same for every backbone)."""
    return sum(p.numel() for p in AnyUpNet(config).parameters())


register_upsampler(
    UpsamplerSpec(
        name="anyup",
        model_class=AnyUp,
        build=lambda backbone, config=None, input_size=None: AnyUp(backbone, config, input_size),
        config_class=AnyUpConfig,
        capabilities=Capabilities(
            trained=True,
            input_size_from_weights=False,
            final_tap_only=False,
            any_tap=True,
            any_backbone=True,
            channel_space="raw",
            banded=True,
            default_release=True,
        ),
        # the reference's training transforms resize with torchvision's default (bilinear, antialiased)
        preprocessing=Preprocessing(resize_filter="bilinear"),
        summary="feature unification + windowed cross-attention from any features (one model for all backbones)",
        paper="Wimmer et al. 2026 (AnyUp, ICLR)",
        licence="reference code and weights CC-BY-4.0 (wimmerth/anyup)",
    )
)
