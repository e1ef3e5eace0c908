"""UPLiFT: iterative 2x feature upsampling with a conv image encoder and a Local Attender (Walmer et al.).

One step maps backbone features ``x`` ``(B, C, h, w)`` to ``(B, C, 2h, 2w)``:

- **Encoder** (once per image): five ``SingleConv`` blocks (16/32/64/128/128 channels), all at the full
  resolution of the normalised image (for patch-14 backbones the image is first resized by 16/14 so
  that 16x the token grid lines up with it).
- **Decoder** (weights shared by every step): ``x`` concatenated with the last encoder map
  (nearest-resized to ``h x w``) -> ``DoubleConv`` to 64 channels; a 2x transposed conv plus a bilinear
  residual; concatenated with the second-to-last encoder map at ``2h x 2w`` -> ``DoubleConv`` (64): the
  guide ``G``.
- **Local Attender**: per output pixel a softmax over 17 logits (``G[:, :17] + conv1x1(G)``) weights
  the 17 low-resolution tokens at fixed offsets around the pixel's cell (3x3 ring plus the 8 tokens two
  cells away along rows, columns and diagonals; replicated borders). The output is a convex combination
  of input tokens, so the features keep the backbone's distribution.

Every block adds its input to its output, truncating (fewer output channels) or zero-padding (more)
the input's channels. Module and parameter names follow the reference implementation
(github.com/mwalmer-umd/UPLiFT, MIT), so its published ``safetensors`` weights load as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitup_cli.backbones import Backbone
from vitup_cli.errors import VitupError
from vitup_cli.models.base import Upsampler, _as_size, sample_map
from vitup_cli.models.registry import Capabilities, UpsamplerSpec, register_upsampler

#: the 17 (dy, dx) offsets of the Local Attender, in the order of its logits
OFFSETS_17: tuple[tuple[int, int], ...] = (
    (-2, -2), (-2, 0), (-2, 2),
    (-1, -1), (-1, 0), (-1, 1),
    (0, -2), (0, -1), (0, 0), (0, 1), (0, 2),
    (1, -1), (1, 0), (1, 1),
    (2, -2), (2, 0), (2, 2),
)  # fmt: skip


@dataclass
class UPLiFTConfig:
    """UPLiFT's architecture; the defaults are the published models' (both DINOv2-S/14 and DINOv3-S+/16)."""

    encoder_widths: tuple[int, ...] = (16, 32, 64, 128, 128)
    decoder_width: int = 64
    neighbours: int = 17


def _match_channels(residual: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out + residual``, the residual truncated to or zero-padded to ``out``'s channels."""
    c_in, c_out = residual.shape[1], out.shape[1]
    if c_in == c_out:
        return out + residual
    if c_in > c_out:
        return out + residual[:, :c_out]
    return out + F.pad(residual, (0, 0, 0, 0, 0, c_out - c_in))


class _ConvBlock(nn.Module):
    """``SingleConv`` (one 3x3 conv) or ``DoubleConv`` (two), BN + ReLU after each, a 1x1 conv, and the
    channel-matching residual."""

    def __init__(self, c_in: int, width: int, double: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        if double:
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, width, 1))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _match_channels(x, self.conv(x))


class _Group(nn.Module):
    """One block in a ``blocks`` container (the reference's ``BlockGroup`` key layout)."""

    def __init__(self, c_in: int, width: int, double: bool) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_ConvBlock(c_in, width, double))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class _Up(nn.Module):
    """2x transposed conv plus the bilinear (align_corners) upsampling of its input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return _match_channels(residual, self.up(x))


class UPLiFTEncoder(nn.Module):
    """Normalised image ``(B, 3, H, W)`` -> five full-resolution maps (``block_0`` .. ``block_4``)."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        c = 3
        for i, width in enumerate(widths):
            self.add_module(f"block_{i}", _Group(c, width, double=False))
            c = width
        self.widths = tuple(widths)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        maps, x = [], image
        for i in range(len(self.widths)):
            x = getattr(self, f"block_{i}")(x)
            maps.append(x)
        return maps


class UPLiFTDecoder(nn.Module):
    """Features ``(B, C, h, w)`` + encoder maps -> the guide ``(B, width, 2h, 2w)``."""

    def __init__(self, channels: int, encoder_widths: Sequence[int], width: int = 64) -> None:
        super().__init__()
        self.block_0 = _Group(channels + encoder_widths[-1], width, double=True)
        self.up_1 = _Up(width)
        self.block_1 = _Group(width + encoder_widths[-2], width, double=True)

    def forward(self, x: torch.Tensor, encoded: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.block_0(torch.cat([x, _nearest(encoded[-1], x.shape[-2:])], dim=1))
        x = self.up_1(x)
        return self.block_1(torch.cat([x, _nearest(encoded[-2], x.shape[-2:])], dim=1))


def _nearest(fmap: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return fmap if tuple(fmap.shape[-2:]) == tuple(size) else F.interpolate(fmap, size=tuple(size), mode="nearest")


class LocalAttender(nn.Module):
    """Guide ``(B, G, I*h, I*w)`` + value ``(B, C, h, w)`` -> ``(B, C, I*h, I*w)``: each output pixel is
    a softmax-weighted sum of the value tokens at ``OFFSETS_17`` around its cell."""

    def __init__(self, guide_channels: int, neighbours: int = 17) -> None:
        super().__init__()
        if neighbours != 17:
            raise ValueError("only the published 17-neighbour Local Attender is implemented")
        self.offsets = OFFSETS_17
        self.pad = max(max(abs(dy), abs(dx)) for dy, dx in self.offsets)
        self.conv1 = nn.Conv2d(guide_channels, neighbours, kernel_size=1)

    def weights(self, guide: torch.Tensor) -> torch.Tensor:
        """Per output pixel, the convex weights of the neighbours: ``(B, 17, H, W)``, summing to 1."""
        return _match_channels(guide, self.conv1(guide)).softmax(dim=1)

    def forward(self, guide: torch.Tensor, value: torch.Tensor, low_memory: bool = False) -> torch.Tensor:
        att = self.weights(guide)
        B, D, H, W = att.shape
        _, C, h, w = value.shape
        scale = H // h
        if scale * h != H or scale * w != W:
            raise ValueError(f"guide {H}x{W} is not an integer multiple of the value map {h}x{w}")
        padded = F.pad(value, (self.pad,) * 4, mode="replicate")
        p = self.pad
        shifted = [padded[:, :, p + dy : p + dy + h, p + dx : p + dx + w] for dy, dx in self.offsets]
        att = att.reshape(B, 1, D, h, scale, w, scale)
        if not low_memory:
            stacked = torch.stack(shifted, dim=2)[:, :, :, :, None, :, None]  # (B, C, D, h, 1, w, 1)
            return (stacked * att).sum(dim=2).reshape(B, C, H, W)
        out = value.new_zeros(B, C, h, scale, w, scale)
        for d, v in enumerate(shifted):  # one neighbour at a time: O(B C H W) extra memory instead of 17x
            out += v[:, :, :, None, :, None] * att[:, :, d]
        return out.reshape(B, C, H, W)


class UPLiFTNet(nn.Module):
    """The trainable UPLiFT module: ``encoder``, ``decoder``, ``attender`` (the published key layout).

    Args:
        channels: backbone feature channels ``C``.
        patch: backbone patch size (14 switches on the 16/14 pre-scaler of the encoder's image).
    """

    def __init__(self, channels: int, patch: int, config: UPLiFTConfig | None = None) -> None:
        super().__init__()
        self.config = config or UPLiFTConfig()
        self.channels, self.patch = int(channels), int(patch)
        self.encoder = UPLiFTEncoder(self.config.encoder_widths)
        self.decoder = UPLiFTDecoder(self.channels, self.config.encoder_widths, self.config.decoder_width)
        self.attender = LocalAttender(self.config.decoder_width, self.config.neighbours)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Normalised image ``(B, 3, H, W)`` -> the encoder maps (run once per image)."""
        if self.patch == 14:
            size = (image.shape[-2] * 16 // 14, image.shape[-1] * 16 // 14)
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.encoder(image)

    def guide(self, x: torch.Tensor, encoded: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.decoder(x, encoded)

    def step(self, x: torch.Tensor, encoded: Sequence[torch.Tensor], low_memory: bool = False) -> torch.Tensor:
        """One 2x step: ``(B, C, h, w)`` -> ``(B, C, 2h, 2w)``."""
        return self.attender(self.decoder(x, encoded), x, low_memory=low_memory)

    def forward(
        self, image: torch.Tensor, x: torch.Tensor, iterations: int = 1, low_memory: bool = False
    ) -> list[torch.Tensor]:
        """Normalised image + its backbone features -> the output of each of ``iterations`` steps."""
        encoded = self.encode(image)
        outs = []
        for _ in range(iterations):
            x = self.step(x, encoded, low_memory=low_memory)
            outs.append(x)
        return outs


def iterations_for(tokens: Sequence[int], size: Sequence[int]) -> int:
    """``ceil(log2(size / tokens))`` over both sides, at least 0: the 2x steps that reach ``size``."""
    ratio = max(size[0] / tokens[0], size[1] / tokens[1])
    return max(0, math.ceil(math.log2(ratio) - 1e-9))


def parameter_counts(model: UPLiFTNet) -> dict[str, int]:
    """Parameters of ``encoder``, ``decoder``, ``attender`` and their ``total``."""
    parts = ("encoder", "decoder", "attender")
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in parts}
    counts["total"] = sum(counts.values())
    return counts


class UPLiFT(Upsampler):
    """UPLiFT behind the ``Upsampler`` interface (the frozen backbone's last hidden state, or ``tap``).

    ``features(images, size)`` runs ``ceil(log2(size / tokens))`` steps and resizes the result to the
    exact size when that lands elsewhere (bilinear; ``output_notes`` says so). ``query`` samples the
    pixel-dense map (the steps that first reach the input size), bilinearly at ``xy``; its last step is
    evaluated only at the pixels the queries touch, in chunks, so memory stays bounded.
    """

    name = "uplift"
    compile_parts = ("net.encoder", "net.decoder")

    def __init__(
        self,
        backbone: Backbone,
        input_size: int | None = None,
        config: UPLiFTConfig | None = None,
        chunk_queries: int = 4096,
        low_memory_bytes: int = 1 << 30,
    ) -> None:
        super().__init__(backbone, input_size)
        self.net = UPLiFTNet(backbone.embed_dim, backbone.patch_size, config)
        self.chunk_queries = chunk_queries
        self.low_memory_bytes = low_memory_bytes  # use the low-memory attender above this many bytes

    @property
    def config(self) -> UPLiFTConfig:
        return self.net.config

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return {f"net.{k}": v for k, v in self.net.state_dict().items()}

    def _start(self, images: torch.Tensor, tap: int | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.prepare(images)
        tap = self.backbone.depth if tap is None else tap
        tokens = self.backbone.hidden_states(x, [tap])[0]
        return tokens, self.net.encode(x)

    def _run(self, tokens: torch.Tensor, encoded: list[torch.Tensor], steps: int) -> torch.Tensor:
        x = tokens
        for _ in range(steps):
            B, C, h, w = x.shape
            big = B * C * 4 * h * w * 4 * len(self.net.attender.offsets) > self.low_memory_bytes
            x = self.net.step(x, encoded, low_memory=big)
        return x

    def output_notes(self, size: int | tuple[int, int]) -> dict[str, Any]:
        h, w = self.token_grid
        out_h, out_w = _as_size(size)
        k = iterations_for((h, w), (out_h, out_w))
        native = [h * 2**k, w * 2**k]
        return {"iterations": k, "native_size": native, "resized": native != [out_h, out_w]}

    def features(self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None) -> torch.Tensor:
        out_h, out_w = _as_size(size)
        tokens, encoded = self._start(images, tap)
        x = self._run(tokens, encoded, iterations_for(tokens.shape[-2:], (out_h, out_w)))
        if tuple(x.shape[-2:]) != (out_h, out_w):
            shrink = x.shape[-2] > out_h or x.shape[-1] > out_w
            x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=shrink)
        return x

    def tokens(self, images: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        tap = self.backbone.depth if tap is None else tap
        return super().tokens(images, tap)

    def query(self, images: torch.Tensor, xy: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        tokens, encoded = self._start(images, tap)
        steps = iterations_for(tokens.shape[-2:], (self.input_size, self.input_size))
        if steps == 0:
            return sample_map(tokens, xy)
        value = self._run(tokens, encoded, steps - 1)
        weights = self.net.attender.weights(self.net.guide(value, encoded))  # (B, 17, H, W)
        return _sample_attended(value, weights, xy, self.net.attender.offsets, self.chunk_queries)


def _sample_attended(
    value: torch.Tensor,
    weights: torch.Tensor,
    xy: torch.Tensor,
    offsets: Sequence[tuple[int, int]],
    chunk: int,
) -> torch.Tensor:
    """Bilinear samples (border clamped, pixel centres) of the attender output, computing only the
    pixels the queries touch: value ``(B, C, h, w)``, weights ``(B, D, H, W)``, xy ``(B, N, 2)`` ->
    ``(B, N, C)``."""
    h, w = value.shape[-2:]
    H, W = weights.shape[-2:]
    scale = H // h
    dy = torch.tensor([o[0] for o in offsets], device=value.device)
    dx = torch.tensor([o[1] for o in offsets], device=value.device)
    flat_v = value.flatten(2).transpose(1, 2)  # (B, h*w, C)
    flat_a = weights.flatten(2)  # (B, D, H*W)
    out = []
    for n0 in range(0, xy.shape[1], chunk):
        q = xy[:, n0 : n0 + chunk].float()
        u = (q[..., 0] * W - 0.5).clamp(0, W - 1)
        v = (q[..., 1] * H - 0.5).clamp(0, H - 1)
        x0, y0 = u.floor().long(), v.floor().long()
        x1, y1 = (x0 + 1).clamp(max=W - 1), (y0 + 1).clamp(max=H - 1)
        fx, fy = (u - x0).unsqueeze(-1), (v - y0).unsqueeze(-1)
        acc = 0
        corners = ((y0, x0, (1 - fx) * (1 - fy)), (y0, x1, fx * (1 - fy)), (y1, x0, (1 - fx) * fy), (y1, x1, fx * fy))
        for yy, xx, wgt in corners:
            pix = _attended_pixels(flat_v, flat_a, yy, xx, dy, dx, scale, h, w, W)  # (B, n, C)
            acc = acc + wgt.to(pix.dtype) * pix
        out.append(acc)
    return torch.cat(out, dim=1)


def _attended_pixels(
    flat_v: torch.Tensor,
    flat_a: torch.Tensor,
    yy: torch.Tensor,
    xx: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    scale: int,
    h: int,
    w: int,
    W: int,
) -> torch.Tensor:
    """The attender output at output pixels ``(yy, xx)`` ``(B, n)`` -> ``(B, n, C)``."""
    B, n = yy.shape
    a = torch.gather(flat_a, 2, (yy * W + xx)[:, None, :].expand(-1, flat_a.shape[1], -1))  # (B, D, n)
    cy = ((yy // scale)[..., None] + dy).clamp(0, h - 1)  # (B, n, D) replicated borders
    cx = ((xx // scale)[..., None] + dx).clamp(0, w - 1)
    idx = (cy * w + cx).reshape(B, -1)  # (B, n*D)
    v = torch.gather(flat_v, 1, idx[..., None].expand(-1, -1, flat_v.shape[-1])).reshape(B, n, -1, flat_v.shape[-1])
    return (v * a.transpose(1, 2)[..., None]).sum(dim=2)


def load_published_state(net: UPLiFTNet, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy weights in the published key layout (``encoder.* / decoder.* / attender.*``; a ``module.``
    or ``net.`` prefix is dropped) into ``net``, cast to its dtype.

    Raises:
        VitupError: one line naming ``source`` and the first unknown, missing or mis-shaped key.
    """
    own = net.state_dict()
    renamed = {}
    for key, value in tensors.items():
        name = key.removeprefix("module.").removeprefix("net.")
        renamed[name] = value
    unknown = sorted(set(renamed) - set(own))
    if unknown:
        raise VitupError(
            f"{source}: unknown UPLiFT weight '{unknown[0]}' ({len(unknown)} unknown keys); expected the published "
            "encoder/decoder/attender layout"
        )
    missing = sorted(k for k in set(own) - set(renamed) if not k.endswith("num_batches_tracked"))
    if missing:
        raise VitupError(f"{source}: UPLiFT weight '{missing[0]}' is missing ({len(missing)} missing keys)")
    for name, value in renamed.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise VitupError(
                f"{source}: {name} has shape {tuple(value.shape)}, this UPLiFT needs {tuple(own[name].shape)} "
                f"(a {net.channels}-channel backbone); use the weights released for that backbone"
            )
    with torch.no_grad():
        for name, value in renamed.items():
            own[name].copy_(value.to(own[name].dtype))


register_upsampler(
    UpsamplerSpec(
        name="uplift",
        model_class=UPLiFT,
        build=lambda backbone, config=None, input_size=None: UPLiFT(backbone, input_size, config),
        config_class=UPLiFTConfig,
        capabilities=Capabilities(trained=True),
        summary="iterative 2x decoder with a 17-neighbour Local Attender over an image encoder",
        paper="Walmer et al. 2025 (UPLiFT)",
        licence="reference code MIT (mwalmer-umd/UPLiFT)",
    )
)
