"""LoftUp's two training stages (Huang et al. 2025; the released ``train_loftup_stage{1,2}.py``).

Data: images with class-agnostic masks (``vitup_cli.data.masks``: SA-1B or a folder of images + masks),
at most 150 masks per image in file order. Targets live in ChannelNorm space (a LayerNorm over the
backbone's last-layer channels, not trained), as LoftUp's output does.

Stage 1 (``--stage 1``): images ``Resize + CenterCrop 224``; the backbone's tokens; LoftUp's 224 x 224
output. Loss = (a) FeatUp's multi-view reconstruction: ``jitters`` random jitters (reflect pad <= 8 px,
zoom up to 1.1 with probability 1/2, a random crop back), the jittered output downsampled by an attention
downsampler (5x5 box blur, per-pixel ``Linear(C, 1)`` salience with dropout 0.2, learned k x k weight and
bias, k = stride = patch size) against the backbone's tokens of the jittered image; (b) TV of the output;
(c) MSE to the pseudo ground truth: the tokens bicubically upsampled to 224 and refined by every mask in
order, in place (``F[m] = (1 - a) F[m] + a mean(F[m])``, a = 0.8). (a) and (c) compare 64 random unit
projections of the channels (new ones every step). NAdam lr 1e-4; gradient norm clipped to 1e-4 for the
first 10 steps.

Stage 2 (``--stage 2 --init STAGE1``): student and EMA teacher start from the stage-1 weights (EMA 0.99,
updated every 10 steps with ema-pytorch's warm-up ``1 - (1 + t)^(-2/3)`` capped at 0.99; float buffers
averaged, others copied; the teacher runs in eval mode). Per image the source is ``Resize + CenterCrop
896``; per step the student input is one of 224/336/448/518 px (all images of the step). The student
upsamples the whole image at its input size; ``crops`` random crops of that size (corners on a 16-px grid)
go through backbone + teacher, whose output is refined by the crop's masks at a = 0.5; the student's
matching region (``input^2 / 896`` px) is compared with the teacher map (bilinearly resized) by the
affinity loss: MSE of the cosine-similarity Gram matrices over the central 80 % of the region, weight 20.
Bounded memory (vitup's choice, the released code uses every pixel): at most ``affinity_pixels`` (4096)
pixels of the region, drawn at random each step, the same for both maps. Plus the multi-view term with
FeatUp's uncertainty net (``s = exp(conv1x1(tokens) + 0.1)``, ``mse / (2 s^2) + log s``, clamped at 0) and
TV 0.05. AdamW lr 1e-3.

Paper values where they differ (recorded, not defaults): lr 1e-3 (stage 1) / 1e-4 (stage 2); stage-2
input 224 or 336; 1 M SA-1B images per stage (the released loaders took 100 k).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vitup_cli.backbones import Backbone, load_backbone
from vitup_cli.data.masks import MAX_MASKS, MaskedImages, open_masked_images
from vitup_cli.errors import VitupError
from vitup_cli.hub.loftup import read_run_checkpoint, save_run_checkpoint
from vitup_cli.models.loftup import LoftUpConfig, LoftUpNet
from vitup_cli.train.config import CommonConfig, check_common
from vitup_cli.train.data import TRAIN_STREAM, PositionDataset
from vitup_cli.train.methods.base import TrainMethod


@dataclass
class LoftUpTrainConfig(CommonConfig):
    """``vitup train --method loftup``; defaults are the released code's (DINOv2-S/14 on SA-1B)."""

    title: ClassVar[str] = "LoftUp"

    method: str = "loftup"
    stage: int = field(
        default=1,
        metadata={
            "help": "1: mask pseudo ground truth (NAdam lr 1e-4); 2: EMA self-distillation (AdamW lr 1e-3, needs "
            "--init). Released code's lrs; the paper says 1e-3 / 1e-4. Backbone default dinov2_s, batch 8."
        },
    )
    init: str | None = field(
        default=None,  # NAME of NAME.safetensors + NAME.json
        metadata={"help": "Stage 2: the stage-1 checkpoint (runs/s1/last)."},
    )
    layout: str = field(
        default="auto", metadata={"help": "Masks: sa1b (sa_N.jpg + sa_N.json), folder (images/ + masks/), auto."}
    )
    max_masks: int = field(default=MAX_MASKS, metadata={"help": "Masks per image, in file order."})
    backbone: str = "dinov2_s"
    steps: int = 125000  # 1 M images / batch 8, one epoch (the released loaders used 100 k images)
    batch_size: int = 8
    lr: float | None = None  # None: 1e-4 (stage 1, NAdam) / 1e-3 (stage 2, AdamW); paper: 1e-3 / 1e-4
    schedule: str = "constant"
    warmup: float = 0.0
    weight_decay: float | None = None  # None: 0 (stage 1, NAdam) / 0.01 (stage 2, AdamW's default)
    grad_clip: float = 0.0
    clip_first: float = field(
        default=1e-4, metadata={"help": "Stage 1: max gradient norm over the first --clip-steps steps."}
    )
    clip_steps: int = field(default=10, metadata={"help": "Stage 1: steps whose gradient norm --clip-first bounds."})
    # stage 1
    image_size: int = field(default=224, metadata={"help": "Stage-1 image and output side (224)."})
    mask_alpha: float = field(default=0.8, metadata={"help": "Stage-1 mask blending."})
    # both stages
    jitters: int | None = field(
        default=None,  # None: 4 (stage 1) / 2 (stage 2)
        metadata={"help": "Jittered views per image for the multi-view term (4 in stage 1, 2 in stage 2)."},
    )
    max_pad: int = field(
        default=8, metadata={"help": "Jitter: reflect padding in px, then a random crop back to the size."}
    )
    max_zoom: float = field(
        default=1.1, metadata={"help": "Jitter: zoom ~ U(1, max-zoom) with probability 1/2, else none."}
    )
    proj_dim: int = field(
        default=64, metadata={"help": "Random unit projections of the channels the losses compare (new every step)."}
    )
    tv_weight: float | None = field(
        default=None,  # None: 0.01 (stage 1; the README command uses 0.001) / 0.05 (stage 2)
        metadata={"help": "TV weight (default 0.01 stage 1, 0.05 stage 2)."},
    )
    mask_weight: float = field(default=1.0, metadata={"help": "Stage-1 weight of the pseudo ground truth MSE."})
    # stage 2
    hr_size: int = field(default=896, metadata={"help": "Stage-2 source image side."})
    input_sizes: list[int] = field(
        default_factory=lambda: [224, 336, 448, 518],
        metadata={"help": "Stage-2 student inputs, one per step (paper: 224 or 336)."},
    )
    crops: int = field(default=2, metadata={"help": "Stage 2: teacher crops per image and step."})
    hr_alpha: float = field(default=0.5, metadata={"help": "Stage-2 teacher mask blending."})
    hr_weight: float = field(default=20.0, metadata={"help": "Stage-2 affinity loss weight."})
    affinity_border: float = field(
        default=0.1, metadata={"help": "Stage 2: the affinity loss leaves out this fraction of each side."}
    )
    affinity_pixels: int = field(
        default=4096, metadata={"help": "Stage 2: pixels per Gram matrix (bounds its memory)."}
    )
    ema_beta: float = field(default=0.99, metadata={"help": "Stage-2 EMA teacher decay."})
    ema_every: int = field(default=10, metadata={"help": "Stage 2: steps between EMA updates."})

    def __post_init__(self) -> None:
        two = self.stage == 2
        if self.lr is None:
            self.lr = 1e-3 if two else 1e-4
        if self.weight_decay is None:
            self.weight_decay = 0.01 if two else 0.0
        if self.jitters is None:
            self.jitters = 2 if two else 4
        if self.tv_weight is None:
            self.tv_weight = 0.05 if two else 0.01


# -- pieces of the objective ------------------------------------------------------------------------
class AttentionDownsampler(nn.Module):
    """FeatUp's learned downsampler: ``(B, C, H, W)`` -> ``(B, C, H / k, W / k)``."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.salience = nn.Sequential(nn.Dropout(0.2), nn.Linear(dim, 1))
        self.w = nn.Parameter(torch.ones(kernel * kernel) + 0.01 * torch.randn(kernel * kernel))
        self.b = nn.Parameter(0.01 * torch.randn(kernel * kernel))

    def forward(self, hr: torch.Tensor) -> torch.Tensor:
        B, C, H, W = hr.shape
        k = self.kernel
        blurred = F.avg_pool2d(hr, 5, stride=1, padding=2, count_include_pad=False)
        logits = self.salience(blurred.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, 1, H, W)
        h, w = H // k, W // k
        patches = F.unfold(blurred, k, stride=k).view(B, C, k * k, h, w)
        attn = F.unfold(logits, k, stride=k).view(B, 1, k * k, h, w)
        attn = torch.softmax(attn * self.w.view(1, 1, -1, 1, 1) + self.b.view(1, 1, -1, 1, 1), dim=2)
        return (patches * attn).sum(2)


def refine_with_masks(feats: torch.Tensor, masks: torch.Tensor, alpha: float) -> torch.Tensor:
    """Each mask in order, in place: ``F[m] = (1 - alpha) F[m] + alpha mean(F[m])``.

    Args:
        feats: ``(B, C, H, W)``; masks: ``(B, M, H, W)`` (1 in the mask, 0 out, -1 padding).
    """
    out = feats.clone()
    for b in range(out.shape[0]):
        flat = out[b].flatten(1)  # (C, HW), a view
        for m in masks[b]:
            idx = (m.flatten() == 1).nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            part = flat[:, idx]
            flat[:, idx] = (1 - alpha) * part + alpha * part.mean(1, keepdim=True)
    return out


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """FeatUp's TV: summed squared neighbour differences over ``B * C * H * W``."""
    dy = (x[:, :, 1:] - x[:, :, :-1]).square().sum()
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).square().sum()
    return (dy + dx) / x.numel()


def random_projection(batch: int, dim: int, k: int, device: torch.device) -> torch.Tensor:
    """``(B, C, k)`` random unit directions (one set per image)."""
    proj = torch.randn(batch, dim, k, device=device)
    return proj / proj.norm(dim=1, keepdim=True)


def project(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bchw,bck->bkhw", x, proj)


@dataclass
class Jitter:
    pad: int
    zoom: float
    y: int
    x: int


def sample_jitter(h: int, w: int, max_pad: int, max_zoom: float) -> Jitter:
    """FeatUp's ``sample_transform`` without flips (LoftUp's rotation is a no-op), from the torch RNG."""
    zoom = float(torch.rand(())) * (max_zoom - 1) + 1 if float(torch.rand(())) > 0.5 else 1.0
    valid_h = int((h + 2 * max_pad) * zoom) - h + 1
    valid_w = int((w + 2 * max_pad) * zoom) - w + 1
    return Jitter(max_pad, zoom, int(torch.randint(0, valid_h, ())), int(torch.randint(0, valid_w, ())))


def apply_jitter(x: torch.Tensor, j: Jitter) -> torch.Tensor:
    h, w = x.shape[-2:]
    out = F.pad(x, [j.pad] * 4, mode="reflect") if j.pad else x
    if j.zoom > 1.0:
        out = F.interpolate(out, scale_factor=j.zoom, mode="bilinear")
    return out[:, :, j.y : j.y + h, j.x : j.x + w]


def affinity_loss(student: torch.Tensor, teacher: torch.Tensor, border: float, pixels: int) -> torch.Tensor:
    """MSE between the cosine-similarity Gram matrices of two ``(B, C, h, w)`` maps over their central
    ``1 - 2 * border`` region, on at most ``pixels`` pixels (a random subset shared by both maps)."""
    h, w = student.shape[-2:]
    by, bx = int(h * border), int(w * border)
    s = student[:, :, by : h - by, bx : w - bx].flatten(2)
    t = teacher[:, :, by : h - by, bx : w - bx].flatten(2)
    n = s.shape[-1]
    if n > pixels:
        idx = torch.randperm(n, device=s.device)[:pixels]
        s, t = s[:, :, idx], t[:, :, idx]
    s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
    return (s.transpose(1, 2) @ s - t.transpose(1, 2) @ t).square().mean()


# -- the model the run trains and saves -------------------------------------------------------------
class LoftUpTrainModel(nn.Module):
    """Everything a LoftUp run saves and resumes: the backbone (frozen), LoftUp (``net``), the
    downsampler, and in stage 2 the uncertainty net and the EMA teacher."""

    def __init__(self, backbone: Backbone, stage: int) -> None:
        super().__init__()
        dim = backbone.embed_dim
        self.backbone = backbone
        self.net = LoftUpNet(dim, LoftUpConfig(minmax="batch"))  # the reference's scaling in training
        self.downsampler = AttentionDownsampler(dim, backbone.patch_size)
        if stage == 2:
            self.scale_net = nn.Conv2d(dim, 1, 1)
            self.teacher = copy.deepcopy(self.net)
            for p in self.teacher.parameters():
                p.requires_grad_(False)


def _tokens(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """Last-layer tokens ``(B, C, h, w)`` of ``(B, 3, S, S)`` images in ``[0, 1]`` (frozen, no grad)."""
    with torch.no_grad():
        return backbone.hidden_states(backbone.normalize(images), [backbone.depth])[0].float()


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class _Student(nn.Module):
    """The trainable forward (what DDP wraps): LoftUp, the downsampler and (stage 2) the scale net."""

    def __init__(self, model: LoftUpTrainModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self.model.net(tokens, self.model.backbone.normalize(images))


class _MaskSamples(PositionDataset):
    """Image + masks at one size per position (the randomness of LoftUp's steps is in the loss)."""

    def __init__(self, masked: MaskedImages, seed: int, stream: int) -> None:
        super().__init__(masked.images, seed, stream)
        self.masked = masked

    def __getitem__(self, position: int) -> dict[str, Any]:
        failed: list[tuple[str, str]] = []
        n = len(self.files)
        for attempt in range(n):
            index = self.image_index(position + attempt)
            try:
                image, masks = self.masked.item(index)
            except VitupError as exc:
                failed.append((str(self.files[index]), str(exc)))
                continue
            return {"image": image, "masks": masks, "failed": failed, "position": position}
        raise VitupError(f"none of the {n} images could be read (first: {failed[0][0]}: {failed[0][1]})")


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images; pad masks to the batch's largest count with -1."""
    count = max(1, max(s["masks"].shape[0] for s in samples))
    size = samples[0]["masks"].shape[-2:]
    masks = torch.full((len(samples), count, *size), -1, dtype=torch.int8)
    for i, s in enumerate(samples):
        masks[i, : s["masks"].shape[0]] = s["masks"].to(torch.int8)
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "masks": masks,
        "position": torch.tensor([s["position"] for s in samples]),
        "failed": [f for s in samples for f in s["failed"]],
    }


class LoftUpMethod(TrainMethod):
    """``--method loftup --stage 1|2`` (see the module docstring)."""

    name = "loftup"
    config_class = LoftUpTrainConfig
    model: LoftUpTrainModel

    # -- building ---------------------------------------------------------------------------------
    def build(self) -> None:
        cfg: LoftUpTrainConfig = self.cfg  # type: ignore[assignment]
        checks = [
            (cfg.stage in (1, 2), f"--stage {cfg.stage}: use 1 (mask pseudo ground truth) or 2 (self-distillation)"),
            (cfg.stage == 1 or cfg.init, "--stage 2 needs --init: the stage-1 checkpoint (e.g. runs/s1/last)"),
            (0 <= cfg.mask_alpha <= 1 and 0 <= cfg.hr_alpha <= 1, "--mask-alpha / --hr-alpha must be in [0, 1]"),
            (cfg.jitters >= 0 and cfg.crops >= 1, "--jitters must be >= 0 and --crops >= 1"),
            (cfg.proj_dim >= 1 and cfg.affinity_pixels >= 2, "--proj-dim >= 1 and --affinity-pixels >= 2"),
            (0 <= cfg.affinity_border < 0.5, "--affinity-border must be in [0, 0.5)"),
            (0 < cfg.ema_beta < 1 and cfg.ema_every >= 1, "--ema-beta in (0, 1) and --ema-every >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise VitupError(message)
        check_common(cfg, self.world_size)
        cfg = self.cfg = replace(cfg, val_every=cfg.val_every or cfg.save_every)
        torch.manual_seed(cfg.seed)
        backbone = load_backbone(
            cfg.backbone, weights=cfg.weights, pretrained=cfg.pretrained, overrides=cfg.backbone_args
        )
        patch = backbone.patch_size
        sizes = [cfg.image_size] if cfg.stage == 1 else [*cfg.input_sizes, cfg.hr_size]
        bad = [s for s in sizes if s <= 0 or s % patch]
        if bad:
            raise VitupError(f"sizes {bad}: each must be a positive multiple of the patch size {patch}")
        if cfg.stage == 2 and max(cfg.input_sizes) > cfg.hr_size:
            raise VitupError(f"--input-sizes {cfg.input_sizes}: none may exceed --hr-size {cfg.hr_size}")
        self.backbone = backbone
        self.model = LoftUpTrainModel(backbone, cfg.stage)
        if cfg.stage == 2:
            state = read_run_checkpoint(cfg.init, backbone)
            self.model.net.load_state_dict(state)
            self.model.teacher.load_state_dict(state)
            self.init_sha256 = hashlib.sha256(json.dumps(sorted(state)).encode()).hexdigest()

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [
            (n, p)
            for n, p in self.model.named_parameters()
            if p.requires_grad and not n.startswith(("backbone.", "teacher."))
        ]

    def optimizer(self, params: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        cfg = self.cfg
        tensors = [p for _, p in params]
        if cfg.stage == 1:
            return torch.optim.NAdam(tensors, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(tensors, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)

    def grad_clip_at(self, step: int) -> float:
        if self.cfg.stage == 1 and step < self.cfg.clip_steps:
            return self.cfg.clip_first
        return self.cfg.grad_clip

    def set_train_mode(self) -> None:
        self.model.train()
        self.model.backbone.model.eval()
        if self.cfg.stage == 2:
            self.model.teacher.eval()

    def student(self) -> nn.Module:
        return _Student(self.model)

    # -- EMA teacher (stage 2) ------------------------------------------------------------------
    def ema_decay(self, step: int) -> float:
        """ema-pytorch's decay at update ``step`` (``update_after_step = 0``, inv_gamma 1, power 2/3)."""
        epoch = step - 1
        if epoch <= 0:
            return 0.0
        return min(self.cfg.ema_beta, max(0.0, 1 - (1 + epoch) ** (-2 / 3)))

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if self.cfg.stage != 2 or step % self.cfg.ema_every:
            return
        decay = self.ema_decay(step)
        student = dict(self.model.net.state_dict())
        for name, t in self.model.teacher.state_dict().items():
            src = student[name]
            if t.is_floating_point() and step > 0:
                t.lerp_(src.to(t.dtype), 1 - decay)
            else:
                t.copy_(src)

    # -- data and loss ------------------------------------------------------------------------------
    def dataset(self, files: Sequence[Path], stream: int) -> PositionDataset:
        cfg = self.cfg
        root = cfg.data if stream == TRAIN_STREAM else cfg.val_data
        size = cfg.image_size if cfg.stage == 1 else cfg.hr_size
        masked = open_masked_images(root, cfg.layout, size=size, max_masks=cfg.max_masks)
        return _MaskSamples(masked, cfg.seed, stream)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return _collate(samples)

    def term_keys(self) -> list[str]:
        if self.cfg.stage == 1:
            return ["loss", "mask", "multiview", "tv"]
        return ["loss", "affinity", "multiview", "tv"]

    def _multiview(self, hr: torch.Tensor, images: torch.Tensor, proj: torch.Tensor, uncertainty: bool) -> torch.Tensor:
        cfg, model = self.cfg, self.model
        if cfg.jitters == 0:
            return hr.new_zeros(())
        total = hr.new_zeros(())
        H, W = images.shape[-2:]
        for _ in range(cfg.jitters):
            j = sample_jitter(H, W, cfg.max_pad, cfg.max_zoom)
            target = model.net.channelnorm(_tokens(self.backbone, apply_jitter(images, j)))
            down = model.downsampler(apply_jitter(hr, j))
            err = (project(down, proj) - project(target, proj)).square().mean(1)  # (B, h, w)
            if uncertainty:
                scale = torch.exp(model.scale_net(target) + 0.1).squeeze(1)
                err = (err / (2 * scale**2) + scale.log()).clamp_min(0)
            total = total + err.mean()
        return total / cfg.jitters

    def loss(
        self, student: nn.Module, batch: dict[str, Any], device: torch.device, autocast: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["image"].to(device, non_blocking=True).float()
        masks = batch["masks"].to(device, non_blocking=True)
        if self.cfg.stage == 1:
            return self._stage1(student, images, masks, autocast)
        return self._stage2(student, images, masks, autocast)

    def _stage1(self, student, images, masks, autocast):
        cfg, model = self.cfg, self.model
        tokens = _tokens(self.backbone, images)
        proj = random_projection(images.shape[0], self.backbone.embed_dim, cfg.proj_dim, images.device)
        with torch.no_grad():
            lr = model.net.channelnorm(tokens)
            pseudo = F.interpolate(lr, size=images.shape[-2:], mode="bicubic", align_corners=False)
            pseudo = refine_with_masks(pseudo, masks, cfg.mask_alpha)
        with autocast:
            hr = student(tokens, images).float()
            mask_term = (project(hr, proj) - project(pseudo, proj)).square().mean()
            multiview = self._multiview(hr, images, proj, uncertainty=False)
            tv = total_variation(hr)
        total = multiview + cfg.mask_weight * mask_term + cfg.tv_weight * tv
        terms = {"loss": total, "mask": mask_term, "multiview": multiview, "tv": tv}
        return total, {k: v.detach() for k, v in terms.items()}

    def _stage2(self, student, hr_images, hr_masks, autocast):
        cfg, model = self.cfg, self.model
        B, _, S, _ = hr_images.shape
        size = cfg.input_sizes[int(torch.randint(0, len(cfg.input_sizes), ()))]
        images = _resize(hr_images, size)
        tokens = _tokens(self.backbone, images)
        proj = random_projection(B, self.backbone.embed_dim, cfg.proj_dim, images.device)
        grid = 16
        affinity = images.new_zeros(())
        with autocast:
            out = student(tokens, images).float()  # (B, C, size, size)
            for _ in range(cfg.crops):
                y0 = grid * int(torch.randint(0, (S - size) // grid + 1, ()))
                x0 = grid * int(torch.randint(0, (S - size) // grid + 1, ()))
                crop = hr_images[:, :, y0 : y0 + size, x0 : x0 + size]
                with torch.no_grad():
                    teacher = model.teacher(_tokens(self.backbone, crop), self.backbone.normalize(crop)).float()
                    teacher = refine_with_masks(teacher, hr_masks[:, :, y0 : y0 + size, x0 : x0 + size], cfg.hr_alpha)
                r = size / S
                sy, sx = round(y0 * r), round(x0 * r)
                side = max(2, round(size * r))
                region = out[:, :, sy : sy + side, sx : sx + side]
                side_h, side_w = region.shape[-2:]
                target = F.interpolate(teacher, size=(side_h, side_w), mode="bilinear", align_corners=False)
                affinity = affinity + affinity_loss(region, target, cfg.affinity_border, cfg.affinity_pixels)
            affinity = affinity / cfg.crops
            multiview = self._multiview(out, images, proj, uncertainty=True)
            tv = total_variation(out)
        total = cfg.hr_weight * affinity + multiview + cfg.tv_weight * tv
        terms = {"loss": total, "affinity": affinity, "multiview": multiview, "tv": tv}
        return total, {k: v.detach() for k, v in terms.items()}

    # -- saving -----------------------------------------------------------------------------------
    def keep_in_state(self, name: str) -> bool:
        return self.backbone.random_init or not name.startswith("backbone.")

    def save_checkpoint(self, path: Path, extra: dict[str, Any]) -> None:
        save_run_checkpoint(path, self.model.net, self.backbone, {"stage": self.cfg.stage, **extra})

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        cfg = self.cfg
        out["loftup"] = {
            "stage": cfg.stage,
            "parameters": sum(p.numel() for p in self.model.net.parameters()),
            "init": cfg.init,
            "paper_values": {"lr": 1e-3 if cfg.stage == 1 else 1e-4, "stage2_input_sizes": [224, 336]},
        }
        return out

    def notes(self) -> list[str]:
        notes = super().notes()
        cfg = self.cfg
        if cfg.stage == 2:
            notes.append(
                f"stage 2: affinity loss on at most {cfg.affinity_pixels} pixels per region (bounded Gram matrix; "
                "the released code uses all of them)"
            )
        return notes
