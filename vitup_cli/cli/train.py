"""``vitup train``: train an upsampler with one of the training methods (``--method``).

The settings every method shares (``CommonConfig``) are this module's explicit options. The settings of one
method are the fields its configuration dataclass adds to ``CommonConfig``; each becomes an option by itself
(``method_options``): ``--NAME`` (dashes for underscores; ``field(metadata={"flag": ...})`` spells it otherwise),
typed by the field's annotation (``bool``: ``--NAME/--no-NAME``; ``list[int]``: ``1,2,3``), its help line from
``field(metadata={"help": ...})``, shown in the method's help panel (``metadata={"panel": ...}`` picks another).
A setting several methods declare is one option. Adding a method to ``vitup_cli.train.methods.METHODS`` adds its
flags here with no change to this file.

Only the flags the user gives are passed on (``build_config``), so each method's own defaults apply, and a flag
of another method is refused in one line.
"""

from __future__ import annotations

import functools
import inspect
import os
import types
import typing
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from vitup_cli.cli._app import (
    BackboneArgsOpt,
    BackboneOpt,
    BatchSizeOpt,
    ConfigOpt,
    DeviceOpt,
    LrOpt,
    OutOpt,
    PrecisionOpt,
    PretrainedOpt,
    ResumeOpt,
    ScheduleOpt,
    SeedOpt,
    WeightsOpt,
    WorkersOpt,
    app,
    reporter,
    variant,
)
from vitup_cli.errors import VitupError
from vitup_cli.train.config import CommonConfig, TrainConfig

# -- the options of one method's settings, from its configuration dataclass ------------------------------------
_SCALARS = (bool, int, float, str)


def _cli_type(owner: type[CommonConfig], name: str) -> type:
    """``bool``, ``int``, ``float`` or ``str`` (also for ``list[int]``: ``1,2,3``) from a field's annotation,
    ``None`` allowed or not."""
    annotation = typing.get_type_hints(owner)[name]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list and typing.get_args(annotation) == (int,):
        return str
    if annotation in _SCALARS:
        return annotation
    raise TypeError(
        f"{owner.__name__}.{name}: a method setting is a bool, int, float, str or list[int] (None allowed), "
        f"not {annotation}"
    )


def _shown_default(f: Field) -> Any:
    value = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
    return ",".join(str(v) for v in value) if isinstance(value, list) else value


def _first_lower(text: str) -> str:
    return text[0].lower() + text[1:] if text[1:2].islower() else text


def _setting_option(name: str, declared: list[tuple[str, type[CommonConfig], Field]]) -> inspect.Parameter:
    """The option of the setting ``name``, declared by one or more methods ``(method, config class, field)``."""
    for _, owner, f in declared:
        if not f.metadata.get("help"):
            raise TypeError(
                f"{owner.__name__}.{name}: give it a help line, field(..., metadata={{'help': ...}}); it is a "
                "flag of `vitup train`"
            )
    flags = {f.metadata.get("flag", "--" + name.replace("_", "-")) for _, _, f in declared}
    kinds = {_cli_type(owner, name) for _, owner, _ in declared}
    if len(flags) > 1 or len(kinds) > 1:
        raise TypeError(f"setting {name}: the methods declare it with other flags or types ({flags}, {kinds})")
    flag, kind = flags.pop(), kinds.pop()
    defaults = {_shown_default(f) for _, _, f in declared}
    default = defaults.pop() if len(defaults) == 1 else None  # each method's own default applies anyway
    helps = [(owner.title or method, f.metadata["help"]) for method, owner, f in declared]
    if len({text for _, text in helps}) == 1:
        help_ = helps[0][1]
    else:
        help_ = " ".join(f"{title}: {_first_lower(text)}" for title, text in helps)
    method, owner, first = declared[0]
    panel = first.metadata.get("panel") or f"{owner.title or method} (--method {method})"
    option = typer.Option(f"{flag}/--no-{flag[2:]}" if kind is bool else flag, help=help_, rich_help_panel=panel)
    annotation = Annotated[kind if default is not None else kind | None, option]  # type: ignore[operator]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def method_options(taken_names: set[str], taken_flags: set[str]) -> list[Any]:
    """The click options of every method setting: the fields each method's configuration dataclass adds to
    ``CommonConfig``, in ``METHODS`` order, one option per field name. ``taken_*``: the names and flags of the
    command's own options, which no setting may reuse."""
    from vitup_cli.train.methods import METHODS  # imports torch: lazy for CLI start-up speed (see _TrainCommand)

    common = {f.name for f in fields(CommonConfig)}
    declared: dict[str, list[tuple[str, type[CommonConfig], Field]]] = {}
    for method, method_class in METHODS.items():
        owner = method_class.config_class
        for f in fields(owner):
            if f.name not in common:
                declared.setdefault(f.name, []).append((method, owner, f))
    parameters = [_setting_option(name, decls) for name, decls in declared.items()]

    def settings(**values: Any) -> None:
        """Never called: typer turns its signature into click options."""

    settings.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    holder = typer.Typer(add_completion=False)
    holder.command()(settings)
    options = typer.main.get_command(holder).params
    for option in options:
        clash = {option.name} & taken_names or {*option.opts, *option.secondary_opts} & taken_flags
        if clash:
            raise TypeError(f"method setting {option.name}: {clash} is already an option of `vitup train`")
    return options


class _TrainCommand(TyperCommand):
    """``vitup train``: its own options, then the method settings' (``method_options``), added when its options
    are first needed (parsing, help, ``.params``). Building them imports the training methods, and with them torch,
    which ``vitup --help`` and the other commands should not wait for. The settings reach ``train_cmd`` through
    ``ctx.params`` (with where each value came from), not as arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._with_settings = True  # click's own set-up sees the command's options only
        super().__init__(*args, **kwargs)
        own = {param.name for param in self._params}
        callback = self.callback
        assert callback is not None

        @functools.wraps(callback)
        def own_arguments(**values: Any) -> Any:
            return callback(**{k: v for k, v in values.items() if k in own})

        self.callback = own_arguments
        self._with_settings = False

    @property  # type: ignore[override]
    def params(self) -> list[Any]:
        if not self._with_settings:
            names = {param.name for param in self._params if param.name}
            flags = {opt for param in self._params for opt in (*param.opts, *param.secondary_opts)}
            self._params.extend(method_options(names, flags))
            self._with_settings = True
        return self._params

    @params.setter
    def params(self, value: list[Any]) -> None:
        self._params = value


# -- the command ------------------------------------------------------------------------------------------------
_DEFAULTS = TrainConfig()
_RUN, _OPT, _RUNTIME, _LOG = "Data and run", "Optimisation", "Runtime", "Logging and checkpoints"
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


@app.command("train", epilog=_TRAIN_EPILOG, cls=_TrainCommand)
def train_cmd(
    ctx: typer.Context,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            rich_help_panel=_RUN,
            help="Training method: vitup (ViT-Up distillation), uplift (UPLiFT), loftup (LoftUp, --stage 1|2, "
            "images with masks) or featsharp (FeatSharp, multi-view consistency). Each has its paper's defaults; "
            "the defaults shown below are ViT-Up's except in the method panels.",
        ),
    ] = _DEFAULTS.method,
    data: Annotated[
        str,
        typer.Option("--data", "-d", rich_help_panel=_RUN, help="Training images: a folder, @list.txt, or one image."),
    ] = _DEFAULTS.data,
    out: Annotated[str, variant(OutOpt, _RUN, help="Run directory (config, checkpoints, metrics).")] = _DEFAULTS.out,
    val_data: Annotated[
        str | None,
        typer.Option("--val-data", rich_help_panel=_RUN, help="Held-out images: val loss and the `best` checkpoint."),
    ] = _DEFAULTS.val_data,
    val_images: Annotated[
        int, typer.Option("--val-images", rich_help_panel=_RUN, help="At most this many held-out images.")
    ] = _DEFAULTS.val_images,
    config: Annotated[Path | None, variant(ConfigOpt, _RUN)] = None,
    resume: Annotated[
        Path | None,
        variant(ResumeOpt, _RUN, help="Continue this run exactly where its last save left it.", file_okay=False),
    ] = None,
    stop_after: Annotated[
        int | None,
        typer.Option(
            "--stop-after", rich_help_panel=_RUN, help="End this session after N steps with a save (time-limited jobs)."
        ),
    ] = None,
    backbone: BackboneOpt = _DEFAULTS.backbone,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = _DEFAULTS.pretrained,
    backbone_args: BackboneArgsOpt = None,
    steps: Annotated[int, typer.Option("--steps", rich_help_panel=_OPT, help="Optimiser steps.")] = _DEFAULTS.steps,
    batch_size: Annotated[
        int, variant(BatchSizeOpt, _OPT, help="Images per step over all processes and accumulation steps.")
    ] = _DEFAULTS.batch_size,
    lr: Annotated[float, variant(LrOpt, _OPT)] = _DEFAULTS.lr,
    schedule: Annotated[str, variant(ScheduleOpt, _OPT)] = _DEFAULTS.schedule,
    warmup: Annotated[
        float, typer.Option("--warmup", rich_help_panel=_OPT, help="Linear warm-up, fraction of steps.")
    ] = _DEFAULTS.warmup,
    min_lr: Annotated[float, typer.Option("--min-lr", rich_help_panel=_OPT, help="Cosine floor.")] = _DEFAULTS.min_lr,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", rich_help_panel=_OPT, help="AdamW weight decay.")
    ] = _DEFAULTS.weight_decay,
    beta1: Annotated[float, typer.Option("--beta1", rich_help_panel=_OPT, help="AdamW beta1.")] = _DEFAULTS.beta1,
    beta2: Annotated[float, typer.Option("--beta2", rich_help_panel=_OPT, help="AdamW beta2.")] = _DEFAULTS.beta2,
    grad_clip: Annotated[
        float, typer.Option("--grad-clip", rich_help_panel=_OPT, help="Max gradient norm (0: off).")
    ] = _DEFAULTS.grad_clip,
    accum: Annotated[
        int, typer.Option("--accum", rich_help_panel=_OPT, help="Gradient accumulation steps.")
    ] = _DEFAULTS.accum,
    precision: Annotated[str, variant(PrecisionOpt, _RUNTIME)] = _DEFAULTS.precision,
    device: Annotated[str, variant(DeviceOpt, _RUNTIME)] = _DEFAULTS.device,
    workers: Annotated[int, variant(WorkersOpt, _RUNTIME, help="Data-loading processes per GPU.")] = _DEFAULTS.workers,
    seed: Annotated[
        int, variant(SeedOpt, _RUNTIME, help="Seed of the model init, data order, crops and noise.")
    ] = _DEFAULTS.seed,
    log_every: Annotated[
        int, typer.Option("--log-every", rich_help_panel=_LOG, help="Steps per metrics.jsonl line.")
    ] = _DEFAULTS.log_every,
    save_every: Annotated[
        int,
        typer.Option(
            "--save-every", rich_help_panel=_LOG, help="Steps between saves of `last` and the resumable state."
        ),
    ] = _DEFAULTS.save_every,
    keep_every: Annotated[
        int, typer.Option("--keep-every", rich_help_panel=_LOG, help="Also keep step-N checkpoints every N steps.")
    ] = _DEFAULTS.keep_every,
    val_every: Annotated[
        int | None,
        typer.Option(
            "--val-every", rich_help_panel=_LOG, help="Steps between held-out evaluations (default: with each save)."
        ),
    ] = _DEFAULTS.val_every,
    tensorboard: Annotated[
        bool,
        typer.Option("--tensorboard/--no-tensorboard", rich_help_panel=_LOG, help="TensorBoard events when installed."),
    ] = _DEFAULTS.tensorboard,
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
    from vitup_cli.train import settings  # imports torch and every method: lazy for CLI start-up speed
    from vitup_cli.train.loop import train  # imports torch: lazy for CLI start-up speed

    skip = {"config", "resume", "stop_after"}
    # ctx.params: this command's options and the method settings (_TrainCommand), given ones only
    given = {name: value for name, value in ctx.params.items() if name not in skip and _explicit(ctx, name)}
    if resume is not None:
        if config is not None:
            raise VitupError("--resume takes its settings from the run's config.json; drop --config")
        if out and Path(out) != resume:
            raise VitupError(f"--resume {resume} and --out {out} disagree: a resumed run stays in its folder")
        cfg = settings.resume_config(resume, given)
    else:
        cfg = settings.build_config(config, given)
    main_rank = os.environ.get("RANK", "0") == "0"
    result = train(cfg, resume=resume is not None, reporter=reporter(interval=30.0), stop_after=stop_after)
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
