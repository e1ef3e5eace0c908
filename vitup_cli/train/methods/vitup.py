"""ViT-Up distillation (the paper's recipe): what it trains on and against.

Data: per image a random square crop and the student canvas (the crop pasted at a random scale into
noise; ``vitup_cli.train.data``). Teacher: the same backbone with its LoRA adapters disabled, run
without grad on the crop at every teacher size. Student: the LoRA-adapted backbone + ViT-Up on the
canvas, queried on a ``Q x Q`` grid over the pasted crop. Loss: target-normalised L2 + cosine +
relational KL per level and teacher scale (``vitup_cli.train.losses``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitup_cli.backbones import Backbone, default_taps, load_backbone
from vitup_cli.hub import save_checkpoint
from vitup_cli.models import ViTUp, ViTUpConfig
from vitup_cli.models.vitup import parameter_summary
from vitup_cli.train.config import Sizes, TrainConfig, resolve
from vitup_cli.train.data import CanvasDataset, CanvasSpec, box_queries
from vitup_cli.train.losses import LossWeights, distillation_loss, term_keys
from vitup_cli.train.methods.base import TrainMethod


def build_model(cfg: TrainConfig) -> ViTUp:
    """Backbone (+ LoRA) and an untrained ViT-Up, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    backbone = load_backbone(
        cfg.backbone, weights=cfg.weights, pretrained=cfg.pretrained, overrides=cfg.backbone_args, taps=cfg.taps
    )
    if cfg.taps is None:
        backbone.taps = default_taps(backbone.depth, cfg.num_blocks)
    if cfg.lora_r > 0:
        backbone.add_lora(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        _freeze_unused_lora(backbone)
    config = ViTUpConfig(
        num_blocks=cfg.num_blocks, input_tokens=cfg.input_tokens, query_grid=cfg.embed_grid, window=cfg.window
    )
    return ViTUp(backbone, config)


def _freeze_unused_lora(backbone: Backbone) -> None:
    """Adapters in blocks after the last tap never reach an output: keep them out of the optimiser (and
    out of DDP's gradient buckets)."""
    last = max(backbone.taps)
    for name, param in backbone.lora_parameters():
        parts = name.split(".")
        if "blocks" in parts:
            block = int(parts[parts.index("blocks") + 1])
            if block >= last:
                param.requires_grad_(False)


def trainable_parameters(model: ViTUp) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def set_train_mode(model: ViTUp) -> None:
    """Upsampler in train mode; the backbone stays in eval mode (no train-time behaviour of timm, e.g.
    RoPE jitter, may reach the teacher) except the LoRA dropout."""
    model.train()
    model.backbone.model.eval()
    for name, module in model.backbone.model.named_modules():
        if name.endswith("lora_dropout"):
            module.train()


class _Student(nn.Module):
    """The trainable forward (what DDP wraps): canvas ``(B, 3, S, S)``, xy ``(B, N, 2)`` -> per level
    ``(B, N, C)``."""

    def __init__(self, model: ViTUp) -> None:
        super().__init__()
        self.model = model

    def forward(self, canvas: torch.Tensor, xy: torch.Tensor) -> list[torch.Tensor]:
        cache = self.model.encode(canvas)
        return self.model.decode(cache, xy, levels=range(len(self.model.decoders)))


def teacher_targets(backbone: Backbone, crop: torch.Tensor, sizes: Sizes, autocast: Any) -> list[list[torch.Tensor]]:
    """The frozen teacher (adapters disabled, no grad) on the crop at every teacher size and tap.

    Args:
        crop: ``(B, 3, T, T)`` in ``[0, 1]`` at the largest teacher size.
    Returns:
        per teacher size, per tap: ``(B, C, g, g)`` float32.
    """
    out = []
    with torch.no_grad(), backbone.adapters_disabled(), autocast:
        for size in sizes.teacher_sizes:
            x = crop
            if size != crop.shape[-1]:
                x = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            out.append([t.float() for t in backbone.hidden_states(backbone.normalize(x))])
    return out


def student_maps(student: nn.Module, canvas: torch.Tensor, box: torch.Tensor, queries: int) -> list[torch.Tensor]:
    """Predictions on the ``queries x queries`` grid over each pasted crop: per level ``(B, C, Q, Q)``."""
    xy = box_queries(box, queries)
    preds = student(canvas, xy)
    B = canvas.shape[0]
    return [p.float().transpose(1, 2).reshape(B, -1, queries, queries) for p in preds]


def _to_batch(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    canvas = batch["canvas"].to(device, non_blocking=True).float().div_(255)
    crop = batch["crop"].to(device, non_blocking=True).float().div_(255)
    return canvas, crop, batch["box"].to(device)


class ViTUpMethod(TrainMethod):
    """``--method vitup``: LoRA-adapted backbone + ViT-Up distilled from the same backbone unadapted."""

    name = "vitup"
    config_class = TrainConfig
    checked_terms = ("l2", "cos", "kl", "loss")
    model: ViTUp

    def build(self) -> None:
        self.model = build_model(self.cfg)
        self.backbone = self.model.backbone
        self.cfg, self.sizes = resolve(self.cfg, self.backbone.patch_size, self.world_size)
        cfg = self.cfg
        self.weights = LossWeights(cfg.w_l2, cfg.w_cos, cfg.w_kl, cfg.tau, cfg.kl_window)
        self.spec = CanvasSpec(self.sizes.canvas, self.sizes.crop, cfg.scale_min, cfg.scale_max, cfg.crop_min, cfg.seed)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return trainable_parameters(self.model)

    def set_train_mode(self) -> None:
        set_train_mode(self.model)

    def student(self) -> nn.Module:
        return _Student(self.model)

    def dataset(self, files: Sequence[Path], stream: int) -> CanvasDataset:
        return CanvasDataset(files, self.spec, stream=stream)

    def loss(
        self, student: nn.Module, batch: dict[str, Any], device: torch.device, autocast: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        canvas, crop, box = _to_batch(batch, device)
        targets = teacher_targets(self.backbone, crop, self.sizes, autocast)
        with autocast:
            preds = student_maps(student, canvas, box, self.sizes.queries)
        return distillation_loss(preds, targets, self.weights)

    def term_keys(self) -> list[str]:
        return term_keys(len(self.model.decoders), self.sizes.teacher_grids)

    def keep_in_state(self, name: str) -> bool:
        is_base = name.startswith("backbone.") and "lora_" not in name
        return self.backbone.random_init or not is_base

    def save_checkpoint(self, path: Path, extra: dict[str, Any]) -> None:
        save_checkpoint(path, self.model, extra)

    def notes(self) -> list[str]:
        return [f"ViT-Up on {self.backbone.name}: {parameter_summary(self.model)}", *super().notes()]
