"""The ``vitup`` command line: a thin Typer layer that parses, calls the importable core, and reports.

User errors (``VitupError``) become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from vitup_cli._version import __version__
from vitup_cli.errors import VitupError
from vitup_cli.train.config import TrainConfig


class _Group(TyperGroup):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VitupError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=_Group,
    name="vitup",
    help="Dense, faithful, per-pixel features from Vision Transformers (ViT-Up).",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    epilog=(
        "Examples:\n\n"
        "vitup train --backbone dinov3_s+ --data /data/imagenet/train --out runs/splus\n\n"
        "vitup extract ./images --out feats.zarr --res 224 --checkpoint runs/splus/last\n\n"
        "vitup probe cityscapes --root /data/cityscapes --checkpoint runs/splus/last --upsampler vitup,bilinear\n\n"
        "vitup visualize photo.jpg --checkpoint runs/splus/last --point 320,240\n\n"
        "Offline demo of all four: bash examples/quickstart.sh"
    ),
    pretty_exceptions_enable=False,
    add_completion=False,
)

# -- options shared by the subcommands ------------------------------------------------------------
_BB = "Backbone"
BackboneOpt = Annotated[
    str,
    typer.Option(
        "--backbone",
        "-b",
        rich_help_panel=_BB,
        help="dinov3_s, dinov3_s+, dinov3_b, dinov3_l, dinov2_s/_b(_reg), or any timm ViT name.",
    ),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        rich_help_panel=_BB,
        dir_okay=False,
        help="Local backbone state dict (.safetensors, or .pth loaded with weights_only).",
    ),
]
PretrainedOpt = Annotated[
    str,
    typer.Option(
        "--pretrained",
        rich_help_panel=_BB,
        help="'hub' (the backbone's default tag), a hub tag such as lvd1689m, or 'none' (random init: "
        "tests and demos only).",
    ),
]
BackboneArgsOpt = Annotated[
    str | None,
    typer.Option(
        "--backbone-args",
        rich_help_panel=_BB,
        help="timm constructor overrides for shrunk models, e.g. 'depth=4,embed_dim=192,num_heads=3'.",
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vitup {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Dense, faithful, per-pixel features from Vision Transformers (ViT-Up)."""


@app.command("backbones")
def backbones_cmd() -> None:
    """List the backbone names vitup knows (any timm ViT name works too)."""
    from rich.console import Console
    from rich.table import Table

    from vitup_cli.backbones import ALIASES, BACKBONES
    from vitup_cli.hub.releases import DEFAULT_RELEASE

    table = Table("name", "timm model", "hub tag", "published ViT-Up", "notes")
    aliases = {v: k for k, v in ALIASES.items()}
    for name, spec in BACKBONES.items():
        shown = f"{name} ({aliases[name]})" if name in aliases else name
        table.add_row(shown, spec.timm_name, spec.tag or "-", DEFAULT_RELEASE.get(name, "-"), spec.note)
    Console().print(table)


_TRAIN_DEFAULTS = TrainConfig()
_UPLIFT = "UPLiFT (--method uplift)"
_LOFTUP = "LoftUp (--method loftup)"
_RUN, _SIZES, _MODEL, _LOSS, _LORA, _OPT, _RUNTIME, _LOG = (
    "Data and run",
    "Distillation sizes",
    "ViT-Up model",
    "Losses",
    "LoRA",
    "Optimisation",
    "Runtime",
    "Logging and checkpoints",
)
_FEATSHARP = "FeatSharp (--method featsharp)"
_TRAIN_EPILOG = (
    "Examples:\n\n"
    "  vitup train --backbone dinov3_s+ --data /data/imagenet/train --out runs/splus --val-data /data/val\n\n"
    "  torchrun --nproc-per-node 8 -m vitup_cli train --config train.yaml --out runs/b; "
    "vitup train --resume runs/b\n\n"
    "  vitup train --method featsharp --factor 2 --backbone dinov3_s --data /data/sa1b --out runs/fs2"
)


def _explicit(ctx: typer.Context, name: str) -> bool:
    """Was this option given (command line or environment), rather than left at its default?"""
    source = ctx.get_parameter_source(name)  # typer vendors click: compare by name, not by enum class
    return source is not None and source.name not in {"DEFAULT", "DEFAULT_MAP"}


def _opt(panel: str, *names: str, help: str, **kw: Any) -> Any:
    return typer.Option(*names, rich_help_panel=panel, help=help, **kw)


@app.command("train", epilog=_TRAIN_EPILOG)
def train_cmd(
    ctx: typer.Context,
    method: Annotated[
        str,
        _opt(
            _RUN,
            "--method",
            "-m",
            help="Training method: vitup (ViT-Up distillation), uplift (UPLiFT), loftup (LoftUp, --stage 1|2, "
            "images with masks) or featsharp (FeatSharp, multi-view consistency). Each has its paper's defaults; "
            "the defaults shown below are ViT-Up's except in the method panels.",
        ),
    ] = "vitup",
    data: Annotated[str, _opt(_RUN, "--data", "-d", help="Training images: a folder, @list.txt, or one image.")] = "",
    out: Annotated[str, _opt(_RUN, "--out", "-o", help="Run directory (config, checkpoints, metrics).")] = "",
    val_data: Annotated[
        str | None, _opt(_RUN, "--val-data", help="Held-out images: val loss and the `best` checkpoint.")
    ] = None,
    val_images: Annotated[int, _opt(_RUN, "--val-images", help="At most this many held-out images.")] = 256,
    config: Annotated[
        Path | None,
        _opt(_RUN, "--config", "-c", dir_okay=False, help="YAML or TOML file of settings; flags override it."),
    ] = None,
    resume: Annotated[
        Path | None,
        _opt(_RUN, "--resume", file_okay=False, help="Continue this run exactly where its last save left it."),
    ] = None,
    stop_after: Annotated[
        int | None,
        _opt(_RUN, "--stop-after", help="End this session after N steps with a save (time-limited jobs)."),
    ] = None,
    backbone: BackboneOpt = _TRAIN_DEFAULTS.backbone,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = _TRAIN_DEFAULTS.pretrained,
    backbone_args: BackboneArgsOpt = None,
    taps: Annotated[
        str | None, _opt(_BB, "--taps", help="Hidden-state taps, e.g. 0,2,4,6,8,10,12 (default: evenly spaced).")
    ] = None,
    num_blocks: Annotated[int, _opt(_MODEL, "--blocks", help="ViT-Up blocks (taps = blocks + 1).")] = 6,
    input_tokens: Annotated[
        int, _opt(_MODEL, "--input-tokens", help="Student backbone input, tokens per side (28: 448 px at patch 16).")
    ] = _TRAIN_DEFAULTS.input_tokens,
    embed_grid: Annotated[
        int, _opt(_MODEL, "--embed-grid", help="Query-embedding grid, tokens per side.")
    ] = _TRAIN_DEFAULTS.embed_grid,
    window: Annotated[
        int | None,
        _opt(
            _MODEL,
            "--window",
            help="ViT-Up: cross-attention window in tokens (default: global). FeatSharp: local attention window (7).",
        ),
    ] = None,
    init_from: Annotated[
        str | None,
        _opt(
            _MODEL,
            "--init-from",
            help="Fine-tune from ViT-Up weights: vit-up:dinov3_splus, vit-up:dinov3_b, hf:ORG/REPO/FILE, an "
            "official .safetensors file or a vitup checkpoint (same backbone and shape as this run).",
        ),
    ] = None,
    factor: Annotated[
        int, _opt(_FEATSHARP, "--factor", help="Upsample factor u, 2 or 4: 1 + u^2 backbone passes per image.")
    ] = 2,
    jitters: Annotated[
        int | None,
        _opt(
            _FEATSHARP,
            "--jitters",
            help="Jittered views per image, with known homographies (FeatSharp: 5; LoftUp: 4 in stage 1, 2 in "
            "stage 2).",
        ),
    ] = None,
    phis_images: Annotated[
        int, _opt(_FEATSHARP, "--phis-images", help="Images whose features fit the PHI-S statistics (at most all).")
    ] = 100_000,
    downsampler_kernel: Annotated[
        int, _opt(_FEATSHARP, "--downsampler-kernel", help="Attention downsampler kernel (paper: 7).")
    ] = 7,
    canvas: Annotated[
        int | None, _opt(_SIZES, "--canvas", help="Student canvas side in px (default: input tokens x patch = 448).")
    ] = None,
    queries: Annotated[
        int | None,
        _opt(_SIZES, "--queries", help="Query grid side over the pasted crop (default: finest teacher grid, 56)."),
    ] = None,
    teacher_sizes: Annotated[
        str, _opt(_SIZES, "--teacher-sizes", help="Teacher input sizes in px (14, 28, 56 tokens at patch 16).")
    ] = "224,448,896",
    scale_min: Annotated[
        float, _opt(_SIZES, "--scale-min", help="Smallest paste scale s.")
    ] = _TRAIN_DEFAULTS.scale_min,
    scale_max: Annotated[float, _opt(_SIZES, "--scale-max", help="Largest paste scale s.")] = _TRAIN_DEFAULTS.scale_max,
    crop_min: Annotated[
        float, _opt(_SIZES, "--crop-min", help="Square crop side ~ U(crop-min, 1) x short side (1: largest square).")
    ] = _TRAIN_DEFAULTS.crop_min,
    w_l2: Annotated[float, _opt(_LOSS, "--w-l2", help="Weight of the target-normalised L2.")] = 1.0,
    w_cos: Annotated[float, _opt(_LOSS, "--w-cos", help="Weight of the cosine distance.")] = 1.0,
    w_kl: Annotated[float, _opt(_LOSS, "--w-kl", help="Weight of the relational KL.")] = 1.0,
    tau: Annotated[float, _opt(_LOSS, "--tau", help="Relational KL temperature.")] = _TRAIN_DEFAULTS.tau,
    kl_window: Annotated[
        int, _opt(_LOSS, "--kl-window", help="Relational KL within windows of this many positions per side.")
    ] = _TRAIN_DEFAULTS.kl_window,
    lora_r: Annotated[int, _opt(_LORA, "--lora-r", help="LoRA rank (0: no adapters).")] = _TRAIN_DEFAULTS.lora_r,
    lora_alpha: Annotated[float, _opt(_LORA, "--lora-alpha", help="LoRA alpha.")] = _TRAIN_DEFAULTS.lora_alpha,
    lora_dropout: Annotated[float, _opt(_LORA, "--lora-dropout", help="LoRA dropout.")] = _TRAIN_DEFAULTS.lora_dropout,
    stage: Annotated[
        int,
        _opt(
            _LOFTUP,
            "--stage",
            help="1: mask pseudo ground truth (NAdam lr 1e-4); 2: EMA self-distillation (AdamW lr 1e-3, needs "
            "--init). Released code's lrs; the paper says 1e-3 / 1e-4. Backbone default dinov2_s, batch 8.",
        ),
    ] = 1,
    init: Annotated[str | None, _opt(_LOFTUP, "--init", help="Stage 2: the stage-1 checkpoint (runs/s1/last).")] = None,
    layout: Annotated[
        str, _opt(_LOFTUP, "--layout", help="Masks: sa1b (sa_N.jpg + sa_N.json), folder (images/ + masks/), auto.")
    ] = "auto",
    max_masks: Annotated[int, _opt(_LOFTUP, "--max-masks", help="Masks per image, in file order.")] = 150,
    mask_alpha: Annotated[float, _opt(_LOFTUP, "--mask-alpha", help="Stage-1 mask blending.")] = 0.8,
    hr_alpha: Annotated[float, _opt(_LOFTUP, "--hr-alpha", help="Stage-2 teacher mask blending.")] = 0.5,
    hr_size: Annotated[int, _opt(_LOFTUP, "--hr-size", help="Stage-2 source image side.")] = 896,
    input_sizes: Annotated[
        str, _opt(_LOFTUP, "--input-sizes", help="Stage-2 student inputs, one per step (paper: 224 or 336).")
    ] = "224,336,448,518",
    tv_weight: Annotated[
        float | None, _opt(_LOFTUP, "--tv-weight", help="TV weight (default 0.01 stage 1, 0.05 stage 2).")
    ] = None,
    hr_weight: Annotated[float, _opt(_LOFTUP, "--hr-weight", help="Stage-2 affinity loss weight.")] = 20.0,
    affinity_pixels: Annotated[
        int, _opt(_LOFTUP, "--affinity-pixels", help="Stage 2: pixels per Gram matrix (bounds its memory).")
    ] = 4096,
    ema_beta: Annotated[float, _opt(_LOFTUP, "--ema-beta", help="Stage-2 EMA teacher decay.")] = 0.99,
    ema_every: Annotated[int, _opt(_LOFTUP, "--ema-every", help="Stage 2: steps between EMA updates.")] = 10,
    steps: Annotated[int, _opt(_OPT, "--steps", help="Optimiser steps.")] = _TRAIN_DEFAULTS.steps,
    batch_size: Annotated[
        int, _opt(_OPT, "--batch-size", "-B", help="Images per step over all processes and accumulation steps.")
    ] = _TRAIN_DEFAULTS.batch_size,
    lr: Annotated[float, _opt(_OPT, "--lr", help="Peak AdamW learning rate.")] = _TRAIN_DEFAULTS.lr,
    schedule: Annotated[
        str, _opt(_OPT, "--schedule", help="cosine (warm-up, then cosine to --min-lr) or constant.")
    ] = _TRAIN_DEFAULTS.schedule,
    warmup: Annotated[
        float, _opt(_OPT, "--warmup", help="Linear warm-up, fraction of steps.")
    ] = _TRAIN_DEFAULTS.warmup,
    min_lr: Annotated[float, _opt(_OPT, "--min-lr", help="Cosine floor.")] = _TRAIN_DEFAULTS.min_lr,
    weight_decay: Annotated[float, _opt(_OPT, "--weight-decay", help="AdamW weight decay.")] = 0.0,
    beta1: Annotated[float, _opt(_OPT, "--beta1", help="AdamW beta1.")] = _TRAIN_DEFAULTS.beta1,
    beta2: Annotated[float, _opt(_OPT, "--beta2", help="AdamW beta2.")] = _TRAIN_DEFAULTS.beta2,
    grad_clip: Annotated[
        float, _opt(_OPT, "--grad-clip", help="Max gradient norm (0: off).")
    ] = _TRAIN_DEFAULTS.grad_clip,
    accum: Annotated[int, _opt(_OPT, "--accum", help="Gradient accumulation steps.")] = 1,
    precision: Annotated[
        str, _opt(_RUNTIME, "--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32.")
    ] = "auto",
    device: Annotated[str, _opt(_RUNTIME, "--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    workers: Annotated[int, _opt(_RUNTIME, "--workers", "-j", help="Data-loading processes per GPU.")] = 4,
    seed: Annotated[int, _opt(_RUNTIME, "--seed", help="Seed of the model init, data order, crops and noise.")] = 0,
    log_every: Annotated[int, _opt(_LOG, "--log-every", help="Steps per metrics.jsonl line.")] = 10,
    save_every: Annotated[
        int, _opt(_LOG, "--save-every", help="Steps between saves of `last` and the resumable state.")
    ] = _TRAIN_DEFAULTS.save_every,
    keep_every: Annotated[int, _opt(_LOG, "--keep-every", help="Also keep step-N checkpoints every N steps.")] = 0,
    val_every: Annotated[
        int | None, _opt(_LOG, "--val-every", help="Steps between held-out evaluations (default: with each save).")
    ] = None,
    tensorboard: Annotated[
        bool, _opt(_LOG, "--tensorboard/--no-tensorboard", help="TensorBoard events when installed.")
    ] = True,
    image_size: Annotated[
        int | None,
        _opt(
            _UPLIFT,
            "--image-size",
            help="UPLiFT: top of the image pyramid, px (448: 448/224/112/56). LoftUp: stage-1 image and output "
            "side (224).",
        ),
    ] = None,
    fit: Annotated[
        str, _opt(_UPLIFT, "--fit", help="squash (resize to a square, the ImageNet recipe) or crop (centre).")
    ] = "squash",
    depths: Annotated[
        str | None, _opt(_UPLIFT, "--depths", help="Iteration depths trained every step (default 1,2,3; DINOv3 1,2).")
    ] = None,
    sync_bn: Annotated[
        bool, _opt(_UPLIFT, "--sync-bn/--no-sync-bn", help="Synchronise BatchNorm across GPUs under DDP.")
    ] = True,
) -> None:
    """Train an upsampler: --method vitup (default) distils ViT-Up (LoRA-adapted backbone, frozen teacher).

    Defaults are each paper's recipe. ViT-Up (DINOv3-S+ on ImageNet-1K):
    batch 24, AdamW 2e-4, 5% warm-up, cosine to 1e-6, 53,381 steps;
    448 px canvas, 56x56 queries, teachers at 224/448/896 px.
    UPLiFT (--method uplift): batch 32, Adam 1e-3 constant, 40,037 steps (one ImageNet epoch);
    448 px squash, pyramid 448/224/112/56, depths 1,2,3 (1,2 for DINOv3), summed MSE.
    FeatSharp (--method featsharp, frozen backbone): batch 32, NAdam 1e-4, 100 warm-up steps,
    cosine, 9,000 steps; 5 jittered views per image; PHI-S fitted on the training images first.
    Only the flags you give are applied; a flag of another method is refused.
    """
    import os
    import sys

    from vitup_cli.progress import Reporter, RichReporter
    from vitup_cli.train import build_config, resume_config
    from vitup_cli.train.loop import train

    skip = {"config", "resume", "stop_after"}
    given = {name: value for name, value in ctx.params.items() if name not in skip and _explicit(ctx, name)}
    if resume is not None:
        if config is not None:
            raise VitupError("--resume takes its settings from the run's config.json; drop --config")
        if out and Path(out) != resume:
            raise VitupError(f"--resume {resume} and --out {out} disagree: a resumed run stays in its folder")
        cfg = resume_config(resume, given)
    else:
        cfg = build_config(config, given)
    main_rank = os.environ.get("RANK", "0") == "0"
    reporter = RichReporter() if sys.stderr.isatty() else Reporter(interval=30.0)
    result = train(cfg, resume=resume is not None, reporter=reporter, stop_after=stop_after)
    if not main_rank:
        return
    state = "finished" if result.finished else "stopped (continue with --resume)"
    typer.echo(f"{state} at step {result.step} in {result.seconds:.0f} s; run: {result.run_dir}", err=True)
    if result.last_checkpoint:
        typer.echo(f"last checkpoint: {result.last_checkpoint}", err=True)
    if result.best_checkpoint:
        typer.echo(f"best checkpoint: {result.best_checkpoint} (held-out loss {result.best_val:.4f})", err=True)
    if result.bad_files:
        typer.echo(f"skipped {len(result.bad_files)} unreadable image(s):", err=True)
        for path, reason in sorted(result.bad_files.items())[:20]:
            typer.echo(f"  {path}: {reason}", err=True)


_EX_IO, _EX_MODEL, _EX_FEAT, _EX_RUN, _EX_SAFE = "Input and output", "Upsampler", "Features", "Run", "Safety"
_EXTRACT_EPILOG = (
    "Examples:\n\n"
    "  vitup extract ./images --out feats.zarr --res 224 --checkpoint runs/b/last\n\n"
    "  vitup extract @list.txt --out feats.h5 --upsampler bilinear --backbone dinov3_b --pca 64 --resume\n\n"
    "  torchrun --nproc-per-node 8 -m vitup_cli extract ./images --out feats.zarr --checkpoint runs/b/last\n\n"
    "  vitup extract 'shards/{000..099}.tar' --out s3://bucket/feats.zarr --part $SLURM_ARRAY_TASK_ID/100"
)


@app.command("extract", epilog=_EXTRACT_EPILOG)
def extract_cmd(
    images: Annotated[
        str,
        typer.Argument(
            help="A folder (recursive, sorted), @list.txt (one path or URL a line), tar shards "
            "('shards/{000..099}.tar', webdataset layout, local or remote), or one image."
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            rich_help_panel=_EX_IO,
            help="The store: NAME.zarr (Zarr v3; also at any fsspec URL: s3://bucket/NAME.zarr) or NAME.h5 (local).",
        ),
    ],
    res: Annotated[
        str, typer.Option("--res", "-r", rich_help_panel=_EX_FEAT, help="Output grid: R (R x R) or H,W.")
    ] = "224",
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            "-c",
            rich_help_panel=_EX_MODEL,
            help="A trained upsampler: vit-up:dinov3_splus, vit-up:dinov3_b, uplift:dinov3_splus, uplift:dinov2_s, "
            "loftup:dinov2_s (and _reg, dinov2_b...), hf:ORG/REPO/FILE, a local copy of a published file (a LoftUp "
            "pytorch_model.bin too), or a `vitup train` checkpoint of any --method; brings its own backbone.",
        ),
    ] = None,
    upsampler: Annotated[
        str | None,
        typer.Option(
            "--upsampler",
            "-u",
            rich_help_panel=_EX_MODEL,
            help="bilinear, nearest or lowres instead of a trained upsampler, or loftup (the published weights "
            "for --backbone). Default: the checkpoint's (implied); without --checkpoint, the published ViT-Up "
            "weights of the backbone (dinov3_s+, dinov3_b).",
        ),
    ] = None,
    minmax: Annotated[
        str,
        typer.Option(
            "--minmax",
            rich_help_panel=_EX_MODEL,
            help="LoftUp's guidance-image min-max scaling: image (per image, vitup's default) or batch (the "
            "reference: an image's features depend on its batch-mates). Recorded in the store.",
        ),
    ] = "image",
    backbone: BackboneOpt = "dinov3_s+",
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = "hub",
    backbone_args: BackboneArgsOpt = None,
    input_size: Annotated[
        int | None,
        typer.Option(
            "--input-size", rich_help_panel=_EX_MODEL, help="Backbone input side in pixels (default 28 tokens)."
        ),
    ] = None,
    tap: Annotated[
        int | None,
        typer.Option("--tap", rich_help_panel=_EX_MODEL, help="Hidden-state index to store (default: the last)."),
    ] = None,
    fit: Annotated[
        str,
        typer.Option(
            "--fit",
            rich_help_panel=_EX_FEAT,
            help="squash, crop (centre) or pad (keeps the aspect; `valid` records the image).",
        ),
    ] = "pad",
    dtype: Annotated[str, typer.Option("--dtype", rich_help_panel=_EX_FEAT, help="float16 or float32.")] = "float16",
    pca: Annotated[
        int | None,
        typer.Option(
            "--pca",
            rich_help_panel=_EX_FEAT,
            help="Store K principal components (fitted on a sample, stored so readers can map back).",
        ),
    ] = None,
    pca_images: Annotated[
        int, typer.Option("--pca-images", rich_help_panel=_EX_FEAT, help="Images the PCA is fitted on.")
    ] = 64,
    tokens: Annotated[
        bool,
        typer.Option("--tokens", rich_help_panel=_EX_FEAT, help="Also store the backbone tokens (`lowres`)."),
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-B",
            rich_help_panel=_EX_RUN,
            help="Images per batch and per shard (default: up to 8, within 256 MB of features).",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-j", rich_help_panel=_EX_RUN, help="Image decoding processes (default: auto)."),
    ] = None,
    device: Annotated[str, typer.Option("--device", rich_help_panel=_EX_RUN, help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            rich_help_panel=_EX_RUN,
            help="Model arithmetic: auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32; recorded in the store.",
        ),
    ] = "auto",
    compile_: Annotated[
        bool,
        typer.Option(
            "--compile",
            rich_help_panel=_EX_RUN,
            help="torch.compile the backbone's blocks and the upsampler's heavy modules (the first batch waits for it; "
            "a C++ compiler is needed on CPU).",
        ),
    ] = False,
    chunk_queries: Annotated[
        int | None,
        typer.Option("--chunk-queries", rich_help_panel=_EX_RUN, help="ViT-Up queries per chunk (bounds memory)."),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", rich_help_panel=_EX_RUN, help="Seeds a random-init backbone (--pretrained none).")
    ] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", rich_help_panel=_EX_SAFE, help="Replace an existing store.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", rich_help_panel=_EX_SAFE, help="Continue an existing store (same inputs and settings)."
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", rich_help_panel=_EX_SAFE, help="Start even if the disk looks too small.")
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", rich_help_panel=_EX_SAFE, help="Stop at the first unreadable image.")
    ] = False,
    storage_option: Annotated[
        list[str] | None,
        typer.Option(
            "--storage-option",
            rich_help_panel=_EX_IO,
            help="KEY=VALUE for fsspec (repeatable), e.g. endpoint_url=http://minio:9000 or anon=true; "
            "the usual environment (AWS_ENDPOINT_URL_S3, credentials) works too.",
        ),
    ] = None,
    part: Annotated[
        str | None,
        typer.Option(
            "--part",
            rich_help_panel=_EX_RUN,
            help="I/N: this job is part I of N of a job array (SLURM --array), no rendezvous; "
            "the first part creates the store, each part owns disjoint shards.",
        ),
    ] = None,
    create_only: Annotated[
        bool,
        typer.Option(
            "--create-only", rich_help_panel=_EX_RUN, help="Create the store at its final size and stop (before parts)."
        ),
    ] = False,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed", rich_help_panel=_EX_SAFE, help="Run again only the rows whose status is failed."
        ),
    ] = False,
    compression: Annotated[
        str,
        typer.Option("--compression", rich_help_panel=_EX_FEAT, help="Zarr codec (Blosc): zstd, lz4 or none."),
    ] = "zstd",
    global_pool: Annotated[
        str | None,
        typer.Option(
            "--global",
            rich_help_panel=_EX_FEAT,
            help="Also store one vector per image, global (image, channel), from the same pass: cls or mean.",
        ),
    ] = None,
    lock_timeout: Annotated[
        float,
        typer.Option(
            "--lock-timeout",
            rich_help_panel=_EX_SAFE,
            help="Seconds without a heartbeat after which another host's (or a remote store's) lock is stale.",
        ),
    ] = 1800.0,
) -> None:
    """Write upsampled dense features for image folders to Zarr or HDF5 stores."""
    import os
    import shlex
    import sys

    from vitup_cli.backbones import parse_overrides
    from vitup_cli.extract import ExtractConfig, parse_part, parse_res, parse_storage_options, run_extract
    from vitup_cli.progress import Reporter, RichReporter, human_bytes

    config = ExtractConfig(
        images=images,
        out=out,
        res=parse_res(res),
        upsampler=upsampler,
        checkpoint=checkpoint,
        backbone=backbone,
        weights=weights,
        pretrained=pretrained,
        backbone_args=parse_overrides(backbone_args),
        input_size=input_size,
        fit=fit,
        tap=tap,
        dtype=dtype,
        pca=pca,
        pca_images=pca_images,
        lowres=tokens,
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
        compile=compile_,
        chunk_queries=chunk_queries,
        minmax=minmax,
        overwrite=overwrite,
        resume=resume,
        force=force,
        strict=strict,
        seed=seed,
        command=shlex.join(["vitup", "extract", *sys.argv[2:]]) if sys.argv[1:2] == ["extract"] else None,
        storage_options=parse_storage_options(storage_option),
        part=parse_part(part),
        create_only=create_only,
        retry_failed=retry_failed,
        compression=compression,
        lock_timeout=lock_timeout,
        global_pool=global_pool,
    )
    reporter = RichReporter() if sys.stderr.isatty() else Reporter()
    summary = run_extract(config, reporter=reporter)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if summary.failures:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in summary.failures)
        reporter.warning(f"{len(summary.failures)} image(s) could not be read and were skipped:\n{lines}")
    typer.echo(
        f"{summary.store}: {summary.done} done, {summary.failed} failed, {summary.skipped} skipped "
        f"(already done) of {summary.total} images" + ("" if summary.complete else f", {summary.pending} pending")
    )
    size = "remote store" if summary.bytes_on_disk is None else f"size on disk {human_bytes(summary.bytes_on_disk)}"
    typer.echo(
        f"{size} (uncompressed {human_bytes(summary.estimate_bytes)}); "
        f"{summary.processed} images in {summary.seconds:.1f} s, {summary.images_per_s:.1f} images/s"
    )


_PR_DATA, _PR_MODEL, _PR_PROTO, _PR_CACHE, _PR_RUN = "Dataset", "Upsampler", "Protocol", "Cache and report", "Run"
_PR_CORR = "Correspondence (spair, keypoints)"
_PROBE_EPILOG = (
    "Examples:\n\n"
    "  vitup probe voc --root /data/VOCdevkit --checkpoint runs/b/last --upsampler vitup,bilinear\n\n"
    "  vitup probe folder --root ./scenes --task depth --backbone dinov3_b --limit 200 --out reports/depth\n\n"
    "  vitup probe spair --root /data/SPair-71k --checkpoint runs/splus/last --upsampler lowres,bilinear,vitup\n\n"
    "  vitup probe keypoints --root ./my_pairs --backbone dinov3_b   (my_pairs/pairs.json: see the README)"
)


@app.command("probe", epilog=_PROBE_EPILOG)
def probe_cmd(
    dataset: Annotated[
        str,
        typer.Argument(
            help="voc, ade20k, cityscapes, cocostuff, folder (linear probes); spair (SPair-71k PCK) or keypoints "
            "(your own pairs.json) for correspondence."
        ),
    ],
    root: Annotated[
        Path,
        typer.Option(
            "--root", rich_help_panel=_PR_DATA, help="The dataset's folder, in its standard layout (see the README)."
        ),
    ],
    task: Annotated[
        str, typer.Option("--task", rich_help_panel=_PR_DATA, help="seg (segmentation) or depth (folder only).")
    ] = "seg",
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            rich_help_panel=_PR_DATA,
            help="Use the first N images of each split (correspondence: N pairs per category).",
        ),
    ] = None,
    depth_scale: Annotated[
        float | None,
        typer.Option(
            "--depth-scale", rich_help_panel=_PR_DATA, help="Integer depth PNG value per metre (default 1000: mm)."
        ),
    ] = None,
    max_depth: Annotated[
        float, typer.Option("--max-depth", rich_help_panel=_PR_DATA, help="Depth range of the head's bins, metres.")
    ] = 10.0,
    checkpoint: Annotated[
        list[str] | None,
        typer.Option(
            "--checkpoint",
            "-c",
            rich_help_panel=_PR_MODEL,
            help="A trained upsampler: vit-up:dinov3_splus, vit-up:dinov3_b, uplift:dinov3_splus, loftup:dinov2_s, "
            "hf:ORG/REPO/FILE, an official file, or a `vitup train` checkpoint of any --method; repeat it once per "
            "method to compare them side by side.",
        ),
    ] = None,
    upsampler: Annotated[
        str | None,
        typer.Option(
            "--upsampler",
            "-u",
            rich_help_panel=_PR_MODEL,
            help="Comma-separated: vitup, uplift, featsharp (each needs its --checkpoint), loftup (its --checkpoint, "
            "else the published weights for the backbone), bilinear, nearest, lowres; the first is the reference "
            "column (default: the checkpoints' upsamplers, else bilinear; spair and keypoints: lowres,bilinear and "
            "the checkpoints').",
        ),
    ] = None,
    backbone: BackboneOpt = "dinov3_s+",
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = "hub",
    backbone_args: BackboneArgsOpt = None,
    input_size: Annotated[
        int | None,
        typer.Option(
            "--input-size",
            rich_help_panel=_PR_MODEL,
            help="Backbone input side in pixels (default 28 tokens: 448 for patch 16).",
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", rich_help_panel=_PR_PROTO, help="Default 20 (COCO-Stuff 5); depth 5."),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", rich_help_panel=_PR_PROTO, help="AdamW learning rate (seg 2e-3, depth 5e-3)."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-B", rich_help_panel=_PR_PROTO, help="Images per step.")
    ] = 4,
    schedule: Annotated[
        str,
        typer.Option(
            "--schedule",
            rich_help_panel=_PR_PROTO,
            help="cosine (over all iterations) or jafar (JAFAR's per-epoch cosine stepped every batch: "
            "reproduces published JAFAR-family tables).",
        ),
    ] = "cosine",
    res: Annotated[
        int | None,
        typer.Option(
            "--res",
            "-r",
            rich_help_panel=_PR_PROTO,
            help="Stored feature grid (default 224, 448 = the exact protocol; spair and keypoints: 448).",
        ),
    ] = None,
    crop: Annotated[
        int,
        typer.Option("--crop", rich_help_panel=_PR_PROTO, help="Short side resize + centre crop of images and labels."),
    ] = 448,
    no_flip: Annotated[
        bool, typer.Option("--no-flip", rich_help_panel=_PR_PROTO, help="No random horizontal flips in training.")
    ] = False,
    seed: Annotated[
        int, typer.Option("--seed", rich_help_panel=_PR_PROTO, help="Seeds the head, order and flips.")
    ] = 0,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache",
            rich_help_panel=_PR_CACHE,
            help="Feature store cache (default $VITUP_CACHE/probe or ~/.cache/vitup/probe).",
        ),
    ] = None,
    no_cache: Annotated[
        bool,
        typer.Option(
            "--no-cache",
            rich_help_panel=_PR_CACHE,
            help="Compute features from the images every epoch; write no store.",
        ),
    ] = False,
    dtype: Annotated[
        str, typer.Option("--dtype", rich_help_panel=_PR_CACHE, help="Stored features: float16 or float32.")
    ] = "float16",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            rich_help_panel=_PR_CACHE,
            help="Report folder (default ./probe-DATASET-TASK; spair: ./probe-spair).",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", rich_help_panel=_PR_CACHE, help="Replace a report already in --out.")
    ] = False,
    device: Annotated[str, typer.Option("--device", rich_help_panel=_PR_RUN, help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            rich_help_panel=_PR_RUN,
            help="Feature arithmetic: auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32 (part of the cache key).",
        ),
    ] = "auto",
    compile_: Annotated[
        bool,
        typer.Option(
            "--compile",
            rich_help_panel=_PR_RUN,
            help="torch.compile the backbone's blocks and the upsampler's heavy modules while extracting features.",
        ),
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-j", rich_help_panel=_PR_RUN, help="Image decoding workers (default: auto)."),
    ] = None,
    memory: Annotated[
        float | None,
        typer.Option(
            "--memory-gb",
            rich_help_panel=_PR_RUN,
            help="Stored features a split may hold in RAM before streaming "
            "from disk (default: a quarter of the machine's memory).",
        ),
    ] = None,
    split: Annotated[
        str, typer.Option("--split", rich_help_panel=_PR_CORR, help="spair: the pair split (test, val or trn).")
    ] = "test",
    categories: Annotated[
        str | None,
        typer.Option("--categories", rich_help_panel=_PR_CORR, help="Comma-separated categories (default all)."),
    ] = None,
    alpha: Annotated[
        str, typer.Option("--alpha", rich_help_panel=_PR_CORR, help="PCK thresholds, fractions of max(box w, h).")
    ] = "0.10,0.05,0.01",
    exclude_padding: Annotated[
        bool,
        typer.Option(
            "--exclude-padding",
            rich_help_panel=_PR_CORR,
            help="Leave the target's padding cells out of the argmax (the reference keeps them).",
        ),
    ] = False,
    map_back: Annotated[
        str,
        typer.Option(
            "--map-back", rich_help_panel=_PR_CORR, help="center (reference) or corner (Probe3D) of the matched cell."
        ),
    ] = "center",
    source_sampling: Annotated[
        str,
        typer.Option(
            "--source-sampling",
            rich_help_panel=_PR_CORR,
            help="nearest (the keypoint's cell: reference) or bilinear (interpolated: Probe3D).",
        ),
    ] = "nearest",
) -> None:
    """Train and score linear probes (segmentation, depth) from cached feature stores, or score semantic
    correspondence (spair, keypoints: PCK of nearest-neighbour matches)."""
    import sys

    from vitup_cli.probe.spair import PAIR_READERS

    if dataset in PAIR_READERS:
        if no_cache:
            raise VitupError(f"--no-cache: not for `vitup probe {dataset}`, which reuses each image's features")
        if task != "seg":
            raise VitupError(f"--task {task}: not for `vitup probe {dataset}` (correspondence has no task)")
        _correspondence(
            dataset, root, split=split, categories=categories, limit=limit,
            checkpoint=(checkpoint[0] if len(checkpoint) == 1 else checkpoint) if checkpoint else None,
            upsampler=upsampler, backbone=backbone, weights=weights, pretrained=pretrained,
            backbone_args=backbone_args, input_size=input_size, res=res or 448, alpha=alpha,
            padding="exclude" if exclude_padding else "include", map_back=map_back, source_sampling=source_sampling,
            dtype=dtype, cache=cache, out=out, overwrite=overwrite, device=device, workers=workers, seed=seed,
            precision=precision, compile=compile_,
        )  # fmt: skip
        return

    from rich.console import Console

    from vitup_cli.backbones import parse_overrides
    from vitup_cli.probe import ProbeConfig, run_probe
    from vitup_cli.probe.report import results_table

    config = ProbeConfig(
        dataset=dataset,
        root=root,
        upsamplers=[u for u in (upsampler or "").split(",") if u.strip()] or None,
        checkpoint=(checkpoint[0] if len(checkpoint) == 1 else checkpoint) if checkpoint else None,
        backbone=backbone,
        weights=weights,
        pretrained=pretrained,
        backbone_args=parse_overrides(backbone_args),
        task=task,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        schedule=schedule,
        flip=not no_flip,
        input_size=input_size,
        res=res or 224,
        crop=crop,
        dtype=dtype,
        cache=cache,
        no_cache=no_cache,
        out=out or Path(f"probe-{dataset}-{task}"),
        overwrite=overwrite,
        limit=limit,
        device=device,
        precision=precision,
        compile=compile_,
        workers=workers,
        seed=seed,
        memory_budget=None if memory is None else int(memory * (1 << 30)),
        depth_scale=depth_scale,
        max_depth=max_depth,
    )
    from vitup_cli.progress import Reporter, RichReporter

    reporter = RichReporter() if sys.stderr.isatty() else Reporter()
    report = run_probe(config, reporter=reporter)
    console = Console()
    console.print(results_table(report))
    for res_ in report.results:
        if res_.skipped:
            reporter.warning(f"{res_.name}: {len(res_.skipped)} unreadable images were left out (see report.json)")
    files = ", ".join(f"{v}" for k, v in report.files.items() if not k.startswith("head:"))
    typer.echo(f"report: {files}; heads in {Path(config.out) / 'heads'} ({report.seconds:.1f} s)")


def _correspondence(dataset: str, root: Path, *, upsampler: str | None, categories: str | None, alpha: str,
                    backbone_args: str | None, out: Path | None, **kw: Any) -> None:  # fmt: skip
    """``vitup probe spair|keypoints``: PCK of nearest-neighbour matches (``vitup_cli.probe.correspondence``)."""
    import sys

    from rich.console import Console

    from vitup_cli.backbones import parse_overrides
    from vitup_cli.extract import Reporter, RichReporter
    from vitup_cli.probe.correspondence import CorrespondenceConfig, run_correspondence
    from vitup_cli.probe.correspondence_report import results_table

    try:
        alphas = [float(a) for a in alpha.split(",") if a.strip()]
    except ValueError:
        raise VitupError(f"--alpha {alpha}: give comma-separated fractions, e.g. 0.10,0.05,0.01") from None
    config = CorrespondenceConfig(
        dataset=dataset, root=root, upsamplers=[u for u in (upsampler or "").split(",") if u.strip()] or None,
        categories=[c for c in (categories or "").split(",") if c.strip()] or None, alphas=alphas,
        backbone_args=parse_overrides(backbone_args), out=out or Path(f"probe-{dataset}"), **kw,
    )  # fmt: skip
    reporter = RichReporter() if sys.stderr.isatty() else Reporter()
    report = run_correspondence(config, reporter=reporter)
    Console().print(results_table(report))
    for res_ in report.results:
        if res_.skipped:
            reporter.warning(f"{res_.name}: {len(res_.skipped)} pairs had no features and were left out")
    if report.skipped:
        reporter.warning(f"{len(report.skipped)} pairs could not be read and were left out (see report.json)")
    typer.echo(f"report: {', '.join(report.files.values())} ({report.seconds:.1f} s)")


_VIZ_IO, _VIZ_MODEL, _VIZ_FIG = "Input and output", "Features", "Figure"


@app.command(
    "visualize",
    epilog="Examples:\n\n"
    "  vitup visualize photo.jpg --checkpoint runs/b/last --compare vitup,bilinear --point 320,240\n\n"
    "  vitup visualize feats.zarr --index 0 --index 3 --out rows.png",
)
def visualize_cmd(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Image files, or one feature store (.zarr, .h5) together with --index.", show_default=False
        ),
    ],
    index: Annotated[
        list[int] | None,
        typer.Option("--index", "-i", rich_help_panel=_VIZ_IO, help="Store row to draw (repeatable)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            rich_help_panel=_VIZ_IO,
            dir_okay=False,
            help="PNG to write (default: IMG.vitup.png next to the first image; STORE.rowI.png for stores).",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", rich_help_panel=_VIZ_IO, help="Replace an existing PNG.")
    ] = False,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            rich_help_panel=_VIZ_IO,
            file_okay=False,
            help="Stores: the folder the stored image paths are relative to (default: as recorded, or "
            "next to the store).",
        ),
    ] = None,
    point: Annotated[
        list[str] | None,
        typer.Option(
            "--point",
            "-p",
            rich_help_panel=_VIZ_IO,
            metavar="X,Y",
            help="Add cosine-similarity maps from this pixel of the original image (repeatable).",
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            "-c",
            rich_help_panel=_VIZ_MODEL,
            help="A trained upsampler: vit-up:dinov3_splus, vit-up:dinov3_b, uplift:dinov3_splus, uplift:dinov2_s, "
            "loftup:dinov2_s (and _reg, dinov2_b...), hf:ORG/REPO/FILE, a local copy of a published file (a LoftUp "
            "pytorch_model.bin too), or a `vitup train` checkpoint of any --method; brings its own backbone.",
        ),
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            rich_help_panel=_VIZ_MODEL,
            help="Methods to draw, from vitup,uplift,loftup,featsharp,bilinear,nearest,lowres (default: the "
            "checkpoint's and bilinear; without --checkpoint the backbone's published ViT-Up weights). The low-res "
            "tokens are always drawn.",
        ),
    ] = None,
    res: Annotated[
        int,
        typer.Option(
            "--res", rich_help_panel=_VIZ_MODEL, help="Feature grid long side; the short side keeps the aspect."
        ),
    ] = 224,
    input_size: Annotated[
        int | None,
        typer.Option("--input-size", rich_help_panel=_VIZ_MODEL, help="Backbone input in pixels (default: 28 tokens)."),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", rich_help_panel=_VIZ_MODEL, help="cpu, cuda, cuda:1, ... or auto.")
    ] = "auto",
    seed: Annotated[
        int,
        typer.Option("--seed", rich_help_panel=_VIZ_MODEL, help="Seeds a random-init backbone (--pretrained none)."),
    ] = 0,
    dpi: Annotated[
        int, typer.Option("--dpi", rich_help_panel=_VIZ_FIG, min=10, max=1200, help="Dots per inch of the PNG.")
    ] = 100,
    panel_size: Annotated[
        float,
        typer.Option("--panel-size", rich_help_panel=_VIZ_FIG, min=0.5, max=20.0, help="Inches per panel column."),
    ] = 3.0,
    backbone: BackboneOpt = "dinov3_s+",
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = "hub",
    backbone_args: BackboneArgsOpt = None,
) -> None:
    """Draw what the features see: joint PCA colours and cosine-similarity maps, one row per image.

    Each image gets input | low-res tokens | each upsampler, all coloured by ONE PCA fitted on that
    image's panels (so colours compare across methods). Stored rows need no model.
    """

    from vitup_cli import viz
    from vitup_cli.backbones import parse_overrides
    from vitup_cli.progress import default_reporter

    log = default_reporter().info

    options = viz.FigureOptions(panel_size=panel_size, dpi=dpi)
    points = [viz.parse_point(p) for p in point or []]
    if len(inputs) == 1 and viz.is_store(inputs[0]):
        if checkpoint is not None or compare is not None:
            raise VitupError("--checkpoint/--compare do not apply to a store: its rows are drawn as stored")
        result = viz.visualize_store(
            inputs[0],
            index or [],
            out,
            points=points,
            image_root=images,
            options=options,
            overwrite=overwrite,
            log=log,
        )
    else:
        if index:
            raise VitupError("--index selects rows of a feature store: pass one .zarr/.h5 store, not images")
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = viz.ModelOptions(
            checkpoint=checkpoint,
            backbone=backbone,
            weights=weights,
            pretrained=pretrained,
            overrides=parse_overrides(backbone_args),
            input_size=input_size,
            device=device,
            seed=seed,
        )
        model = viz.with_default_checkpoint(model, compare, log)
        result = viz.visualize_images(
            inputs,
            out,
            model=model,
            compare=None if compare is None else viz.parse_compare(compare, viz.trained_method(model.checkpoint)),
            res=res,
            points=points,
            options=options,
            overwrite=overwrite,
            log=log,
        )
    rows, cols = result.grid
    typer.echo(f"wrote {result.path} ({result.size_px[0]}x{result.size_px[1]} px, {rows}x{cols} panels)")


def main() -> None:
    from vitup_cli.allocator import tune_malloc

    tune_malloc()  # large per-chunk buffers reused, not page-faulted in again (vitup_cli/allocator.py)
    app()
