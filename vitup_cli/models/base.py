"""The interface every upsampler keeps, so stores, probes and pictures can compare them side by side.

Coordinates: ``xy`` in ``[0, 1]^2``, x to the right, y down, pixel-centre convention: the centre of
pixel ``(i, j)`` of an ``H x W`` grid is ``((j + 0.5) / W, (i + 0.5) / H)``.
Images: ``(B, 3, H, W)`` float RGB in ``[0, 1]`` at any size; each upsampler resizes to its backbone
input size and normalises.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitup_cli.backbones import Backbone
from vitup_cli.errors import VitupError


def grid_xy(height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Pixel-centre coordinates of an ``H x W`` grid, row-major: ``(H * W, 2)`` in ``[0, 1]``."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


def sample_map(fmap: torch.Tensor, xy: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``(B, C, h, w)`` at ``xy`` ``(B, N, 2)`` -> ``(B, N, C)`` (border padding, pixel centres).

    Sampling runs in float32 whatever ``fmap``'s dtype: in bfloat16 a coordinate keeps 8 bits, and at a
    448-px output only 353 of 448 columns would stay distinct. The result has ``fmap``'s dtype."""
    grid = (xy.float() * 2 - 1).unsqueeze(1)  # (B, 1, N, 2)
    with torch.autocast(fmap.device.type, enabled=False):
        out = F.grid_sample(fmap.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    return out[:, :, 0].transpose(1, 2).to(fmap.dtype)


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class Upsampler(nn.Module, ABC):
    """Dense features from a backbone at any resolution.

    Subclasses implement ``query``; ``features`` defaults to querying a pixel-centre grid.
    ``tap`` selects which hidden-state index to return (default: the last tap, "the" feature).
    """

    name: str = "upsampler"
    #: True when ``features`` ignores ``size`` and returns the native token grid.
    native_resolution_only: bool = False
    #: dotted paths of the upsampler's own compute-heavy modules, compiled by ``--compile``
    #: (``compile_targets``); a ModuleList stands for each of its members
    compile_parts: tuple[str, ...] = ()

    def __init__(self, backbone: Backbone, input_size: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.input_size = int(input_size or 28 * backbone.patch_size)
        if self.input_size % backbone.patch_size:
            raise ValueError(f"input size {self.input_size} is not a multiple of the patch size {backbone.patch_size}")

    @property
    def dim(self) -> int:
        return self.backbone.embed_dim

    def compile_targets(self) -> list[nn.Module]:
        """The modules ``torch.compile`` helps: the backbone's transformer blocks and ``compile_parts``.

        Whole upsamplers are not compiled: their entry points (``encode``/``decode``, banded loops) are not
        ``forward``, and their Python-level chunking is what keeps memory bounded."""
        targets = list(self.backbone.model.blocks)
        for path in self.compile_parts:
            module = self.get_submodule(path)
            targets.extend(module if isinstance(module, nn.ModuleList) else [module])
        return targets

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """Learned weights that no backbone name identifies (for store fingerprints); none by default."""
        return {}

    def settings(self) -> dict[str, Any]:
        """Method-specific settings an output made with this model records (``upsampler_settings``)."""
        return {}

    def _own_and_adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The upsampler's own parameters and buffers and its backbone's LoRA factors (``backbone.*``)."""
        tensors = {n: t for n, t in self.state_dict().items() if not n.startswith("backbone.")}
        tensors.update({f"backbone.{n}": p for n, p in self.backbone.lora_parameters()})
        return tensors

    def output_notes(self, size: int | tuple[int, int]) -> dict[str, Any]:
        """What a store should record about how ``features`` reaches ``size`` (e.g. a final resize)."""
        return {}

    @property
    def backbone_size(self) -> int:
        """The side in pixels at which the backbone sees the image (FeatSharp: its global view)."""
        return self.input_size

    @property
    def token_grid(self) -> tuple[int, int]:
        side = self.input_size // self.backbone.patch_size
        return side, side

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> normalised ``(B, 3, S, S)`` at the backbone input size."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(
                images,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return self.backbone.normalize(images)

    def tokens(self, images: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        """Backbone tokens ``(B, C, h, w)`` at ``tap`` (default the last tap)."""
        tap = self.backbone.taps[-1] if tap is None else tap
        return self.backbone.hidden_states(self.prepare(images), [tap])[0]

    def teacher_tokens(self, images: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        """The original backbone's tokens ``(B, C, h, w)`` at ``tap`` (a method that adapts its backbone,
        e.g. with LoRA, shows them with the adaptation off): what stores keep as ``lowres``."""
        return self.tokens(images, tap)

    def check_tap(self, tap: int) -> None:
        """``VitupError`` naming ``--tap`` when this upsampler cannot produce hidden-state index ``tap``."""
        if not 0 <= tap <= self.backbone.depth:
            raise VitupError(f"--tap {tap}: this backbone has hidden states 0..{self.backbone.depth}")

    def bands(
        self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None, chunk: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """The dense output ``(B, C, H, W)`` as row bands ``(r0, r1, (B, C, r1 - r0, W))``, so callers can
        copy each away before the next exists. One band by default; methods whose memory grows with the
        output (``Capabilities.banded``) yield several, of about ``chunk`` output pixels each."""
        out = self.features(images, size, tap=tap)
        yield 0, out.shape[-2], out

    @abstractmethod
    def query(self, images: torch.Tensor, xy: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        """Features at continuous coordinates: images ``(B, 3, H, W)``, xy ``(B, N, 2)`` -> ``(B, N, C)``."""

    def features(self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None) -> torch.Tensor:
        """Dense features on a pixel-centre grid: ``(B, 3, H, W)`` -> ``(B, C, size_h, size_w)``."""
        out_h, out_w = _as_size(size)
        xy = grid_xy(out_h, out_w, device=images.device).expand(images.shape[0], -1, -1)
        feats = self.query(images, xy, tap=tap)
        return feats.transpose(1, 2).reshape(images.shape[0], -1, out_h, out_w)
