"""JAFAR's weights: the GitHub release ``.pth`` files (``{"jafar": state_dict}``, as the reference's training
saves them; read only through ``torch.load(weights_only=True)``), a bare state dict in that layout, or a
``.safetensors`` copy of it. Inference only: there is no ``vitup train --method jafar``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from vitup_cli.backbones import Backbone, sha256_file
from vitup_cli.errors import VitupError
from vitup_cli.hub.format import OpenOptions, published_backbone, read_state_dict, register_readers
from vitup_cli.hub.releases import (
    RELEASES,
    ResolvedWeights,
    licence_notice,
    release_for_backbone,
    releases_for,
    resolve_weights,
)
from vitup_cli.models.jafar import JAFAR, config_from_state, load_state

_MARKERS = ("key_features_encoder.0.weight", "image_encoder.0.weight", "rope.freqs")


def read_published_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A JAFAR state dict in the published layout: ``.safetensors``, or a torch file read ONLY with
    ``torch.load(weights_only=True)`` (anything that needs more is refused). The release files hold it
    under ``jafar`` (training saves may add ``optimizer_jafar`` and the like: ignored)."""
    state = read_state_dict(path, "a JAFAR release .pth", container="jafar")
    if not all(k in state for k in _MARKERS):
        raise VitupError(f"--checkpoint {path}: not JAFAR weights in the published layout (no {' / '.join(_MARKERS)})")
    return state


def load_jafar(
    checkpoint: str | Path | None = None,
    *,
    backbone: str | Backbone = "dinov2_s",
    weights: str | Path | None = None,
    pretrained: str = "hub",
    overrides: dict[str, Any] | None = None,
    input_size: int | None = None,
    log: Any = None,
) -> JAFAR:
    """JAFAR with weights from ``checkpoint``: a release (``jafar:dinov2_s``) or a local published-layout
    file. Without ``checkpoint``, the release trained on ``backbone``. A release implies its backbone and
    the backbone weights it was trained on (unless ``backbone`` is a built ``Backbone``); a local file takes
    ``backbone``, and its width must match."""
    if checkpoint is None:
        name = backbone.name if isinstance(backbone, Backbone) else backbone
        release = release_for_backbone("jafar", name)
        checkpoint = release.name if release is not None else None
        if checkpoint is None:
            names = ", ".join(r.name for r in releases_for("jafar"))
            raise VitupError(
                f"--upsampler jafar: no published JAFAR weights for backbone '{name}'; pass --checkpoint "
                f"({names}, or a local release .pth)"
            )
    known = RELEASES.get(str(checkpoint))
    if known is not None and known.method != "jafar":
        raise VitupError(f"--checkpoint {checkpoint}: that is a {known.method} release, not JAFAR weights")
    resolved = resolve_weights(checkpoint)
    release = resolved.release
    state = read_published_weights(resolved.path)
    dim, config = config_from_state(state)
    bb = published_backbone(
        release, backbone, weights=weights, pretrained=pretrained, overrides=overrides, dim=dim,
        label=str(checkpoint), what="JAFAR",
    )  # fmt: skip
    model = JAFAR(bb, config, input_size, source=resolved.source, weights_sha256=sha256_file(resolved.path))
    load_state(model.net, state, str(checkpoint))
    if release is not None:
        notice = licence_notice(release)
        if notice:
            (log or _stderr)(notice)
    return model.eval()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _read(source: Any, options: OpenOptions) -> JAFAR:
    """Published JAFAR weights (``ResolvedWeights``) with ``options``."""
    ref = source.source if isinstance(source, ResolvedWeights) else source
    backbone = options.backbone if options.backbone is not None else "dinov2_s"
    model = load_jafar(
        ref, backbone=backbone, weights=options.weights, pretrained=options.pretrained, overrides=options.overrides,
        input_size=options.input_size, log=options.notify,
    )  # fmt: skip
    return model.to(options.map_location)


register_readers("jafar", published=_read, suffixes=(".pth",))
