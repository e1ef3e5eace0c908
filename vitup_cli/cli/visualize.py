"""``vitup visualize``: what the features see, as joint PCA colours and cosine-similarity maps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitup_cli.choice import parse_overrides
from vitup_cli.cli._app import (
    FEATURES,
    IO,
    BackboneArgsOpt,
    BackboneOpt,
    CheckpointOpt,
    DeviceOpt,
    InputSizeOpt,
    OutOpt,
    OverwriteOpt,
    PretrainedOpt,
    ResOpt,
    SeedOpt,
    WeightsOpt,
    app,
    reporter,
    variant,
)
from vitup_cli.errors import VitupError

_VIZ_FIG = "Figure"  # and _app.py's panels


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
        typer.Option("--index", "-i", rich_help_panel=IO, help="Store row to draw (repeatable)."),
    ] = None,
    out: Annotated[
        Path | None,
        variant(
            OutOpt,
            help="PNG to write (default: IMG.vitup.png next to the first image; STORE.rowI.png for stores).",
            dir_okay=False,
        ),
    ] = None,
    overwrite: Annotated[bool, variant(OverwriteOpt, help="Replace an existing PNG.")] = False,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            rich_help_panel=IO,
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
            rich_help_panel=IO,
            metavar="X,Y",
            help="Add cosine-similarity maps from this pixel of the original image (repeatable).",
        ),
    ] = None,
    checkpoint: Annotated[Path | None, variant(CheckpointOpt, FEATURES)] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            rich_help_panel=FEATURES,
            help="Methods to draw, from vitup,uplift,loftup,featsharp,bilinear,nearest,lowres (default: the "
            "checkpoint's and bilinear; without --checkpoint the backbone's published ViT-Up weights). The low-res "
            "tokens are always drawn.",
        ),
    ] = None,
    res: Annotated[int, variant(ResOpt, help="Feature grid long side; the short side keeps the aspect.")] = 224,
    input_size: Annotated[int | None, variant(InputSizeOpt, FEATURES)] = None,
    device: Annotated[str, variant(DeviceOpt, FEATURES)] = "auto",
    seed: Annotated[int, variant(SeedOpt, FEATURES)] = 0,
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
    # they import torch: lazy for CLI start-up speed
    from vitup_cli import viz

    log = reporter().info

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
            import torch  # heavy: lazy for CLI start-up speed

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
