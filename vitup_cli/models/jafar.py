"""JAFAR (Couairon, Chambon et al. 2025): high-resolution queries from the image attend to low-resolution keys.

Per image: an image encoder (a 1x1 conv then two GroupNorm/SiLU ResBlocks of 1x1 convs, ``qk_dim`` = 128
channels) runs on the normalised guidance image, then a 2-D rotary encoding (learned frequencies
``rope.freqs`` ``(2, qk_dim)``; coordinates ``linspace(0, 1)`` over the image's rows and columns). From it:
queries (a query encoder, adaptive average pooling to the output size, an affine-free GroupNorm, a 3x3 conv)
and keys (a key encoder pooled to the token grid, modulated ``gamma * GroupNorm(keys) + beta`` by an encoder
of the L2-normalised tokens). Cross-attention (RMSNorm'ed queries and keys, ``nn.MultiheadAttention``'s query
and key projections, 4 heads) gives attention weights averaged over the heads; the output is those weights
applied to the raw low-resolution tokens: every output vector is a convex mix of the backbone's own tokens
(``channel_space="raw"``). The value and output projections and ``norm_v`` exist in the published weights
but do not touch the output (the reference keeps only the attention weights).

``JAFARNet`` keeps the published state-dict layout (the ``jafar`` entry of the GitHub release ``.pth``
files), so the released weights load as they are.

Memory: the reference materialises the ``H*W x h*w`` attention of every head (its issue #7: out of memory near
672^2) and holds several ``qk_dim``-channel maps at the output size. Here neither is held. The output is made
in bands of rows: fused attention (``scaled_dot_product_attention``, the raw tokens as values, averaged over
heads) runs per band, and queries never attend to each other, so banding is exact. The encoders are streamed
(``models.streamed.StreamedGuidance``): each GroupNorm's statistics (the query map's affine-free one included)
are learnt in a pass over row chunks of the guidance image (``chunk_pixels`` pixels a chunk; the first conv,
1x1 in the releases, gets a reflect-padded halo when it is wider), the key encoder's map is pooled to the
token grid chunk by chunk, and each band's GroupNorm'ed query rows plus the 3x3 conv's one-row halo are made
on demand from the guidance image. Exact up to float summation order; the price is compute: 9 passes over the
image before the first band, each recomputing the 1x1 convs before the norm it learns (about 4.5x the
encoders' arithmetic). Working memory at a 896^2 output is that at 224^2 (``benchmarks/memory.py``).
"""

from __future__ import annotations

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

#: the input size (and output size) of JAFAR's own evaluation (``img_size: 448``)
REFERENCE_SIZE = 448


@dataclass
class JAFARConfig:
    """JAFAR hyperparameters; the defaults are the released models' (``config/model/jafar.yaml``)."""

    qk_dim: int = 128
    num_heads: int = 4
    kernel_size: int = 1  # the image encoder's first conv
    num_layers: int = 2  # ResBlocks per encoder
    chunk_pixels: int = 112 * 112  # output pixels per band (all images of the batch together)

    def __post_init__(self) -> None:
        if self.chunk_pixels < 1:
            raise VitupError(f"--chunk-pixels {self.chunk_pixels}: must be at least 1")
        if self.qk_dim % self.num_heads or self.qk_dim % 8:
            raise VitupError(f"JAFAR: qk_dim {self.qk_dim} must be divisible by {self.num_heads} heads and 8 groups")


# -- layers (named as the published weights name them) ---------------------------------------------
class ResBlock(nn.Module):
    """``x + conv2(SiLU(GN(conv1(SiLU(GN(x))))))`` with 1x1 convs (keys ``norm1``, ``conv1``, ``norm2``, ``conv2``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, dim)
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=False)
        self.norm2 = nn.GroupNorm(8, dim)
        self.conv2 = nn.Conv2d(dim, dim, 1, bias=False)

    @property
    def norms(self) -> tuple[nn.GroupNorm, nn.GroupNorm]:
        return self.norm1, self.norm2

    def hidden(self, x: torch.Tensor, stats: Stats | None = None) -> torch.Tensor:
        """``conv1(SiLU(GN(x)))`` (GroupNorm by ``stats`` when given: ``streamed.group_norm``)."""
        return self.conv1(F.silu(group_norm(x, self.norm1, stats)))

    def forward(self, x: torch.Tensor, stats: tuple[Stats, Stats] | None = None) -> torch.Tensor:
        s1, s2 = (None, None) if stats is None else stats
        return x + self.conv2(F.silu(group_norm(self.hidden(x, s1), self.norm2, s2)))


def _encoder(in_dim: int, dim: int, kernel_size: int, layers: int) -> nn.Sequential:
    """A conv (reflect padding, no bias) then ``layers`` ResBlocks (keys ``0``, ``1``, ``2``, ...)."""
    first = nn.Conv2d(in_dim, dim, kernel_size, padding=kernel_size // 2, padding_mode="reflect", bias=False)
    return nn.Sequential(first, *[ResBlock(dim) for _ in range(layers)])


class SFTModulation(nn.Module):
    """``gamma(f) * GroupNorm(x) + beta(f)`` (1x1 convs ``gamma``, ``beta``; affine-free GroupNorm)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Conv2d(dim, dim, 1, bias=False)
        self.beta = nn.Conv2d(dim, dim, 1, bias=False)
        self.norm = nn.GroupNorm(8, dim, affine=False)

    def forward(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.gamma(features) * self.norm(x) + self.beta(features)


class RoPE(nn.Module):
    """2-D rotary encoding with learned angular frequencies ``freqs`` ``(2, dim)`` (row, column)."""

    def __init__(self, dim: int, theta: float = 100.0) -> None:
        super().__init__()
        base = theta ** torch.linspace(0, -1, dim // 4)
        base = torch.cat([base, base])
        freqs = torch.zeros(2, dim)
        freqs[0, : dim // 2] = base
        freqs[1, -dim // 2 :] = base
        self.freqs = nn.Parameter(freqs * 2 * torch.pi)

    def forward(self, x: torch.Tensor, row0: int = 0, height: int | None = None) -> torch.Tensor:
        """``(B, C, H, W)`` -> same, rotated by ``row * freqs[0] + col * freqs[1]`` (coordinates in [0, 1]);
        ``x`` may be rows ``row0..row0 + H`` of a map of ``height`` rows."""
        H, W = x.shape[-2:]
        # positions and angles in float32 at least: in bfloat16 (autocast) neighbouring rows of a large map
        # would share one position (JAFAR #7); float32 and float64 inputs are computed as the reference does
        dtype = torch.promote_types(x.dtype, torch.float32)
        freqs = self.freqs.to(dtype)
        rows = torch.linspace(0, 1, height or H, device=x.device, dtype=dtype)[row0 : row0 + H]
        cols = torch.linspace(0, 1, W, device=x.device, dtype=dtype)
        angle = rows.view(H, 1, 1) * freqs[0] + cols.view(1, W, 1) * freqs[1]  # (H, W, C)
        angle = angle.permute(2, 0, 1).unsqueeze(0)
        x1, x2 = x.chunk(2, dim=1)
        return (x * angle.cos() + torch.cat([-x2, x1], dim=1) * angle.sin()).to(x.dtype)


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters with ``vdim != embed_dim`` (``q_proj_weight``, ``k_proj_weight``,
    ``v_proj_weight``, ``in_proj_bias``, ``out_proj``); only the query and key projections are used."""

    def __init__(self, dim: int, value_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj_weight = nn.Parameter(torch.empty(dim, dim))
        self.k_proj_weight = nn.Parameter(torch.empty(dim, dim))
        self.v_proj_weight = nn.Parameter(torch.empty(dim, value_dim))  # unused by JAFAR's output
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)  # unused by JAFAR's output
        for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            nn.init.xavier_uniform_(w)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        return x.view(B, N, self.heads, D // self.heads).transpose(1, 2)

    def keys(self, k: torch.Tensor) -> torch.Tensor:
        """Normalised keys ``(B, N, D)`` -> ``(B, heads, N, D / heads)``."""
        return self._split(F.linear(k, self.k_proj_weight, self.in_proj_bias.chunk(3)[1]))

    def forward(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention weights of ``q`` ``(B, P, D)`` on ``values`` ``(B, N, C)`` -> ``(B, P, C)``."""
        q = self._split(F.linear(q, self.q_proj_weight, self.in_proj_bias.chunk(3)[0]))
        v = values.unsqueeze(1).expand(-1, self.heads, -1, -1)
        return F.scaled_dot_product_attention(q, keys, v).mean(dim=1)


class CrossAttention(nn.Module):
    """RMSNorm'ed queries and keys (``norm_q``, ``norm_k``; ``norm_v`` is published but unused) -> attention."""

    def __init__(self, dim: int, value_dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.RMSNorm(dim)
        self.norm_k = nn.RMSNorm(dim)
        self.norm_v = nn.RMSNorm(value_dim)
        self.attention = SplitAttention(dim, value_dim, heads)


class CrossAttentionBlock(nn.Module):
    """A 3x3 conv on the query map (``conv2d``, zero padding) then ``cross_attn``."""

    def __init__(self, dim: int, value_dim: int, heads: int) -> None:
        super().__init__()
        self.cross_attn = CrossAttention(dim, value_dim, heads)
        self.conv2d = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False)


class JAFARNet(nn.Module):
    """The reference's ``JAFAR`` module in its published key layout; ``forward(image, tokens, size)``."""

    def __init__(self, dim: int, config: JAFARConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or JAFARConfig()
        self.dim = dim
        qk, layers = config.qk_dim, config.num_layers
        self.image_encoder = _encoder(3, qk, config.kernel_size, layers)
        self.key_encoder = _encoder(qk, qk, 1, layers)
        self.query_encoder = _encoder(qk, qk, 1, layers)
        self.norm = nn.GroupNorm(8, qk, affine=False)
        self.key_features_encoder = _encoder(dim, qk, 1, layers)
        self.cross_decode = CrossAttentionBlock(qk, dim, config.num_heads)
        self.sft_key = SFTModulation(qk)
        self.rope = RoPE(qk)

    def prepare(
        self, image: torch.Tensor, tokens: torch.Tensor, size: tuple[int, int], chunk_pixels: int | None = None
    ) -> tuple[StreamedGuidance, torch.Tensor, torch.Tensor]:
        """Normalised guidance ``(B, 3, Hg, Wg)``, raw tokens ``(B, C, h, w)`` -> the GroupNorm'ed query map at
        ``size`` (``StreamedGuidance``: rows on demand, never the whole map), the projected keys
        ``(B, heads, h*w, qk / heads)`` and the values ``(B, h*w, C)``. The encoders run over the guidance in
        chunks of about ``chunk_pixels`` pixels (default ``config.chunk_pixels``)."""
        if tokens.shape[1] != self.dim:
            raise VitupError(f"JAFAR for {self.dim}-d features was given {tokens.shape[1]}-d tokens")
        chunk = self.config.chunk_pixels if chunk_pixels is None else chunk_pixels
        queries = StreamedGuidance(
            image, size, tuple(tokens.shape[-2:]), self.image_encoder, self.rope, self.query_encoder,
            self.key_encoder, chunk, query_norm=self.norm,
        )  # fmt: skip
        features = self.key_features_encoder(F.normalize(tokens, dim=1))
        keys = self.sft_key(queries.keys.to(features.dtype), features)
        attn = self.cross_decode.cross_attn
        keys = attn.attention.keys(attn.norm_k(keys.flatten(2).transpose(1, 2)))
        return queries, keys, tokens.flatten(2).transpose(1, 2)

    def band(
        self, queries: StreamedGuidance, keys: torch.Tensor, values: torch.Tensor, r0: int, r1: int
    ) -> torch.Tensor:
        """Output rows ``[r0, r1)``: ``(B, C, r1 - r0, W)`` (the 3x3 conv sees query rows ``r0 - 1 .. r1 + 1``,
        zero rows at the true borders only: exact)."""
        H, W = queries.size
        q = conv_rows(self.cross_decode.conv2d, queries.rows, H, r0, r1)
        attn = self.cross_decode.cross_attn
        out = attn.attention(attn.norm_q(q.flatten(2).transpose(1, 2)), keys, values)  # (B, P, C)
        return out.transpose(1, 2).reshape(q.shape[0], -1, r1 - r0, W)

    def bands(
        self, image: torch.Tensor, tokens: torch.Tensor, size: tuple[int, int], chunk_pixels: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(r0, r1, rows r0..r1 of the output (B, C, r1 - r0, W))`` band by band."""
        chunk = self.config.chunk_pixels if chunk_pixels is None else chunk_pixels
        queries, keys, values = self.prepare(image, tokens, size, chunk)
        B = tokens.shape[0]
        H, W = queries.size
        step = max(1, min(H, chunk // max(1, B * W)))
        for r0 in range(0, H, step):
            r1 = min(H, r0 + step)
            yield r0, r1, self.band(queries, keys, values, r0, r1)

    def forward(
        self, image: torch.Tensor, tokens: torch.Tensor, size: tuple[int, int], chunk_pixels: int | None = None
    ) -> torch.Tensor:
        """Normalised image ``(B, 3, H, W)``, raw tokens ``(B, C, h, w)`` -> ``(B, C, *size)``."""
        parts = [band for _, _, band in self.bands(image, tokens, _as_size(size), chunk_pixels)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


# -- weights (the published key layout) -------------------------------------------------------------
def config_from_state(state: dict[str, torch.Tensor], **overrides: Any) -> tuple[int, JAFARConfig]:
    """The feature width and the architecture a published-layout state dict implies."""
    dim = int(state["key_features_encoder.0.weight"].shape[1])
    first = state["image_encoder.0.weight"]
    blocks = {k.split(".")[1] for k in state if k.startswith("image_encoder.") and k.split(".")[1] != "0"}
    config = JAFARConfig(
        qk_dim=int(first.shape[0]), kernel_size=int(first.shape[-1]), num_layers=len(blocks), **overrides
    )
    return dim, config


def load_state(net: JAFARNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a published-layout state dict into ``net``: every key, every shape, or one clear error."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise VitupError(
            f"--checkpoint {source}: does not match JAFAR's layout (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, value in state.items():
        if own[name].shape != value.shape:
            raise VitupError(
                f"--checkpoint {source}: {name} has shape {tuple(value.shape)}, JAFAR expects {tuple(own[name].shape)}"
            )
    net.load_state_dict(state)


# -- the upsampler ----------------------------------------------------------------------------------
class JAFAR(Upsampler):
    """JAFAR over a backbone's last layer (final norm applied, as the reference's ``forward_intermediates``).

    ``features(images, size)``: the tokens come from ``images`` at ``input_size`` (default 448, the
    reference's evaluation size, when the patch divides it); the guidance image is ``images`` resized to
    ``size`` (bilinear, antialiased) and normalised like the backbone input, so at ``size == input_size``
    this is the reference's evaluation exactly. ``query`` samples the dense map at the images' own size.
    """

    name = "jafar"

    def __init__(
        self,
        backbone: Backbone,
        config: JAFARConfig | None = None,
        input_size: int | None = None,
        *,
        source: str | None = None,
        weights_sha256: str | None = None,
    ) -> None:
        if input_size is None and REFERENCE_SIZE % backbone.patch_size == 0:
            input_size = REFERENCE_SIZE
        super().__init__(backbone, input_size)
        self.config = config or JAFARConfig()
        self.net = JAFARNet(backbone.embed_dim, self.config)
        self.source = source  # where the weights came from (release name, path); None = untrained
        self.weights_sha256 = weights_sha256

    @property
    def compile_parts(self) -> tuple[str, ...]:  # type: ignore[override]
        """The encoders' residual blocks: what the streamed encoders call as modules (``models.streamed``)."""
        layers = range(1, self.config.num_layers + 1)
        return tuple(f"net.{e}_encoder.{i}" for e in ("image", "query", "key") for i in layers)

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """JAFAR's own tensors in the published layout (no backbone)."""
        return self.net.state_dict()

    def settings(self) -> dict[str, Any]:
        return {"jafar": asdict(self.config), "weights": self.source}

    def check_tap(self, tap: int | None) -> None:
        if tap is not None and tap != self.backbone.depth:
            raise VitupError(f"--tap {tap}: JAFAR upsamples the last layer only (tap {self.backbone.depth})")

    def guidance(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> the normalised guidance image ``(B, 3, *size)``."""
        if tuple(images.shape[-2:]) != tuple(size):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.backbone.normalize(images)

    def bands(
        self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None, chunk: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """The output ``(B, C, *size)`` band by band, about ``chunk`` pixels a band."""
        self.check_tap(tap)
        size = _as_size(size)
        tokens = self.backbone.hidden_states(self.prepare(images), [self.backbone.depth])[0]
        yield from self.net.bands(self.guidance(images, size), tokens, size, chunk)

    def features(self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None) -> torch.Tensor:
        parts = [band for _, _, band in self.bands(images, size, tap)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def query(self, images: torch.Tensor, xy: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        """Bilinear samples ``(B, N, C)`` of the dense map at the images' own size (border clamped)."""
        return sample_map(self.features(images, tuple(images.shape[-2:]), tap), xy)


def count_parameters(dim: int, config: JAFARConfig | None = None) -> int:
    """JAFAR's parameter count for a ``dim``-d backbone (the unused value/output projections included)."""
    return sum(p.numel() for p in JAFARNet(dim, config).parameters())


register_upsampler(
    UpsamplerSpec(
        name="jafar",
        model_class=JAFAR,
        build=lambda backbone, config=None, input_size=None: JAFAR(backbone, config, input_size),
        config_class=JAFARConfig,
        capabilities=Capabilities(
            trained=True,
            input_size_from_weights=False,
            final_tap_only=True,
            any_tap=False,
            channel_space="raw",
            banded=True,
            default_release=True,
        ),
        # the reference evaluation: T.Resize(448, BILINEAR) on the PIL image, CenterCrop, the backbone's mean/std
        preprocessing=Preprocessing(resize_filter="bilinear"),
        summary="image queries at the output size attend to feature-modulated keys; convex mix of raw tokens",
        paper="Couairon, Chambon et al. 2025 (JAFAR)",
        licence="reference code Apache-2.0 (PaulCouairon/JAFAR)",
    )
)
