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
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitup_cli import __version__
from vitup_cli.backbones import Backbone, load_backbone
from vitup_cli.errors import VitupError
from vitup_cli.models import CHECKPOINT_METHODS, TRAINING_FREE, Upsampler, ViTUp, build_upsampler

if TYPE_CHECKING:
    from vitup_cli.weights import Release

#: 2: the reference's conventions (log-spaced Fourier bands, adjacent-pair RoPE, raw tap 0, nearest token
#: half-to-even, separate q/k/v LoRAs, separate k/v projections, recorded resize antialiasing).
FORMAT = "vitup-checkpoint/2"
_OLD_FORMATS = {"vitup-checkpoint/1"}
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


def _own_state(model: Upsampler) -> dict[str, torch.Tensor]:
    """The upsampler's own parameters and persistent buffers (e.g. FeatSharp's PHI-S), without the backbone."""
    return {n: t for n, t in model.state_dict().items() if not n.startswith("backbone.")}


def _state(model: Upsampler) -> dict[str, torch.Tensor]:
    tensors = {f"upsampler.{n}": p for n, p in _own_state(model).items()}
    backbone = model.backbone
    if backbone.random_init:
        tensors.update({f"backbone.{n}": t for n, t in backbone.model.state_dict().items()})
    else:
        tensors.update({f"backbone.{n}": p for n, p in backbone.lora_parameters()})
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(path: str | Path, model: Upsampler, extra: dict[str, Any] | None = None) -> Path:
    """Write ``path.safetensors`` and ``path.json`` atomically; returns the weights path."""
    return write_checkpoint(path, model, _state(model), extra)


def write_checkpoint(
    path: str | Path, model: Upsampler, tensors: dict[str, torch.Tensor], extra: dict[str, Any] | None = None
) -> Path:
    """``tensors`` to ``path.safetensors`` beside the JSON that rebuilds ``model`` (method, backbone, config,
    sizes, versions), both written atomically; returns the weights path. Every method's checkpoints go
    through here, whatever key layout its tensors use."""
    import timm
    from safetensors.torch import save

    weights_path, meta_path = checkpoint_paths(path)
    blob = save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "vitup_version": __version__,
        "upsampler": model.name,
        "backbone": model.backbone.describe(),
        "backbone_included": model.backbone.random_init,
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.config).items()},
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
    if isinstance(meta, dict) and meta.get("format") in _OLD_FORMATS:
        raise VitupError(
            f"checkpoint {meta_path}: written by an older vitup ({meta['format']}, before ViT-Up followed the "
            "reference's Fourier bands, RoPE layout, tap 0 and LoRA placement); it cannot be converted exactly: "
            f"retrain it with `vitup train` (now {FORMAT}) or use the official weights "
            "(--checkpoint vit-up:dinov3_splus)"
        )
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
) -> Upsampler:
    """Rebuild the upsampler a checkpoint holds (ViT-Up, or the method its JSON names).

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
    _copy_checkpoint_tensors(
        tensors,
        _own_state(model),
        model.backbone,
        bool(meta.get("backbone_included")),
        mismatch=lambda missing, extra: (
            f"checkpoint {weights_path} does not match its JSON (missing {missing}, unexpected {extra})"
        ),
        wrong_shape=lambda name, value, target: (
            f"checkpoint {weights_path}: {name} has shape {tuple(value.shape)}, its JSON implies "
            f"{tuple(target.shape)}; the two files do not belong together"
        ),
    )
    return model.to(map_location)


def _copy_checkpoint_tensors(
    tensors: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
    backbone: Backbone,
    included: bool,
    *,
    mismatch: Callable[[list[str], list[str]], str],
    wrong_shape: Callable[[str, torch.Tensor, torch.Tensor], str],
) -> None:
    """Copy a vitup checkpoint's ``upsampler.*`` tensors into ``own`` and its ``backbone.*`` ones into the
    backbone (all its weights when ``included``, else its LoRA); the names must match exactly and every
    shape too, else a ``VitupError`` worded by ``mismatch(missing, extra)`` or
    ``wrong_shape(name, value, target)``."""
    base = backbone.model.state_dict() if included else dict(backbone.lora_parameters())
    expected = {f"upsampler.{n}" for n in own} | {f"backbone.{n}" for n in base}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise VitupError(mismatch(missing, extra))
    with torch.no_grad():
        for name, value in tensors.items():
            kind, _, key = name.partition(".")
            target = (own if kind == "upsampler" else base)[key]
            if target.shape != value.shape:
                raise VitupError(wrong_shape(name, value, target))
            target.copy_(value)


def rebuild_backbone(
    meta: dict[str, Any],
    path: str | Path,
    backbone: Backbone | None = None,
    weights: str | Path | None = None,
    pretrained: str = "hub",
) -> Backbone:
    """The backbone a checkpoint's JSON describes (any method), checked against ``backbone`` if given."""
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
    return backbone


def _rebuild(
    meta: dict[str, Any],
    path: str | Path,
    backbone: Backbone | None,
    weights: str | Path | None,
    pretrained: str,
) -> Upsampler:
    """The untrained upsampler of the method a checkpoint's JSON names (and its backbone)."""
    recorded = meta["backbone"]
    backbone = rebuild_backbone(meta, path, backbone, weights, pretrained)
    if recorded.get("lora") and backbone.lora is None:
        backbone.add_lora(**recorded["lora"])
    method = meta.get("upsampler", "vitup")
    if method not in CHECKPOINT_METHODS:
        raise VitupError(f"checkpoint {path} holds a '{method}' upsampler, which this vitup cannot rebuild")
    cls, config_cls = CHECKPOINT_METHODS[method]
    return cls(backbone, config_cls(**meta["model"]))


def _is_vitup_checkpoint(path: Path) -> bool:
    return checkpoint_paths(path)[1].is_file()


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
    from vitup_cli.backbones import sha256_file
    from vitup_cli.official import is_official_layout, load_official, safetensors_keys
    from vitup_cli.weights import resolve_weights

    resolved = resolve_weights(ref)
    path = resolved.path
    if resolved.release is None and _is_vitup_checkpoint(path):
        model = load_checkpoint(path, weights=weights, pretrained=pretrained, map_location=map_location)
        file = checkpoint_paths(path)[0]
    else:
        _refuse_pickle(path)
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
        _tell_licence(release, notify)
    return model.eval()


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def _tell_licence(release: Release, notify: Callable[[str], None] | None) -> None:
    """``release``'s licence line to ``notify`` (else stderr), once per process as ``licence_notice`` decides."""
    from vitup_cli.weights import licence_notice

    line = licence_notice(release)
    if line:
        (notify or _stderr)(line)


#: how a checkpoint is rebuilt, by the ``upsampler`` its JSON names (``vitup train --method NAME``
#: writes checkpoints a loader here reads): ``loader(path, weights=, pretrained=, map_location=)``
CHECKPOINT_LOADERS: dict[str, Callable[..., Upsampler]] = {}
#: how published weights are loaded, by the release's method (``vitup_cli.weights.RELEASES``):
#: ``loader(resolved, weights=, pretrained=, map_location=)``
PUBLISHED_LOADERS: dict[str, Callable[..., Upsampler]] = {}


def _register_loaders() -> None:
    from vitup_cli.models import uplift

    CHECKPOINT_LOADERS.setdefault("vitup", load_checkpoint)
    CHECKPOINT_LOADERS.setdefault("uplift", uplift.load_uplift_checkpoint)
    CHECKPOINT_LOADERS.setdefault("featsharp", load_checkpoint)  # rebuilt through models.CHECKPOINT_METHODS
    CHECKPOINT_LOADERS.setdefault("loftup", _load_loftup_checkpoint)
    PUBLISHED_LOADERS.setdefault("uplift", uplift.load_uplift_release)
    PUBLISHED_LOADERS.setdefault("loftup", _load_loftup_release)


def _load_loftup_checkpoint(
    path: str | Path, *, weights: Any = None, pretrained: str = "hub", map_location: Any = "cpu"
) -> Upsampler:
    from vitup_cli.models.loftup import load_loftup

    return load_loftup(path, weights=weights, pretrained=pretrained).to(map_location)


def _load_loftup_release(resolved: Any, *, weights: Any = None, pretrained: str = "hub", map_location: Any = "cpu"):
    from vitup_cli.models.loftup import load_loftup

    return load_loftup(resolved.source, weights=weights, pretrained=pretrained).to(map_location)


def load_trained(
    ref: str | Path,
    *,
    weights: str | Path | None = None,
    pretrained: str = "hub",
    antialias: bool | None = None,
    map_location: str | torch.device = "cpu",
    notify: Callable[[str], None] | None = None,
    backbone: str | None = None,
) -> Upsampler:
    """A trained upsampler from ``--checkpoint``: a vitup checkpoint of any method (``NAME`` /
    ``NAME.safetensors`` beside ``NAME.json``), a published release (``vit-up:dinov3_splus``,
    ``uplift:dinov3_splus``, ``hf:ORG/REPO/FILE``) or a local copy of a published file. ViT-Up in any of
    its forms goes through ``open_vitup``; other methods through the loaders registered above. A
    release's licence goes to ``notify`` once per process."""
    from vitup_cli.weights import is_release_ref, release_for_file, resolve_weights

    _register_loaders()
    text = str(ref)
    vitup_kw = {"weights": weights, "pretrained": pretrained, "antialias": antialias, "notify": notify}
    meta_path = checkpoint_paths(text)[1]
    if is_release_ref(text) or (not meta_path.is_file() and release_for_file(text) is not None):
        resolved = resolve_weights(text)
        release = resolved.release
        if release is None or release.method == "vitup":  # open_vitup checks the file's layout
            return open_vitup(text, map_location=map_location, **vitup_kw)
        if release.method not in PUBLISHED_LOADERS:
            raise VitupError(f"--checkpoint {text}: published {release.method} weights are not loadable yet")
        if release.filename.endswith(".safetensors"):
            _refuse_pickle(resolved.path)
        model = PUBLISHED_LOADERS[release.method](
            resolved, weights=weights, pretrained=pretrained, map_location=map_location
        )
        _tell_licence(release, notify)
        return model.eval()
    if not meta_path.is_file():
        if Path(text).is_file() and checkpoint_method(text) == "loftup":  # a local published LoftUp file
            from vitup_cli.models.loftup import load_loftup

            return load_loftup(text, backbone=backbone or "dinov2_s", weights=weights, pretrained=pretrained).to(
                map_location
            )
        if Path(text).is_file():  # an official ViT-Up file under another name (open_vitup says if it is not)
            return open_vitup(text, map_location=map_location, **vitup_kw)
        resolve_weights(text)  # a mistyped short name (``uplift:nope``) gets the list of releases
    meta = read_checkpoint_meta(text)
    name = meta.get("upsampler", "vitup")
    if name == "vitup":
        return open_vitup(text, map_location=map_location, **vitup_kw)
    if name not in CHECKPOINT_LOADERS:
        raise VitupError(
            f"checkpoint {meta_path}: upsampler '{name}' has no loader (known: {', '.join(CHECKPOINT_LOADERS)})"
        )
    return CHECKPOINT_LOADERS[name](text, weights=weights, pretrained=pretrained, map_location=map_location).eval()


def checkpoint_method(ref: str | Path) -> str:
    """The method a ``--checkpoint`` holds (``vitup``, ``uplift``, ``loftup``, ``featsharp``), read from
    the release table or the checkpoint's JSON without loading weights (a local ``pytorch_model.bin``:
    LoftUp's published layout; another file without JSON: an official ViT-Up file)."""
    from vitup_cli.weights import is_release_ref, release_for_file, resolve_weights

    text = str(ref)
    if is_release_ref(text):
        release = resolve_weights(text).release
        return release.method if release is not None else ("loftup" if text.endswith(".bin") else "vitup")
    if not checkpoint_paths(text)[1].is_file():
        release = release_for_file(text)
        if release is not None:
            return release.method
        return "loftup" if Path(text).suffix == ".bin" else "vitup"
    return str(read_checkpoint_meta(text).get("upsampler", "vitup"))


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
    notify: Callable[[str], None] | None = None,
    minmax: str = "image",
) -> Upsampler:
    """The one way downstream commands get an upsampler: a checkpoint means the trained upsampler it
    holds (``load_trained``: any method, any form; its own backbone); otherwise a training-free upsampler
    by name over the named backbone. ``loftup`` takes its weights from ``checkpoint`` (a release, hf: file,
    local file or LoftUp run) or the release for ``backbone``; ``minmax`` is its guidance-image scaling
    (``image`` or the reference's ``batch``)."""
    if upsampler == "loftup" or (checkpoint is not None and checkpoint_method(checkpoint) == "loftup"):
        from vitup_cli.models.loftup import load_loftup

        model = load_loftup(
            checkpoint, backbone=backbone, weights=weights, pretrained=pretrained, overrides=overrides,
            input_size=input_size, minmax=minmax,
        )  # fmt: skip
        return model.to(device).eval()
    if checkpoint is not None:
        return load_trained(checkpoint, weights=weights, pretrained=pretrained, map_location=device, notify=notify)
    if upsampler == "vitup":
        raise VitupError(
            "--upsampler vitup needs --checkpoint (vit-up:dinov3_splus, vit-up:dinov3_b, or one from `vitup train`)"
        )
    if upsampler == "uplift":
        raise VitupError(
            "--upsampler uplift needs --checkpoint: published weights (uplift:dinov3_splus, uplift:dinov2_s) or a "
            "`vitup train --method uplift` run"
        )
    if upsampler in CHECKPOINT_METHODS and upsampler not in TRAINING_FREE:
        raise VitupError(
            f"--upsampler {upsampler} needs --checkpoint (train one with `vitup train --method {upsampler}`)"
        )
    bb = load_backbone(backbone, weights=weights, pretrained=pretrained, overrides=overrides)
    return build_upsampler(upsampler, bb, input_size=input_size).to(device).eval()


def default_checkpoint(
    backbone: str,
    *,
    pretrained: str = "hub",
    overrides: dict[str, Any] | None = None,
    alternative: str = "--upsampler bilinear",
) -> str:
    """The official release for ``backbone``, used when a command gets neither --checkpoint nor an
    upsampler; one clear line naming the choices where there is none (or it cannot apply)."""
    from vitup_cli.backbones import ALIASES
    from vitup_cli.weights import DEFAULT_RELEASE

    key = ALIASES.get(backbone, backbone)
    known = ", ".join(f"{r} ({b})" for b, r in DEFAULT_RELEASE.items())
    if key not in DEFAULT_RELEASE:
        raise VitupError(
            f"ViT-Up needs --checkpoint: there are no published ViT-Up weights for backbone '{backbone}' "
            f"(only {known}); pass --checkpoint (a run of `vitup train` or a release) or {alternative}"
        )
    if pretrained == "none" or overrides:
        flag = "--pretrained none" if pretrained == "none" else "--backbone-args"
        raise VitupError(
            f"ViT-Up needs --checkpoint with {flag}: the published weights ({DEFAULT_RELEASE[key]}) only fit the "
            f"DINOv3 weights they were trained on; pass --checkpoint (a run of `vitup train`) or {alternative}"
        )
    return DEFAULT_RELEASE[key]


def init_from(model: ViTUp, ref: str | Path, notify: Callable[[str], None] | None = None) -> str:
    """Copy ViT-Up weights (upsampler + LoRA; the base weights of a random-init source too) from ``ref``
    (any form ``open_vitup`` takes) into ``model``, which must have the same backbone and shape.
    Returns the source as the user can type it again."""
    from safetensors.torch import load_file

    from vitup_cli.backbones import ALIASES
    from vitup_cli.official import is_official_layout, load_official_state, safetensors_keys
    from vitup_cli.weights import resolve_weights

    label = f"--init-from {ref}"
    resolved = resolve_weights(ref)
    path = resolved.path
    if resolved.release is None and _is_vitup_checkpoint(path):
        meta = read_checkpoint_meta(path)
        included = bool(meta.get("backbone_included"))
        diffs = _differences(model.backbone, meta["backbone"], included)
        if diffs:
            raise VitupError(f"{label} is for another backbone ({'; '.join(diffs)})")
        _copy_checkpoint_tensors(
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
    _refuse_pickle(path)
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
        _tell_licence(release, notify)
    load_official_state(model, load_file(str(path)), label)
    return resolved.source
