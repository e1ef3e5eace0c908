"""What every ``vitup`` command shares (the model: spaCy's ``spacy/cli/_util.py``): the Typer ``app`` the command
modules register on, the one-line handling of user errors, the progress reporter, and the options that more than
one command takes, each declared once here.

User errors (``VitupError``) become one line on stderr and exit code 2, never a traceback.

A shared option is an ``Annotated`` alias (``DeviceOpt``); a command uses it as is (``device: DeviceOpt =
"auto"``), or, where its help panel, help text, type or a setting differs, through ``variant``
(``seed: Annotated[int, variant(SeedOpt, "Protocol", help="Seeds the head, order and flips.")] = 0``). The flag
names stay those declared here: each flag is spelt in one place (``tests/test_cli_options.py`` checks it).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from typer.core import TyperGroup
from typer.models import OptionInfo

from vitup_cli import __version__
from vitup_cli.errors import VitupError
from vitup_cli.progress import Reporter, default_reporter


class _Group(TyperGroup):
    def invoke(self, ctx: typer.Context) -> Any:
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
        "vitup leaderboard --upsamplers vitup,anyup,bilinear --tasks voc,spair --data-root /data --checkpoint "
        "runs/splus/last\n\n"
        "vitup visualize photo.jpg --checkpoint runs/splus/last --point 320,240\n\n"
        "Offline demo of all five: bash examples/quickstart.sh"
    ),
    pretty_exceptions_enable=False,
    add_completion=False,
)


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


def reporter(*, interval: float | None = None) -> Reporter:
    """The progress reporter of a command (``vitup_cli.progress.default_reporter``): a rich bar on a terminal,
    tqdm in a notebook, plain lines otherwise (logs), those every ``interval`` seconds (default: the reporter's)."""
    chosen = default_reporter()
    if interval is not None:
        chosen.interval = interval
    return chosen


def variant(alias: Any, panel: str | None = None, *, help: str | None = None, **settings: Any) -> OptionInfo:
    """The option of the shared ``alias`` as one command shows it, for that command's own ``Annotated[TYPE, ...]``:
    in its help ``panel``, with a ``help`` text saying what the flag does there, or other ``typer.Option``
    ``settings`` (``dir_okay=False``...). Its flag names are the alias's."""
    info = copy.copy(get_args(alias)[1])
    if panel is not None:
        info.rich_help_panel = panel
    if help is not None:
        info.help = help
    for key, value in settings.items():
        if not hasattr(info, key):
            raise TypeError(f"variant: typer.Option has no setting {key!r}")
        setattr(info, key, value)
    return info


# -- help panels of the shared options (a command's other panels are its own) ---------------------------
BACKBONE, UPSAMPLER, FEATURES, RUN, IO = "Backbone", "Upsampler", "Features", "Run", "Input and output"

# -- the backbone ------------------------------------------------------------------------------------------
BackboneOpt = Annotated[
    str,
    typer.Option(
        "--backbone",
        "-b",
        rich_help_panel=BACKBONE,
        help="dinov3_s, dinov3_s+, dinov3_b, dinov3_l, dinov2_s/_b(_reg), or any timm ViT name.",
    ),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        rich_help_panel=BACKBONE,
        dir_okay=False,
        help="Local backbone state dict (.safetensors, or .pth loaded with weights_only).",
    ),
]
PretrainedOpt = Annotated[
    str,
    typer.Option(
        "--pretrained",
        rich_help_panel=BACKBONE,
        help="'hub' (the backbone's default tag), a hub tag such as lvd1689m, or 'none' (random init: "
        "tests and demos only).",
    ),
]
BackboneArgsOpt = Annotated[
    str | None,
    typer.Option(
        "--backbone-args",
        rich_help_panel=BACKBONE,
        help="timm constructor overrides for shrunk models, e.g. 'depth=4,embed_dim=192,num_heads=3'.",
    ),
]

# -- the upsampler -----------------------------------------------------------------------------------------
CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        "-c",
        rich_help_panel=UPSAMPLER,
        help="A trained upsampler: vit-up:dinov3_splus, vit-up:dinov3_b, uplift:dinov3_splus, uplift:dinov2_s, "
        "loftup:dinov2_s (and _reg, dinov2_b...), hf:ORG/REPO/FILE, a local copy of a published file (a LoftUp "
        "pytorch_model.bin too), or a `vitup train` checkpoint of any --method; brings its own backbone.",
    ),
]
UpsamplerOpt = Annotated[
    str | None,
    typer.Option(
        "--upsampler",
        "-u",
        rich_help_panel=UPSAMPLER,
        help="bilinear, nearest or lowres instead of a trained upsampler, or loftup (the published weights "
        "for --backbone). Default: the checkpoint's (implied); without --checkpoint, the published ViT-Up "
        "weights of the backbone (dinov3_s+, dinov3_b).",
    ),
]
InputSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--input-size",
        rich_help_panel=UPSAMPLER,
        help="Backbone input side in pixels (default 28 tokens: 448 for patch 16).",
    ),
]

# -- features ----------------------------------------------------------------------------------------------
ResOpt = Annotated[str, typer.Option("--res", "-r", rich_help_panel=FEATURES, help="Output grid: R (R x R) or H,W.")]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", rich_help_panel=FEATURES, help="Stored features: float16 or float32.")
]

# -- input and output --------------------------------------------------------------------------------------
OutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", rich_help_panel=IO, help="Where the command writes its result.")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", rich_help_panel=IO, help="Replace an existing result at --out.")
]
ResumeOpt = Annotated[
    bool,
    typer.Option("--resume", rich_help_panel=IO, help="Continue an existing store (same inputs and settings)."),
]

# -- the run -----------------------------------------------------------------------------------------------
DeviceOpt = Annotated[str, typer.Option("--device", rich_help_panel=RUN, help="auto, cpu, cuda or cuda:N.")]
SeedOpt = Annotated[
    int, typer.Option("--seed", rich_help_panel=RUN, help="Seeds a random-init backbone (--pretrained none).")
]
PrecisionOpt = Annotated[
    str,
    typer.Option("--precision", rich_help_panel=RUN, help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32."),
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        rich_help_panel=RUN,
        help="torch.compile the backbone's blocks and the upsampler's heavy modules (the first batch waits for it; "
        "a C++ compiler is needed on CPU).",
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", "-j", rich_help_panel=RUN, help="Image decoding workers (default: auto)."),
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        "-B",
        rich_help_panel=RUN,
        help="Images per batch and per shard (default: up to 8, within 256 MB of features).",
    ),
]

# -- training (of an upsampler, or of a probe's head) -----------------------------------------------------
LrOpt = Annotated[float, typer.Option("--lr", help="Peak AdamW learning rate.")]
ScheduleOpt = Annotated[str, typer.Option("--schedule", help="cosine (warm-up, then cosine to --min-lr) or constant.")]

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", dir_okay=False, help="YAML or TOML file of settings; flags override it."),
]

# -- the probes' protocol (vitup probe, vitup leaderboard) -------------------------------------------------
PROBE_DATA, PROBE_PROTOCOL, PROBE_CACHE = "Dataset", "Protocol", "Cache and report"
LimitOpt = Annotated[
    int | None,
    typer.Option(
        "--limit",
        rich_help_panel=PROBE_DATA,
        help="Use the first N images of each split (correspondence: N pairs per category).",
    ),
]
DepthScaleOpt = Annotated[
    float | None,
    typer.Option(
        "--depth-scale", rich_help_panel=PROBE_DATA, help="Integer depth PNG value per metre (default 1000: mm)."
    ),
]
MaxDepthOpt = Annotated[
    float, typer.Option("--max-depth", rich_help_panel=PROBE_DATA, help="Depth range of the head's bins, metres.")
]
EpochsOpt = Annotated[
    int | None,
    typer.Option("--epochs", rich_help_panel=PROBE_PROTOCOL, help="Default 20 (COCO-Stuff 5); depth 5."),
]
CropOpt = Annotated[
    int,
    typer.Option(
        "--crop", rich_help_panel=PROBE_PROTOCOL, help="Short side resize + centre crop of images and labels."
    ),
]
CacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        rich_help_panel=PROBE_CACHE,
        help="Feature store cache (default $VITUP_CACHE/probe or ~/.cache/vitup/probe).",
    ),
]
