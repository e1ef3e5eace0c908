"""LoftUp's weights: the published ``pytorch_model.bin`` (Hugging Face ``haiwen/loftup-*``; read only through
``torch.load(weights_only=True)``), ``.safetensors`` copies of it, and the run checkpoints of
``vitup train --method loftup`` (the published layout under ``loftup.`` in a vitup checkpoint)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from vitup_cli._version import __version__
from vitup_cli.backbones import Backbone, load_backbone, sha256_file
from vitup_cli.errors import VitupError
from vitup_cli.fileio import atomic_write_bytes
from vitup_cli.hub.format import (
    FORMAT,
    OpenOptions,
    checkpoint_paths,
    published_backbone,
    read_checkpoint_meta,
    read_state_dict,
    register_readers,
)
from vitup_cli.hub.releases import (
    RELEASES,
    ResolvedWeights,
    licence_notice,
    release_for_backbone,
    releases_for,
    resolve_weights,
)
from vitup_cli.models.loftup import LoftUp, LoftUpConfig, LoftUpNet, config_from_state, load_state


# -- weights ----------------------------------------------------------------------------------------
def read_published_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A LoftUp state dict in the published layout: ``.safetensors``, or a torch file read ONLY with
    ``torch.load(weights_only=True)`` (anything that needs more is refused)."""
    state = read_state_dict(path, "a LoftUp pytorch_model.bin")
    if "channelnorm.norm.weight" not in state or "upsampler.fourier_feat.1.biases" not in state:
        raise VitupError(
            f"--checkpoint {path}: not LoftUp weights in the published layout (no channelnorm.norm.weight / "
            "upsampler.fourier_feat.1.biases)"
        )
    return state


def load_loftup(
    checkpoint: str | Path | None = None,
    *,
    backbone: str | Backbone = "dinov2_s",
    weights: str | Path | None = None,
    pretrained: str = "hub",
    overrides: dict[str, Any] | None = None,
    input_size: int | None = None,
    minmax: str = "image",
    log: Any = None,
) -> LoftUp:
    """LoftUp with weights from ``checkpoint``: a release (``loftup:dinov2_s``), ``hf:ORG/REPO/FILE``,
    or a local published-layout file (``pytorch_model.bin`` via ``weights_only=True``, or ``.safetensors``).

    Without ``checkpoint``, the release trained on ``backbone``. A release implies its backbone and the
    backbone weights it was trained on (``backbone`` is then ignored unless it is a built ``Backbone``);
    a local file takes ``backbone``, and its width must match.
    """
    if checkpoint is None:
        name = backbone.name if isinstance(backbone, Backbone) else backbone
        release = release_for_backbone("loftup", name)
        checkpoint = release.name if release is not None else None
        if checkpoint is None:
            names = ", ".join(r.name for r in releases_for("loftup"))
            raise VitupError(
                f"--upsampler loftup: no published LoftUp weights for backbone '{name}'; pass --checkpoint "
                f"({names}, hf:ORG/REPO/FILE, a pytorch_model.bin, or a run of `vitup train --method loftup`)"
            )
    if is_run_checkpoint(checkpoint):  # a run of `vitup train --method loftup`
        if isinstance(backbone, Backbone):
            bb, state = backbone, read_run_checkpoint(checkpoint, backbone)
        else:
            bb, state, _ = open_run_checkpoint(checkpoint, weights=weights, pretrained=pretrained)
        dim, config = config_from_state(state, minmax=minmax)
        model = LoftUp(
            bb, config, input_size, source=str(checkpoint), weights_sha256=sha256_file(checkpoint_paths(checkpoint)[0])
        )
        load_state(model.net, state, str(checkpoint))
        return model.eval()
    known = RELEASES.get(str(checkpoint))
    if known is not None and known.method != "loftup":
        raise VitupError(f"--checkpoint {checkpoint}: that is a {known.method} release, not LoftUp weights")
    resolved = resolve_weights(checkpoint)
    release = resolved.release
    state = read_published_weights(resolved.path)
    dim, config = config_from_state(state, minmax=minmax)
    bb = published_backbone(
        release, backbone, weights=weights, pretrained=pretrained, overrides=overrides, dim=dim,
        label=str(checkpoint), what="LoftUp",
    )  # fmt: skip
    model = LoftUp(bb, config, input_size, source=resolved.source, weights_sha256=sha256_file(resolved.path))
    load_state(model.net, state, str(checkpoint))
    if release is not None:
        notice = licence_notice(release)
        if notice:
            (log or _stderr)(notice)
    return model.eval()


# -- run checkpoints (vitup format: NAME.safetensors + NAME.json) -------------------------------------
def save_run_checkpoint(path: Path, net: LoftUpNet, backbone: Backbone, extra: dict[str, Any]) -> Path:
    """LoftUp's weights in the published layout under ``loftup.`` (plus a random-init backbone's
    weights under ``backbone.``), and a JSON that ``load_loftup`` rebuilds it from."""
    tensors = {f"loftup.{k}": v for k, v in net.state_dict().items()}
    if backbone.random_init:
        tensors.update({f"backbone.{k}": v for k, v in backbone.model.state_dict().items()})
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    blob = save(tensors, metadata={"format": FORMAT})
    weights_path, meta_path = checkpoint_paths(path)
    meta = {
        "format": FORMAT,
        "vitup_version": __version__,
        "upsampler": "loftup",
        "backbone": backbone.describe(),
        "backbone_included": backbone.random_init,
        "model": asdict(LoftUpConfig(n_freqs=net.config.n_freqs, lr_freqs=net.config.lr_freqs)),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    atomic_write_bytes(weights_path, blob)
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return weights_path


def is_run_checkpoint(path: str | Path) -> bool:
    """Does ``path`` name a LoftUp checkpoint written by ``vitup train --method loftup``?"""
    weights_path, meta_path = checkpoint_paths(path)
    if not (weights_path.is_file() and meta_path.is_file()):
        return False
    try:
        return json.loads(meta_path.read_text()).get("upsampler") == "loftup"
    except (OSError, json.JSONDecodeError):
        return False


def read_run_checkpoint(path: str | Path, backbone: Backbone | None = None) -> dict[str, torch.Tensor]:
    """The published-layout state dict of a LoftUp run checkpoint (checked against ``backbone``)."""
    if not is_run_checkpoint(path):
        raise VitupError(
            f"--init {path}: not a LoftUp checkpoint of `vitup train --method loftup` (NAME.safetensors + NAME.json)"
        )
    meta = read_checkpoint_meta(path)
    tensors = load_file(str(checkpoint_paths(path)[0]))
    if backbone is not None:
        rec = meta["backbone"]
        have = backbone.describe()
        diffs = [k for k in ("timm_name", "embed_dim", "patch_size", "weights_id") if rec.get(k) != have[k]]
        if diffs:
            raise VitupError(
                f"--init {path} was trained on another backbone ({', '.join(f'{k} {rec.get(k)!r}' for k in diffs)}); "
                f"use --backbone {rec['name']} with the same weights"
            )
    return {k[len("loftup.") :]: v for k, v in tensors.items() if k.startswith("loftup.")}


def open_run_checkpoint(
    path: str | Path, weights: str | Path | None = None, pretrained: str = "hub"
) -> tuple[Backbone, dict[str, torch.Tensor], dict[str, Any]]:
    """A LoftUp run checkpoint -> its backbone (rebuilt), its state dict and its JSON."""
    meta = read_checkpoint_meta(path)
    rec = meta["backbone"]
    if meta.get("backbone_included"):
        backbone = load_backbone(rec["name"], pretrained="none", overrides=rec.get("overrides"))
        tensors = load_file(str(checkpoint_paths(path)[0]))
        backbone.model.load_state_dict(
            {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
        )
    else:
        wid = rec["weights_id"]
        if wid.startswith("file:") and weights is None:
            raise VitupError(
                f"checkpoint {path} was trained on backbone weights from a file ({wid}): pass --weights PATH"
            )
        tag = wid.rsplit(".", 1)[-1] if wid.startswith("timm/") else "hub"
        backbone = load_backbone(
            rec["name"], weights=weights, pretrained=pretrained if (weights or pretrained != "hub") else tag,
            overrides=rec.get("overrides"),
        )  # fmt: skip
    return backbone, read_run_checkpoint(path, backbone), meta


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _read(source: Any, options: OpenOptions) -> LoftUp:
    """A LoftUp run checkpoint (``Path``) or published weights (``ResolvedWeights``) with ``options``."""
    ref = source.source if isinstance(source, ResolvedWeights) else source
    backbone = options.backbone if options.backbone is not None else "dinov2_s"
    model = load_loftup(
        ref, backbone=backbone, weights=options.weights, pretrained=options.pretrained, overrides=options.overrides,
        input_size=options.input_size, minmax=options.minmax, log=options.notify,
    )  # fmt: skip
    return model.to(options.map_location)


register_readers("loftup", checkpoint=_read, published=_read, suffixes=(".bin",))
