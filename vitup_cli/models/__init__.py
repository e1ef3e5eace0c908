"""Upsamplers behind one interface (``features`` / ``query``), each registered by its model file.

Importing this package registers every built-in method (``registry.register_upsampler``); the name lists
below are live views of the registry, so a method registered later (a plug-in, a test's toy) appears in
them too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

# ruff: noqa: I001  (the import order is the registration order, which every listing of methods follows)
from vitup_cli.models.base import Upsampler, grid_xy, sample_map
from vitup_cli.models.vitup import ViTUp, ViTUpConfig
from vitup_cli.models.uplift import UPLiFT, UPLiFTConfig
from vitup_cli.models.loftup import LoftUp, LoftUpConfig
from vitup_cli.models.featsharp import FeatSharp, FeatSharpConfig
from vitup_cli.models.anyup import AnyUp, AnyUpConfig
from vitup_cli.models.jafar import JAFAR, JAFARConfig
from vitup_cli.models.naf import NAF, NAFConfig
from vitup_cli.models.featup import FeatUp, FeatUpConfig
from vitup_cli.models.simple import BilinearUpsampler, LowresUpsampler, NearestUpsampler
from vitup_cli.models.registry import (
    Capabilities,
    Preprocessing,
    UpsamplerSpec,
    build_upsampler,
    capabilities_of,
    register_upsampler,
    spec_of,
    specs,
    unregister_upsampler,
    upsampler_names,
)


class _Names(Sequence[str]):
    """The registered names whose spec satisfies ``keep``, read from the registry at each use."""

    def __init__(self, keep: Callable[[UpsamplerSpec], bool]) -> None:
        self._keep = keep

    def _names(self) -> list[str]:
        return [n for n, s in specs().items() if self._keep(s)]

    def __getitem__(self, index):  # type: ignore[override]
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __repr__(self) -> str:
        return repr(tuple(self._names()))


class _Builders(Mapping[str, Callable[..., Upsampler]]):
    """``name -> build(backbone, config=None, input_size=None)`` for every registered upsampler."""

    def __getitem__(self, name: str) -> Callable[..., Upsampler]:
        return specs()[name].build

    def __len__(self) -> int:
        return len(specs())

    def __iter__(self) -> Iterator[str]:
        return iter(specs())


#: every registered upsampler: name -> ``build(backbone, config=None, input_size=None)``
UPSAMPLERS: Mapping[str, Callable[..., Upsampler]] = _Builders()
#: upsamplers with learned weights (``--checkpoint``, a release)
TRAINED: Sequence[str] = _Names(lambda s: s.capabilities.trained)
#: trained upsamplers that need ``--checkpoint`` (no release is picked for them by backbone)
CHECKPOINT_ONLY: Sequence[str] = _Names(lambda s: s.capabilities.trained and not s.capabilities.default_release)
TRAINING_FREE: Sequence[str] = _Names(lambda s: not s.capabilities.trained)

__all__ = [
    "CHECKPOINT_ONLY",
    "JAFAR",
    "NAF",
    "TRAINED",
    "TRAINING_FREE",
    "UPSAMPLERS",
    "AnyUp",
    "AnyUpConfig",
    "BilinearUpsampler",
    "Capabilities",
    "FeatSharp",
    "FeatSharpConfig",
    "FeatUp",
    "FeatUpConfig",
    "JAFARConfig",
    "LoftUp",
    "LoftUpConfig",
    "LowresUpsampler",
    "NAFConfig",
    "NearestUpsampler",
    "Preprocessing",
    "UPLiFT",
    "UPLiFTConfig",
    "Upsampler",
    "UpsamplerSpec",
    "ViTUp",
    "ViTUpConfig",
    "build_upsampler",
    "capabilities_of",
    "grid_xy",
    "register_upsampler",
    "sample_map",
    "spec_of",
    "specs",
    "unregister_upsampler",
    "upsampler_names",
]
