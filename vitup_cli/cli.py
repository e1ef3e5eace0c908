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
        str,
        typer.Option(
            "--upsampler", "-u", rich_help_panel=_EX_MODEL, help="Without --checkpoint: bilinear, nearest or lowres."
        ),
    ] = "bilinear",
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
    from vitup_cli.extract import ExtractConfig, Reporter, RichReporter, human_bytes, parse_res, run_extract

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
    from vitup_cli.extract import Reporter, RichReporter
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
        limit=limit,
        device=device,
        workers=workers,
        seed=seed,
        memory_budget=None if memory is None else int(memory * (1 << 30)),
        depth_scale=depth_scale,
        max_depth=max_depth,
    )
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
