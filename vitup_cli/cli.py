"""The ``vitup`` command line: a thin Typer layer that parses, calls the importable core, and reports.

User errors (``VitupError``) become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from vitup_cli import __version__
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

    table = Table("name", "timm model", "hub tag", "notes")
    aliases = {v: k for k, v in ALIASES.items()}
    for name, spec in BACKBONES.items():
        shown = f"{name} ({aliases[name]})" if name in aliases else name
        table.add_row(shown, spec.timm_name, spec.tag or "-", spec.note)
    Console().print(table)


_TRAIN_DEFAULTS = TrainConfig()
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
_TRAIN_EPILOG = (
    "Examples:\n\n"
    "  vitup train --backbone dinov3_s+ --data /data/imagenet/train --out runs/splus --val-data /data/val\n\n"
    "  torchrun --nproc-per-node 8 -m vitup_cli train --config train.yaml --out runs/b; "
    "vitup train --resume runs/b"
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
        int | None, _opt(_MODEL, "--window", help="Cross-attention window in tokens (default: global).")
    ] = None,
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
    steps: Annotated[int, _opt(_OPT, "--steps", help="Optimiser steps.")] = _TRAIN_DEFAULTS.steps,
    batch_size: Annotated[
        int, _opt(_OPT, "--batch-size", "-B", help="Images per step over all processes and accumulation steps.")
    ] = _TRAIN_DEFAULTS.batch_size,
    lr: Annotated[float, _opt(_OPT, "--lr", help="Peak AdamW learning rate.")] = _TRAIN_DEFAULTS.lr,
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
) -> None:
    """Distil a ViT-Up upsampler (LoRA-adapted backbone, frozen teacher).

    Defaults are the paper's recipe (DINOv3-S+ on ImageNet-1K):
    batch 24, AdamW 2e-4, 5% warm-up, cosine to 1e-6, 53,381 steps;
    448 px canvas, 56x56 queries, teachers at 224/448/896 px.
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
    "  torchrun --nproc-per-node 8 -m vitup_cli extract ./images --out feats.zarr --checkpoint runs/b/last"
)


@app.command("extract", epilog=_EXTRACT_EPILOG)
def extract_cmd(
    images: Annotated[
        str, typer.Argument(help="A folder (recursive, sorted), @list.txt (one path a line), or one image.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", rich_help_panel=_EX_IO, help="The store: NAME.zarr (Zarr v3) or NAME.h5.")
    ],
    res: Annotated[
        str, typer.Option("--res", "-r", rich_help_panel=_EX_FEAT, help="Output grid: R (R x R) or H,W.")
    ] = "224",
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", "-c", rich_help_panel=_EX_MODEL, help="A ViT-Up checkpoint from `vitup train`."),
    ] = None,
    upsampler: Annotated[
        str | None,
        typer.Option(
            "--upsampler",
            "-u",
            rich_help_panel=_EX_MODEL,
            help="Without --checkpoint: bilinear (default), nearest or lowres. With one: vitup (implied).",
        ),
    ] = None,
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
) -> None:
    """Write upsampled dense features for image folders to Zarr or HDF5 stores."""
    import os
    import shlex
    import sys

    from vitup_cli.backbones import parse_overrides
    from vitup_cli.extract import ExtractConfig, parse_res, run_extract
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
        chunk_queries=chunk_queries,
        overwrite=overwrite,
        resume=resume,
        force=force,
        strict=strict,
        seed=seed,
        command=shlex.join(["vitup", "extract", *sys.argv[2:]]) if sys.argv[1:2] == ["extract"] else None,
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
        f"(already done) of {summary.total} images"
    )
    typer.echo(
        f"size on disk {human_bytes(summary.bytes_on_disk)} (uncompressed {human_bytes(summary.estimate_bytes)}); "
        f"{summary.processed} images in {summary.seconds:.1f} s, {summary.images_per_s:.1f} images/s"
    )


_PR_DATA, _PR_MODEL, _PR_PROTO, _PR_CACHE, _PR_RUN = "Dataset", "Upsampler", "Protocol", "Cache and report", "Run"
_PROBE_EPILOG = (
    "Examples:\n\n"
    "  vitup probe voc --root /data/VOCdevkit --checkpoint runs/b/last --upsampler vitup,bilinear\n\n"
    "  vitup probe folder --root ./scenes --task depth --backbone dinov3_b --limit 200 --out reports/depth"
)


@app.command("probe", epilog=_PROBE_EPILOG)
def probe_cmd(
    dataset: Annotated[str, typer.Argument(help="voc, ade20k, cityscapes, cocostuff, or folder.")],
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
        typer.Option("--limit", rich_help_panel=_PR_DATA, help="Use the first N images of each split (quick runs)."),
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
        Path | None,
        typer.Option("--checkpoint", "-c", rich_help_panel=_PR_MODEL, help="A ViT-Up checkpoint from `vitup train`."),
    ] = None,
    upsampler: Annotated[
        str | None,
        typer.Option(
            "--upsampler",
            "-u",
            rich_help_panel=_PR_MODEL,
            help="Comma-separated: vitup (needs --checkpoint), bilinear, nearest, lowres; the first is the "
            "reference column (default: vitup with --checkpoint, else bilinear).",
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
        int,
        typer.Option(
            "--res",
            "-r",
            rich_help_panel=_PR_PROTO,
            help="Stored feature grid (448 = the exact protocol; 224 saves 4x).",
        ),
    ] = 224,
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
        typer.Option("--out", "-o", rich_help_panel=_PR_CACHE, help="Report folder (default ./probe-DATASET-TASK)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", rich_help_panel=_PR_CACHE, help="Replace a report already in --out.")
    ] = False,
    device: Annotated[str, typer.Option("--device", rich_help_panel=_PR_RUN, help="auto, cpu or cuda.")] = "auto",
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
) -> None:
    """Train and score linear probes (segmentation, depth) from cached feature stores."""
    import sys

    from rich.console import Console

    from vitup_cli.backbones import parse_overrides
    from vitup_cli.probe import ProbeConfig, run_probe
    from vitup_cli.probe.report import results_table

    config = ProbeConfig(
        dataset=dataset,
        root=root,
        upsamplers=[u for u in (upsampler or "").split(",") if u.strip()] or None,
        checkpoint=checkpoint,
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
        res=res,
        crop=crop,
        dtype=dtype,
        cache=cache,
        no_cache=no_cache,
        out=out or Path(f"probe-{dataset}-{task}"),
        overwrite=overwrite,
        limit=limit,
        device=device,
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
            help="ViT-Up checkpoint (NAME or NAME.safetensors beside NAME.json); brings its own backbone.",
        ),
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            rich_help_panel=_VIZ_MODEL,
            help="Methods to draw, from vitup,bilinear,nearest,lowres (default: vitup,bilinear with "
            "--checkpoint, else bilinear,nearest). The low-res tokens are always drawn.",
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
        result = viz.visualize_images(
            inputs,
            out,
            model=model,
            compare=viz.parse_compare(compare, checkpoint is not None),
            res=res,
            points=points,
            options=options,
            overwrite=overwrite,
            log=log,
        )
    rows, cols = result.grid
    typer.echo(f"wrote {result.path} ({result.size_px[0]}x{result.size_px[1]} px, {rows}x{cols} panels)")


def main() -> None:
    app()
