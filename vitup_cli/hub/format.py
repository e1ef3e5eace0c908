"""The vitup checkpoint format: ``NAME.safetensors`` (upsampler + LoRA weights) beside ``NAME.json`` (what
to rebuild), for every method.

Nothing is ever unpickled. Writes are atomic (temporary file, then ``os.replace``). When the backbone
was randomly initialised its base weights are stored too, since no hub or file could rebuild them. A
checkpoint's JSON names its method (``upsampler``); a method whose tensors use another layout (UPLiFT,
LoftUp runs) writes through ``write_checkpoint`` and reads with its own reader in ``vitup_cli.hub``; every
other registered method is rebuilt here from its spec (``model_class(backbone, config_class(**model))``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from vitup_cli._version import __version__
from vitup_cli.backbones import Backbone, load_backbone
from vitup_cli.errors import VitupError
from vitup_cli.fileio import atomic_write_bytes
from vitup_cli.models import Upsampler, specs

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


def refuse_pickle(path: Path) -> None:
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
    refuse_pickle(p)
    weights_path, meta_path = checkpoint_paths(p)
    for needed in (weights_path, meta_path):
        if not needed.is_file():
            raise VitupError(f"checkpoint {p}: {needed} is missing; a checkpoint is NAME.safetensors + NAME.json")
    refuse_pickle(weights_path)
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


def backbone_differences(backbone: Backbone, recorded: dict[str, Any], included: bool) -> list[str]:
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
    copy_checkpoint_tensors(
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


def copy_checkpoint_tensors(
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
    diffs = backbone_differences(backbone, recorded, included)
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
    spec = specs().get(method)
    if spec is None or spec.config_class is None:
        raise VitupError(f"checkpoint {path} holds a '{method}' upsampler, which this vitup cannot rebuild")
    return spec.build(backbone, config=spec.config_class(**meta["model"]), input_size=meta.get("input_size"))


def is_vitup_checkpoint(path: Path) -> bool:
    """True when ``path`` is a checkpoint in vitup's format (its ``NAME.json`` is beside it), any method."""
    return checkpoint_paths(path)[1].is_file()


def read_state_dict(path: str | Path, what: str, container: str = "state_dict") -> dict[str, torch.Tensor]:
    """A published state dict: ``.safetensors``, or a torch file read ONLY with ``torch.load(weights_only=True)``
    (anything that needs more is refused in one line). A mapping holding it under ``container`` (Lightning's
    ``state_dict``, JAFAR's ``jafar``) is unwrapped. ``what`` names the expected file in the error lines."""
    path = Path(path)
    if not path.is_file():
        raise VitupError(f"--checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        try:
            state: Any = load_file(str(path))
        except Exception as exc:
            raise VitupError(f"--checkpoint {path}: unreadable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for anything beyond tensors and plain containers
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise VitupError(
                f"--checkpoint {path}: refused, it cannot be read with torch.load(weights_only=True) ({reason}); "
                "vitup never unpickles anything more than tensors"
            ) from None
    if isinstance(state, dict) and isinstance(state.get(container), dict):
        state = state[container]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VitupError(f"--checkpoint {path}: not a state dict of tensors ({what})")
    return state


def published_backbone(
    release: Any,
    backbone: str | Backbone,
    *,
    weights: str | Path | None,
    pretrained: str,
    overrides: dict[str, Any] | None,
    dim: int,
    label: str,
    what: str,
) -> Backbone:
    """The backbone a per-backbone published file runs over: ``backbone`` when built; else the one its
    ``release`` names (with the hub tag it was trained on, unless ``weights``/``pretrained`` say otherwise);
    else ``backbone`` by name. Its width must be the file's ``dim`` (one line naming ``label`` otherwise)."""
    if isinstance(backbone, Backbone):
        bb = backbone
    elif release is not None:
        tag = release.backbone_tag if pretrained == "hub" and weights is None else pretrained
        bb = load_backbone(release.backbone, weights=weights, pretrained=tag, overrides=overrides)
    else:
        bb = load_backbone(backbone, weights=weights, pretrained=pretrained, overrides=overrides)
    if bb.embed_dim != dim:
        raise VitupError(
            f"--checkpoint {label}: {what} weights for {dim}-d features, but backbone {bb.name} is "
            f"{bb.embed_dim}-d; pass the --backbone they were trained on"
        )
    return bb


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors on the CPU, or one line naming the unreadable file."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise VitupError(f"{path}: unreadable safetensors file ({exc})") from None


# -- readers: how each method's weights are opened -------------------------------------------------
@dataclass(frozen=True)
class OpenOptions:
    """What a user's command line says about how to open weights, passed to every reader.

    Attributes:
        backbone: the ``--backbone`` for files that do not name theirs (a local published file of an
            any-input-size method), or a built ``Backbone`` to run over.
        weights, pretrained, overrides: where the base backbone weights come from (``load_backbone``).
        input_size: ``--input-size``, for methods whose weights do not fix it.
        map_location: the device the model ends up on.
        notify: receives a release's licence line (once per process); stderr when ``None``.
        minmax: LoftUp's guidance-image scaling (``image`` or the reference's ``batch``); other methods
            have no such setting.
    """

    backbone: str | Backbone | None = None
    weights: str | Path | None = None
    pretrained: str = "hub"
    overrides: dict[str, Any] | None = None
    input_size: int | None = None
    map_location: str | torch.device = "cpu"
    notify: Callable[[str], None] | None = None
    minmax: str = "image"


#: ``reader(path, options)`` by the ``upsampler`` a vitup checkpoint's JSON names; a method without one is
#: rebuilt by ``load_checkpoint`` from its spec
CHECKPOINT_READERS: dict[str, Callable[[Path, OpenOptions], Upsampler]] = {}
#: ``reader(resolved_weights, options)`` by method, for published files (releases, ``hf:`` files, local copies)
PUBLISHED_READERS: dict[str, Callable[[Any, OpenOptions], Upsampler]] = {}
#: file suffixes that only one method publishes (a local file without a JSON beside it)
PUBLISHED_SUFFIXES: dict[str, str] = {}


def register_readers(
    method: str,
    *,
    checkpoint: Callable[[Path, OpenOptions], Upsampler] | None = None,
    published: Callable[[Any, OpenOptions], Upsampler] | None = None,
    suffixes: tuple[str, ...] = (),
) -> None:
    """Register how ``method``'s checkpoints and published files are read (its ``hub`` module does this)."""
    if checkpoint is not None:
        CHECKPOINT_READERS[method] = checkpoint
    if published is not None:
        PUBLISHED_READERS[method] = published
    for suffix in suffixes:
        PUBLISHED_SUFFIXES[suffix] = method
