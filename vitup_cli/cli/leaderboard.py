"""``vitup leaderboard``: every upsampler on every task, one protocol, one table (``vitup_cli.leaderboard``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from vitup_cli.choice import parse_overrides
from vitup_cli.cli._app import (
    PROBE_DATA,
    PROBE_PROTOCOL,
    BackboneArgsOpt,
    BackboneOpt,
    BatchSizeOpt,
    CacheOpt,
    CheckpointOpt,
    CompileOpt,
    ConfigOpt,
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
    PrecisionOpt,
    PretrainedOpt,
    ResOpt,
    ScheduleOpt,
    SeedOpt,
    WeightsOpt,
    WorkersOpt,
    app,
    reporter,
    variant,
)
from vitup_cli.errors import VitupError

_EPILOG = (
    "Examples:\n\n"
    "  vitup leaderboard --backbone dinov3_s+ --upsamplers vitup,uplift,loftup,anyup,jafar,naf,featup,bilinear "
    "--tasks voc,ade20k,cityscapes,cocostuff,nyu,spair --data-root /data --checkpoint vit-up:dinov3_splus "
    "--checkpoint uplift:dinov3_splus --out lb\n\n"
    "  vitup leaderboard --config suite.yaml   (the same settings as YAML keys: tasks, upsamplers, checkpoint, ...)\n\n"
    "  vitup leaderboard --tasks voc:/data/VOCdevkit,mine=folder:/my/seg,spair:/data/SPair-71k --upsamplers "
    "bilinear,loftup --backbone dinov2_s --limit 20 --seeds 3 --out lb-smoke"
)


def _read_suite(path: Path) -> dict[str, Any]:
    import yaml  # only when --config is given

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise VitupError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise VitupError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VitupError(f"--config {path}: expected a mapping of settings (tasks: ..., upsamplers: ...)")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _cast(ctx: typer.Context, param: Any, value: Any, path: Path) -> Any:
    """A ``--config`` value through its flag's own type (``seeds: three`` is refused as ``--seeds three`` is);
    lists for comma-separated flags are joined, one value for a repeatable flag is a list of one."""
    if isinstance(value, list) and not param.multiple:
        value = ",".join(str(v) for v in value)
    if param.multiple and not isinstance(value, list):
        value = [value]
    if isinstance(value, dict):
        value = ",".join(f"{k}={v}" for k, v in value.items())  # backbone_args: {depth: 2}
    try:
        return param.process_value(ctx, value)
    except Exception as exc:  # click's BadParameter (typer may ship its own click) or a conversion error
        text = getattr(exc, "message", None) or str(exc)
        raise VitupError(f"--config {path}: {param.name.rstrip('_')}: {text}") from None


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


@app.command("leaderboard", epilog=_EPILOG)
def leaderboard_cmd(
    ctx: typer.Context,
    upsamplers: Annotated[
        str | None,
        typer.Option(
            "--upsamplers",
            rich_help_panel="Leaderboard",
            help="Comma-separated upsamplers, one row each (bilinear is the baseline every cell is compared with). "
            "Trained ones take their --checkpoint, else their published weights for the backbone.",
        ),
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            rich_help_panel="Leaderboard",
            help="Comma-separated: voc, ade20k, cityscapes, cocostuff (seg), nyu (depth), spair (correspondence), "
            "each found under --data-root, or NAME:PATH; folder:PATH (the probe's folder layout), folder-depth:PATH, "
            "keypoints:PATH for your own data; LABEL=NAME:PATH names a column.",
        ),
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(
            "--data-root", rich_help_panel=PROBE_DATA, help="Where bare task names are looked up (/data/SPair-71k...)."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        variant(
            ConfigOpt,
            "Leaderboard",
            param_decls=(),  # no -c here: it is --checkpoint's
            help="A YAML suite whose keys are these flags' names (tasks, upsamplers, checkpoint: [...], seeds, ...); "
            "flags given on the command line win.",
        ),
    ] = None,
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds",
            rich_help_panel=PROBE_PROTOCOL,
            help="Probe heads per cell, seeds --seed.. --seed+N-1: mean ± std, and which differences are noise.",
        ),
    ] = 1,
    checkpoint: Annotated[
        list[str] | None,
        variant(
            CheckpointOpt,
            help="A trained upsampler's weights (a release such as vit-up:dinov3_splus, a file, a `vitup train` "
            "checkpoint); once per method. Each cell loads its own method's; the others run over the first one that "
            "opens (its backbone and input size).",
        ),
    ] = None,
    backbone: BackboneOpt = "dinov3_s+",
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = "hub",
    backbone_args: BackboneArgsOpt = None,
    input_size: InputSizeOpt = None,
    limit: Annotated[
        int | None,
        variant(
            LimitOpt,
            help="Only the first N images of each split (N pairs per category): a smoke run; the "
            "table's header says what it changes.",
        ),
    ] = None,
    depth_scale: Annotated[
        float | None, variant(DepthScaleOpt, help="folder-depth: integer depth PNG value per metre (default 1000).")
    ] = None,
    max_depth: MaxDepthOpt = 10.0,
    epochs: EpochsOpt = None,
    lr: Annotated[
        float | None, variant(LrOpt, PROBE_PROTOCOL, help="AdamW learning rate (seg 2e-3, depth 5e-3).")
    ] = None,
    batch_size: Annotated[int, variant(BatchSizeOpt, PROBE_PROTOCOL, help="Images per step.")] = 4,
    schedule: Annotated[
        str, variant(ScheduleOpt, PROBE_PROTOCOL, help="cosine (the paper's) or jafar (JAFAR's published schedule).")
    ] = "cosine",
    res: Annotated[
        str | None,
        variant(
            ResOpt,
            PROBE_PROTOCOL,
            help="Stored feature grid of the linear probes (default 224, resized to the "
            "448 labels; 448 is the paper's exact protocol, 4x the cache).",
        ),
    ] = None,
    correspondence_res: Annotated[
        int,
        typer.Option(
            "--correspondence-res", rich_help_panel=PROBE_PROTOCOL, help="Feature grid of spair and keypoints (448)."
        ),
    ] = 448,
    crop: CropOpt = 448,
    dtype: DtypeOpt = "float16",
    cache: CacheOpt = None,
    out: Annotated[
        Path | None,
        variant(
            OutOpt, help="Folder of the table (leaderboard.md/.csv/.json/.png) and its cells (default: ./leaderboard)."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    seed: Annotated[int, variant(SeedOpt, help="Seeds a random-init backbone and the first probe head.")] = 0,
    precision: PrecisionOpt = "auto",
    compile_: CompileOpt = False,
    workers: WorkersOpt = None,
) -> None:
    """Run every upsampler on every task with one protocol and write the comparison: leaderboard.md, .csv,
    .json (every setting, versions, weights and licences, time and peak memory per cell) and leaderboard.png.

    Resumable: rerun the same command after a crash or kill and finished cells are not recomputed. A cell
    that cannot run (a missing dataset, weights missing offline) is marked with its reason; the others run.
    Exit code 0: every cell finished; 3: the table is written but some cells failed; 1: no cell could run.
    """
    given = dict(ctx.params)
    if config is not None:
        suite = _read_suite(config)
        unknown = sorted(set(suite) - set(given) - {"compile"})
        if unknown:
            known = ", ".join(sorted(k.rstrip("_") for k in given))
            raise VitupError(f"--config {config}: unknown setting {unknown[0]}; use the flags' names ({known})")
        params = {p.name: p for p in ctx.command.params}
        for key, value in suite.items():
            key = "compile_" if key == "compile" else key
            # by name: typer may ship its own click, whose ParameterSource is another enum
            if getattr(ctx.get_parameter_source(key), "name", None) == "COMMANDLINE":
                continue
            given[key] = _cast(ctx, params[key], value, config)
    names = _as_list(given["upsamplers"])
    task_specs = _as_list(given["tasks"])
    if not names:
        raise VitupError("--upsamplers: give the upsamplers to compare, e.g. --upsamplers vitup,bilinear")
    if not task_specs:
        raise VitupError("--tasks: give the tasks, e.g. --tasks voc,spair (with --data-root)")
    res_value = given["res"]
    try:
        res_px = 224 if res_value is None else int(res_value)
    except ValueError:
        raise VitupError(f"--res {res_value}: give one size in pixels, e.g. 224 or 448") from None
    ck = [str(c) for c in given["checkpoint"] or []]
    overrides = given["backbone_args"]  # a string, from the flag or the suite
    from vitup_cli.leaderboard import LeaderboardConfig, run_leaderboard  # imports torch: lazy for a fast --help

    lb_config = LeaderboardConfig(
        upsamplers=names, tasks=task_specs, out=given["out"] or Path("leaderboard"), checkpoint=ck or None,
        backbone=given["backbone"], weights=given["weights"], pretrained=given["pretrained"],
        backbone_args=parse_overrides(overrides),
        input_size=given["input_size"], device=given["device"], seed=int(given["seed"]),
        data_root=given["data_root"], seeds=int(given["seeds"]), limit=given["limit"], res=res_px,
        crop=int(given["crop"]), correspondence_res=int(given["correspondence_res"]), epochs=given["epochs"],
        lr=given["lr"], batch_size=int(given["batch_size"]),
        schedule=given["schedule"], dtype=given["dtype"], precision=given["precision"],
        compile=bool(given["compile_"]), cache=given["cache"], workers=given["workers"],
        depth_scale=given["depth_scale"], max_depth=float(given["max_depth"]),
    )  # fmt: skip
    progress = reporter()
    lb = run_leaderboard(lb_config, reporter=progress)
    md = Path(lb.files["md"]).read_text(encoding="utf-8")
    typer.echo(md.split("\n## ")[0].rstrip())  # the header and the main table; the per-task tables are in the file
    if lb.failed:
        typer.echo("\nfailed cells: " + "; ".join(f"[{i}] {r}" for i, r in enumerate(lb.reasons, start=1)))
    done = sum(c.status == "done" for c in lb.cells)
    reused = sum(c.reused for c in lb.cells)
    typer.echo(
        f"{done}/{len(lb.cells)} cells done ({reused} found finished), {len(lb.failed)} failed; "
        f"tables: {lb.files['md']}, {lb.files['csv']}, {lb.files['json']}; picture: {lb.files['png']}"
    )
    if lb.failed:
        raise typer.Exit(1 if done == 0 else 3)
