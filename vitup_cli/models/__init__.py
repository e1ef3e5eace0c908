"""Upsamplers behind one interface (``features`` / ``query``), built by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vitup_cli.backbones import Backbone
from vitup_cli.errors import VitupError
from vitup_cli.models.base import Upsampler, grid_xy, sample_map
from vitup_cli.models.featsharp import FeatSharp, FeatSharpConfig
from vitup_cli.models.loftup import LoftUp, LoftUpConfig
from vitup_cli.models.simple import BilinearUpsampler, LowresUpsampler, NearestUpsampler
from vitup_cli.models.uplift import UPLiFT, UPLiFTConfig
from vitup_cli.models.vitup import ViTUp, ViTUpConfig

UPSAMPLERS: dict[str, Callable[..., Upsampler]] = {
    "vitup": lambda backbone, config=None, **_: ViTUp(backbone, config),
    "featsharp": lambda backbone, config=None, **_: FeatSharp(backbone, config),
    "bilinear": lambda backbone, input_size=None, **_: BilinearUpsampler(backbone, input_size),
    "nearest": lambda backbone, input_size=None, **_: NearestUpsampler(backbone, input_size),
    "lowres": lambda backbone, input_size=None, **_: LowresUpsampler(backbone, input_size),
    "uplift": lambda backbone, input_size=None, config=None, **_: UPLiFT(backbone, input_size, config),
    "loftup": lambda backbone, config=None, input_size=None, **_: LoftUp(backbone, config, input_size),
}
#: Upsamplers with learned weights: opened with --checkpoint (``loftup`` also from its published releases).
TRAINED = ("vitup", "uplift", "loftup", "featsharp")
#: trained upsamplers that exist only through --checkpoint (LoftUp also loads its release for a backbone)
CHECKPOINT_ONLY = ("vitup", "uplift", "featsharp")
TRAINING_FREE = ("bilinear", "nearest", "lowres")
#: trained methods a vitup checkpoint can hold (its JSON records which): name -> (model class, config class)
CHECKPOINT_METHODS: dict[str, tuple[type[Upsampler], type]] = {
    "vitup": (ViTUp, ViTUpConfig),
    "featsharp": (FeatSharp, FeatSharpConfig),
}


def build_upsampler(name: str, backbone: Backbone, **kwargs: Any) -> Upsampler:
    """An upsampler by registry name over ``backbone`` (``vitup`` and ``loftup`` start untrained: load weights)."""
    if name not in UPSAMPLERS:
        raise VitupError(f"unknown upsampler '{name}': use one of {', '.join(UPSAMPLERS)}")
    return UPSAMPLERS[name](backbone, **kwargs)


__all__ = [
    "CHECKPOINT_METHODS",
    "CHECKPOINT_ONLY",
    "TRAINED",
    "TRAINING_FREE",
    "UPSAMPLERS",
    "BilinearUpsampler",
    "FeatSharp",
    "FeatSharpConfig",
    "LoftUp",
    "LoftUpConfig",
    "LowresUpsampler",
    "NearestUpsampler",
    "UPLiFT",
    "UPLiFTConfig",
    "Upsampler",
    "ViTUp",
    "ViTUpConfig",
    "build_upsampler",
    "grid_xy",
    "sample_map",
]
