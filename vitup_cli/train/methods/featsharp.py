"""FeatSharp training (``vitup train --method featsharp``): FeatUp's multi-view consistency in PHI-S space.

Written from the FeatSharp paper (section 3, appendix C, table 11) and vitup's research notes; the
reference code is non-commercial and none of it is used.

Per sample (``make_views``): a square "student" crop of the image (shared zoom ``U(1, zoom_max)``) at
``u * r`` px, and ``jitters`` views of about the same region at ``r`` px, each with its own zoom
``U(jz, 1/jz)``, rotation ``+-rotation`` degrees, shift (the crop) and perspective (each corner moved by
``U(p_min, p_max)`` of the side), with the homography that maps the view's normalised coordinates to the
student's. Per micro-batch (``MultiViewObjective``):

- ``Z = FeatSharp(student)`` in PHI-S space ``(B, C, u h, u h)``; per view ``i``: warp ``Z`` into the view's
  frame (``grid_sample`` through the homography), downsample it with the learned attention downsampler
  to ``h x h`` (``X_i``) and compare with the view's own backbone features ``Y_i`` (PHI-S normalised, plus
  the same de-bias buffer, so the buffer learns to cancel fixed-position artefacts);
- loss = per-position MSE over channels, times the valid mask (positions whose content lies outside the
  image or the student crop are excluded), times the tile-seam weighting (the 2-token lines on tile
  borders weigh ``seam_weight``, renormalised to mean 1), times ``exp(-s)`` of the predicted uncertainty
  ``s`` (a small conv net on ``Z``), summed over the views and divided by ``views x valid positions``, plus
  ``mean(s) / 2``;
- fidelity (paper eq. 7) = ``MSE(Y, mu_Y) / MSE(X, Y)`` in the backbone's raw space, with ``MSE(Y, mu_Y)``
  the dataset's mean per-channel variance from the PHI-S statistics (``1 / alpha^2``).

Optimiser: NAdam, linear warm-up then cosine (the shared schedule), the paper's lr 1e-4 for 9,000 steps
at batch 32 (the "long" recipe); the uncertainty net at 0.1 x lr. PHI-S statistics are fitted once at the
start of a run on up to ``phis_images`` training images (the student crops' global views) and saved in
the run state and every checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vitup_cli.backbones import load_backbone
from vitup_cli.errors import VitupError
from vitup_cli.hub import save_checkpoint
from vitup_cli.models.featsharp import FACTORS, FeatSharp, FeatSharpConfig, MomentAccumulator
from vitup_cli.train.config import CommonConfig
from vitup_cli.train.data import PositionDataset, make_loader
from vitup_cli.train.methods.base import TrainMethod

PHIS_STREAM = 7  # the sample stream of the PHI-S statistics pass (apart from training and held-out samples)


@dataclass
class FeatSharpTrainConfig(CommonConfig):
    """Every hyperparameter of ``vitup train --method featsharp``; defaults are the paper's (table 11,
    "long" recipe) except where the README's FeatSharp section says otherwise."""

    title: ClassVar[str] = "FeatSharp"

    method: str = "featsharp"
    # model
    factor: int = field(default=2, metadata={"help": "Upsample factor u, 2 or 4: 1 + u^2 backbone passes per image."})
    input_tokens: int = field(
        default=28, metadata={"help": "Tokens per side of the global view (28: 448 px at patch 16)."}
    )
    window: int = field(default=7, metadata={"help": "Local attention window (7)."})
    debias: bool = field(
        default=True, metadata={"help": "Learn a de-bias buffer that cancels fixed-position artefacts of the tokens."}
    )
    # views
    jitters: int = field(default=5, metadata={"help": "Jittered views per image, with known homographies (5)."})
    zoom_max: float = field(default=2.0, metadata={"help": "Shared zoom of the student crop ~ U(1, zoom-max)."})
    jitter_zoom: float = field(
        default=0.95, metadata={"help": "Per-view zoom ~ U(jitter-zoom, 1 / jitter-zoom), in (0, 1]."}
    )
    rotation: float = field(default=5.0, metadata={"help": "Per-view rotation, +- this many degrees."})
    shift: float = field(default=0.1, metadata={"help": "Per-view shift, +- this fraction of the crop's side."})
    perspective_min: float = field(
        default=0.01, metadata={"help": "Per-view perspective: each corner moves at least this fraction of the side."}
    )
    perspective_max: float = field(
        default=0.05, metadata={"help": "Per-view perspective: each corner moves at most this fraction of the side."}
    )
    flip_prob: float = field(default=0.0, metadata={"help": "Probability of a horizontally flipped view."})
    # objective
    downsampler_kernel: int = field(default=7, metadata={"help": "Attention downsampler kernel (paper: 7)."})
    downsampler_dropout: float = field(
        default=0.2, metadata={"help": "Attention downsampler logit dropout while training."}
    )
    seam_weight: float = field(
        default=2.0, metadata={"help": "Loss weight of the 2-token lines on tile borders (renormalised to mean 1)."}
    )
    uncertainty: bool = field(default=True, metadata={"help": "Weigh the loss by a learned per-position uncertainty."})
    uncertainty_lr_scale: float = field(
        default=0.1, metadata={"help": "Learning rate of the uncertainty net, times --lr."}
    )
    phis_images: int = field(
        default=100_000, metadata={"help": "Images whose features fit the PHI-S statistics (at most all)."}
    )
    # the shared settings with FeatSharp's values
    steps: int = 9000
    batch_size: int = 32
    lr: float = 1e-4
    warmup: float = 100 / 9000  # 100 steps
    min_lr: float = 0.0
    grad_clip: float = 5.0
    precision: str = "fp32"


# =================================================================================================
# views and homographies
# =================================================================================================
def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 projective map taking 4 points ``src`` ``(4, 2)`` to ``dst`` ``(4, 2)`` (float64)."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for k, ((x, y), (u, v)) in enumerate(zip(src, dst, strict=True)):
        a[2 * k] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * k + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * k], b[2 * k + 1] = u, v
    return np.append(np.linalg.solve(a, b), 1.0).reshape(3, 3)


def apply_homography(h: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """``(..., 3, 3)`` maps applied to points ``(..., N, 2)`` -> ``(..., N, 2)``."""
    ones = torch.ones_like(pts[..., :1])
    q = torch.cat([pts, ones], -1) @ h.transpose(-1, -2)
    return q[..., :2] / q[..., 2:]


def cell_centres(n: int, dtype: torch.dtype = torch.float64, device: Any = None) -> torch.Tensor:
    """Normalised pixel-centre coordinates of an ``n x n`` grid (``align_corners=False``): ``(n * n, 2)``."""
    t = (torch.arange(n, dtype=dtype, device=device) * 2 + 1) / n - 1
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)


_CORNERS = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])


@dataclass(frozen=True)
class ViewSpec:
    """Geometry and randomness of the multi-view samples (pixels unless said otherwise)."""

    student: int  # u * r
    view: int  # r
    grid: int  # h, tokens per side of a view
    jitters: int = 5
    zoom_max: float = 2.0
    jitter_zoom: float = 0.95
    rotation: float = 5.0
    shift: float = 0.1
    perspective: tuple[float, float] = (0.01, 0.05)
    flip_prob: float = 0.0
    seed: int = 0


def _warp(src: torch.Tensor, h: np.ndarray, size: int) -> torch.Tensor:
    """Render a ``size x size`` view: ``h`` maps its normalised coordinates to ``src`` pixels (edges)."""
    H, W = src.shape[-2:]
    p = apply_homography(torch.from_numpy(h), cell_centres(size))
    grid = torch.stack([2 * p[:, 0] / W - 1, 2 * p[:, 1] / H - 1], -1).reshape(1, size, size, 2).float()
    return F.grid_sample(src[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def make_views(img: Image.Image, spec: ViewSpec, rng: np.random.Generator, student_only: bool = False) -> dict:
    """One multi-view sample (see the module docstring):

    ``student`` ``(3, u r, u r)`` uint8; ``views`` ``(J, 3, r, r)`` uint8; ``transforms`` ``(J, 3, 3)``
    float32 (view normalised -> student normalised coordinates); ``valid`` ``(J, h, h)`` float32 (1 where a
    view token's centre lies inside the image and inside the student crop).
    """
    W, H = img.size
    short = min(W, H)
    side = short / rng.uniform(1.0, spec.zoom_max)
    x0, y0 = rng.uniform(0, W - side), rng.uniform(0, H - side)
    f = spec.student / side  # the student crop at its rendering resolution
    sw, sh = max(1, round(W * f)), max(1, round(H * f))
    src_img = img.resize((sw, sh), Image.Resampling.BICUBIC) if (sw, sh) != (W, H) else img
    src = torch.from_numpy(np.asarray(src_img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    fx, fy = sw / W, sh / H
    s_side = side * f
    centre = np.array([(x0 + side / 2) * fx, (y0 + side / 2) * fy])
    h_student = homography(_CORNERS, centre + _CORNERS * s_side / 2)
    out: dict[str, torch.Tensor] = {"student": _to_uint8(_warp(src, h_student, spec.student))}
    if student_only:
        return out
    inv_student = np.linalg.inv(h_student)
    tokens = cell_centres(spec.grid)
    views, transforms, valid = [], [], []
    for _ in range(spec.jitters):
        zoom = rng.uniform(spec.jitter_zoom, 1 / spec.jitter_zoom)
        theta = math.radians(rng.uniform(-spec.rotation, spec.rotation))
        shift = rng.uniform(-spec.shift, spec.shift, size=2) * s_side
        flip = rng.random() < spec.flip_prob
        corners = _CORNERS * (s_side / (2 * zoom))
        if flip:
            corners = corners * np.array([-1.0, 1.0])
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        corners = corners @ rot.T + centre + shift
        angles = rng.uniform(0, 2 * math.pi, size=4)
        amount = rng.uniform(*spec.perspective, size=4) * s_side
        corners = corners + np.stack([np.cos(angles), np.sin(angles)], -1) * amount[:, None]
        h_view = homography(_CORNERS, corners)
        view = _warp(src, h_view, min(spec.student, 2 * spec.view))  # then area-averaged to the view size
        view = F.interpolate(view[None], size=(spec.view, spec.view), mode="bilinear", antialias=True)[0]
        to_student = inv_student @ h_view
        in_src = apply_homography(torch.from_numpy(h_view), tokens)
        in_student = apply_homography(torch.from_numpy(to_student), tokens)
        ok = (in_src[:, 0] >= 0) & (in_src[:, 0] <= sw) & (in_src[:, 1] >= 0) & (in_src[:, 1] <= sh)
        ok &= (in_student.abs() <= 1).all(-1)
        views.append(_to_uint8(view))
        transforms.append(torch.from_numpy(to_student).float())
        valid.append(ok.float().reshape(spec.grid, spec.grid))
    out.update(views=torch.stack(views), transforms=torch.stack(transforms), valid=torch.stack(valid))
    return out


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class MultiViewDataset(PositionDataset):
    """FeatSharp's student + jittered views per position (``make_views``)."""

    def __init__(self, files: Sequence[Path], spec: ViewSpec, stream: int, student_only: bool = False) -> None:
        super().__init__(files, spec.seed, stream)
        self.spec = spec
        self.student_only = student_only

    def make(self, img: Image.Image, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return make_views(img, self.spec, rng, self.student_only)


# =================================================================================================
# the objective's modules
# =================================================================================================
class AttentionDownsampler(nn.Module):
    """FeatUp's attention downsampler: a 5x5 Gaussian blur, then each output token is a softmax-weighted
    mean of the ``k x k`` inputs around it, the weights predicted from those inputs by a dense conv
    (logit dropout while training). ``(N, C, u h, u h)`` -> ``(N, C, h, h)``."""

    def __init__(self, dim: int, kernel: int = 7, factor: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.kernel, self.factor, self.dropout = kernel, factor, dropout
        k2 = kernel * kernel
        self.attn_kernel = nn.Parameter(torch.randn(k2, dim, kernel, kernel) * 0.01 + 1)
        self.kernel_bias = nn.Parameter(torch.randn(k2) * 0.01)
        self.logit_bias = nn.Parameter(torch.randn(1, k2, 1, 1) * 0.1)
        t = torch.arange(-2, 3, dtype=torch.float32)
        g = torch.exp(-math.sqrt(2) * t**2)
        blur = g[:, None] * g[None]
        self.register_buffer("blur", (blur / blur.sum()).reshape(1, 1, 5, 5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C = x.shape[:2]
        x = F.conv2d(x, self.blur.to(x.dtype).expand(C, 1, 5, 5), padding=2, groups=C)
        k, s, pad = self.kernel, self.factor, self.kernel // 2
        logits = F.conv2d(x, self.attn_kernel, self.kernel_bias, stride=s, padding=pad)  # (N, k^2, h, w)
        if self.training and self.dropout > 0:
            logits = logits * (torch.rand_like(logits) > self.dropout)
        attn = torch.softmax(logits + self.logit_bias, dim=1)
        h, w = attn.shape[-2:]
        padded = F.pad(x, [pad] * 4)
        out = torch.zeros(N, C, h, w, dtype=x.dtype, device=x.device)
        for n in range(k * k):  # the weighted sum, one kernel offset at a time (no k^2-fold unfold)
            i, j = divmod(n, k)
            out = out + padded[:, :, i : i + s * (h - 1) + 1 : s, j : j + s * (w - 1) + 1 : s] * attn[:, n : n + 1]
        return out


class UncertaintyNet(nn.Module):
    """Per-position log-uncertainty ``s`` of the upsampled features: Conv5x5 (C -> 256) -> GELU -> Conv1x1
    (256 -> 1, zero-initialised, so ``s = 0`` at the start)."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, hidden, 5, padding=2, padding_mode="reflect"), nn.GELU(), nn.Conv2d(hidden, 1, 1, bias=False)
        )  # fmt: skip
        nn.init.zeros_(self.net[2].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def seam_grid(tokens: int, factor: int, weight: float) -> torch.Tensor:
    """``(1, 1, u h, u h)`` loss weights: the 2-token lines on the tile borders weigh ``weight``, mean 1."""
    side = tokens * factor
    grid = torch.ones(1, 1, side, side)
    for offset in range(tokens, side, tokens):
        grid[..., offset - 1 : offset + 1, :] = weight
        grid[..., offset - 1 : offset + 1] = weight
    return grid * (grid.numel() / grid.sum())


class MultiViewObjective(nn.Module):
    """FeatSharp plus its training-only parts; ``forward`` is one micro-batch's loss (what DDP wraps)."""

    def __init__(self, featsharp: FeatSharp, cfg: FeatSharpTrainConfig) -> None:
        super().__init__()
        self.featsharp = featsharp
        dim, u = featsharp.dim, featsharp.factor
        self.downsampler = AttentionDownsampler(dim, cfg.downsampler_kernel, u, cfg.downsampler_dropout)
        self.uncertainty = UncertaintyNet(dim) if cfg.uncertainty else None
        self.register_buffer("seam", seam_grid(cfg.input_tokens, u, cfg.seam_weight), persistent=False)

    def forward(
        self, student: torch.Tensor, views: torch.Tensor, transforms: torch.Tensor, valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """student ``(B, 3, u r, u r)`` and views ``(B, J, 3, r, r)`` in ``[0, 1]``, transforms ``(B, J, 3, 3)``,
        valid ``(B, J, h, h)`` -> loss terms (per-sample means, averaged over the micro-batch)."""
        fs = self.featsharp
        B, J = views.shape[:2]
        h = fs.config.input_tokens
        side = h * fs.factor
        hr = fs.upsample_normalized(student)  # (B, C, u h, u h)
        with torch.no_grad():
            raw = fs.backbone_features(fs.backbone.normalize(views.flatten(0, 1)))
        targets = fs.head.add_bias(fs.phis.normalize(raw.float()))  # (B J, C, h, h); the bias gets gradients
        tf = transforms.flatten(0, 1).to(torch.float64)
        hr_pos = apply_homography(tf[:, None], cell_centres(side, device=hr.device)[None, None])[:, 0]
        lr_pos = apply_homography(tf[:, None], cell_centres(h, device=hr.device)[None, None])[:, 0]
        hr_grid = hr_pos.reshape(B * J, side, side, 2).float()  # float32 grids even under autocast
        lr_grid = lr_pos.reshape(B * J, h, h, 2).float()
        hr_rep = hr.float().repeat_interleave(J, dim=0)
        warped = F.grid_sample(hr_rep, hr_grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        pred = self.downsampler(warped).float()  # (B J, C, h, h)
        weight = F.grid_sample(self.seam.expand(B * J, -1, -1, -1), lr_grid, align_corners=False)
        mask = valid.flatten(0, 1)[:, None].to(pred.dtype)
        if self.uncertainty is not None:
            unc = self.uncertainty(hr.detach()).float()  # (B, 1, u h, u h)
            scale = F.grid_sample(
                torch.exp(-unc).repeat_interleave(J, 0), lr_grid, padding_mode="reflection", align_corners=False
            )
            unc_reg = (unc / 2).mean()
        else:
            scale, unc_reg = torch.ones_like(mask), pred.new_zeros(())
        mse = (pred - targets).pow(2).mean(1, keepdim=True)  # (B J, 1, h, h)
        # per sample and view: divide by J x its valid positions (at least half the grid), then sum the views
        count = mask.sum((1, 2, 3)).clamp_min(h * h / 2) * J
        rec = ((mask * weight * scale * mse).sum((1, 2, 3)) / count).reshape(B, J).sum(1).mean()
        with torch.no_grad():
            diff = fs.phis.denormalize(pred.detach()) - fs.phis.denormalize(targets.detach())
            raw_mse = ((mask * diff.pow(2).mean(1, keepdim=True)).sum((1, 2, 3)) / count).reshape(B, J).sum(1).mean()
            variance = fs.phis.alpha.double().pow(-2).float()  # MSE(Y, mu_Y) over the dataset
            fidelity = variance / raw_mse.clamp_min(1e-30)
        return {"loss": rec + unc_reg, "rec": rec, "unc_reg": unc_reg, "rec_raw": raw_mse, "fidelity": fidelity}


# =================================================================================================
# the method
# =================================================================================================
class FeatSharpMethod(TrainMethod):
    """``--method featsharp``: FeatSharp over a frozen backbone, trained by multi-view consistency."""

    name = "featsharp"
    config_class = FeatSharpTrainConfig
    checked_terms = ("loss", "rec", "unc_reg")
    model: MultiViewObjective

    def build(self) -> None:
        cfg = self.cfg
        assert isinstance(cfg, FeatSharpTrainConfig)
        checks = [
            (cfg.factor in FACTORS, f"--factor {cfg.factor}: FeatSharp trains at factors {FACTORS}"),
            (cfg.input_tokens >= 4, f"--input-tokens {cfg.input_tokens}: at least 4"),
            (cfg.window >= 1 and cfg.window % 2 == 1, f"--window {cfg.window}: a positive odd number"),
            (cfg.jitters >= 1, "--jitters must be at least 1"),
            (cfg.zoom_max >= 1, f"zoom_max {cfg.zoom_max}: at least 1"),
            (0 < cfg.jitter_zoom <= 1, f"jitter_zoom {cfg.jitter_zoom}: in (0, 1]"),
            (0 <= cfg.perspective_min <= cfg.perspective_max < 0.5, "perspective_min <= perspective_max < 0.5"),
            (cfg.downsampler_kernel >= 1 and cfg.downsampler_kernel % 2 == 1, "--downsampler-kernel: positive odd"),
            (0 <= cfg.downsampler_dropout < 1, "downsampler_dropout in [0, 1)"),
            (cfg.seam_weight > 0, "seam_weight must be positive"),
            (cfg.phis_images >= 1, "--phis-images must be at least 1"),
            (0 <= cfg.flip_prob <= 1, "flip_prob in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise VitupError(message)
        self.cfg = replace(cfg, val_every=cfg.val_every or cfg.save_every)
        torch.manual_seed(cfg.seed)
        self.backbone = load_backbone(
            cfg.backbone, weights=cfg.weights, pretrained=cfg.pretrained, overrides=cfg.backbone_args
        )
        config = FeatSharpConfig(factor=cfg.factor, input_tokens=cfg.input_tokens, window=cfg.window, debias=cfg.debias)
        featsharp = FeatSharp(self.backbone, config)
        self.model = MultiViewObjective(featsharp, cfg)
        r = featsharp.backbone_size
        self.spec = ViewSpec(
            student=featsharp.input_size, view=r, grid=cfg.input_tokens, jitters=cfg.jitters, zoom_max=cfg.zoom_max,
            jitter_zoom=cfg.jitter_zoom, rotation=cfg.rotation, shift=cfg.shift,
            perspective=(cfg.perspective_min, cfg.perspective_max), flip_prob=cfg.flip_prob, seed=cfg.seed,
        )  # fmt: skip

    @property
    def featsharp(self) -> FeatSharp:
        return self.model.featsharp

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def optimizer(self, params: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        cfg = self.cfg
        main = [p for n, p in params if not n.startswith("uncertainty.")]
        unc = [p for n, p in params if n.startswith("uncertainty.")]
        groups = [{"params": main, "lr": cfg.lr}]
        if unc:
            groups.append({"params": unc, "lr": cfg.lr * cfg.uncertainty_lr_scale})
        return torch.optim.NAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)

    def set_train_mode(self) -> None:
        self.model.train()
        self.backbone.model.eval()  # the frozen backbone never runs in train mode

    def dataset(self, files: Sequence[Path], stream: int) -> MultiViewDataset:
        if not self.featsharp.phis.fitted:
            self.fit_statistics(files)
        return MultiViewDataset(files, self.spec, stream)

    @torch.no_grad()
    def fit_statistics(self, files: Sequence[Path]) -> int:
        """PHI-S statistics (float64) over the global views of the student crops of up to ``phis_images``
        images (positions of their own stream); shards over processes, merged in rank order."""
        cfg = self.cfg
        fs = self.featsharp
        rank, world = _rank_world()
        n = min(cfg.phis_images, len(files))
        mine = list(range(rank, n, world))
        micro = 8
        batches = [mine[i : i + micro] for i in range(0, len(mine), micro)]
        dataset = MultiViewDataset(files, self.spec, PHIS_STREAM, student_only=True)
        stats = MomentAccumulator(fs.dim)
        device = fs.phis.mean.device
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in make_loader(dataset, batches, cfg.workers, collate_fn=self.collate):
                fs.accumulate_statistics(batch["student"].to(device).float() / 255, stats)
        finally:
            if was_training:
                self.set_train_mode()
        if world > 1:
            stats = _merge_across_processes(stats)
        fs.phis.fit(stats)
        return stats.count

    def loss(
        self, student: nn.Module, batch: dict[str, Any], device: torch.device, autocast: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = batch["student"].to(device, non_blocking=True).float().div_(255)
        v = batch["views"].to(device, non_blocking=True).float().div_(255)
        tf = batch["transforms"].to(device)
        valid = batch["valid"].to(device)
        with autocast:
            terms = student(s, v, tf, valid)
        return terms["loss"], {k: t.detach().float() for k, t in terms.items()}

    def term_keys(self) -> list[str]:
        return ["loss", "rec", "unc_reg", "rec_raw", "fidelity"]

    def keep_in_state(self, name: str) -> bool:
        return self.backbone.random_init or not name.startswith("featsharp.backbone.")

    def save_checkpoint(self, path: Path, extra: dict[str, Any]) -> None:
        save_checkpoint(path, self.featsharp, extra)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "parameters": self.parameter_counts()}

    def parameter_counts(self) -> dict[str, int]:
        counts = self.featsharp.parameter_counts()
        counts["train_downsampler"] = sum(p.numel() for p in self.model.downsampler.parameters())
        unc = self.model.uncertainty
        counts["train_uncertainty"] = sum(p.numel() for p in unc.parameters()) if unc is not None else 0
        return counts

    def notes(self) -> list[str]:
        c = self.parameter_counts()
        fs = self.featsharp
        line = (
            f"FeatSharp {fs.factor}x: {c['total'] / 1e6:.2f}M parameters (block {c['refine_block'] / 1e6:.2f}M, "
            f"de-bias {c['debias'] / 1e6:.3f}M, JBU {c['jbu']}, tile positions {c['tile_pos']}); training only: "
            f"downsampler {c['train_downsampler'] / 1e6:.2f}M, uncertainty {c['train_uncertainty'] / 1e6:.2f}M; "
            f"{1 + fs.factor**2} + {self.cfg.jitters} backbone passes per image"
        )
        return [line, *super().notes()]


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _merge_across_processes(stats: MomentAccumulator) -> MomentAccumulator:
    """Every process's ``(count, mean, scatter)``, merged in rank order (the same result on every rank)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    packed = torch.cat([torch.tensor([float(stats.count)], dtype=torch.float64), stats.mean, stats.m2.reshape(-1)])
    packed = packed.to(backend_device)
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed)
    merged = MomentAccumulator(stats.mean.shape[0])
    dim = stats.mean.shape[0]
    for part in parts:
        part = part.cpu()
        merged.merge(int(part[0]), part[1 : 1 + dim], part[1 + dim :].reshape(dim, dim))
    return merged
