"""The Python face of vitup: ``load`` an upsampler by name, release or checkpoint, and ``list_upsamplers``.

>>> import vitup_cli
>>> up = vitup_cli.load("vit-up:dinov3_splus")                   # a release (downloaded once, then cached)
>>> up = vitup_cli.load("runs/b/last")                           # a checkpoint of `vitup train`, any method
>>> up = vitup_cli.load("bilinear", backbone="dinov3_s")         # a training-free baseline over a backbone
>>> feats = up.features(images, (448, 448))                     # (B, 3, H, W) in [0, 1] -> (B, C, 448, 448)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vitup_cli.hub import open_upsampler, releases_for
from vitup_cli.models import Capabilities, Upsampler, specs
from vitup_cli.train.methods import METHODS


def load(
    name: str | Path = "vit-up:dinov3_splus",
    *,
    backbone: str | None = None,
    pretrained: str = "hub",
    weights: str | Path | None = None,
    backbone_args: dict[str, Any] | None = None,
    input_size: int | None = None,
    device: str | torch.device = "cpu",
) -> Upsampler:
    """An upsampler in eval mode on ``device``.

    Args:
        name: a registered method (``bilinear``, ``loftup``: see ``list_upsamplers``), a release
            (``vit-up:dinov3_splus``, ``uplift:dinov2_s``), ``hf:ORG/REPO/FILE``, a local published file, or
            a vitup checkpoint (``NAME`` / ``NAME.safetensors`` beside ``NAME.json``).
        backbone: for a method name, the backbone to run over (default ``dinov3_s+``; a method with
            published weights takes those of this backbone); releases and checkpoints bring their own.
        pretrained, weights, backbone_args: where the backbone's weights come from (``hub`` tag,
            ``none`` for a random init, a local file) and timm constructor overrides for shrunk models.
        input_size: the backbone input side in pixels, for methods whose weights do not fix it.
    """
    text = str(name)
    if text in specs() and not Path(text).exists():
        return open_upsampler(
            text, backbone=backbone or "dinov3_s+", weights=weights, pretrained=pretrained,
            overrides=backbone_args, input_size=input_size, device=device,
        )  # fmt: skip
    return open_upsampler(
        checkpoint=text, backbone=backbone or "dinov3_s+", weights=weights, pretrained=pretrained,
        overrides=backbone_args, input_size=input_size, device=device,
    )  # fmt: skip


@dataclass(frozen=True)
class UpsamplerInfo:
    """One registered upsampler as ``vitup_cli.list_upsamplers`` describes it."""

    name: str
    trained: bool
    trainable: bool
    any_backbone: bool
    native_resolution_only: bool
    output: str
    channel_space: str
    resize_filter: str
    releases: tuple[str, ...]
    licences: tuple[str, ...]
    summary: str
    paper: str

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def list_upsamplers() -> list[UpsamplerInfo]:
    """Every registered upsampler, in registration order, with what it needs and where its weights are."""
    out = []
    for name, spec in specs().items():
        releases = releases_for(name)
        licences = tuple(dict.fromkeys([spec.licence, *(r.licence for r in releases)]))
        out.append(
            UpsamplerInfo(
                name=name,
                trained=spec.capabilities.trained,
                trainable=name in METHODS,
                any_backbone=spec.capabilities.any_backbone or not spec.capabilities.trained,
                native_resolution_only=spec.capabilities.native_resolution_only,
                output=_output(spec.capabilities),
                channel_space=spec.capabilities.channel_space,
                resize_filter=spec.preprocessing.resize_filter,
                releases=tuple(r.name for r in releases),
                licences=tuple(x for x in licences if x),
                summary=spec.summary,
                paper=spec.paper,
            )
        )
    return out


def _output(caps: Capabilities) -> str:
    """What output sizes a method gives, in a few words."""
    if caps.native_resolution_only:
        return "the token grid"
    return "any size" + (" (queries too)" if caps.query else "")
