"""``vitup probe``: linear probes (segmentation, depth) from cached feature stores, and semantic correspondence
(``spair``, ``keypoints``: PCK of nearest-neighbour matches)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from vitup_cli.choice import parse_overrides
from vitup_cli.cli._app import (
    PROBE_CACHE,
    PROBE_DATA,
    PROBE_PROTOCOL,
    RUN,
    BackboneArgsOpt,
    BackboneOpt,
    BatchSizeOpt,
    CacheOpt,
    CheckpointOpt,
    CompileOpt,
    CropOpt,
    DepthScaleOpt,
    DeviceOpt,
    DtypeOpt,
    EpochsOpt,
    InputSizeOpt,
    LimitOpt,
    LrOpt,
    MaxDepthOpt,
    OutOpt,
    OverwriteOpt,
    PrecisionOpt,
    PretrainedOpt,
    ResOpt,
    ScheduleOpt,
    SeedOpt,
    UpsamplerOpt,
    WeightsOpt,
    WorkersOpt,
    app,
    reporter,
    variant,
)
from vitup_cli.errors import VitupError

_PR_DATA, _PR_PROTO, _PR_CACHE = PROBE_DATA, PROBE_PROTOCOL, PROBE_CACHE
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
            help="voc, ade20k, cityscapes, cocostuff, nyu (depth), folder (linear probes); spair (SPair-71k PCK) or "
            "keypoints (your own pairs.json) for correspondence."
        ),
    ],
    root: Annotated[
        Path,
        typer.Option(
            "--root", rich_help_panel=_PR_DATA, help="The dataset's folder, in its standard layout (see the README)."
        ),
    ],
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            rich_help_panel=_PR_DATA,
            help="seg (segmentation) or depth (nyu, folder; default: nyu depth, else seg).",
        ),
    ] = None,
    limit: LimitOpt = None,
    depth_scale: DepthScaleOpt = None,
    max_depth: MaxDepthOpt = 10.0,
    checkpoint: Annotated[
        list[str] | None,
        variant(
            CheckpointOpt,
            help="A trained upsampler: vit-up:dinov3_splus, vit-up:dinov3_b, uplift:dinov3_splus, loftup:dinov2_s, "
            "hf:ORG/REPO/FILE, an official file, or a `vitup train` checkpoint of any --method; repeat it once per "
            "method to compare them side by side.",
        ),
    ] = None,
    upsampler: Annotated[
        str | None,
        variant(
            UpsamplerOpt,
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
    input_size: InputSizeOpt = None,
    epochs: EpochsOpt = None,
    lr: Annotated[float | None, variant(LrOpt, _PR_PROTO, help="AdamW learning rate (seg 2e-3, depth 5e-3).")] = None,
    batch_size: Annotated[int, variant(BatchSizeOpt, _PR_PROTO, help="Images per step.")] = 4,
    schedule: Annotated[
        str,
        variant(
            ScheduleOpt,
            _PR_PROTO,
            help="cosine (over all iterations) or jafar (JAFAR's per-epoch cosine stepped every batch: "
            "reproduces published JAFAR-family tables).",
        ),
    ] = "cosine",
    res: Annotated[
        int | None,
        variant(
            ResOpt,
            _PR_PROTO,
            help="Stored feature grid (default 224, 448 = the exact protocol; spair and keypoints: 448).",
        ),
    ] = None,
    crop: CropOpt = 448,
    no_flip: Annotated[
        bool, typer.Option("--no-flip", rich_help_panel=_PR_PROTO, help="No random horizontal flips in training.")
    ] = False,
    seed: Annotated[int, variant(SeedOpt, _PR_PROTO, help="Seeds the head, order and flips.")] = 0,
    cache: CacheOpt = None,
    no_cache: Annotated[
        bool,
        typer.Option(
            "--no-cache",
            rich_help_panel=_PR_CACHE,
            help="Compute features from the images every epoch; write no store.",
        ),
    ] = False,
    dtype: Annotated[str, variant(DtypeOpt, _PR_CACHE)] = "float16",
    out: Annotated[
        Path | None,
        variant(OutOpt, _PR_CACHE, help="Report folder (default ./probe-DATASET-TASK; spair: ./probe-spair)."),
    ] = None,
    overwrite: Annotated[bool, variant(OverwriteOpt, _PR_CACHE, help="Replace a report already in --out.")] = False,
    device: DeviceOpt = "auto",
    precision: Annotated[
        str,
        variant(
            PrecisionOpt,
            help="Feature arithmetic: auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32 (part of the cache key).",
        ),
    ] = "auto",
    compile_: Annotated[
        bool,
        variant(
            CompileOpt,
            help="torch.compile the backbone's blocks and the upsampler's heavy modules while extracting features.",
        ),
    ] = False,
    workers: WorkersOpt = None,
    memory: Annotated[
        float | None,
        typer.Option(
            "--memory-gb",
            rich_help_panel=RUN,
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
    from vitup_cli.probe.spair import PAIR_READERS  # imports torch (vitup_cli.probe): lazy for CLI start-up speed

    if dataset in PAIR_READERS:
        if no_cache:
            raise VitupError(f"--no-cache: not for `vitup probe {dataset}`, which reuses each image's features")
        if task not in (None, "seg"):
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

    task = task or ("depth" if dataset == "nyu" else "seg")
    # they import torch: lazy for CLI start-up speed
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
    progress = reporter()
    report = run_probe(config, reporter=progress)
    console = Console()
    console.print(results_table(report))
    for res_ in report.results:
        if res_.skipped:
            progress.warning(f"{res_.name}: {len(res_.skipped)} unreadable images were left out (see report.json)")
    files = ", ".join(f"{v}" for k, v in report.files.items() if not k.startswith("head:"))
    typer.echo(f"report: {files}; heads in {Path(config.out) / 'heads'} ({report.seconds:.1f} s)")


def _correspondence(dataset: str, root: Path, *, upsampler: str | None, categories: str | None, alpha: str,
                    backbone_args: str | None, out: Path | None, **kw: Any) -> None:  # fmt: skip
    """``vitup probe spair|keypoints``: PCK of nearest-neighbour matches (``vitup_cli.probe.correspondence``)."""
    # they import torch: lazy for CLI start-up speed
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
    progress = reporter()
    report = run_correspondence(config, reporter=progress)
    Console().print(results_table(report))
    for res_ in report.results:
        if res_.skipped:
            progress.warning(f"{res_.name}: {len(res_.skipped)} pairs had no features and were left out")
    if report.skipped:
        progress.warning(f"{len(report.skipped)} pairs could not be read and were left out (see report.json)")
    typer.echo(f"report: {', '.join(report.files.values())} ({report.seconds:.1f} s)")
