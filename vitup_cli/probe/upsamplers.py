"""The upsamplers a probe compares, built once for ``vitup probe`` (``run``) and ``vitup probe spair|keypoints``
(``correspondence``).

``build_upsamplers(choice, names)`` opens each named upsampler for a ``ModelChoice``: trained ones from their
checkpoints (one per method), the others over the first checkpoint's backbone with its LoRA adapters off
(``TeacherView``: the original backbone, what the paper compares against), or over ``choice.backbone``
without a checkpoint. ``choose_names`` validates an ``--upsampler`` list against the checkpoints given,
``checkpoint_refs`` sorts those by method and ``resolve_device`` reads ``--device``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vitup_cli.backbones import Backbone, load_backbone
from vitup_cli.choice import ModelChoice
from vitup_cli.errors import VitupError
from vitup_cli.hub import checkpoint_method, load_trained, open_upsampler
from vitup_cli.models import CHECKPOINT_ONLY, UPSAMPLERS, Upsampler, spec_of

#: ``--checkpoint`` of a probe: one reference, or one per trained method
Checkpoints = str | Path | Sequence[str | Path] | None


class TeacherView(Upsampler):
    """An upsampler over another method's LoRA-adapted backbone, run with the adapters off (the
    original backbone, as a method without adapters sees it)."""

    def __init__(self, inner: Upsampler) -> None:
        super().__init__(inner.backbone, inner.input_size)
        self.inner = inner
        self.name = inner.name
        self.native_resolution_only = inner.native_resolution_only

    def tokens(self, images: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        with self.backbone.adapters_disabled():
            return self.inner.tokens(images, tap)

    def query(self, images: torch.Tensor, xy: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        with self.backbone.adapters_disabled():
            return self.inner.query(images, xy, tap)

    def features(self, images: torch.Tensor, size: Any, tap: int | None = None) -> torch.Tensor:
        with self.backbone.adapters_disabled():
            return self.inner.features(images, size, tap)

    def bands(self, images: torch.Tensor, size: Any, tap: int | None = None, chunk: int | None = None):
        with self.backbone.adapters_disabled():
            yield from self.inner.bands(images, size, tap, chunk)

    def check_tap(self, tap: int) -> None:
        self.inner.check_tap(tap)

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return self.inner.trained_tensors()

    def settings(self) -> dict[str, Any]:
        return self.inner.settings()


def resolve_device(name: str) -> str:
    """``--device``: ``auto`` (CUDA when there is one, else CPU), ``cpu`` or ``cuda[:N]`` (refused without CUDA)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise VitupError(f"--device {name}: use auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VitupError("--device cuda: no CUDA device is available here; use --device cpu")
    return name


def checkpoint_refs(checkpoint: Checkpoints) -> dict[str, str]:
    """The checkpoints given by the upsampler each holds (``vitup``, ``uplift``), in order; at most one per method."""
    if checkpoint is None:
        return {}
    refs = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    out: dict[str, str] = {}
    for ref in (str(r) for r in refs):
        name = checkpoint_method(ref)
        if name in out:
            raise VitupError(f"--checkpoint {ref}: a second {name} checkpoint (after {out[name]}); give one per method")
        out[name] = ref
    return out


def choose_names(requested: Sequence[str] | None, refs: Mapping[str, str]) -> list[str]:
    """The ``--upsampler`` names (stripped, blanks dropped), validated: known, each once, and a trained method
    that needs ``--checkpoint`` has one in ``refs`` (``checkpoint_refs``). None or empty: the checkpoints'
    methods, else ``bilinear``."""
    names = [n.strip() for n in (requested or []) if n.strip()]
    if not names:
        names = list(refs) if refs else ["bilinear"]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise VitupError(f"--upsampler lists {', '.join(dupes)} twice")
    unknown = [n for n in names if n not in UPSAMPLERS]
    if unknown:
        raise VitupError(f"--upsampler {unknown[0]}: unknown; use one of {', '.join(UPSAMPLERS)}")
    needing = [n for n in names if n in CHECKPOINT_ONLY and n not in refs]
    # the wording below names methods (UPLiFT's published weights, `vitup train`'s default method): it is
    # what the user types, not a capability
    if needing == ["uplift"]:
        raise VitupError(
            "--upsampler uplift needs --checkpoint uplift:dinov3_splus (published weights) or a "
            "`vitup train --method uplift` checkpoint (--checkpoint may be given once per method)"
        )
    if needing and refs:
        held = ", ".join(f"{ref} holds a {name} upsampler" for name, ref in refs.items())
        raise VitupError(
            f"--upsampler {needing[0]} needs its own --checkpoint ({held}; --checkpoint may be given once per method)"
        )
    if needing:
        how = "`vitup train`" if needing[0] == "vitup" else f"`vitup train --method {needing[0]}`"
        raise VitupError(
            f"--upsampler {needing[0]} needs --checkpoint (train one with {how}; --checkpoint may be given once "
            "per method)"
        )
    return names


def _base_weights(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The backbone's own tensors, LoRA factors left out, peft's ``base_layer`` names unwrapped and ViT-Up's
    split ``q_proj`` / ``k_proj`` / ``v_proj`` joined back into timm's ``qkv``."""
    out = {k.replace(".base_layer", ""): v for k, v in backbone.model.state_dict().items() if ".lora_" not in k}
    for key in [k for k in out if ".q_proj." in k]:
        parts = [out.pop(key.replace(".q_proj.", f".{x}_proj.")) for x in "qkv"]
        out[key.replace(".q_proj.", ".qkv.")] = torch.cat(parts)
    return out


def _same_backbone(a: Backbone, b: Backbone) -> bool:
    """Same timm model, weights and overrides; random-init backbones (stored in their checkpoints, all with
    the same weights id) by their tensors."""
    keys = ("timm_name", "weights_id", "overrides")
    if [a.describe()[k] for k in keys] != [b.describe()[k] for k in keys]:
        return False
    if not a.random_init:
        return True
    wa, wb = _base_weights(a), _base_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def build_upsamplers(choice: ModelChoice, names: Sequence[str] | None = None) -> list[tuple[Upsampler, bool]]:
    """``(upsampler, teacher)`` per name of ``choose_names(names, ...)``, in order, for the checkpoints of
    ``choice.checkpoint`` (one reference or one per trained method, ``Checkpoints``).

    Trained ones come from their checkpoints; the others run over the first checkpoint's backbone with its
    adapters off (``teacher``), or over ``choice.backbone`` without a checkpoint (a trained method with
    published weights for that backbone takes them). Checkpoints side by side must share backbone and input
    size. ``choice.seed`` seeds a random-init backbone (``pretrained='none'``), the same in every run.
    """
    refs = checkpoint_refs(choice.checkpoint)
    names = choose_names(names, refs)
    torch.manual_seed(choice.seed)  # a random-init backbone (--pretrained none) is the same in every run
    out: list[tuple[Upsampler, bool]] = []
    if refs:
        loaded = {}
        # methods whose weights fix their input come first: without --input-size, the others follow their backbone
        # resolution (a LoftUp file beside a ViT-Up checkpoint runs at ViT-Up's input, not at LoftUp's default)
        fixed_first = sorted(refs, key=lambda n: not spec_of(n).capabilities.input_size_from_weights)
        for name in fixed_first:
            # each method's file that runs over --backbone gets the same random-init backbone (--pretrained none)
            torch.manual_seed(choice.seed)
            fixed = spec_of(name).capabilities.input_size_from_weights
            anchor = next(iter(loaded.values())).backbone_size if loaded and not fixed else None
            loaded[name] = load_trained(
                refs[name], weights=choice.weights, pretrained=choice.pretrained, backbone=choice.backbone,
                overrides=choice.backbone_args, input_size=choice.input_size or anchor,
            ).eval()  # fmt: skip
        trained = {name: loaded[name] for name in refs}
        first = next(iter(trained.values()))
        for name, model in trained.items():
            fixed = spec_of(name).capabilities.input_size_from_weights
            if fixed and choice.input_size not in (None, model.input_size):
                raise VitupError(
                    f"--input-size {choice.input_size}: this {name} checkpoint was trained at {model.input_size}; "
                    "drop the flag"
                )
            if not _same_backbone(model.backbone, first.backbone) or model.backbone_size != first.backbone_size:
                raise VitupError(
                    f"--checkpoint {refs[name]}: its backbone/input ({model.backbone.weights_id}, "
                    f"{model.backbone_size} px) differs from {first.name}'s ({first.backbone.weights_id}, "
                    f"{first.backbone_size} px); side-by-side probes need the same backbone and input size"
                )
        lora = first.backbone.lora is not None
        for name in names:
            if name in trained:
                out.append((trained[name], False))
                continue
            # over the backbone at the resolution the trained methods run it (FeatSharp: its global view); a
            # trained method without a checkpoint takes its published weights for that backbone
            inner = open_upsampler(name, backbone=first.backbone, input_size=first.backbone_size)
            wrap = lora or not spec_of(name).capabilities.trained
            out.append((TeacherView(inner).eval() if wrap else inner.eval(), lora))
        return out
    backbone = load_backbone(
        choice.backbone, weights=choice.weights, pretrained=choice.pretrained, overrides=choice.backbone_args
    )
    for name in names:
        try:
            out.append((open_upsampler(name, backbone=backbone, input_size=choice.input_size).eval(), False))
        except ValueError as exc:
            raise VitupError(f"--input-size {choice.input_size}: {exc}") from None
    return out
