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


@app.command("train")
def train_cmd() -> None:
    """Distil a ViT-Up upsampler (LoRA-adapted backbone, frozen teacher)."""
    _not_built("train", 4)


@app.command("extract")
def extract_cmd() -> None:
    """Write upsampled dense features for image folders to Zarr or HDF5 stores."""
    _not_built("extract", 3)


@app.command("probe")
def probe_cmd() -> None:
    """Train and score linear probes (segmentation, depth) from feature stores."""
    _not_built("probe", 5)


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
            help="PNG to write [default: IMG.vitup.png next to the first image; STORE.rowI.png for stores].",
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
            help="Stores: the folder the stored image paths are relative to [default: as recorded, or "
            "next to the store].",
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
            help="Methods to draw, from vitup,bilinear,nearest,lowres [default: vitup,bilinear with "
            "--checkpoint, else bilinear,nearest]. The low-res tokens are always drawn.",
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
        typer.Option("--input-size", rich_help_panel=_VIZ_MODEL, help="Backbone input in pixels [default: 28 tokens]."),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", rich_help_panel=_VIZ_MODEL, help="cpu, cuda, cuda:1, ... or auto.")
    ] = "auto",
    dpi: Annotated[int, typer.Option("--dpi", rich_help_panel=_VIZ_FIG, min=10, max=1200)] = 100,
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

    def log(message: str) -> None:
        typer.echo(message, err=True)

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
