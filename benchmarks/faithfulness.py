"""Faithfulness benchmark: does `vitup train` make ViT-Up's (and UPLiFT's) features closer to the
teacher's real high-resolution features than bilinear and nearest interpolation of the tokens?

Per (teacher, seed): train ViT-Up (``--method vitup``) and UPLiFT (``--method uplift``) with the
`vitup train` core (``vitup_cli.train.train``) on the same generated images for a CPU-feasible number of
steps, over a shrunk randomly initialised DINOv3-layout backbone (each seed draws its own backbone, inits,
data order, crops and noise). UPLiFT trains with its own recipe (summed MSE over its depths 1, 2 against
the frozen backbone on an image pyramid whose top is ``--uplift-top`` x the student's input), scaled
down like ViT-Up's. ``--featsharp-steps N`` also trains FeatSharp (``--method featsharp``) at u=2 and
u=4, each scored at its own factor only (it takes the image at u x the student's pixels: its tiles).
Then, on held-out images
never seen in training, the student sees each image at its input size (``g x g`` tokens) and every
upsampler predicts features on a ``2g`` and a ``4g`` grid; the target is the teacher (the same backbone,
adapters off) run on the image at 2x and 4x the pixels, i.e. its *real* ``2g`` / ``4g`` token maps.

Two random teachers (no pretrained weights can be downloaded here):
- ``deep`` (the headline): layer scale 1 and block weights ~ N(0, 1/fan_in), so every block changes the
  features (cosine between tap 0 and the last tap ~0.25, as in trained ViTs) and deep taps mix context.
- ``patch``: timm's own random init (block weights std 0.02, layer scale 1e-5): the blocks are near
  no-ops, so every tap is the normalised patch embedding; this isolates sub-token detail recovery.

UPLiFT upsamples the last tap only (what it is trained on); ViT-Up and the interpolations are scored at
every tap in the JSON.

Metrics (per image, then averaged), at the last tap (and every tap in the JSON): cosine similarity,
target-normalised L2 (each target vector standardised by its own channel mean/std, as in the loss), and
the fidelity ratio MSE(Y, mean Y) / MSE(X, Y) (how much better than the image's mean feature).

Runs are independent processes, ``--jobs`` at a time (one torch thread each, data loaded inline).

    PYTHONPATH=. python benchmarks/faithfulness.py                 # ~12-15 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/faithfulness.py --steps 20 --patch-steps 20 --seeds 0 --out /tmp/f.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitup_cli.backbones import load_backbone  # noqa: E402
from vitup_cli.hub import load_checkpoint, load_trained  # noqa: E402
from vitup_cli.models import build_upsampler, grid_xy  # noqa: E402
from vitup_cli.progress import Reporter  # noqa: E402
from vitup_cli.train import TrainConfig, build_config  # noqa: E402
from vitup_cli.train.config import coerce  # noqa: E402
from vitup_cli.train.loop import train  # noqa: E402

UPSAMPLERS = ("vitup", "uplift", "featsharp", "bilinear", "nearest")
TRAINED = ("vitup", "uplift", "featsharp")
METRICS = ("cosine", "nl2", "fidelity")  # higher, lower, higher is better
HIGHER_IS_BETTER = {"cosine": True, "nl2": False, "fidelity": True}


# -- images -----------------------------------------------------------------------------------------
def scene(rng: np.random.Generator, size: tuple[int, int], masks: list | None = None) -> Image.Image:
    """A synthetic picture with edges, flat regions, gradients and textures at several scales.

    With ``masks`` (a list), each shape's visible region (later shapes occlude earlier ones) is appended
    to it as an ``(h, w)`` bool array: class-agnostic masks for LoftUp. The images are the same either way.
    """
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy - (np.cos(angle) + np.sin(angle)) / 2 + 0.7) / 1.4
    base = c0 + (c1 - c0) * t.clip(0, 1)[..., None]
    freq = rng.uniform(2, 12)
    base += 0.08 * np.sin(2 * math.pi * freq * (xx * rng.normal() + yy * rng.normal()))[..., None]
    img = Image.fromarray((base.clip(0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    drawn: list[Image.Image] = []
    for _ in range(int(rng.integers(4, 10))):
        shape = Image.new("L", (w, h), 0)
        drawn.append(shape)
        pen = ImageDraw.Draw(shape)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.04, 0.3) * min(w, h)
        kind = rng.integers(0, 4)
        if kind == 0:
            box = [cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r]
            draw.ellipse(box, fill=colour)
            pen.ellipse(box, fill=255)
        elif kind == 1:
            box = [cx - r, cy - r * rng.uniform(0.3, 1.0), cx + r * rng.uniform(0.3, 1.5), cy + r]
            draw.rectangle(box, fill=colour)
            pen.rectangle(box, fill=255)
        elif kind == 2:
            pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in rng.uniform(0, 2 * math.pi, 3)]
            draw.polygon(pts, fill=colour)
            pen.polygon(pts, fill=255)
        else:  # a striped patch
            period = rng.uniform(3, 14)
            for k in range(int(2 * r / period)):
                x = cx - r + k * period
                end = x + r * rng.uniform(-0.3, 0.3)
                draw.line([x, cy - r, end, cy + r], fill=colour, width=max(1, int(period / 3)))
                pen.line([x, cy - r, end, cy + r], fill=255, width=max(1, int(period / 3)))
    if masks is not None:
        covered = np.zeros((h, w), bool)
        for shape in reversed(drawn):
            m = np.asarray(shape) > 0
            visible = m & ~covered
            covered |= m
            if visible.any():
                masks.insert(0, visible)
    if rng.uniform() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(1, 8), (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def write_images(folder: Path, n: int, seed: int, sizes: tuple[int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        side = (int(rng.integers(sizes[0], sizes[1] + 1)), int(rng.integers(sizes[0], sizes[1] + 1)))
        path = folder / f"{i:04d}.png"
        scene(rng, side).save(path)
        paths.append(path)
    return paths


def write_masked_images(folder: Path, n: int, seed: int, sizes: tuple[int, int]) -> None:
    """The same images as ``write_images`` with the same seed, in vitup's mask folder layout
    (``images/NNNN.png`` + ``masks/NNNN.json``, COCO RLE): LoftUp's training data."""
    from vitup_cli.data.masks import encode_rle

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        side = (int(rng.integers(sizes[0], sizes[1] + 1)), int(rng.integers(sizes[0], sizes[1] + 1)))
        masks: list = []
        scene(rng, side, masks).save(folder / "images" / f"{i:04d}.png")
        (folder / "masks" / f"{i:04d}.json").write_text(json.dumps([encode_rle(m) for m in masks]))


# -- the teachers -------------------------------------------------------------------------------------
TEACHERS = ("deep", "patch")


def backbone_overrides(args: argparse.Namespace, teacher: str) -> dict:
    layer_scale = {"init_values": 1.0} if teacher == "deep" else {}
    return {"depth": args.depth, "embed_dim": args.dim, "num_heads": max(1, args.dim // 64), **layer_scale}


def make_teacher(teacher: str, seed: int, args: argparse.Namespace, path: Path) -> Path:
    """A random DINOv3-layout ViT saved as a state dict (given to training as ``--weights``).

    ``deep``: layer scale 1, block weights ~ N(0, 1/fan_in): every block matters (measured: cosine between
    tap 0 and the last tap ~0.25). ``patch``: timm's random init as is (std-0.02 weights, layer scale
    1e-5): the blocks are near no-ops and every tap is the normalised patch embedding (cosine 0.999).
    """
    torch.manual_seed(seed)
    backbone = load_backbone("dinov3_s", pretrained="none", overrides=backbone_overrides(args, teacher))
    if teacher == "deep":
        with torch.no_grad():
            for module in backbone.model.blocks.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0, 1 / math.sqrt(module.in_features))
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(path))
    return path


# -- metrics ----------------------------------------------------------------------------------------
def metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``(C, H, W)`` prediction vs target -> cosine, target-normalised L2, fidelity ratio."""
    x, y = pred.flatten(1).T.double(), target.flatten(1).T.double()  # (N, C)
    cosine = F.cosine_similarity(x, y, dim=1).mean().item()
    sd = y.std(1, keepdim=True, unbiased=False) + 1e-6  # (x - mu)/sd - (y - mu)/sd = (x - y)/sd
    nl2 = (((x - y) / sd) ** 2).mean().item()
    fidelity = ((y - y.mean(0, keepdim=True)) ** 2).mean().item() / max(((x - y) ** 2).mean().item(), 1e-12)
    return {"cosine": cosine, "nl2": nl2, "fidelity": fidelity}


def evaluate(
    checkpoint: Path,
    teacher: Path,
    images: list[Path],
    input_tokens: int,
    factors: tuple[int, ...],
    uplift_checkpoint: Path | None = None,
) -> dict:
    """Every upsampler vs the teacher's real token maps at ``factor x`` the student's grid, at every tap
    (the headline is the last tap; UPLiFT at the last tap only)."""
    vitup = load_checkpoint(checkpoint, weights=teacher).eval()
    backbone = vitup.backbone
    patch = backbone.patch_size
    side = input_tokens * patch
    others = {name: build_upsampler(name, backbone, input_size=side).eval() for name in ("bilinear", "nearest")}
    uplift = None
    if uplift_checkpoint is not None:
        uplift = load_trained(uplift_checkpoint, weights=teacher).eval()
        assert uplift.backbone.weights_id == backbone.weights_id
        uplift.input_size = side  # the student's input, as for ViT-Up (it trained on a pyramid around it)
    taps = backbone.taps
    sums: dict = {}
    with torch.no_grad():
        for path in images:
            img = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255)
            img = img.permute(2, 0, 1)[None]
            student_in = F.interpolate(img, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            for factor in factors:
                grid = input_tokens * factor
                hi = F.interpolate(img, size=(grid * patch,) * 2, mode="bilinear", antialias=True, align_corners=False)
                with backbone.adapters_disabled():
                    targets = backbone.hidden_states(backbone.normalize(hi))
                    preds = {n: [up.features(student_in, grid, tap=t)[0] for t in taps] for n, up in others.items()}
                xy = grid_xy(grid, grid)[None]
                levels = vitup.decode(vitup.encode(student_in), xy, levels=range(len(taps)))
                preds["vitup"] = [lv[0].T.reshape(-1, grid, grid) for lv in levels]
                if uplift is not None:  # the last tap only: None elsewhere
                    preds["uplift"] = [None] * (len(taps) - 1) + [uplift.features(student_in, grid)[0]]
                for name, per_tap in preds.items():
                    for k, pred in enumerate(per_tap):
                        if pred is None:
                            continue
                        for metric, value in metrics(pred, targets[k][0]).items():
                            key = (f"{factor}x", name, k, metric)
                            sums[key] = sums.get(key, 0.0) + value
    n = len(images)
    out: dict = {}
    for (scale, name, level, metric), total in sums.items():
        entry = out.setdefault(scale, {}).setdefault(name, {"per_tap": {}})
        entry["per_tap"].setdefault(f"tap{taps[level]}" if taps.count(taps[level]) == 1 else f"level{level}", {})[
            metric
        ] = total / n
        if level == len(taps) - 1:
            entry[metric] = total / n
    return out


def evaluate_loftup(checkpoint: Path, teacher: Path, images: list[Path], input_tokens: int, factors) -> dict:
    """LoftUp and bilinear vs the teacher's real last-layer maps at ``factor x`` the student's grid, all
    three ChannelNorm'ed (a LayerNorm over channels without affine: LoftUp's output and training targets
    live in that space, so raw-space metrics would compare it unfairly)."""
    from vitup_cli.hub.loftup import load_loftup

    loft = load_loftup(checkpoint, weights=teacher).eval()
    backbone = loft.backbone
    side = input_tokens * backbone.patch_size
    bilinear = build_upsampler("bilinear", backbone, input_size=side).eval()
    norm = lambda x: F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2)
    sums: dict = {}
    with torch.no_grad():
        for path in images:
            img = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255)
            img = img.permute(2, 0, 1)[None]
            student_in = F.interpolate(img, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            for factor in factors:
                grid = input_tokens * factor
                hi = F.interpolate(
                    img, size=(grid * backbone.patch_size,) * 2, mode="bilinear", antialias=True, align_corners=False
                )
                target = norm(backbone.hidden_states(backbone.normalize(hi), [backbone.depth])[0])[0]
                preds = {
                    "loftup": loft.features(student_in, grid)[0],
                    "bilinear": norm(bilinear.features(student_in, grid))[0],
                }
                for name, pred in preds.items():
                    for metric, value in metrics(pred, target).items():
                        key = (f"{factor}x", name, metric)
                        sums[key] = sums.get(key, 0.0) + value
    out: dict = {}
    for (scale, name, metric), total in sums.items():
        out.setdefault(scale, {}).setdefault(name, {})[metric] = total / len(images)
    return out


LOFTUP_DEVIATIONS = (
    "lr: the paper's stage-1 value when --loftup-lr 1e-3 (the released code's default is 1e-4, far slower"
    " to leave initialisation in a short run: 30 steps at 1e-4 gave cosine 0.44); jitters below the relea"
    "sed 4 (--loftup-jitters) and batch 4 for the CPU budget; stage 1 only (no stage-2 self-distillation)"
    ", so the target it learns is the masks-refined bicubic upsampling of the low-resolution tokens"
)


def run_loftup(args: argparse.Namespace, teacher: str, seed: int, work: Path, weights: Path) -> dict:
    """LoftUp stage 1 (the `vitup train --method loftup` core) on the masked copy of the training images."""
    from vitup_cli.train.methods.loftup import LoftUpTrainConfig

    out = work / f"loftup-{teacher}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = LoftUpTrainConfig(
        data=str(work / "train_masked"), out=str(out), backbone="dinov3_s", weights=str(weights),
        backbone_args=backbone_overrides(args, teacher), stage=1, image_size=16 * args.tokens,
        steps=args.loftup_steps, batch_size=args.batch, lr=args.loftup_lr, jitters=args.loftup_jitters, workers=0,
        seed=seed, log_every=10,
        save_every=args.loftup_steps, tensorboard=False,
    )  # fmt: skip
    t0 = time.monotonic()
    result = train(cfg, reporter=Reporter(interval=120))
    train_s = time.monotonic() - t0
    test_images = sorted((work / "heldout").glob("*.png"))
    scores = evaluate_loftup(result.last_checkpoint, weights, test_images, args.tokens, (2, 4))
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    return {"steps": cfg.steps, "lr": cfg.lr, "jitters": cfg.jitters, "train_seconds": round(train_s, 1),
            "loss_first_10_steps": losses[0], "loss_last_10_steps": losses[-1], "scores": scores}  # fmt: skip


def evaluate_featsharp(checkpoint: Path, teacher: Path, images: list[Path], input_tokens: int) -> dict:
    """One FeatSharp (factor u) vs the teacher's real last-layer map at ``u x`` the student's grid, in the
    backbone's raw space (FeatSharp denormalises its PHI-S output). FeatSharp takes the image at ``u x`` the
    student's pixels (its global view at the student's size plus ``u x u`` tiles): that is the method."""
    fs = load_trained(checkpoint, weights=teacher).eval()
    backbone = fs.backbone
    u, patch = fs.factor, backbone.patch_size
    assert fs.backbone_size == input_tokens * patch
    grid = input_tokens * u
    sums: dict = {}
    with torch.no_grad():
        for path in images:
            img = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255)
            img = img.permute(2, 0, 1)[None]
            hi = F.interpolate(img, size=(grid * patch,) * 2, mode="bilinear", antialias=True, align_corners=False)
            with backbone.adapters_disabled():
                target = backbone.hidden_states(backbone.normalize(hi), [backbone.depth])[0][0]
            for metric, value in metrics(fs.features(hi, grid)[0], target).items():
                sums[metric] = sums.get(metric, 0.0) + value
    last = (
        f"tap{backbone.taps[-1]}" if backbone.taps.count(backbone.taps[-1]) == 1 else f"level{len(backbone.taps) - 1}"
    )
    scores = {metric: total / len(images) for metric, total in sums.items()}
    return {**scores, "per_tap": {last: dict(scores)}}


def run_featsharp(args: argparse.Namespace, teacher: str, seed: int, work: Path, weights: Path) -> dict:
    """FeatSharp (the `vitup train --method featsharp` core) at its native factors 2 and 4, one run each,
    on the same training images; each scored at its own factor."""
    out: dict = {"steps": args.featsharp_steps, "lr": args.featsharp_lr, "jitters": args.featsharp_jitters}
    for u in (2, 4):
        cfg = build_config(
            None,
            {
                "method": "featsharp", "data": str(work / "train"),
                "out": str(work / f"run-featsharp{u}-{teacher}-seed{seed}"),
                "backbone": "dinov3_s", "weights": str(weights), "backbone_args": backbone_overrides(args, teacher),
                "factor": u, "input_tokens": args.tokens, "jitters": args.featsharp_jitters,
                "steps": args.featsharp_steps, "batch_size": args.batch, "lr": args.featsharp_lr, "workers": 0,
                "seed": seed, "log_every": 10, "save_every": args.featsharp_steps, "tensorboard": False,
            },
        )  # fmt: skip
        shutil.rmtree(cfg.out, ignore_errors=True)
        t0 = time.monotonic()
        result = train(cfg, reporter=Reporter(interval=120))
        train_s = time.monotonic() - t0
        losses = _losses(Path(cfg.out))
        test_images = sorted((work / "heldout").glob("*.png"))
        out[f"{u}x"] = {
            "train_seconds": round(train_s, 1),
            "seconds_per_step": round(train_s / cfg.steps, 3),
            "loss_first_10_steps": losses[0],
            "loss_last_10_steps": losses[-1],
            "scores": evaluate_featsharp(result.last_checkpoint, weights, test_images, args.tokens),
        }
    return out


# -- the benchmark ----------------------------------------------------------------------------------
def train_config(args: argparse.Namespace, teacher: str, seed: int, work: Path) -> TrainConfig:
    steps = args.steps if teacher == "deep" else args.patch_steps
    return TrainConfig(
        data=str(work / "train"),
        out=str(work / f"run-{teacher}-seed{seed}"),
        backbone="dinov3_s",
        weights=str(make_teacher(teacher, seed, args, work / f"teacher-{teacher}-seed{seed}.safetensors")),
        backbone_args=backbone_overrides(args, teacher),
        num_blocks=args.depth,
        input_tokens=args.tokens,
        embed_grid=args.embed * args.tokens,
        teacher_sizes=[8 * args.tokens, 16 * args.tokens, 32 * args.tokens],
        scale_min=args.scale_min,
        steps=steps,
        batch_size=args.batch,
        lr=args.lr,
        workers=0,
        seed=seed,
        log_every=10,
        save_every=steps,
        tensorboard=False,
        **coerce(dict(kv.split("=", 1) for kv in args.set), "--set"),
    )


def uplift_config(args: argparse.Namespace, teacher: str, seed: int, work: Path, weights: str):
    """UPLiFT's recipe over the same teacher and images: the pyramid top is ``--uplift-top`` x the
    student's input side (2: depth 1 maps the student's ``tokens x tokens`` to the 2x grid), batch and
    threads as ViT-Up's."""
    return build_config(
        None,
        {
            "method": "uplift",
            "data": str(work / "train"),
            "out": str(work / f"run-uplift-{teacher}-seed{seed}"),
            "backbone": "dinov3_s",
            "weights": weights,
            "backbone_args": backbone_overrides(args, teacher),
            "image_size": args.uplift_top * 16 * args.tokens,
            "steps": args.uplift_steps,
            "batch_size": args.batch,
            "lr": args.uplift_lr,
            "workers": 0,
            "seed": seed,
            "log_every": 10,
            "save_every": args.uplift_steps,
            "tensorboard": False,
        },
    )


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def run_one(args: argparse.Namespace, teacher: str, seed: int, work: Path) -> dict:
    """Train one ViT-Up and one UPLiFT and score them with the training-free upsamplers on the held-out
    images."""
    torch.set_num_threads(args.threads)
    cfg = train_config(args, teacher, seed, work)
    shutil.rmtree(cfg.out, ignore_errors=True)
    t0 = time.monotonic()
    result = train(cfg, reporter=Reporter(interval=120))
    train_s = time.monotonic() - t0
    up_result, up_s, up_losses = None, 0.0, []
    if args.uplift_steps > 0:
        up_cfg = uplift_config(args, teacher, seed, work, cfg.weights)
        shutil.rmtree(up_cfg.out, ignore_errors=True)
        t0 = time.monotonic()
        up_result = train(up_cfg, reporter=Reporter(interval=120))
        up_s = time.monotonic() - t0
        up_losses = _losses(Path(up_cfg.out))
    t0 = time.monotonic()
    test_images = sorted((work / "heldout").glob("*.png"))
    scores = evaluate(
        result.last_checkpoint,
        Path(cfg.weights),
        test_images,
        args.tokens,
        (2, 4),
        up_result.last_checkpoint if up_result else None,
    )
    losses = _losses(Path(cfg.out))
    if args.keep_runs:
        dest = Path(args.keep_runs) / f"{teacher}-seed{seed}"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(cfg.out, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    loftup = run_loftup(args, teacher, seed, work, Path(cfg.weights)) if args.loftup_steps else None
    featsharp = run_featsharp(args, teacher, seed, work, Path(cfg.weights)) if args.featsharp_steps else None
    if featsharp:  # raw space, last tap: scored beside the others at its native factors
        for scale in ("2x", "4x"):
            scores[scale]["featsharp"] = featsharp[scale].pop("scores")
    return {
        "teacher": teacher,
        "seed": seed,
        **({"loftup": loftup} if loftup else {}),
        **({"featsharp": featsharp} if featsharp else {}),
        "steps": cfg.steps,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.monotonic() - t0, 1),
        "loss_first_10_steps": losses[0],
        "loss_last_10_steps": losses[-1],
        "seconds_per_step": round(train_s / cfg.steps, 3),
        "uplift": {
            "steps": args.uplift_steps,
            "train_seconds": round(up_s, 1),
            "seconds_per_step": round(up_s / max(args.uplift_steps, 1), 3),
            "loss_first_10_steps": up_losses[0] if up_losses else None,
            "loss_last_10_steps": up_losses[-1] if up_losses else None,
        },
        "scores": scores,
    }


def _launch(args: argparse.Namespace, teacher: str, seed: int, work: Path) -> tuple[subprocess.Popen, Path]:
    out = work / f"result-{teacher}-seed{seed}.json"
    # the same options (argparse keeps the last --workdir), plus which run this process is
    cmd = [sys.executable, __file__, *sys.argv[1:], "--workdir", str(work), "--_one", f"{teacher}:{seed}:{out}"]
    log = open(work / f"log-{teacher}-seed{seed}.txt", "w")  # noqa: SIM115 - closed by the child's exit
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), out


def run(args: argparse.Namespace) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vitup-faith-"))
    started = time.monotonic()
    write_images(work / "train", args.train_images, seed=1234, sizes=(160, 320))
    write_images(work / "heldout", args.test_images, seed=987654, sizes=(512, 512))
    if args.loftup_steps:
        write_masked_images(work / "train_masked", args.train_images, seed=1234, sizes=(160, 320))
    jobs = [(t, seed) for t in args.teachers for seed in args.seeds]
    pending, running, per_run = list(jobs), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            teacher, seed = pending.pop(0)
            running.append((teacher, seed, *_launch(args, teacher, seed, work)))
        time.sleep(2)
        for item in list(running):
            teacher, seed, proc, out = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                tail = (work / f"log-{teacher}-seed{seed}.txt").read_text()[-3000:]
                raise SystemExit(f"run {teacher}/seed {seed} failed:\n{tail}")
            record = json.loads(out.read_text())
            per_run.append(record)
            print(
                f"[{time.monotonic() - started:5.0f} s] teacher {teacher}, seed {seed}: {record['steps']} steps "
                f"in {record['train_seconds']:.0f} s, loss {record['loss_first_10_steps']:.2f} -> "
                f"{record['loss_last_10_steps']:.2f}"
            )
            print(table(record["scores"]), flush=True)
            if "loftup" in record:
                print(loftup_table(record["loftup"]["scores"]), flush=True)
    per_run.sort(key=lambda r: (TEACHERS.index(r["teacher"]), r["seed"]))
    summary = {t: summarise([r for r in per_run if r["teacher"] == t]) for t in args.teachers}
    if args.loftup_steps:
        for t in args.teachers:
            summary[t]["loftup_channelnorm_space"] = summarise_loftup([r for r in per_run if r["teacher"] == t])
    result = {
        "benchmark": "faithfulness",
        "question": "after `vitup train`, are ViT-Up (and UPLiFT) features closer to the teacher's real 2x/4x "
        "features than bilinear / nearest upsampling of the tokens, on held-out images?",
        "setup": {
            "backbone": f"dinov3_s layout (RoPE, 4 registers, patch 16), depth {args.depth}, dim {args.dim}, "
            "random weights, a new backbone per seed, given to training as --weights",
            "teachers": {
                "deep": "layer scale 1, block weights N(0, 1/fan_in): every block matters (cos(tap0, last) ~0.25)",
                "patch": "timm random init (std 0.02, layer scale 1e-5): blocks near no-ops, every tap = the "
                "normalised patch embedding",
            },
            "student_input_tokens": args.tokens,
            "eval_grids": {"2x": 2 * args.tokens, "4x": 4 * args.tokens},
            "train": {
                "steps": {"deep": args.steps, "patch": args.patch_steps},
                "batch_size": args.batch,
                "lr": args.lr,
                "scale_min": args.scale_min,
                "canvas_px": 16 * args.tokens,
                "teacher_px": [8 * args.tokens, 16 * args.tokens, 32 * args.tokens],
                "queries": 2 * args.tokens,
                "embed_grid": args.embed * args.tokens,
                "images": args.train_images,
                "other settings": "the paper's defaults (loss terms and weights, tau, LoRA r/alpha/dropout, "
                "5% warm-up, cosine to 1e-6, grad clip 1)",
                "deviations from the paper and why": "lr 2e-3 / batch 4 / a few thousand steps instead of "
                "2e-4 / 24 / 53k (CPU budget; measured: 3e-4 and 1e-3 are slower to converge here); paste "
                "scale s ~ U(0.5, 1) instead of U(0.1, 1) (the evaluated ratios are 2x-4x = s in [0.5, 1]; "
                "measured: better at equal steps)",
            },
            "uplift_train": {
                "steps": args.uplift_steps,
                "batch_size": args.batch,
                "lr": args.uplift_lr,
                "image_size_px": args.uplift_top * 16 * args.tokens,
                "pyramid_px": [args.uplift_top * 16 * args.tokens // 2**k for k in range(3)],
                "depths": [1, 2],
                "other settings": "the paper's recipe (squash, summed MSE of every intermediate output, Adam, "
                "no schedule, no clipping); deviations: batch 4 and few steps (CPU budget), pyramid top "
                "--uplift-top x the student input instead of 448 px (the full-resolution encoder dominates the "
                "cost); the 4x grid is reached by 2 iterations, as UPLiFT runs more iterations at inference "
                "than it trained with",
            },
            "heldout_images": args.test_images,
            "images": "generated scenes (gradients, shapes, stripes, blur, noise); held-out ones use another seed",
            "metrics": {
                "cosine": "mean cosine similarity to the teacher, higher is better",
                "nl2": "target-normalised L2 (target vector standardised), lower is better",
                "fidelity": "MSE(Y, mean Y) / MSE(X, Y), higher is better",
            },
            "seeds": args.seeds,
            "other_settings": args.set,
            "loftup": (
                {
                    "what": "LoftUp stage 1 (vitup train --method loftup) on the same training images with their "
                    "generated shapes as class-agnostic masks (visible part of each drawn shape), then scored on the "
                    "same held-out images",
                    "space": "LoftUp's output is in LayerNorm space: it and bilinear are compared with the "
                    "ChannelNorm'ed (LayerNorm over channels, no affine) teacher maps, last layer only; these rows "
                    "are not comparable with the raw-space ViT-Up rows",
                    "steps": args.loftup_steps,
                    "lr": args.loftup_lr,
                    "jitters": args.loftup_jitters,
                    "image_px": 16 * args.tokens,
                    "deviations": LOFTUP_DEVIATIONS,
                }
                if args.loftup_steps
                else "not run (--loftup-steps 0)"
            ),
            "featsharp": (
                {
                    "what": "FeatSharp (vitup train --method featsharp) at factors 2 and 4, one model each, on the "
                    "same training images; the factor-u model is scored at the u x grid only, last tap, raw space",
                    "input": "FeatSharp takes the image at u x the student's pixels (its global view at the "
                    "student's size plus u x u backbone tiles of the larger image), as the method does",
                    "steps": args.featsharp_steps,
                    "batch_size": args.batch,
                    "lr": args.featsharp_lr,
                    "jitters": args.featsharp_jitters,
                    "other settings": "the paper's recipe (multi-view consistency, attention downsampler, seam "
                    "weighting, uncertainty term, NAdam, warm-up and cosine); deviations: few steps, batch "
                    f"{args.batch}, {args.featsharp_jitters} jittered views (CPU budget); PHI-S fitted on the "
                    "training images",
                }
                if args.featsharp_steps
                else "not run (--featsharp-steps 0)"
            ),
        },
        "runs": per_run,
        "summary": summary,
        "machine": {
            "cpu_count": os.cpu_count(),
            "jobs": args.jobs,
            "torch_threads_per_job": args.threads,
            "load_average_at_end": os.getloadavg(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "total_seconds": round(time.monotonic() - started, 1),
    }
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _present(per_seed: list[dict]) -> list[str]:
    scale = next(iter(per_seed[0]["scores"]))
    return [n for n in UPSAMPLERS if n in per_seed[0]["scores"][scale]]


def summarise(per_seed: list[dict]) -> dict:
    scales = list(per_seed[0]["scores"])
    names = _present(per_seed)
    summary: dict = {"mean_std": {}}
    for scale in scales:
        for name in names:
            for metric in METRICS:
                values = [s["scores"][scale][name][metric] for s in per_seed]
                summary["mean_std"].setdefault(scale, {}).setdefault(name, {})[metric] = [
                    float(np.mean(values)),
                    float(np.std(values)),
                ]
    for method in (n for n in TRAINED if n in names):
        for rival in ("bilinear", "nearest"):
            key = f"{method}_beats_{rival}"
            summary[key] = {}
            for scale in scales:
                wins = {}
                for metric in METRICS:
                    per = []
                    for s in per_seed:
                        v, b = s["scores"][scale][method][metric], s["scores"][scale][rival][metric]
                        per.append(bool(v > b) if HIGHER_IS_BETTER[metric] else bool(v < b))
                    wins[metric] = per
                summary[key][scale] = wins
    taps = list(per_seed[0]["scores"][scales[0]]["vitup"]["per_tap"])
    summary["per_tap_nl2_mean"] = {
        scale: {
            name: {
                t: float(np.mean([s["scores"][scale][name]["per_tap"][t]["nl2"] for s in per_seed]))
                for t in taps
                if t in per_seed[0]["scores"][scale][name]["per_tap"]
            }
            for name in names
        }
        for scale in scales
    }
    summary["taps_where_vitup_beats_bilinear_nl2_every_seed"] = {
        scale: [
            t
            for t in taps
            if all(
                s["scores"][scale]["vitup"]["per_tap"][t]["nl2"] < s["scores"][scale]["bilinear"]["per_tap"][t]["nl2"]
                for s in per_seed
            )
        ]
        for scale in scales
    }
    for method in (n for n in TRAINED if n in names):
        summary[f"{method}_ahead_of_bilinear_everywhere"] = all(
            all(v) for scale in summary[f"{method}_beats_bilinear"].values() for v in scale.values()
        )
    return summary


def summarise_loftup(per_seed: list[dict]) -> dict:
    out: dict = {}
    for scale in per_seed[0]["loftup"]["scores"]:
        for name in ("loftup", "bilinear"):
            for metric in METRICS:
                values = [s["loftup"]["scores"][scale][name][metric] for s in per_seed]
                out.setdefault(scale, {}).setdefault(name, {})[metric] = [float(np.mean(values)), float(np.std(values))]
    return out


def loftup_table(scores: dict) -> str:
    lines = [f"{'scale':6} {'ChannelNorm space':18} {'cosine ↑':>9} {'norm. L2 ↓':>11} {'fidelity ↑':>11}"]
    for scale, per in scores.items():
        for name, m in per.items():
            lines.append(f"{scale:6} {name:18} {m['cosine']:9.4f} {m['nl2']:11.4f} {m['fidelity']:11.3f}")
    return "\n".join(lines)


def table(scores: dict) -> str:
    lines = [f"{'scale':6} {'upsampler':10} {'cosine ↑':>9} {'norm. L2 ↓':>11} {'fidelity ↑':>11}"]
    for scale, per in scores.items():
        for name in (n for n in UPSAMPLERS if n in per):
            m = per[name]
            lines.append(f"{scale:6} {name:10} {m['cosine']:9.4f} {m['nl2']:11.4f} {m['fidelity']:11.3f}")
    return "\n".join(lines)


def summary_table(summary: dict) -> str:
    lines = [f"{'scale':6} {'upsampler':10} {'cosine ↑':>17} {'norm. L2 ↓':>17} {'fidelity ↑':>17}"]
    for scale, per in summary["mean_std"].items():
        for name in (n for n in UPSAMPLERS if n in per):
            cells = [f"{per[name][m][0]:8.4f} ± {per[name][m][1]:6.4f}" for m in METRICS]
            lines.append(f"{scale:6} {name:10} " + " ".join(f"{c:>17}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--teachers", type=lambda s: s.split(","), default=list(TEACHERS))
    parser.add_argument("--steps", type=int, default=1400, help="training steps with the deep teacher")
    parser.add_argument("--patch-steps", type=int, default=500, help="training steps with the patch teacher")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--uplift-steps", type=int, default=600, help="UPLiFT training steps (0: no UPLiFT)")
    parser.add_argument("--uplift-lr", type=float, default=1e-3, help="UPLiFT's Adam learning rate (the paper's)")
    parser.add_argument("--uplift-top", type=int, default=2, help="UPLiFT pyramid top / student input side")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--scale-min", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=8, help="student input tokens per side")
    parser.add_argument("--embed", type=int, default=4, help="query-embedding grid / input tokens (paper: 8)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--test-images", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=3, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--set", action="append", default=[], help="other TrainConfig settings, KEY=VALUE")
    parser.add_argument(
        "--loftup-steps", type=int, default=0, help="also train LoftUp stage 1 this many steps per run (0: off)"
    )
    parser.add_argument("--loftup-lr", type=float, default=1e-4, help="LoftUp stage-1 lr (released code: 1e-4)")
    parser.add_argument(
        "--loftup-jitters", type=int, default=4, help="LoftUp stage-1 multi-view jitters (released code: 4)"
    )
    parser.add_argument(
        "--featsharp-steps", type=int, default=0, help="also train FeatSharp at u=2 and u=4, N steps each (0: off)"
    )
    parser.add_argument("--featsharp-lr", type=float, default=1e-4, help="FeatSharp's NAdam lr (the paper's)")
    parser.add_argument("--featsharp-jitters", type=int, default=5, help="FeatSharp's jittered views (paper: 5)")
    parser.add_argument("--workdir", default=None, help="keep generated images and runs here")
    parser.add_argument("--keep-runs", default=None, help="copy each run's metrics/plots (no weights) here")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faithfulness.json"))
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        teacher, seed, out = args._one.split(":", 2)
        record = run_one(args, teacher, int(seed), Path(args.workdir))
        Path(out).write_text(json.dumps(record, indent=2) + "\n")
        return
    result = run(args)
    print()
    for teacher, summary in result["summary"].items():
        print(f"teacher {teacher}, seeds {args.seeds} (mean ± std), last tap, held-out images:")
        print(summary_table(summary))
        for method in TRAINED:
            if f"{method}_ahead_of_bilinear_everywhere" in summary:
                ahead = summary[f"{method}_ahead_of_bilinear_everywhere"]
                print(f"{method} ahead of bilinear on every metric, scale and seed: {ahead}")
        print()
        if "loftup_channelnorm_space" in summary:
            print("LoftUp vs bilinear, both ChannelNorm'ed against the ChannelNorm'ed teacher (mean over seeds):")
            rows = {sc: {n: {m: v[0] for m, v in per.items()} for n, per in d.items()}
                    for sc, d in summary["loftup_channelnorm_space"].items()}  # fmt: skip
            print(loftup_table(rows) + "\n")
    print(f"total {result['total_seconds']:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
