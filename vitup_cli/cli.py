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


def _not_built(command: str, issue: int) -> None:
    raise VitupError(f"`vitup {command}` is not built yet (tracked in issue #{issue})")


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

    from vitup_cli.train import build_config, resume_config
    from vitup_cli.train.loop import train
    from vitup_cli.train.report import LogReporter, RichReporter

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
    reporter = RichReporter() if sys.stderr.isatty() else LogReporter()
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


@app.command("extract")
def extract_cmd() -> None:
    """Write upsampled dense features for image folders to Zarr or HDF5 stores."""
    _not_built("extract", 3)


@app.command("probe")
def probe_cmd() -> None:
    """Train and score linear probes (segmentation, depth) from feature stores."""
    _not_built("probe", 5)


@app.command("visualize")
def visualize_cmd() -> None:
    """Draw what the features see: PCA colours and similarity maps."""
    _not_built("visualize", 6)


def main() -> None:
    app()
