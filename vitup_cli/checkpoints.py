"""Checkpoints: ``NAME.safetensors`` (upsampler + LoRA weights) beside ``NAME.json`` (what to rebuild).

Nothing is ever unpickled. Writes are atomic (temporary file, then ``os.replace``). When the backbone
was randomly initialised its base weights are stored too, since no hub or file could rebuild them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from vitup_cli import __version__
from vitup_cli.backbones import Backbone, load_backbone
from vitup_cli.errors import VitupError
from vitup_cli.models import Upsampler, ViTUp, ViTUpConfig, build_upsampler

FORMAT = "vitup-checkpoint/1"
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``runs/b/last``, ``runs/b/last.safetensors`` or ``runs/b/last.json`` -> (weights, metadata)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in {".safetensors", ".json"} else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``: readers never see half a file.

    The file gets the usual permissions (``0666`` minus the umask), not ``mkstemp``'s private ``0600``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _state(model: ViTUp) -> dict[str, torch.Tensor]:
    tensors = {f"upsampler.{n}": p for n, p in model.upsampler_parameters()}
    backbone = model.backbone
    if backbone.random_init:
        tensors.update({f"backbone.{n}": t for n, t in backbone.model.state_dict().items()})
    else:
        tensors.update({f"backbone.{n}": p for n, p in backbone.lora_parameters()})
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(path: str | Path, model: ViTUp, extra: dict[str, Any] | None = None) -> Path:
    """Write ``path.safetensors`` and ``path.json`` atomically; returns the weights path."""
    import timm
    from safetensors.torch import save

    weights_path, meta_path = checkpoint_paths(path)
    blob = save(_state(model), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "vitup_version": __version__,
        "upsampler": model.name,
        "backbone": model.backbone.describe(),
        "backbone_included": model.backbone.random_init,
        "model": asdict(model.config),
        "input_size": model.input_size,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        **(extra or {}),
    }
    atomic_write_bytes(weights_path, blob)
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return weights_path


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with its JSON header's length (u64, little-endian), then ``{``."""
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise VitupError(
            f"{path}: looks like a pickle file; vitup never unpickles checkpoints. "
            "Pass a vitup checkpoint (NAME.safetensors + NAME.json, as written by `vitup train`)"
        )
    if path.is_file():
        with open(path, "rb") as fh:
            head = fh.read(9)
        if _looks_like_safetensors(head, path.stat().st_size):
            return
        if (head[:1] == b"\x80" and head[1:2] in {b"\x02", b"\x03", b"\x04", b"\x05"}) or head[:4] == b"PK\x03\x04":
            raise VitupError(
                f"{path}: this is a pickle/torch archive, not a vitup checkpoint; it was not loaded. "
                "Pass NAME.safetensors + NAME.json as written by `vitup train`"
            )


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The JSON half of a checkpoint, validated."""
    p = Path(path)
    _refuse_pickle(p)
    weights_path, meta_path = checkpoint_paths(p)
    for needed in (weights_path, meta_path):
        if not needed.is_file():
            raise VitupError(f"checkpoint {p}: {needed} is missing; a checkpoint is NAME.safetensors + NAME.json")
    _refuse_pickle(weights_path)
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VitupError(f"checkpoint {meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise VitupError(f"checkpoint {meta_path}: not a vitup checkpoint (format should be {FORMAT})")
    return meta


def _differences(backbone: Backbone, recorded: dict[str, Any], included: bool) -> list[str]:
    have = backbone.describe()
    keys = ["timm_name", "embed_dim", "depth", "patch_size", "taps"]
    if not included:
        keys.append("weights_id")
    return [
        f"{k}: checkpoint has {recorded.get(k)!r}, backbone has {have[k]!r}" for k in keys if recorded.get(k) != have[k]
    ]


def load_checkpoint(
    path: str | Path,
    *,
    backbone: Backbone | None = None,
    weights: str | Path | None = None,
    pretrained: str = "hub",
    map_location: str | torch.device = "cpu",
) -> ViTUp:
    """Rebuild a ViT-Up from a checkpoint.

    Args:
        backbone: use this backbone (checked against the checkpoint's) instead of building one.
        weights, pretrained: how to get the base backbone weights when the checkpoint lacks them
            (see ``load_backbone``); by default the hub tag the checkpoint was trained on.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(path)
    weights_path, meta_path = checkpoint_paths(path)
    try:
        model = _rebuild(meta, path, backbone, weights, pretrained)
    except (KeyError, TypeError, ValueError) as exc:
        raise VitupError(
            f"checkpoint {meta_path}: malformed JSON ({type(exc).__name__}: {exc}); "
            "use the files exactly as `vitup train` wrote them"
        ) from None
    try:
        tensors = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise VitupError(f"checkpoint {weights_path}: unreadable safetensors file ({exc})") from None
    own = dict(model.upsampler_parameters())
    included = bool(meta.get("backbone_included"))
    base = model.backbone.model.state_dict() if included else dict(model.backbone.lora_parameters())
    expected = {f"upsampler.{n}" for n in own} | {f"backbone.{n}" for n in base}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise VitupError(f"checkpoint {weights_path} does not match its JSON (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, value in tensors.items():
            kind, _, key = name.partition(".")
            target = (own if kind == "upsampler" else base)[key]
            if target.shape != value.shape:
                raise VitupError(
                    f"checkpoint {weights_path}: {name} has shape {tuple(value.shape)}, its JSON implies "
                    f"{tuple(target.shape)}; the two files do not belong together"
                )
            target.copy_(value)
    return model.to(map_location)


def _rebuild(
    meta: dict[str, Any],
    path: str | Path,
    backbone: Backbone | None,
    weights: str | Path | None,
    pretrained: str,
) -> ViTUp:
    """The untrained ViT-Up (and its backbone) that a checkpoint's JSON describes."""
    recorded = meta["backbone"]
    included = bool(meta.get("backbone_included"))
    wid = recorded["weights_id"]
    if backbone is None:
        if included:
            backbone = load_backbone(
                recorded["name"], pretrained="none", overrides=recorded.get("overrides"), taps=recorded["taps"]
            )
        else:
            if wid.startswith("file:") and weights is None:
                raise VitupError(
                    f"checkpoint {path} was trained on backbone weights from a file ({wid}): "
                    "pass --weights PATH to that file"
                )
            tag_from_id = wid.rsplit(".", 1)[-1] if wid.startswith("timm/") else "hub"
            backbone = load_backbone(
                recorded["name"],
                weights=weights,
                pretrained=pretrained if (weights or pretrained != "hub") else tag_from_id,
                overrides=recorded.get("overrides"),
                taps=recorded["taps"],
            )
    diffs = _differences(backbone, recorded, included)
    if diffs:
        raise VitupError(
            f"checkpoint {path} is for another backbone ({'; '.join(diffs)}): "
            f"use --backbone {recorded['name']} with the weights it was trained on"
        )
    if recorded.get("lora") and backbone.lora is None:
        backbone.add_lora(**recorded["lora"])
    return ViTUp(backbone, ViTUpConfig(**meta["model"]))


def open_upsampler(
    upsampler: str = "bilinear",
    *,
    checkpoint: str | Path | None = None,
    backbone: str = "dinov3_s+",
    weights: str | Path | None = None,
    pretrained: str = "hub",
    overrides: dict[str, Any] | None = None,
    input_size: int | None = None,
    device: str | torch.device = "cpu",
    minmax: str = "image",
) -> Upsampler:
    """The one way downstream commands get an upsampler: a checkpoint means ViT-Up (its own backbone);
    otherwise a training-free upsampler by name over the named backbone. ``loftup`` takes its weights from
    ``checkpoint`` (a release, hf: file, local file or LoftUp run) or the release for ``backbone``;
    ``minmax`` is its guidance-image scaling (``image`` or the reference's ``batch``)."""
    if upsampler == "loftup":
        from vitup_cli.models.loftup import load_loftup

        model = load_loftup(
            checkpoint, backbone=backbone, weights=weights, pretrained=pretrained, overrides=overrides,
            input_size=input_size, minmax=minmax,
        )  # fmt: skip
        return model.to(device).eval()
    if checkpoint is not None:
        return load_checkpoint(checkpoint, weights=weights, pretrained=pretrained, map_location=device).eval()
    if upsampler == "vitup":
        raise VitupError("--upsampler vitup needs --checkpoint (train one with `vitup train`)")
    bb = load_backbone(backbone, weights=weights, pretrained=pretrained, overrides=overrides)
    return build_upsampler(upsampler, bb, input_size=input_size).to(device).eval()
