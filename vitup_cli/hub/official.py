"""The official ViT-Up release layout (github krispinwandel/vit-up, Hugging Face ``Krispin/vit-up``).

A released ``.safetensors`` file holds the reference's module names: ``vit_up_blocks.*``,
``decoder_mlp.*`` and ``rel_pos_enc.freqs`` for the upsampler, and ``backbone.base_model.model.*`` for
the LoRA tensors of its Hugging Face ``DINOv3ViTModel``-style backbone (patch embedding and the q, k,
v and o projections of every block). The base backbone weights are not in the file: they are the
DINOv3 weights the release was trained on (the release's timm backbone). Every tensor in the file maps
onto exactly one vitup tensor; a file with an unknown key, a missing key or a wrong shape is refused
with a message naming it.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from vitup_cli.backbones import Backbone, default_taps, load_backbone
from vitup_cli.errors import VitupError
from vitup_cli.hub.releases import RELEASES, Release, releases_for
from vitup_cli.models.vitup import ViTUp, ViTUpConfig

#: upsampler keys: reference name (after ``vit_up_blocks.N.`` or ``decoder_mlp.N.``) -> vitup name
_BLOCK_NAMES: dict[str, str] = {
    "transition_mlp.mlp.0": "norm_transition",
    "transition_mlp.mlp.1": "transition.0",
    "transition_mlp.mlp.3": "transition.2",
    "norm_q_global": "attn.norm_q",
    "norm_h_global": "attn.norm_kv",
    "cross_attention.q_proj": "attn.q",
    "cross_attention.k_proj": "attn.k",
    "cross_attention.v_proj": "attn.v",
    "cross_attention.out_proj": "attn.proj",
    "featx.norm_input": "featx.norm_in",
    "featx.gamma_beta_mlp.mlp.0": "featx.film.0",
    "featx.gamma_beta_mlp.mlp.2": "featx.film.2",
    "featx.post_mlp.mlp.0": "featx.norm_mid",
    "featx.post_mlp.mlp.1": "featx.mlp.0",
    "featx.post_mlp.mlp.3": "featx.mlp.2",
    "norm_h_local": "featx.norm_out",
    "norm_post": "norm_fusion",
    "mlp.mlp.0": "fusion.0",
    "mlp.mlp.2": "fusion.2",
}
_DECODER_NAMES = {"mlp.0": "0", "mlp.1": "1"}
_PROJ_NAMES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "proj"}

_BLOCK_RE = re.compile(r"^vit_up_blocks\.(\d+)\.(.+)\.(weight|bias)$")
_DECODER_RE = re.compile(r"^decoder_mlp\.(\d+)\.(.+)\.(weight|bias)$")
_LORA_PATCH_RE = re.compile(
    r"^backbone\.base_model\.model\.embeddings\.patch_embeddings\.(lora_[AB])\.default\.weight$"
)
_LORA_ATTN_RE = re.compile(
    r"^backbone\.base_model\.model\.layer\.(\d+)\.attention\.(q_proj|k_proj|v_proj|o_proj)\.(lora_[AB])\.default\.weight$"
)


#: module names of earlier reference checkpoints -> the current ones (the reference's own wrapper migrates
#: them the same way when it loads a file)
_RENAMES = (
    (re.compile(r"^q_proj\.(\d+)\."), r"vit_up_blocks.\1.transition_mlp."),
    (re.compile(r"^local_feature_decoder\.(\d+)\."), r"vit_up_blocks.\1.featx."),
    (
        re.compile(r"^global_local_cross_attention\.(\d+)\.global_cross_attention\."),
        r"vit_up_blocks.\1.cross_attention.",
    ),
    (re.compile(r"^global_local_cross_attention\.(\d+)\."), r"vit_up_blocks.\1."),
)


def current_key(key: str) -> str:
    """An official key with an older module name (``q_proj.N.``, ``local_feature_decoder.N.``,
    ``global_local_cross_attention.N.``; an optional ``vit_up.`` prefix) in today's naming."""
    key = key.removeprefix("vit_up.")
    for pattern, repl in _RENAMES:
        new = pattern.sub(repl, key, count=1)
        if new != key:
            return new
    return key


def vitup_name(key: str) -> str | None:
    """The vitup tensor name (in ``ViTUp.state_dict()`` terms) for an official key; ``None`` if unknown."""
    key = current_key(key)
    if key == "rel_pos_enc.freqs":
        return "fourier_freqs"
    if m := _BLOCK_RE.match(key):
        inner = _BLOCK_NAMES.get(m[2])
        return None if inner is None else f"blocks.{m[1]}.{inner}.{m[3]}"
    if m := _DECODER_RE.match(key):
        inner = _DECODER_NAMES.get(m[2])
        return None if inner is None else f"decoders.{m[1]}.{inner}.{m[3]}"
    if m := _LORA_PATCH_RE.match(key):
        return f"backbone.model.patch_embed.proj.{m[1]}.default.weight"
    if m := _LORA_ATTN_RE.match(key):
        return f"backbone.model.blocks.{m[1]}.attn.{_PROJ_NAMES[m[2]]}.{m[3]}.default.weight"
    return None


def is_official_layout(keys: list[str] | set[str]) -> bool:
    """True for the key layout of a released file (no ``upsampler.`` prefix, reference block names)."""
    return any(current_key(k).startswith("vit_up_blocks.") for k in keys) and not any(
        k.startswith("upsampler.") for k in keys
    )


def safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except (SafetensorError, OSError) as exc:
        raise VitupError(f"{path}: unreadable safetensors file ({exc})") from None


def _targets(model: ViTUp) -> dict[str, torch.Tensor]:
    """Every vitup tensor a released file must fill: upsampler parameters, the Fourier bands, LoRA."""
    out = {name: p for name, p in model.upsampler_parameters()}
    out["fourier_freqs"] = model.fourier_freqs
    out.update({f"backbone.{name}": p for name, p in model.backbone.lora_parameters()})
    return out


def load_official_state(model: ViTUp, tensors: dict[str, torch.Tensor], label: str) -> None:
    """Copy a released state dict into ``model`` (a ViT-Up with LoRA): every key used, none missing."""
    targets = _targets(model)
    used: set[str] = set()
    for key, value in tensors.items():
        name = vitup_name(key)
        if name is None or name not in targets:
            raise VitupError(
                f"{label}: unknown key '{key}' for this ViT-Up ({len(model.blocks)} blocks, "
                f"{len(model.decoders)} decoders); is it a ViT-Up release for {model.backbone.name}?"
            )
        target = targets[name]
        if tuple(target.shape) != tuple(value.shape):
            raise VitupError(
                f"{label}: '{key}' has shape {list(value.shape)}, this model needs {list(target.shape)} "
                f"(the file is for another backbone or configuration)"
            )
        used.add(name)
    missing = sorted(set(targets) - used)
    if missing:
        inverse = _official_names(model)
        shown = ", ".join(inverse.get(n, n) for n in missing[:3])
        raise VitupError(f"{label}: {len(missing)} tensors missing from the file (e.g. {shown}): not a full release")
    with torch.no_grad():
        for key, value in tensors.items():
            target = targets[vitup_name(key)]  # type: ignore[index]
            target.copy_(value.to(target.dtype))


def _official_names(model: ViTUp) -> dict[str, str]:
    """vitup name -> official key, for messages about missing tensors."""
    out: dict[str, str] = {"fourier_freqs": "rel_pos_enc.freqs"}
    for i in range(len(model.blocks)):
        for ref, ours in _BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{kind}"] = f"vit_up_blocks.{i}.{ref}.{kind}"
    for i in range(len(model.decoders)):
        for ref, ours in _DECODER_NAMES.items():
            for kind in ("weight", "bias"):
                out[f"decoders.{i}.{ours}.{kind}"] = f"decoder_mlp.{i}.{ref}.{kind}"
    for ab in ("lora_A", "lora_B"):
        out[f"backbone.model.patch_embed.proj.{ab}.default.weight"] = (
            f"backbone.base_model.model.embeddings.patch_embeddings.{ab}.default.weight"
        )
        for i in range(model.backbone.depth):
            for ref, ours in _PROJ_NAMES.items():
                out[f"backbone.model.blocks.{i}.attn.{ours}.{ab}.default.weight"] = (
                    f"backbone.base_model.model.layer.{i}.attention.{ref}.{ab}.default.weight"
                )
    return out


def _infer_shape(tensors: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(width, ViT-Up blocks, LoRA rank) of a released state dict."""
    tensors = {current_key(k): v for k, v in tensors.items()}
    try:
        dim = int(tensors["decoder_mlp.0.mlp.1.weight"].shape[0])
        blocks = 1 + max(int(m[1]) for k in tensors if (m := _BLOCK_RE.match(k)))
        rank = int(tensors["backbone.base_model.model.embeddings.patch_embeddings.lora_A.default.weight"].shape[0])
    except (KeyError, ValueError) as exc:
        raise VitupError(f"not a ViT-Up release file: {exc} is missing") from None
    return dim, blocks, rank


def load_official(
    path: str | Path,
    *,
    release: Release | None = None,
    backbone: Backbone | None = None,
    config: ViTUpConfig | None = None,
    weights: str | Path | None = None,
    pretrained: str = "hub",
    map_location: str | torch.device = "cpu",
    label: str | None = None,
) -> ViTUp:
    """A ViT-Up from a released ``.safetensors`` file (the reference's key layout).

    Args:
        release: the ``hub.releases.Release`` the file is (implies its backbone); inferred from the width
            (384: dinov3_s+, 768: dinov3_b) when ``None``.
        backbone: use this backbone (without LoRA; its taps must be the model's) instead of building
            the release's; for tests and shrunk models.
        config: the ``ViTUpConfig`` (default: the paper's, with the reference's conventions).
        weights, pretrained: where the base backbone weights come from (see ``load_backbone``); by
            default the hub tag the release was trained on.
    """
    p = Path(path)
    label = label or str(p)
    try:
        tensors = load_file(str(p), device="cpu")
    except Exception as exc:  # SafetensorError, OSError
        raise VitupError(f"{label}: unreadable safetensors file ({exc})") from None
    dim, blocks, rank = _infer_shape(tensors)
    if backbone is None:
        if release is None:
            by_dim = {384: "vit-up:dinov3_splus", 768: "vit-up:dinov3_b"}
            if dim not in by_dim:
                names = ", ".join(r.name for r in releases_for("vitup"))
                raise VitupError(f"{label}: a {dim}-wide ViT-Up matches no known release ({names})")
            release = RELEASES[by_dim[dim]]
        tag = release.backbone_tag if (weights is None and pretrained == "hub") else pretrained
        backbone = load_backbone(release.backbone, weights=weights, pretrained=tag)
        backbone.taps = default_taps(backbone.depth, blocks)
    if backbone.embed_dim != dim:
        raise VitupError(f"{label}: a {dim}-wide ViT-Up cannot run on {backbone.name} ({backbone.embed_dim}-wide)")
    if backbone.lora is None:
        backbone.add_lora(r=rank, alpha=2 * rank, dropout=0.05)  # the reference: r=16, alpha=32
    config = config or ViTUpConfig(num_blocks=blocks)
    if config.num_blocks != blocks:
        config = replace(config, num_blocks=blocks)
    model = ViTUp(backbone, config)
    load_official_state(model, tensors, label)
    model.release = release
    return model.to(map_location)


def official_state(model: ViTUp) -> dict[str, torch.Tensor]:
    """``model``'s upsampler and LoRA tensors under the official release's key names (the inverse of
    ``load_official_state``), e.g. to hand a vitup-trained ViT-Up to the reference's loader."""
    names = _official_names(model)
    return {names[name]: t.detach().cpu().contiguous().clone() for name, t in _targets(model).items()}
