"""NAF (Neighborhood Attention Filtering; Chambon et al., CVPR 2026; valeoai/NAF, Apache-2.0), inference only.

One set of weights upsamples the features of any backbone zero-shot: queries are an RGB encoding of the
image (two small conv stacks, pooled to the output size, rotated by an axial RoPE), keys are those queries
pooled back to the token grid, values are the backbone's own tokens; each output pixel attends to a
``kernel_size``-square neighbourhood of the nearest-upsampled keys and values with NATTEN's dilated
neighbourhood attention (dilation = output size // token grid). Outputs are convex mixes of the tokens,
in the backbone's own feature space.

NATTEN's kernel is replaced by plain PyTorch here, exactly: along each axis of length ``L`` with dilation
``d`` a position ``i`` belongs to the group ``i % d`` (length ``Lg = ceil((L - i % d) / d)``), sits at
``p = i // d`` in it, and attends to the group positions ``clamp(p - k // 2, 0, Lg - k) + 0..k-1``: at
the borders the window is shifted inside, never clipped (``natten.backends.flex.get_na_flex_mask``).

The published ``naf_release.pth`` keeps its key layout (``image_encoder.*``; ``image_encoder.rope.periods``
is a buffer). Output rows are produced in bands: keys are accumulated band by band first, then each band of
queries attends, so memory is bounded whatever the output size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitup_cli.backbones import Backbone
from vitup_cli.errors import VitupError
from vitup_cli.models.base import Upsampler, _as_size, sample_map
from vitup_cli.models.registry import Capabilities, Preprocessing, UpsamplerSpec, register_upsampler

#: the guidance image's normalisation in NAF's reference (its notebook's ``mean_ups, std_ups``)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class NAFConfig:
    """NAF's architecture (the published model: dim 256, 4 attention heads, 4 RoPE heads, kernel 9).

    ``chunk_pixels``: output pixels (times batch) per band; memory grows with it, results do not change."""

    dim: int = 256
    heads_attn: int = 4
    heads_rope: int = 4
    kernel_size: int = 9
    img_layers: int = 2
    num_groups: int = 8
    chunk_pixels: int = 8192

    def __post_init__(self) -> None:
        if self.dim % self.heads_attn or self.dim % (4 * self.heads_rope) or self.kernel_size % 2 == 0:
            raise ValueError(
                f"NAF: dim {self.dim} must divide by heads_attn {self.heads_attn} and 4 x heads_rope "
                f"{self.heads_rope}; kernel_size {self.kernel_size} must be odd"
            )


class EncBlock(nn.Module):
    """GroupNorm, SiLU, conv, GroupNorm, SiLU, conv (reflect padding; no residual in the release)."""

    def __init__(self, width: int, kernel_size: int, num_groups: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.norm1 = nn.GroupNorm(num_groups, width)
        self.conv1 = nn.Conv2d(width, width, kernel_size, padding=pad, padding_mode="reflect")
        self.norm2 = nn.GroupNorm(num_groups, width)
        self.conv2 = nn.Conv2d(width, width, kernel_size, padding=pad, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.silu(self.norm1(x)))
        return self.conv2(F.silu(self.norm2(x)))


def conv_stack(width: int, kernel_size: int, layers: int, num_groups: int) -> nn.Sequential:
    """RGB -> ``width`` channels: a conv then ``layers`` ``EncBlock`` (keys ``0.*``, ``1.*``, ...)."""
    first = nn.Conv2d(3, width, kernel_size, padding=kernel_size // 2, padding_mode="reflect")
    return nn.Sequential(first, *[EncBlock(width, kernel_size, num_groups) for _ in range(layers)])


class AxialRoPE(nn.Module):
    """DINOv3's axial RoPE without learned weights: ``periods`` (a stored buffer) per head, coordinates
    ``2 * (i + 0.5) / H - 1`` (rows) and ``2 * (j + 0.5) / W - 1`` (columns), each normalised separately."""

    def __init__(self, dim: int, heads: int, base: float = 100.0) -> None:
        super().__init__()
        self.heads = heads
        head = dim // heads
        self.register_buffer("periods", base ** (2 * torch.arange(head // 4, dtype=torch.float32) / (head // 2)))

    def forward(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, dim, r, W)`` at row coordinates ``rows`` ``(r,)`` and column coordinates ``cols`` ``(W,)``."""
        B, C, r, W = x.shape
        yy, xx = torch.meshgrid(rows, cols, indexing="ij")
        coords = torch.stack([yy, xx], dim=-1).reshape(r * W, 2)
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]
        angles = angles.flatten(1, 2).tile(2)  # (rW, head): [rows..., cols..., rows..., cols...]
        cos, sin = angles.cos(), angles.sin()
        h = x.reshape(B, self.heads, C // self.heads, r * W).transpose(2, 3)  # (B, n, rW, head)
        a, b = h.chunk(2, dim=-1)
        out = h * cos + torch.cat([-b, a], dim=-1) * sin
        return out.transpose(2, 3).reshape(B, C, r, W)


class ImageEncoder(nn.Module):
    """The published ``image_encoder``: two conv stacks (1x1 and 3x3) concatenated, and the RoPE."""

    def __init__(self, config: NAFConfig) -> None:
        super().__init__()
        half = config.dim // 2
        self.encoder = conv_stack(half, 1, config.img_layers, config.num_groups)
        self.sem_encoder = conv_stack(half, 3, config.img_layers, config.num_groups)
        self.rope = AxialRoPE(config.dim, config.heads_rope)

    def encode(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Normalised guidance ``(B, 3, H, W)`` -> the encoding at the image's (capped) size, before pooling.

        As the reference: an image over 4x the output is first resized (bilinear) to
        ``min(H, 4 oh, 4 ow) x min(W, 4 ow, 4 oh)``."""
        oh, ow = size
        if image.shape[-2] > 4 * oh or image.shape[-1] > 4 * ow:
            cap = (min(image.shape[-2], 4 * oh, 4 * ow), min(image.shape[-1], 4 * ow, 4 * oh))
            image = F.interpolate(image, size=cap, mode="bilinear", align_corners=False)
        return torch.cat([self.encoder(image), self.sem_encoder(image)], dim=1)


def pool_matrix(n_in: int, n_out: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(n_out, n_in)``: ``adaptive_avg_pool`` along one axis as a matrix (bins ``[floor(i n_in / n_out),
    ceil((i + 1) n_in / n_out))``), so pooled rows can be made band by band."""
    i = torch.arange(n_out)
    start = torch.div(i * n_in, n_out, rounding_mode="floor")
    end = torch.div((i + 1) * n_in + n_out - 1, n_out, rounding_mode="floor")
    j = torch.arange(n_in)
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return (inside.float() / (end - start)[:, None].float()).to(device)


def nearest_exact_index(n_in: int, n_out: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The source index of each of ``n_out`` positions under ``F.interpolate(mode="nearest-exact")``
    (taken from PyTorch itself, so the rounding is its own)."""
    src = torch.arange(n_in, dtype=torch.float32, device=device).view(1, 1, n_in)
    return F.interpolate(src, size=n_out, mode="nearest-exact").view(n_out).round().long()


def neighbourhood(length: int, dilation: int, kernel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(length, kernel)``: the positions each position attends to along one axis under NATTEN's dilated
    neighbourhood attention (windows shifted inside at the borders; see the module docstring)."""
    if dilation < 1 or length // dilation < kernel:
        raise VitupError(
            f"NAF: an output side of {length} with dilation {dilation} leaves fewer than kernel_size {kernel} "
            "positions per dilation group (the output side must be at least the token grid's, and the token "
            f"grid at least {kernel})"
        )
    i = torch.arange(length, device=device)
    group, pos = i % dilation, i // dilation
    group_len = (length - group + dilation - 1) // dilation
    start = torch.minimum((pos - kernel // 2).clamp(min=0), group_len - kernel)
    return group[:, None] + dilation * (start[:, None] + torch.arange(kernel, device=device)[None, :])


class NAFNet(nn.Module):
    """The published ``NAF`` module (state-dict keys ``image_encoder.*``), by row bands."""

    def __init__(self, config: NAFConfig | None = None) -> None:
        super().__init__()
        self.config = config or NAFConfig()
        self.image_encoder = ImageEncoder(self.config)

    def _queries(self, enc: torch.Tensor, ph: torch.Tensor, pw: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of the pooled, rotated encoding: ``(B, dim, r1 - r0, W)``."""
        H, W = ph.shape[0], pw.shape[0]
        x = torch.einsum("rh,bchw,sw->bcrs", ph[r0:r1], enc, pw)
        dev = enc.device
        rows = (torch.arange(0.5, H, device=dev) / H * 2.0 - 1.0)[r0:r1]
        cols = torch.arange(0.5, W, device=dev) / W * 2.0 - 1.0
        return self.image_encoder.rope(x, rows, cols)

    def bands(
        self, image: torch.Tensor, tokens: torch.Tensor, size: tuple[int, int], chunk_pixels: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Normalised guidance ``(B, 3, *)``, tokens ``(B, C, h, w)`` -> ``(r0, r1, (B, C, r1 - r0, W))``."""
        cfg = self.config
        H, W = size
        B, C, h, w = tokens.shape
        if C % cfg.heads_attn:
            raise VitupError(f"NAF: {C}-d features do not split into {cfg.heads_attn} attention heads")
        dev = tokens.device
        rows_nb = neighbourhood(H, H // h if h else 0, cfg.kernel_size, dev)
        cols_nb = neighbourhood(W, W // w if w else 0, cfg.kernel_size, dev)
        rows_src = nearest_exact_index(h, H, dev)[rows_nb]  # (H, k) token rows
        cols_src = nearest_exact_index(w, W, dev)[cols_nb]  # (W, k) token columns
        enc = self.image_encoder.encode(image, size)
        ph = pool_matrix(enc.shape[-2], H, dev).to(enc.dtype)
        pw = pool_matrix(enc.shape[-1], W, dev).to(enc.dtype)
        kh = pool_matrix(H, h, dev).to(enc.dtype)
        kw = pool_matrix(W, w, dev).to(enc.dtype)
        chunk = cfg.chunk_pixels if chunk_pixels is None else chunk_pixels
        step = max(1, min(H, chunk // max(1, B * W)))
        keys = enc.new_zeros(B, cfg.dim, h, w)
        for r0 in range(0, H, step):  # keys: the rotated queries pooled to the token grid
            r1 = min(H, r0 + step)
            keys += torch.einsum("hr,bcrs,ws->bchw", kh[:, r0:r1], self._queries(enc, ph, pw, r0, r1), kw)
        n, k = cfg.heads_attn, cfg.kernel_size
        dk, dv = cfg.dim // n, C // n
        keys = keys.reshape(B, n, dk, h, w).permute(0, 1, 3, 4, 2)  # (B, n, h, w, dk): gathers stay contiguous
        values = tokens.to(enc.dtype).reshape(B, n, dv, h, w).permute(0, 1, 3, 4, 2)
        scale = dk**-0.5
        cols = cols_src.reshape(-1)
        for r0 in range(0, H, step):
            r1 = min(H, r0 + step)
            r = r1 - r0
            q = self._queries(enc, ph, pw, r0, r1).reshape(B, n, dk, r, W).permute(0, 1, 3, 4, 2)
            scores = []
            for a in range(k):  # k x k neighbours: rows a, all k columns at once
                ka = keys.index_select(2, rows_src[r0:r1, a]).index_select(3, cols).reshape(B, n, r, W, k, dk)
                scores.append((ka @ q.unsqueeze(-1)).squeeze(-1))  # (B, n, r, W, k)
            attn = (torch.stack(scores, dim=-2) * scale).flatten(-2).softmax(-1)  # (B, n, r, W, k*k)
            attn = attn.reshape(B, n, r, W, k, k)
            out = values.new_zeros(B, n, r, W, 1, dv)
            for a in range(k):
                va = values.index_select(2, rows_src[r0:r1, a]).index_select(3, cols).reshape(B, n, r, W, k, dv)
                out += attn[..., a, :].unsqueeze(-2) @ va
            yield r0, r1, out.reshape(B, n, r, W, dv).permute(0, 1, 4, 2, 3).reshape(B, C, r, W)

    def forward(
        self, image: torch.Tensor, tokens: torch.Tensor, size: tuple[int, int], chunk_pixels: int | None = None
    ) -> torch.Tensor:
        """The reference's ``NAF(image, features, output_size)``: ``(B, C, *size)``."""
        parts = [band for _, _, band in self.bands(image, tokens, size, chunk_pixels)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


# -- weights (the published key layout) -------------------------------------------------------------
def config_from_state(state: dict[str, torch.Tensor], **overrides: Any) -> NAFConfig:
    """The architecture a published-layout state dict implies (heads and kernel are the release's)."""
    try:
        half = int(state["image_encoder.encoder.0.weight"].shape[0])
        periods = int(state["image_encoder.rope.periods"].shape[0])
    except KeyError as exc:
        raise VitupError(f"not NAF weights in the published layout (no {exc.args[0]})") from None
    layers = {k.split(".")[2] for k in state if k.startswith("image_encoder.encoder.")} - {"0"}
    dim = 2 * half
    fields = {"dim": dim, "heads_rope": dim // (4 * periods), "img_layers": len(layers)}
    fields.update(overrides)
    return NAFConfig(**fields)


def load_state(net: NAFNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a published-layout state dict into ``net``: every key, every shape, or one clear error."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise VitupError(
            f"--checkpoint {source}: does not match NAF's layout (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, value in state.items():
        if own[name].shape != value.shape:
            raise VitupError(
                f"--checkpoint {source}: {name} has shape {tuple(value.shape)}, NAF expects {tuple(own[name].shape)}"
            )
    net.load_state_dict(state)


# -- the upsampler ----------------------------------------------------------------------------------
class NAF(Upsampler):
    """NAF over any backbone and any hidden state (default the last).

    The backbone sees ``images`` at ``input_size`` (its own normalisation); NAF's guidance is that same
    resized image normalised with ImageNet's mean/std, as NAF's notebook and ViT-Up's eval kit feed it.
    ``query`` computes the dense map at the images' own size band by band and samples it bilinearly."""

    name = "naf"
    compile_parts = ("net.image_encoder.encoder", "net.image_encoder.sem_encoder")

    def __init__(
        self,
        backbone: Backbone,
        config: NAFConfig | None = None,
        input_size: int | None = None,
        *,
        source: str | None = None,
        weights_sha256: str | None = None,
    ) -> None:
        super().__init__(backbone, input_size)
        self.config = config or NAFConfig()
        self.net = NAFNet(self.config)
        self.source = source  # where the weights came from (release name, path); None = untrained
        self.weights_sha256 = weights_sha256  # of the file they came from (stores record it)
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """NAF's own tensors in the published layout."""
        return self.net.state_dict()

    def settings(self) -> dict[str, Any]:
        return {
            "naf": {k: v for k, v in vars(self.config).items()},
            "guidance": "the backbone's input image normalised with ImageNet mean/std (NAF's notebook)",
            "weights": self.source,
        }

    def guidance(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> NAF's guidance: the backbone's input size, ImageNet-normalised."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            )
        return (images - self._mean) / self._std

    def bands(
        self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None, chunk: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """The output ``(B, C, *size)`` as row bands of about ``chunk`` pixels (default ``config.chunk_pixels``)."""
        tokens = self.tokens(images, tap)
        yield from self.net.bands(self.guidance(images), tokens, _as_size(size), chunk)

    def features(self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None) -> torch.Tensor:
        parts = [band for _, _, band in self.bands(images, size, tap)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def query(self, images: torch.Tensor, xy: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        """Bilinear samples ``(B, N, C)`` (border clamped) of the dense map at the images' own size."""
        return sample_map(self.features(images, tuple(images.shape[-2:]), tap), xy)


register_upsampler(
    UpsamplerSpec(
        name="naf",
        model_class=NAF,
        build=lambda backbone, config=None, input_size=None: NAF(backbone, config, input_size),
        config_class=NAFConfig,
        capabilities=Capabilities(
            trained=True,
            input_size_from_weights=False,
            any_backbone=True,
            banded=True,
            default_release=True,
        ),
        # NAF's loaders resize with torchvision's bilinear (T.Resize(..., BILINEAR) + CenterCrop)
        preprocessing=Preprocessing(resize_filter="bilinear"),
        summary="RoPE'd RGB queries, dilated 9x9 neighbourhood attention to the tokens (zero-shot, any backbone)",
        paper="Chambon et al. 2026 (NAF, CVPR)",
        licence="reference code Apache-2.0 (valeoai/NAF)",
    )
)
