"""Training-free baselines: bilinear and nearest interpolation of the tokens, and the tokens themselves."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitup_cli.models.base import Upsampler, _as_size, sample_map
from vitup_cli.models.registry import Capabilities, UpsamplerSpec, register_upsampler


class BilinearUpsampler(Upsampler):
    """Bilinear interpolation of the token map (pixel-centre aligned, border clamped)."""

    name = "bilinear"
    mode = "bilinear"

    def query(self, images: torch.Tensor, xy: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        return sample_map(self.tokens(images, tap), xy, mode=self.mode)

    def features(self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None) -> torch.Tensor:
        return F.interpolate(self.tokens(images, tap), size=_as_size(size), mode="bilinear", align_corners=False)


class NearestUpsampler(BilinearUpsampler):
    """Each output pixel takes the token whose patch contains it."""

    name = "nearest"
    mode = "nearest"

    def features(self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None) -> torch.Tensor:
        return F.interpolate(self.tokens(images, tap), size=_as_size(size), mode="nearest-exact")


class LowresUpsampler(BilinearUpsampler):
    """The backbone's own token grid: ``features`` ignores ``size``; ``query`` takes the nearest token."""

    name = "lowres"
    mode = "nearest"
    native_resolution_only = True

    def features(
        self, images: torch.Tensor, size: int | tuple[int, int] | None = None, tap: int | None = None
    ) -> torch.Tensor:
        return self.tokens(images, tap)


for _cls, _summary in (
    (BilinearUpsampler, "bilinear interpolation of the token map"),
    (NearestUpsampler, "each pixel takes the token whose patch holds it"),
    (LowresUpsampler, "the backbone's own token grid (no upsampling)"),
):
    register_upsampler(
        UpsamplerSpec(
            name=_cls.name,
            model_class=_cls,
            build=lambda backbone, config=None, input_size=None, _cls=_cls: _cls(backbone, input_size),
            capabilities=Capabilities(
                trained=False, input_size_from_weights=False, native_resolution_only=_cls.native_resolution_only
            ),
            summary=_summary,
            licence="vitup (Apache-2.0)",
        )
    )
