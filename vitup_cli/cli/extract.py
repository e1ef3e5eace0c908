"""``vitup extract``: upsampled dense features of image folders, lists or tar shards, into Zarr or HDF5 stores."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Annotated

import typer

from vitup_cli.choice import parse_overrides
from vitup_cli.cli._app import (
    FEATURES,
    IO,
    RUN,
    UPSAMPLER,
    BackboneArgsOpt,
    BackboneOpt,
    BatchSizeOpt,
    CheckpointOpt,
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    InputSizeOpt,
    OutOpt,
    OverwriteOpt,
    PrecisionOpt,
    PretrainedOpt,
    ResOpt,
    ResumeOpt,
    SeedOpt,
    UpsamplerOpt,
    WeightsOpt,
    WorkersOpt,
    app,
    reporter,
    variant,
)
from vitup_cli.progress import human_bytes

_EX_SAFE = "Safety"  # and _app.py's panels
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
        variant(
            OutOpt,
            help="The store: NAME.zarr (Zarr v3; also at any fsspec URL: s3://bucket/NAME.zarr) or NAME.h5 (local).",
        ),
    ],
    res: ResOpt = "224",
    checkpoint: CheckpointOpt = None,
    upsampler: UpsamplerOpt = None,
    minmax: Annotated[
        str,
        typer.Option(
            "--minmax",
            rich_help_panel=UPSAMPLER,
            help="LoftUp's guidance-image min-max scaling: image (per image, vitup's default) or batch (the "
            "reference: an image's features depend on its batch-mates). Recorded in the store.",
        ),
    ] = "image",
    backbone: BackboneOpt = "dinov3_s+",
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = "hub",
    backbone_args: BackboneArgsOpt = None,
    input_size: InputSizeOpt = None,
    tap: Annotated[
        int | None,
        typer.Option("--tap", rich_help_panel=UPSAMPLER, help="Hidden-state index to store (default: the last)."),
    ] = None,
    fit: Annotated[
        str,
        typer.Option(
            "--fit",
            rich_help_panel=FEATURES,
            help="squash, crop (centre) or pad (keeps the aspect; `valid` records the image).",
        ),
    ] = "pad",
    resize_filter: Annotated[
        str | None,
        typer.Option(
            "--resize-filter",
            rich_help_panel=FEATURES,
            help="PIL filter that fits images to the input size: bicubic, bilinear, nearest or lanczos "
            "(default: the method's reference pipeline's; LoftUp bilinear, the others bicubic). Recorded.",
        ),
    ] = None,
    dtype: DtypeOpt = "float16",
    pca: Annotated[
        int | None,
        typer.Option(
            "--pca",
            rich_help_panel=FEATURES,
            help="Store K principal components (fitted on a sample, stored so readers can map back).",
        ),
    ] = None,
    pca_images: Annotated[
        int, typer.Option("--pca-images", rich_help_panel=FEATURES, help="Images the PCA is fitted on.")
    ] = 64,
    tokens: Annotated[
        bool,
        typer.Option("--tokens", rich_help_panel=FEATURES, help="Also store the backbone tokens (`lowres`)."),
    ] = False,
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    precision: Annotated[
        str,
        variant(
            PrecisionOpt,
            help="Model arithmetic: auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32; recorded in the store.",
        ),
    ] = "auto",
    compile_: CompileOpt = False,
    chunk_queries: Annotated[
        int | None,
        typer.Option("--chunk-queries", rich_help_panel=RUN, help="ViT-Up queries per chunk (bounds memory)."),
    ] = None,
    seed: SeedOpt = 0,
    writer_threads: Annotated[
        int | None,
        typer.Option(
            "--writer-threads",
            rich_help_panel=RUN,
            help="Threads compressing the store's shards (default: the cores available, at most 8); 0: zarr's "
            "own codec pipeline.",
        ),
    ] = None,
    overwrite: Annotated[bool, variant(OverwriteOpt, _EX_SAFE, help="Replace an existing store.")] = False,
    resume: Annotated[bool, variant(ResumeOpt, _EX_SAFE)] = False,
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
            rich_help_panel=IO,
            help="KEY=VALUE for fsspec (repeatable), e.g. endpoint_url=http://minio:9000 or anon=true; "
            "the usual environment (AWS_ENDPOINT_URL_S3, credentials) works too.",
        ),
    ] = None,
    part: Annotated[
        str | None,
        typer.Option(
            "--part",
            rich_help_panel=RUN,
            help="I/N: this job is part I of N of a job array (SLURM --array), no rendezvous; "
            "the first part creates the store, each part owns disjoint shards.",
        ),
    ] = None,
    create_only: Annotated[
        bool,
        typer.Option(
            "--create-only", rich_help_panel=RUN, help="Create the store at its final size and stop (before parts)."
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
        typer.Option("--compression", rich_help_panel=FEATURES, help="Zarr codec (Blosc): zstd, lz4 or none."),
    ] = "zstd",
    global_pool: Annotated[
        str | None,
        typer.Option(
            "--global",
            rich_help_panel=FEATURES,
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
    # they import torch: lazy for CLI start-up speed
    from vitup_cli.extract import ExtractConfig, parse_part, parse_res, parse_storage_options, run_extract

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
        resample=resize_filter,
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
        writer_threads=writer_threads,
    )
    progress = reporter()
    summary = run_extract(config, reporter=progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if summary.failures:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in summary.failures)
        progress.warning(f"{len(summary.failures)} image(s) could not be read and were skipped:\n{lines}")
    typer.echo(
        f"{summary.store}: {summary.done} done, {summary.failed} failed, {summary.skipped} skipped "
        f"(already done) of {summary.total} images" + ("" if summary.complete else f", {summary.pending} pending")
    )
    size = "remote store" if summary.bytes_on_disk is None else f"size on disk {human_bytes(summary.bytes_on_disk)}"
    typer.echo(
        f"{size} (uncompressed {human_bytes(summary.estimate_bytes)}); "
        f"{summary.processed} images in {summary.seconds:.1f} s, {summary.images_per_s:.1f} images/s"
    )
