"""NAF's weights: the published ``naf_release.pth`` (a GitHub release of valeoai/NAF, Apache-2.0; read only
through ``torch.load(weights_only=True)``) or a ``.safetensors`` copy of it, in the reference's key layout.
The same file runs over any backbone (``--backbone``; the release's backbone is ``*``)."""

from __future__ import annotations

from pathlib import Path

import torch

from vitup_cli.backbones import Backbone, load_backbone, sha256_file
from vitup_cli.errors import VitupError
from vitup_cli.hub.format import OpenOptions, read_state_dict, register_readers
from vitup_cli.hub.releases import ResolvedWeights
from vitup_cli.models.naf import NAF, config_from_state, load_state

#: the backbone a NAF file runs over when no ``--backbone`` is given (the one the release was trained on)
DEFAULT_BACKBONE = "dinov3_b"


def read_published_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A NAF state dict in the published layout: ``.safetensors``, or a torch file read ONLY with
    ``torch.load(weights_only=True)`` (anything that needs more is refused in one line)."""
    state = read_state_dict(path, "NAF's naf_release.pth")
    return state


def load_naf_release(resolved: ResolvedWeights, options: OpenOptions) -> NAF:
    """NAF with the published weights of ``resolved`` over ``options.backbone`` (any backbone)."""
    label = f"{resolved.source} ({resolved.path})" if resolved.source != str(resolved.path) else resolved.source
    state = read_published_weights(resolved.path)
    try:
        config = config_from_state(state)
    except VitupError as exc:
        raise VitupError(f"--checkpoint {label}: {exc}") from None
    backbone = options.backbone or DEFAULT_BACKBONE
    if not isinstance(backbone, Backbone):
        backbone = load_backbone(
            backbone, weights=options.weights, pretrained=options.pretrained, overrides=options.overrides
        )
    model = NAF(backbone, config, options.input_size, source=resolved.source, weights_sha256=sha256_file(resolved.path))
    load_state(model.net, state, label)
    return model.to(options.map_location)


register_readers("naf", published=load_naf_release)
