"""One spec per upsampler, registered by its model file (timm's ``@register_model`` is the pattern).

A spec says what the method is (its model and configuration classes), what it can do (``Capabilities``:
the facts commands used to find out with ``hasattr`` and name checks), how its reference prepares images
(``Preprocessing``) and how to build it untrained over a backbone. Everything that lists or branches on
methods (``UPSAMPLERS``, ``TRAINED``, ``TRAINING_FREE``, ``CHECKPOINT_METHODS``, the CLI's help, the probe's
and visualize's choices) is derived from the registered specs. Weights (releases, file layouts) live in the
weights layer (``vitup_cli.hub``) and training recipes in ``vitup_cli.train.methods``, both keyed by the
same name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vitup_cli.backbones import Backbone
from vitup_cli.errors import VitupError
from vitup_cli.models.base import Upsampler

#: PIL resize filters a spec may name (``vitup_cli.features.RESAMPLING`` maps them to PIL)
RESIZE_FILTERS = ("bicubic", "bilinear", "nearest", "lanczos")
CHANNEL_SPACES = ("raw", "normalised")


@dataclass(frozen=True)
class Capabilities:
    """What an upsampler can do, as the commands need to know it.

    Attributes:
        trained: needs learned weights (``--checkpoint``, a release); False for training-free baselines.
        native_resolution_only: ``features`` ignores the requested size and returns its own grid.
        query: ``query(images, xy)`` at arbitrary coordinates is supported (else only ``features``).
        input_size_from_weights: the weights fix the backbone input size (``--input-size`` must agree);
            False: the method runs at any input size (``--input-size`` applies, a checkpoint too).
        final_tap_only: upsamples the backbone's last hidden state only (``--tap`` must be the last).
        any_tap: any hidden-state index of the backbone is accepted (else only the model's own taps, checked
            by ``Upsampler.check_tap``).
        any_backbone: the same weights work over any backbone vitup knows.
        channel_space: ``raw`` (the backbone's own feature space) or ``normalised`` (a per-channel
            normalisation of it, e.g. LoftUp's ChannelNorm).
        banded: ``features`` can run band by band (``Upsampler.bands``) for bounded memory at any size.
        default_release: without ``--checkpoint`` the method takes the published weights for ``--backbone``.
    """

    trained: bool = True
    native_resolution_only: bool = False
    query: bool = True
    input_size_from_weights: bool = True
    final_tap_only: bool = False
    any_tap: bool = True
    any_backbone: bool = False
    channel_space: str = "raw"
    banded: bool = False
    default_release: bool = False

    def __post_init__(self) -> None:
        if self.channel_space not in CHANNEL_SPACES:
            raise ValueError(f"channel_space {self.channel_space!r}: use one of {CHANNEL_SPACES}")


@dataclass(frozen=True)
class Preprocessing:
    """How the method's reference pipeline turns a file into the model's input.

    Attributes:
        resize_filter: the PIL filter that fits an image to the input size (``vitup extract --fit``).
        antialias: whether the in-model tensor resize to the backbone input antialiases.
        normalisation: which mean/std the backbone input uses (``backbone``: the backbone's own).
    """

    resize_filter: str = "bicubic"
    antialias: bool = True
    normalisation: str = "backbone"

    def __post_init__(self) -> None:
        if self.resize_filter not in RESIZE_FILTERS:
            raise ValueError(f"resize_filter {self.resize_filter!r}: use one of {RESIZE_FILTERS}")


@dataclass(frozen=True)
class UpsamplerSpec:
    """One registered upsampler.

    Attributes:
        name: the registry name (``--upsampler NAME``, the ``upsampler`` of checkpoints and stores).
        model_class: the ``Upsampler`` subclass.
        build: ``build(backbone, config=None, input_size=None) -> Upsampler``, untrained.
        config_class: the model's configuration dataclass (``None`` when it has none); a vitup checkpoint of
            this method stores ``asdict(config)`` and is rebuilt as ``model_class(backbone, config_class(**))``
            unless the weights layer registers its own reader.
        summary: one line for ``vitup upsamplers`` and ``--help``.
        paper: where the method comes from.
        licence: the licence of the reference code the model follows (weights carry their own).
    """

    name: str
    model_class: type[Upsampler]
    build: Callable[..., Upsampler]
    config_class: type | None = None
    capabilities: Capabilities = field(default_factory=Capabilities)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    summary: str = ""
    paper: str = ""
    licence: str = ""


_SPECS: dict[str, UpsamplerSpec] = {}


def register_upsampler(spec: UpsamplerSpec) -> UpsamplerSpec:
    """Add ``spec`` to the registry (its model file calls this once); a second spec of one name is an error."""
    if spec.name in _SPECS and _SPECS[spec.name] is not spec:
        raise ValueError(f"upsampler '{spec.name}' is registered twice")
    _SPECS[spec.name] = spec
    return spec


def unregister_upsampler(name: str) -> None:
    """Remove a spec (tests that register a toy upsampler clean up with this)."""
    _SPECS.pop(name, None)


def specs() -> dict[str, UpsamplerSpec]:
    """Every registered spec by name, in registration order."""
    return dict(_SPECS)


def spec_of(name: str) -> UpsamplerSpec:
    """The spec named ``name``, or one line listing the known names."""
    if name not in _SPECS:
        raise VitupError(f"unknown upsampler '{name}': use one of {', '.join(_SPECS)}")
    return _SPECS[name]


def upsampler_names(*, trained: bool | None = None) -> list[str]:
    """Registered names, optionally only the trained (``True``) or the training-free (``False``) ones."""
    return [n for n, s in _SPECS.items() if trained is None or s.capabilities.trained == trained]


def capabilities_of(model: Upsampler) -> Capabilities:
    """The capabilities of a built model (by its ``name``); an unregistered one gets the defaults."""
    spec = _SPECS.get(model.name)
    return spec.capabilities if spec is not None else Capabilities()


def build_upsampler(name: str, backbone: Backbone, **kwargs: Any) -> Upsampler:
    """An upsampler by registry name over ``backbone`` (trained ones start untrained: load weights)."""
    return spec_of(name).build(backbone, **kwargs)
