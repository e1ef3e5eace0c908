"""UPLiFT training (the paper's recipe, ``uplift/train_uplift.py`` of the reference): what it trains on
and against.

Data: each image squashed to ``image_size`` (448; ``fit = "crop"``: short side resized, centre crop),
no augmentation. Pyramid: the normalised image bilinearly resized (antialiased) to ``image_size / 2^k``
for ``k = 0 .. max(depths)`` (448/224/112/56), and the frozen backbone's last hidden state (final norm)
of each: the targets. Per step and per depth ``d`` in ``depths`` ({1, 2, 3}; {1, 2} for DINOv3): the
input is the features of the ``image_size / 2^d`` image and that same image for the encoder; UPLiFT
runs ``d`` iterations and every intermediate output (``image_size / 2^(d - j)`` after step ``j``) is
compared with the backbone features of the image at that scale: 1 + 2 + 3 = 6 ``MSE`` terms, summed.
Optimiser: Adam (AdamW with weight decay 0), lr 1e-3, no schedule, batch 32, one ImageNet-1K epoch.

BatchNorm uses the statistics of each forward batch (the per-process micro-batch); under DDP on CUDA
the BatchNorms are synchronised (``sync_bn``), so the statistics are those of the whole per-step batch
(without accumulation). On CPU (gloo) each process normalises with its own micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vitup_cli.backbones import Backbone, load_backbone
from vitup_cli.errors import VitupError
from vitup_cli.hub.uplift import save_uplift_checkpoint
from vitup_cli.models.uplift import UPLiFT, UPLiFTNet
from vitup_cli.train.config import CommonConfig
from vitup_cli.train.data import PositionDataset
from vitup_cli.train.methods.base import TrainMethod

FITS = ("squash", "crop")


@dataclass
class UpliftTrainConfig(CommonConfig):
    """Every setting of ``vitup train --method uplift``; defaults are the paper's (ImageNet-1K)."""

    title: ClassVar[str] = "UPLiFT"

    method: str = "uplift"
    steps: int = 40037  # one ImageNet-1K epoch (1,281,167 images) at batch 32
    batch_size: int = 32
    lr: float = 1e-3
    schedule: str = "constant"
    warmup: float = 0.0
    grad_clip: float = 0.0  # the reference clips nothing
    image_size: int = field(default=448, metadata={"help": "Top of the image pyramid, px (448: 448/224/112/56)."})
    fit: str = field(
        default="squash",  # squash: resize to image_size x image_size (ImageNet); crop: short side + centre crop
        metadata={"help": "squash (resize to a square, the ImageNet recipe) or crop (centre)."},
    )
    depths: list[int] | None = field(
        default=None,  # None: [1, 2, 3], or [1, 2] for DINOv3 backbones
        metadata={"help": "Iteration depths trained every step (default 1,2,3; DINOv3 1,2)."},
    )
    sync_bn: bool = field(
        default=True,  # under DDP on CUDA
        metadata={"help": "Synchronise BatchNorm across GPUs under DDP."},
    )


def default_depths(backbone: Backbone) -> list[int]:
    """{1, 2, 3} (the DINOv2 config), {1, 2} for DINOv3 (its published config)."""
    return [1, 2] if "dinov3" in backbone.timm_name else [1, 2, 3]


class UpliftDataset(PositionDataset):
    """``image``: ``(3, S, S)`` uint8, the image squashed (or short-side resized and centre-cropped) to
    ``S``. No randomness besides the shuffled order."""

    def __init__(self, files: Sequence[Path], size: int, fit: str, seed: int, stream: int) -> None:
        super().__init__(files, seed, stream)
        self.size, self.fit = size, fit

    def make(self, img: Image.Image, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        s = self.size
        if self.fit == "squash":
            img = img.resize((s, s), Image.Resampling.BILINEAR)
        else:
            w, h = img.size
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            img = img.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - s) // 2, (nh - s) // 2
            img = img.crop((left, top, left + s, top + s))
        array = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
        return {"image": torch.from_numpy(array)}


class _Student(nn.Module):
    """Every depth in one forward (DDP allows one forward per backward): per depth ``d``, the image at
    ``S / 2^d`` and its features -> the outputs of the ``d`` iterations."""

    def __init__(self, net: UPLiFTNet) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, images: list[torch.Tensor], feats: list[torch.Tensor], depths: list[int]
    ) -> list[list[torch.Tensor]]:
        return [self.net(image, x, iterations=d) for image, x, d in zip(images, feats, depths, strict=True)]


def pyramid(image: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Normalised ``(B, 3, S, S)`` -> ``[S, S/2, ..., S/2^levels]`` images, each resized from ``S``
    (bilinear, antialiased, as torchvision's ``resize``)."""
    S = image.shape[-1]
    out = [image]
    for k in range(1, levels + 1):
        size = S // 2**k
        out.append(F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    return out


def uplift_loss(
    outputs: Sequence[Sequence[torch.Tensor]], targets: Sequence[torch.Tensor], depths: Sequence[int]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed MSE of every intermediate output against the target of the same scale.

    Args:
        outputs: per depth ``d``, the ``d`` outputs (step ``j`` at the scale of pyramid level ``d - j``).
        targets: per pyramid level ``k`` (``S / 2^k``), the backbone features ``(B, C, h_k, w_k)``.
    Returns:
        the total and detached terms: ``loss``, ``depth{d}`` and ``mse_d{d}_s{j}``.
    """
    total = targets[0].new_zeros((), dtype=torch.float32)
    terms: dict[str, torch.Tensor] = {}
    for d, outs in zip(depths, outputs, strict=True):
        per_depth = total.new_zeros(())
        for j, out in enumerate(outs, start=1):
            target = targets[d - j]
            if out.shape != target.shape:
                raise ValueError(f"depth {d} step {j}: output {tuple(out.shape)} vs target {tuple(target.shape)}")
            mse = F.mse_loss(out.float(), target.float())
            terms[f"mse_d{d}_s{j}"] = mse.detach()
            per_depth = per_depth + mse
        terms[f"depth{d}"] = per_depth.detach()
        total = total + per_depth
    terms["loss"] = total.detach()
    return total, terms


class UpliftMethod(TrainMethod):
    """``--method uplift``: UPLiFT trained against the frozen backbone's own features at larger scales."""

    name = "uplift"
    config_class = UpliftTrainConfig
    checked_terms = ("loss",)
    model: UPLiFT

    def build(self) -> None:
        cfg = self.cfg
        checks = [
            (cfg.fit in FITS, f"--fit {cfg.fit}: use one of {', '.join(FITS)}"),
            (cfg.image_size > 0, "--image-size must be positive"),
            (cfg.depths is None or (len(cfg.depths) > 0 and min(cfg.depths) >= 1), "--depths: integers >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise VitupError(message)
        torch.manual_seed(cfg.seed)
        backbone = load_backbone(
            cfg.backbone, weights=cfg.weights, pretrained=cfg.pretrained, overrides=cfg.backbone_args
        )
        depths = sorted(set(cfg.depths or default_depths(backbone)))
        patch = backbone.patch_size
        bad = [
            cfg.image_size // 2**k
            for k in range(max(depths) + 1)
            if (cfg.image_size // 2**k) % patch or cfg.image_size % 2**k
        ]
        if bad:
            raise VitupError(
                f"--image-size {cfg.image_size} with --depths up to {max(depths)}: the pyramid needs images of "
                f"{bad} px, which are not multiples of the patch size {patch}; choose an image size divisible by "
                f"{patch * 2 ** max(depths)}"
            )
        self.cfg = replace(cfg, depths=depths, val_every=cfg.val_every or cfg.save_every)
        self.backbone = backbone
        self.model = UPLiFT(backbone, cfg.image_size)
        for p in backbone.model.parameters():
            p.requires_grad_(False)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"net.{n}", p) for n, p in self.model.net.named_parameters()]

    def set_train_mode(self) -> None:
        self.model.net.train()
        self.backbone.model.eval()

    def student(self) -> nn.Module:
        student = _Student(self.model.net)
        if self.world_size > 1 and self.cfg.sync_bn and next(self.model.net.parameters()).is_cuda:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)  # same parameters and buffers
            self.model.net = student.net
        return student

    def dataset(self, files: Sequence[Path], stream: int) -> UpliftDataset:
        return UpliftDataset(files, self.cfg.image_size, self.cfg.fit, self.cfg.seed, stream)

    def targets(self, images: list[torch.Tensor], autocast: Any) -> list[torch.Tensor]:
        """The frozen backbone's last hidden state (final norm) of every pyramid image, float32."""
        with torch.no_grad(), autocast:
            return [self.backbone.hidden_states(x, [self.backbone.depth])[0].float() for x in images]

    def loss(
        self, student: nn.Module, batch: dict[str, Any], device: torch.device, autocast: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        depths = self.cfg.depths
        image = self.backbone.normalize(batch["image"].to(device, non_blocking=True).float().div_(255))
        images = pyramid(image, max(depths))
        targets = self.targets(images, autocast)
        with autocast:
            outputs = student([images[d] for d in depths], [targets[d] for d in depths], depths)
        return uplift_loss(outputs, targets, depths)

    def term_keys(self) -> list[str]:
        depths = self.cfg.depths
        return ["loss", *(f"depth{d}" for d in depths), *(f"mse_d{d}_s{j}" for d in depths for j in range(1, d + 1))]

    def keep_in_state(self, name: str) -> bool:
        return not name.startswith("backbone.") or self.backbone.random_init

    def save_checkpoint(self, path: Path, extra: dict[str, Any]) -> None:
        save_uplift_checkpoint(path, self.model, extra)
