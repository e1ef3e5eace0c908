"""UPLiFT's weights: the published files (Hugging Face ``UPLiFT-upsampler/*``, the reference's
``encoder.* / decoder.* / attender.*`` layout) and the checkpoints of ``vitup train --method uplift``
(that same layout in a vitup checkpoint, so the reference code loads them too)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from vitup_cli.backbones import load_backbone
from vitup_cli.errors import VitupError
from vitup_cli.hub.format import (
    checkpoint_paths,
    read_checkpoint_meta,
    read_tensors,
    rebuild_backbone,
    register_readers,
    write_checkpoint,
)
from vitup_cli.hub.releases import ResolvedWeights, licence_notice
from vitup_cli.models.uplift import UPLiFT, UPLiFTConfig, load_published_state

#: the input side of the published models (448 px: 32 tokens at patch 14, 28 at patch 16)
PUBLISHED_INPUT_SIZE = 448


def save_uplift_checkpoint(path: str | Path, model: UPLiFT, extra: dict[str, Any] | None = None) -> Path:
    """``path.safetensors`` (the net in the published key layout, so the reference code loads it too;
    plus ``backbone.*`` when the backbone was randomly initialised) and ``path.json``; atomic."""
    tensors = dict(model.net.state_dict())
    if model.backbone.random_init:
        tensors.update({f"backbone.{k}": v for k, v in model.backbone.model.state_dict().items()})
    return write_checkpoint(path, model, tensors, extra)


def load_uplift_checkpoint(
    path: str | Path,
    *,
    weights: str | Path | None = None,
    pretrained: str = "hub",
    map_location: str | torch.device = "cpu",
) -> UPLiFT:
    """Rebuild an UPLiFT from a ``vitup train --method uplift`` checkpoint (its own backbone)."""
    meta = read_checkpoint_meta(path)
    weights_path, meta_path = checkpoint_paths(path)
    try:
        backbone = rebuild_backbone(meta, path, None, weights, pretrained)
        config = UPLiFTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items()})
        model = UPLiFT(backbone, int(meta["input_size"]), config)
    except (KeyError, TypeError, ValueError) as exc:
        raise VitupError(f"checkpoint {meta_path}: malformed JSON ({type(exc).__name__}: {exc})") from None
    tensors = read_tensors(weights_path)
    base = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
    if meta.get("backbone_included"):
        try:
            backbone.model.load_state_dict(base)
        except RuntimeError as exc:
            raise VitupError(f"checkpoint {weights_path}: backbone weights do not fit ({str(exc)[:200]})") from None
    own = {k: v for k, v in tensors.items() if not k.startswith("backbone.")}
    load_published_state(model.net, own, f"checkpoint {weights_path}")
    return model.to(map_location)


def load_uplift_release(
    resolved: ResolvedWeights,
    *,
    weights: str | Path | None = None,
    pretrained: str = "hub",
    map_location: str | torch.device = "cpu",
) -> UPLiFT:
    """The published UPLiFT weights of ``resolved`` (``vitup_cli.weights.ResolvedWeights``) over the
    backbone the release names (``--weights`` / ``--pretrained`` may point at a local copy of it)."""
    release = resolved.release
    backbone = load_backbone(
        release.backbone, weights=weights, pretrained=release.backbone_tag if pretrained == "hub" else pretrained
    )
    model = UPLiFT(backbone, PUBLISHED_INPUT_SIZE)
    load_published_state(model.net, read_tensors(resolved.path), f"{resolved.source} ({resolved.path})")
    notice = licence_notice(release)
    if notice:
        print(notice, file=sys.stderr)
    return model.to(map_location)


register_readers(
    "uplift",
    checkpoint=lambda path, o: load_uplift_checkpoint(
        path, weights=o.weights, pretrained=o.pretrained, map_location=o.map_location
    ),
    published=lambda resolved, o: load_uplift_release(
        resolved, weights=o.weights, pretrained=o.pretrained, map_location=o.map_location
    ),
)
