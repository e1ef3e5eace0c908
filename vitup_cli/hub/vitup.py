"""ViT-Up's weights in all their forms: a release (``vit-up:dinov3_splus``), ``hf:ORG/REPO/FILE``, a local copy
of an official ``.safetensors`` file (the reference's key layout, ``hub.official``), or a vitup checkpoint.
Also fine-tuning's starting point (``vitup train --init-from``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from vitup_cli.backbones import ALIASES, sha256_file
from vitup_cli.errors import VitupError
from vitup_cli.hub.format import (
    OpenOptions,
    backbone_differences,
    checkpoint_paths,
    copy_checkpoint_tensors,
    is_vitup_checkpoint,
    load_checkpoint,
    read_checkpoint_meta,
    refuse_pickle,
    register_readers,
)
from vitup_cli.hub.official import is_official_layout, load_official, load_official_state, safetensors_keys
from vitup_cli.hub.releases import Release, ResolvedWeights, licence_notice, resolve_weights
from vitup_cli.models.vitup import ViTUp


def open_vitup(
    ref: str | Path,
    *,
    weights: str | Path | None = None,
    pretrained: str = "hub",
    antialias: bool | None = None,
    map_location: str | torch.device = "cpu",
    notify: Callable[[str], None] | None = None,
) -> ViTUp:
    """The one way to get a ViT-Up from what a user typed after ``--checkpoint``.

    ``ref``: a release short name (``vit-up:dinov3_splus``), ``hf:ORG/REPO/FILE``, a local copy of an
    official ``.safetensors`` file, or a vitup checkpoint (``NAME``, ``NAME.safetensors``, ``NAME.json``).
    The model carries ``weights_info`` (source, file sha256, release, licence) for store metadata;
    ``notify`` receives the licence line of a release, once per process. ``antialias`` overrides the
    recorded resize setting (official weights: the reference's, no antialiasing).
    """
    resolved = resolve_weights(ref)
    path = resolved.path
    if resolved.release is None and is_vitup_checkpoint(path):
        model = load_checkpoint(path, weights=weights, pretrained=pretrained, map_location=map_location)
        file = checkpoint_paths(path)[0]
    else:
        refuse_pickle(path)
        if not path.is_file():
            raise VitupError(
                f"--checkpoint {ref}: no such file; pass a vitup checkpoint (NAME.safetensors + NAME.json), "
                "an official ViT-Up .safetensors file, hf:ORG/REPO/FILE, or vit-up:dinov3_splus / vit-up:dinov3_b"
            )
        keys = safetensors_keys(path)
        if not is_official_layout(keys):
            raise VitupError(
                f"--checkpoint {ref}: {path.name} is neither a vitup checkpoint (no {checkpoint_paths(path)[1].name} "
                "beside it) nor an official ViT-Up release (no vit_up_blocks.* keys)"
            )
        model = load_official(
            path,
            release=resolved.release,
            weights=weights,
            pretrained=pretrained,
            map_location=map_location,
            label=f"--checkpoint {ref}",
        )
        file = path
    if not isinstance(model, ViTUp):
        raise VitupError(f"--checkpoint {ref} holds a {model.name} upsampler, not ViT-Up")
    if antialias is not None:
        model.config.antialias = bool(antialias)
    release = resolved.release or getattr(model, "release", None)
    model.weights_info = {
        "checkpoint": resolved.source,
        "file_sha256": sha256_file(file),
        "release": release.name if release else None,
        "licence": release.licence if release else None,
        "antialias": model.config.antialias,
    }
    if release is not None:
        tell_licence(release, notify)
    return model.eval()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def tell_licence(release: Release, notify: Callable[[str], None] | None) -> None:
    """``release``'s licence line to ``notify`` (else stderr), once per process as ``licence_notice`` decides."""
    line = licence_notice(release)
    if line:
        (notify or _stderr)(line)


def init_from(model: ViTUp, ref: str | Path, notify: Callable[[str], None] | None = None) -> str:
    """Copy ViT-Up weights (upsampler + LoRA; the base weights of a random-init source too) from ``ref``
    (any form ``open_vitup`` takes) into ``model``, which must have the same backbone and shape.
    Returns the source as the user can type it again."""
    label = f"--init-from {ref}"
    resolved = resolve_weights(ref)
    path = resolved.path
    if resolved.release is None and is_vitup_checkpoint(path):
        meta = read_checkpoint_meta(path)
        included = bool(meta.get("backbone_included"))
        diffs = backbone_differences(model.backbone, meta["backbone"], included)
        if diffs:
            raise VitupError(f"{label} is for another backbone ({'; '.join(diffs)})")
        copy_checkpoint_tensors(
            load_file(str(checkpoint_paths(path)[0])),
            dict(model.upsampler_parameters()),
            model.backbone,
            included,
            mismatch=lambda missing, extra: (
                f"{label}: its tensors do not fit this run's model (missing {missing}, unexpected {extra})"
            ),
            wrong_shape=lambda name, value, target: (
                f"{label}: {name} has shape {list(value.shape)}, this run needs {list(target.shape)}"
            ),
        )
        return resolved.source
    refuse_pickle(path)
    if not path.is_file():
        raise VitupError(f"{label}: no such file")
    if not is_official_layout(safetensors_keys(path)):
        raise VitupError(f"{label}: {path.name} is neither a vitup checkpoint nor an official ViT-Up release")
    release = resolved.release
    if release is not None:
        wanted = ALIASES.get(release.backbone, release.backbone)
        have = ALIASES.get(model.backbone.name, model.backbone.name)
        if wanted != have:
            raise VitupError(f"{label} is for backbone {release.backbone}: use --backbone {release.backbone}")
        tell_licence(release, notify)
    load_official_state(model, load_file(str(path)), label)
    return resolved.source


def _read(source: Path | ResolvedWeights, options: OpenOptions) -> ViTUp:
    ref = source.source if isinstance(source, ResolvedWeights) else source
    return open_vitup(
        ref, weights=options.weights, pretrained=options.pretrained, map_location=options.map_location,
        notify=options.notify,
    )  # fmt: skip


register_readers("vitup", checkpoint=_read, published=_read)
