"""The one opener behind every ``--checkpoint``, ``--upsampler`` and ``vitup_cli.load``.

What a user types is a release short name (``vit-up:dinov3_splus``, ``uplift:dinov2_s``,
``loftup:dinov2_s``), ``hf:ORG/REPO/FILE``, a local copy of a published file, or a vitup checkpoint of any
method (``NAME`` / ``NAME.safetensors`` beside ``NAME.json``). The method is read from the release table,
the checkpoint's JSON or the file's suffix, and its reader (``format.CHECKPOINT_READERS`` /
``PUBLISHED_READERS``, registered by the method's ``hub`` module) builds the model. A release's licence
is told once per process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vitup_cli.backbones import Backbone, load_backbone
from vitup_cli.errors import VitupError
from vitup_cli.hub.format import (
    CHECKPOINT_READERS,
    PUBLISHED_READERS,
    PUBLISHED_SUFFIXES,
    OpenOptions,
    checkpoint_paths,
    load_checkpoint,
    read_checkpoint_meta,
    refuse_pickle,
)
from vitup_cli.hub.releases import (
    RELEASES,
    ResolvedWeights,
    is_release_ref,
    release_for_backbone,
    release_for_file,
    releases_for,
    resolve_weights,
)
from vitup_cli.hub.vitup import tell_licence
from vitup_cli.models import Upsampler, build_upsampler, spec_of, specs


def checkpoint_method(ref: str | Path, upsampler: str | None = None) -> str:
    """The method a ``--checkpoint`` holds (``vitup``, ``uplift``, ``loftup``, ...), read without loading
    weights from the release table, the checkpoint's JSON, or, for a local file without JSON whose name is
    no release's: the ``--upsampler`` given (``upsampler``) when that method reads published files (an
    AnyUp or JAFAR ``.pth``), else the method that alone publishes the file's suffix (LoftUp ``.bin``),
    else an official ViT-Up file."""
    text = str(ref)
    if text in RELEASES:  # a short name says its method: nothing is fetched (a file missing offline fails later)
        return RELEASES[text].method
    if is_release_ref(text):
        release = resolve_weights(text).release
        return release.method if release is not None else PUBLISHED_SUFFIXES.get(Path(text).suffix, "vitup")
    if not checkpoint_paths(text)[1].is_file():
        release = release_for_file(text)
        if release is not None:
            return release.method
        if upsampler in PUBLISHED_READERS:
            return str(upsampler)
        return PUBLISHED_SUFFIXES.get(Path(text).suffix, "vitup")
    return str(read_checkpoint_meta(text).get("upsampler", "vitup"))


def read_weights(ref: str | Path, options: OpenOptions, upsampler: str | None = None) -> Upsampler:
    """The trained upsampler ``ref`` names, by its method's reader (see the module docstring)."""
    text = str(ref)
    method = checkpoint_method(text, upsampler)
    if method not in specs():
        raise VitupError(f"--checkpoint {text} holds a '{method}' upsampler, which this vitup does not know")
    if checkpoint_paths(text)[1].is_file() and not is_release_ref(text):
        reader = CHECKPOINT_READERS.get(method)
        if reader is not None:
            model = reader(Path(text), options)
        else:
            model = load_checkpoint(
                text, weights=options.weights, pretrained=options.pretrained, map_location=options.map_location
            )
        return model.eval()
    if method not in PUBLISHED_READERS:
        raise VitupError(f"--checkpoint {text}: published {method} weights are not loadable yet")
    resolved = (
        resolve_weights(text) if is_release_ref(text) else ResolvedWeights(Path(text), text, release_for_file(text))
    )
    if resolved.release is not None and resolved.release.filename.endswith(".safetensors"):
        refuse_pickle(resolved.path)
    model = PUBLISHED_READERS[method](resolved, options)
    if resolved.release is not None:
        tell_licence(resolved.release, options.notify)
    return model.eval()


def load_trained(
    ref: str | Path,
    *,
    weights: str | Path | None = None,
    pretrained: str = "hub",
    map_location: str | torch.device = "cpu",
    notify: Callable[[str], None] | None = None,
    backbone: str | Backbone | None = None,
    input_size: int | None = None,
    minmax: str = "image",
    overrides: dict[str, Any] | None = None,
    upsampler: str | None = None,
) -> Upsampler:
    """A trained upsampler from ``--checkpoint`` in any of its forms (see the module docstring).

    ``backbone``, ``overrides`` and ``input_size`` apply to methods whose files do not fix them (a local
    published LoftUp file runs over ``backbone``). ``vitup_cli.hub.open_vitup`` also overrides ViT-Up's
    recorded resize antialiasing."""
    text = str(ref)
    if not checkpoint_paths(text)[1].is_file() and not is_release_ref(text) and not Path(text).is_file():
        resolve_weights(text)  # a mistyped short name (``uplift:nope``) gets the list of releases
    options = OpenOptions(
        backbone=backbone, weights=weights, pretrained=pretrained, overrides=overrides, input_size=input_size,
        map_location=map_location, notify=notify, minmax=minmax,
    )  # fmt: skip
    return read_weights(text, options, upsampler)


def _needs_checkpoint(method: str) -> VitupError:
    names = ", ".join(r.name for r in releases_for(method))
    how = "`vitup train`" if method == "vitup" else f"`vitup train --method {method}`"
    if names:
        return VitupError(f"--upsampler {method} needs --checkpoint: published weights ({names}) or a {how} run")
    return VitupError(f"--upsampler {method} needs --checkpoint (train one with {how})")


def open_upsampler(
    upsampler: str = "bilinear",
    *,
    checkpoint: str | Path | None = None,
    backbone: str | Backbone = "dinov3_s+",
    weights: str | Path | None = None,
    pretrained: str = "hub",
    overrides: dict[str, Any] | None = None,
    input_size: int | None = None,
    device: str | torch.device = "cpu",
    notify: Callable[[str], None] | None = None,
    minmax: str = "image",
) -> Upsampler:
    """The one way downstream commands get an upsampler: a checkpoint means the trained upsampler it
    holds (its own backbone where its weights fix one); a trained method without one takes its published
    release for ``backbone`` where its spec says so (``Capabilities.default_release``); otherwise a
    training-free upsampler by name over the named backbone (a built ``Backbone`` is used as it is).
    ``minmax`` is LoftUp's guidance-image scaling (``image`` or the reference's ``batch``)."""
    spec = spec_of(checkpoint_method(checkpoint, upsampler) if checkpoint is not None else upsampler)
    name = backbone.name if isinstance(backbone, Backbone) else backbone
    if checkpoint is None and spec.capabilities.trained:
        if not spec.capabilities.default_release:
            raise _needs_checkpoint(spec.name)
        release = release_for_backbone(spec.name, name)
        if release is None:
            names = ", ".join(r.name for r in releases_for(spec.name))
            raise VitupError(
                f"--upsampler {spec.name}: no published {spec.name} weights for backbone '{name}'; pass --checkpoint "
                f"({names}, hf:ORG/REPO/FILE, a local published file, or a run of `vitup train --method {spec.name}`)"
            )
        checkpoint = release.name
    if checkpoint is not None:
        model = load_trained(
            checkpoint, weights=weights, pretrained=pretrained, map_location=device, notify=notify, backbone=backbone,
            input_size=input_size, minmax=minmax, overrides=overrides, upsampler=upsampler,
        )  # fmt: skip
        return model.to(device).eval()
    bb = backbone if isinstance(backbone, Backbone) else load_backbone(
        backbone, weights=weights, pretrained=pretrained, overrides=overrides
    )  # fmt: skip
    return build_upsampler(spec.name, bb, input_size=input_size).to(device).eval()


def default_checkpoint(
    backbone: str,
    *,
    pretrained: str = "hub",
    overrides: dict[str, Any] | None = None,
    alternative: str = "--upsampler bilinear",
) -> str:
    """The official ViT-Up release for ``backbone``, used when a command gets neither --checkpoint nor an
    upsampler; one clear line naming the choices where there is none (or it cannot apply)."""
    release = release_for_backbone("vitup", backbone)
    known = ", ".join(f"{r.name} ({r.backbone})" for r in releases_for("vitup"))
    if release is None:
        raise VitupError(
            f"ViT-Up needs --checkpoint: there are no published ViT-Up weights for backbone '{backbone}' "
            f"(only {known}); pass --checkpoint (a run of `vitup train` or a release) or {alternative}"
        )
    if pretrained == "none" or overrides:
        flag = "--pretrained none" if pretrained == "none" else "--backbone-args"
        raise VitupError(
            f"ViT-Up needs --checkpoint with {flag}: the published weights ({release.name}) only fit the "
            f"DINOv3 weights they were trained on; pass --checkpoint (a run of `vitup train`) or {alternative}"
        )
    return release.name
