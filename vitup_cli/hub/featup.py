"""FeatUp's weights: the published JBU checkpoints (``*_jbu_stack_cocostuff.ckpt``, served by URL through
torch.hub; read only through ``torch.load(weights_only=True)``) and ``.safetensors`` copies of their
``state_dict``. Only ``upsampler.*`` and ``model.1.norm.*`` are taken; the backbone (``model.0.*``) is
vitup's own, and ``scale_net.*`` / ``downsampler.*`` are training-only."""

from __future__ import annotations

from pathlib import Path

import torch

from vitup_cli.backbones import sha256_file
from vitup_cli.hub.format import OpenOptions, published_backbone, read_state_dict, register_readers
from vitup_cli.hub.releases import ResolvedWeights
from vitup_cli.models.featup import FeatUp, config_from_state, load_published_state


def read_published_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a FeatUp checkpoint: ``.safetensors``, or a torch file read ONLY with
    ``torch.load(weights_only=True)`` (anything that needs more is refused in one line)."""
    state = read_state_dict(path, "a FeatUp *_jbu_stack_*.ckpt")
    return state


def load_featup(resolved: ResolvedWeights, options: OpenOptions) -> FeatUp:
    """FeatUp over the backbone its release names (a local file: ``options.backbone``, whose width must
    match), at ``options.input_size`` or the published 224 px."""
    source = f"{resolved.source} ({resolved.path})" if resolved.source != str(resolved.path) else resolved.source
    state = read_published_weights(resolved.path)
    channels, config = config_from_state(state, f"--checkpoint {source}")
    release = resolved.release
    backbone = published_backbone(
        release, options.backbone or "dinov2_s", weights=options.weights, pretrained=options.pretrained,
        overrides=options.overrides, dim=channels, label=resolved.source, what="FeatUp",
    )  # fmt: skip
    model = FeatUp(
        backbone, options.input_size, config, source=resolved.source, weights_sha256=sha256_file(resolved.path)
    )
    load_published_state(model.net, state, f"--checkpoint {source}")
    return model.to(options.map_location)


register_readers("featup", published=load_featup, suffixes=(".ckpt",))
