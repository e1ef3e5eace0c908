"""ViT backbones: friendly names -> timm models, weights, hidden-state taps, LoRA adapters.

Tap convention (the ViT-Up reference's): tap ``0`` is the raw token sequence entering the first block
(patch embedding, plus the position embedding where the model has one; prefix tokens dropped; *not*
normalised); tap ``i > 0`` is the residual stream after block ``i``, normalised the way the network
itself normalises it next: by block ``i + 1``'s first LayerNorm, tap ``depth`` by the final norm.
Taps are returned NCHW, ``(B, C, h, w)``.

LoRA (the reference's placement): the patch-embedding conv and the separate q, k, v and output
projections of every block. timm fuses q, k and v into one ``qkv`` linear; ``add_lora`` first splits it
into three modules holding the same weights (the same function), so that each gets its own adapter.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitup_cli.choice import parse_overrides  # noqa: F401 - re-exported: the backbone's constructor overrides
from vitup_cli.errors import VitupError


@dataclass(frozen=True)
class BackboneSpec:
    """A friendly backbone name and the timm model (and default hub tag) behind it."""

    timm_name: str
    tag: str | None
    note: str = ""


BACKBONES: dict[str, BackboneSpec] = {
    "dinov3_s": BackboneSpec("vit_small_patch16_dinov3", "lvd1689m", "ViT-S/16, 384-d, 12 blocks"),
    "dinov3_s+": BackboneSpec("vit_small_plus_patch16_dinov3", "lvd1689m", "ViT-S+/16, 384-d, 12 blocks (paper)"),
    "dinov3_b": BackboneSpec("vit_base_patch16_dinov3", "lvd1689m", "ViT-B/16, 768-d, 12 blocks"),
    "dinov3_l": BackboneSpec("vit_large_patch16_dinov3", "lvd1689m", "ViT-L/16, 1024-d, 24 blocks"),
    "dinov2_s": BackboneSpec("vit_small_patch14_dinov2", "lvd142m", "ViT-S/14, 384-d, 12 blocks"),
    "dinov2_b": BackboneSpec("vit_base_patch14_dinov2", "lvd142m", "ViT-B/14, 768-d, 12 blocks"),
    "dinov2_s_reg": BackboneSpec("vit_small_patch14_reg4_dinov2", "lvd142m", "ViT-S/14 + 4 registers"),
    "dinov2_b_reg": BackboneSpec("vit_base_patch14_reg4_dinov2", "lvd142m", "ViT-B/14 + 4 registers"),
}
ALIASES: dict[str, str] = {"dinov3_splus": "dinov3_s+"}

# Anchored so that only the backbone's own layers match (a bare "proj" also matches other modules).
_LORA_TARGETS = r"^(patch_embed\.proj|blocks\.\d+\.attn\.(qkv\.)?(q_proj|k_proj|v_proj)|blocks\.\d+\.attn\.proj)$"


def resolve_name(name: str) -> tuple[str, str | None]:
    """``dinov3_b`` / ``vit_base_patch16_dinov3`` / ``vit_base_patch16_dinov3.lvd1689m`` -> (timm name, tag)."""
    import timm

    key = ALIASES.get(name, name)
    if key in BACKBONES:
        spec = BACKBONES[key]
        return spec.timm_name, spec.tag
    timm_name, _, tag = name.partition(".")
    if not timm.is_model(timm_name):
        known = ", ".join(sorted([*BACKBONES, *ALIASES]))
        raise VitupError(
            f"unknown backbone '{name}': use one of {known} or a timm ViT name (see `timm.list_models('vit_*')`)"
        )
    return timm_name, tag or None


def default_taps(depth: int, num_blocks: int = 6) -> list[int]:
    """Evenly spaced taps: ``[0, 2, 4, ..., 12]`` for 12 blocks, ``[0, 4, ..., 24]`` for 24."""
    return [int(i * depth / num_blocks + 0.5) for i in range(num_blocks + 1)]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hub_offline() -> bool:
    """True when the Hugging Face hub cannot be reached; decided in seconds, not a minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0]
    hostname, _, port = host.partition(":")
    try:
        with socket.create_connection((hostname, int(port or 443)), timeout=3):
            return False
    except OSError:
        return True


def _cached_hub_file(hub_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _no_weights_message(friendly: str, hub_id: str) -> str:
    return (
        f"no weights for backbone '{friendly}': {hub_id} is not in the Hugging Face cache and the hub "
        "is unreachable. Fix: go online (or pre-download it with `hf download "
        f"{hub_id}`), or pass --weights PATH (a .safetensors or .pth state dict), or "
        "--pretrained none (random init, for tests and demos only)"
    )


class Backbone(nn.Module):
    """A timm ViT with hidden-state taps, input normalisation and optional LoRA adapters.

    Attributes:
        name: the name the user gave (``dinov3_s+`` or a timm name).
        timm_name: the timm architecture.
        weights_id: where the base weights came from (hub id, ``file:<name>@sha256:<hex>`` or
            ``none (random init)``).
        taps: the default hidden-state indices, ``len == num_blocks + 1``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        timm_name: str,
        weights_id: str,
        overrides: dict[str, Any] | None = None,
        taps: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        import timm.data

        self.model = model
        self.name = name
        self.timm_name = timm_name
        self.weights_id = weights_id
        self.overrides = dict(overrides or {})
        self.depth = len(model.blocks)
        self.embed_dim = int(model.embed_dim)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.taps = list(taps) if taps is not None else default_taps(self.depth)
        bad = [t for t in self.taps if not 0 <= t <= self.depth]
        if bad:
            raise VitupError(f"--taps {bad} out of range: this backbone has taps 0..{self.depth}")
        data_cfg = timm.data.resolve_data_config({}, model=model)
        self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self._is_eva = type(model).__name__ == "Eva"
        self.has_class_token = getattr(model, "cls_token", None) is not None and self.num_prefix_tokens > 0
        self.last_pooled: dict[int, dict[str, torch.Tensor | None]] = {}  # see hidden_states
        self.lora: dict[str, float] | None = None
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)

    # -- inputs ---------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in ``[0, 1]`` -> the backbone's normalised input."""
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    @property
    def random_init(self) -> bool:
        return self.weights_id.startswith("none")

    # -- features -------------------------------------------------------------------------------
    def hidden_states(self, x: torch.Tensor, taps: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Normalised hidden states at ``taps``.

        Args:
            x: ``(B, 3, H, W)`` normalised images, H and W multiples of the patch size.
        Returns:
            one ``(B, C, H/p, W/p)`` map per tap, in the order asked.
        """
        taps = list(self.taps if taps is None else taps)
        m = self.model
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        tokens = m.patch_embed(x)
        if tokens.ndim == 4:  # dynamic-size patch embeds are NHWC
            tokens = tokens.reshape(B, h * w, -1)
        rope = None
        if self._is_eva:
            tokens, rope = m._pos_embed(tokens.reshape(B, h, w, -1) if m.dynamic_img_size else tokens)
        else:
            tokens = m._pos_embed(tokens.reshape(B, h, w, -1) if m.dynamic_img_size else tokens)
        if getattr(m, "patch_drop", None) is not None:
            tokens = m.patch_drop(tokens)
        tokens = m.norm_pre(tokens)
        wanted = set(taps)
        found: dict[int, torch.Tensor] = {}
        last = max(wanted)
        for i, block in enumerate(m.blocks):
            if i in wanted:
                found[i] = tokens if i == 0 else block.norm1(tokens)
            if i >= last:
                break
            if self._is_eva:
                block_rope = rope[i] if isinstance(rope, (list, tuple)) else rope
                tokens = block(tokens, rope=block_rope)
            else:
                tokens = block(tokens)
        if self.depth in wanted:
            found[self.depth] = m.norm(tokens)
        p = self.num_prefix_tokens
        # one vector per image from this same pass, for `extract --global`: the class token and the patch mean
        self.last_pooled = {
            t: {"cls": found[t][:, 0] if self.has_class_token else None, "mean": found[t][:, p:].mean(1)} for t in taps
        }
        return [found[t][:, p:].transpose(1, 2).reshape(B, -1, h, w) for t in taps]

    def patch_embed_grid(self, x: torch.Tensor) -> torch.Tensor:
        """The (possibly LoRA-adapted) patch embedding alone: ``(B, 3, H, W)`` -> ``(B, C, H/p, W/p)``."""
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        emb = self.model.patch_embed(x)
        if emb.ndim == 4:
            return emb.permute(0, 3, 1, 2)
        return emb.transpose(1, 2).reshape(B, -1, h, w)

    # -- LoRA -----------------------------------------------------------------------------------
    def add_lora(self, r: int = 16, alpha: float = 32, dropout: float = 0.05) -> None:
        """Inject LoRA adapters (peft) on the patch embedding and the q, k, v and output projections.

        Fused ``qkv`` projections are split first (``split_qkv``). ``B`` is zero-initialised, so the
        adapted network equals the teacher until trained.
        """
        if self.lora is not None:
            raise VitupError("LoRA adapters are already attached to this backbone")
        from peft import LoraConfig, inject_adapter_in_model

        self.split_qkv()
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=_LORA_TARGETS)
        inject_adapter_in_model(config, self.model)
        n_adapted = sum(1 for n, _ in self.model.named_modules() if n.endswith("lora_A"))
        if n_adapted == 0:
            raise VitupError(f"no LoRA target found in {self.timm_name} (looked for {_LORA_TARGETS})")
        self.lora = {"r": r, "alpha": alpha, "dropout": dropout}

    def split_qkv(self) -> None:
        """Replace every fused ``qkv`` linear by separate ``q_proj``, ``k_proj``, ``v_proj`` modules with
        the same weights (and biases): the same function, but one module per projection.

        timm's Eva (DINOv3) has an unfused path of its own (``attn.q_proj`` ...); other timm ViTs get
        ``attn.qkv`` replaced by a module that concatenates the three outputs.
        """
        for block in self.model.blocks:
            attn = block.attn
            qkv = getattr(attn, "qkv", None)
            if not isinstance(qkv, nn.Linear):
                continue
            wq, wk, wv = qkv.weight.detach().chunk(3, dim=0)
            if hasattr(attn, "q_proj") and hasattr(attn, "q_bias"):  # timm Eva
                q_bias, v_bias = attn.q_bias, attn.v_bias
                k_bias = getattr(attn, "k_bias", None)
                if k_bias is not None and torch.count_nonzero(k_bias):
                    raise VitupError(f"{self.timm_name}: a non-zero k bias cannot be split (not a DINOv3 model?)")
                attn.q_proj = _linear(wq, None if q_bias is None else q_bias.detach())
                attn.k_proj = _linear(wk, None)
                attn.v_proj = _linear(wv, None if v_bias is None else v_bias.detach())
                attn.qkv = None
                attn.q_bias = attn.v_bias = None
                if "k_bias" in attn._buffers:
                    del attn._buffers["k_bias"]
                attn.k_bias = None
            else:
                b = qkv.bias.detach().chunk(3) if qkv.bias is not None else (None, None, None)
                attn.qkv = _SplitQKV(_linear(wq, b[0]), _linear(wk, b[1]), _linear(wv, b[2]))

    def lora_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.named_parameters():
            if "lora_" in name:
                yield name, param

    def _tuner_layers(self) -> list[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[Backbone]:
        """Within the block, the backbone is the frozen teacher (LoRA off); restored on exit."""
        layers = self._tuner_layers()
        trainable = {name: p.requires_grad for name, p in self.model.named_parameters()}
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield self
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            for name, p in self.model.named_parameters():  # peft's toggle also flips requires_grad
                p.requires_grad_(trainable[name])

    def describe(self) -> dict[str, Any]:
        """What a checkpoint or store records about this backbone."""
        return {
            "name": self.name,
            "timm_name": self.timm_name,
            "weights_id": self.weights_id,
            "overrides": self.overrides,
            "taps": self.taps,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "patch_size": self.patch_size,
            "lora": self.lora,
        }


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(False)
    return layer


class _SplitQKV(nn.Module):
    """``qkv(x)`` as three projections: ``cat([q_proj(x), k_proj(x), v_proj(x)], -1)``."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = q_proj, k_proj, v_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


def load_backbone(
    name: str = "dinov3_s+",
    *,
    weights: str | Path | None = None,
    pretrained: str = "hub",
    overrides: dict[str, Any] | None = None,
    taps: Sequence[int] | None = None,
) -> Backbone:
    """Build a frozen backbone.

    Args:
        name: friendly name (``dinov3_b``), timm name, or ``timm_name.tag``.
        weights: local state-dict file (``.safetensors``; ``.pth``/``.bin`` loaded with
            ``weights_only=True``). Wins over ``pretrained``.
        pretrained: ``"hub"`` for the name's default tag, a tag such as ``"lvd1689m"``, or ``"none"``
            for random init (tests and demos only; recorded as such everywhere).
        overrides: timm constructor overrides (``depth``, ``embed_dim``, ``num_heads``) for shrunk models.
        taps: hidden-state indices; default evenly spaced (``default_taps``).
    """
    import timm

    timm_name, tag = resolve_name(name)
    overrides = dict(overrides or {})
    _check_overrides(overrides)
    kwargs: dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True, **overrides}
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise VitupError(f"--weights {path}: no such file")
        weights_id = f"file:{path.name}@sha256:{sha256_file(path)}"
        try:
            model = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        except Exception as exc:
            raise VitupError(
                f"--weights {path}: cannot load it into {timm_name} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); pass a state dict for this architecture"
            ) from None
    elif pretrained == "none":
        weights_id = "none (random init)"
        model = _create(timm_name, overrides, pretrained=False, **kwargs)
    else:
        tag = tag if pretrained == "hub" else pretrained
        if not tag:
            raise VitupError(
                f"backbone '{name}' has no default hub tag: pass --pretrained TAG, --weights PATH, or --pretrained none"
            )
        hub_id = f"timm/{timm_name}.{tag}"
        cached = _cached_hub_file(hub_id)
        if cached is not None:
            model = _create(
                f"{timm_name}.{tag}", overrides, pretrained=True, pretrained_cfg_overlay={"file": str(cached)}, **kwargs
            )
        elif _hub_offline():
            raise VitupError(_no_weights_message(name, hub_id))
        else:
            model = _create(f"{timm_name}.{tag}", overrides, pretrained=True, **kwargs)
        weights_id = hub_id
    return Backbone(model, name=name, timm_name=timm_name, weights_id=weights_id, overrides=overrides, taps=taps)


_POSITIVE_INTS = ("depth", "embed_dim", "num_heads", "patch_size", "img_size", "reg_tokens", "num_reg_tokens")


def _overrides_text(overrides: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items())


def _check_overrides(overrides: dict[str, Any]) -> None:
    """Catch the common bad values before timm turns them into a traceback deep inside a constructor."""
    for key in _POSITIVE_INTS:
        if key in overrides:
            value = overrides[key]
            zero_ok = key in {"reg_tokens", "num_reg_tokens", "depth"}  # depth 0: the patch embedding alone
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
                raise VitupError(
                    f"--backbone-args {key}={value}: {key} must be a {'non-negative' if zero_ok else 'positive'} "
                    f"integer, e.g. --backbone-args depth=2,embed_dim=64,num_heads=1"
                )
    if {"embed_dim", "num_heads"} <= overrides.keys() and overrides["embed_dim"] % overrides["num_heads"]:
        raise VitupError(f"--backbone-args {_overrides_text(overrides)}: embed_dim must be a multiple of num_heads")


def _create(model_name: str, overrides: dict[str, Any], **kwargs: Any) -> Any:
    """``timm.create_model`` where a bad override is one line, not a constructor's traceback."""
    import timm

    if not overrides:
        return timm.create_model(model_name, **kwargs)
    try:
        return timm.create_model(model_name, **kwargs)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, AssertionError) as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise VitupError(
            f"--backbone-args {_overrides_text(overrides)}: timm cannot build {model_name.split('.')[0]} with these "
            f"overrides ({type(exc).__name__}: {first}); use constructor arguments such as depth, embed_dim, num_heads"
        ) from None
