"""AnyUp's weights: the published ``anyup_paper.pth`` / ``anyup_multi_backbone.pth`` (GitHub releases of
wimmerth/anyup, the files its ``hubconf.py`` downloads; read only through ``torch.load(weights_only=True)``)
and ``.safetensors`` copies of them. The weights fit any backbone: the model runs over ``--backbone``."""

from __future__ import annotations

from pathlib import Path

import torch

from vitup_cli.backbones import Backbone, load_backbone, sha256_file
from vitup_cli.errors import VitupError
from vitup_cli.hub.format import OpenOptions, read_state_dict, register_readers
from vitup_cli.hub.releases import ResolvedWeights
from vitup_cli.models.anyup import AnyUp, config_from_state, load_state

#: keys every published AnyUp file has
_MARKERS = ("key_features_encoder.0.basis", "image_encoder.0.weight", "rope.freqs")


def read_published_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """An AnyUp state dict in the published layout: ``.safetensors``, or a torch file read ONLY with
    ``torch.load(weights_only=True)`` (anything that needs more is refused in one line)."""
    state = read_state_dict(path, "an AnyUp anyup_paper.pth")
    if not all(k in state for k in _MARKERS):
        raise VitupError(f"--checkpoint {path}: not AnyUp weights in the published layout (no {' / '.join(_MARKERS)})")
    return state


def load_anyup(
    resolved: ResolvedWeights,
    *,
    backbone: str | Backbone = "dinov2_s",
    weights: str | Path | None = None,
    pretrained: str = "hub",
    overrides: dict | None = None,
    input_size: int | None = None,
) -> AnyUp:
    """AnyUp with the weights of ``resolved`` (a release, or a local published-layout file) over ``backbone``
    (any backbone: the release's training backbone is only a default)."""
    state = read_published_weights(resolved.path)
    config = config_from_state(state)
    bb = backbone if isinstance(backbone, Backbone) else load_backbone(
        backbone, weights=weights, pretrained=pretrained, overrides=overrides
    )  # fmt: skip
    model = AnyUp(bb, config, input_size, source=resolved.source, weights_sha256=sha256_file(resolved.path))
    load_state(model.net, state, resolved.source)
    return model.eval()


def _read(source: ResolvedWeights, options: OpenOptions) -> AnyUp:
    backbone = options.backbone if options.backbone is not None else "dinov2_s"
    model = load_anyup(
        source, backbone=backbone, weights=options.weights, pretrained=options.pretrained,
        overrides=options.overrides, input_size=options.input_size,
    )  # fmt: skip
    return model.to(options.map_location)


register_readers("anyup", published=_read)
