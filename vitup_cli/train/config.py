"""Training configuration: one dataclass with the paper's defaults, YAML/TOML files, CLI overrides.

Precedence: the dataclass defaults < a ``--config`` file < flags given on the command line. On
``--resume`` the run's own ``config.json`` replaces the first two, and only operational settings
(``RESUME_MUTABLE``) may be changed; anything that would change the result is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from vitup_cli.choice import parse_overrides
from vitup_cli.errors import VitupError

#: settings that may differ on ``--resume`` without changing what the run computes
RESUME_MUTABLE = frozenset(
    {"workers", "log_every", "save_every", "keep_every", "val_every", "tensorboard", "device", "weights"}
)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class CommonConfig:
    """What every training method shares: data, run directory, backbone, optimiser, runtime, logging.

    Each method's configuration subclasses this and redeclares the fields whose paper defaults differ
    (``steps``, ``lr``, ...). ``method`` names the ``TrainMethod`` (``vitup_cli.train.methods.METHODS``).

    The fields a method adds are its ``vitup train`` flags (``vitup_cli/cli/train.py``): ``--NAME`` with
    dashes for underscores, typed by the annotation (``bool`` is ``--NAME/--no-NAME``; ``list[int]`` takes
    ``1,2,3``), with the help line ``field(metadata={"help": ...})``. Optional metadata: ``"flag"`` (another
    spelling) and ``"panel"`` (the help panel; default ``"TITLE (--method NAME)"``, ``TITLE`` the class's
    ``title``). The shared fields here have their own hand-written flags.
    """

    #: the method's name for people (help panels, ``vitup train --help``)
    title: ClassVar[str] = ""

    method: str = "vitup"
    # data and run
    data: str = ""  # image folder, @list.txt, or one image
    out: str = ""  # run directory
    val_data: str | None = None  # held-out images: enables `best` and val loss
    val_images: int = 256  # at most this many held-out images per evaluation
    # backbone
    backbone: str = "dinov3_s+"
    weights: str | None = None
    pretrained: str = "hub"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    # optimisation (AdamW; with weight_decay 0 its update is exactly Adam's)
    steps: int = 53381
    batch_size: int = 24  # images per optimiser step over all processes and accumulation steps
    lr: float = 2e-4
    schedule: str = "cosine"  # cosine: linear warm-up then cosine to min_lr; constant: lr throughout
    warmup: float = 0.05  # linear warm-up, fraction of steps
    min_lr: float = 1e-6  # cosine floor
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    accum: int = 1  # gradient accumulation steps
    # runtime
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    workers: int = 4
    seed: int = 0
    # logging and checkpoints
    log_every: int = 10
    save_every: int = 1000  # `last` + resumable state
    keep_every: int = 0  # also keep `step-NNNNNNN` every N steps (0: never)
    val_every: int | None = None  # None: with every save
    tensorboard: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_MODEL, _SIZES, _LOSSES, _LORA = "ViT-Up model", "Distillation sizes", "Losses", "LoRA"  # help panels


@dataclass
class TrainConfig(CommonConfig):
    """Every hyperparameter of ``vitup train --method vitup``; defaults are the paper's (DINOv3-S+,
    ImageNet-1K).

    Sizes are in pixels unless named ``*_tokens`` / ``*_grid``. ``None`` means "derived", resolved by
    ``resolve`` once the backbone's patch size is known (values for patch 16 in the comments).
    """

    title: ClassVar[str] = "ViT-Up"

    taps: list[int] | None = field(
        default=None,  # None: evenly spaced, num_blocks + 1 of them
        metadata={"help": "Hidden-state taps, e.g. 0,2,4,6,8,10,12 (default: evenly spaced).", "panel": "Backbone"},
    )
    # model
    num_blocks: int = field(
        default=6, metadata={"help": "ViT-Up blocks (taps = blocks + 1).", "flag": "--blocks", "panel": _MODEL}
    )
    input_tokens: int = field(
        default=28,  # 448 px
        metadata={"help": "Student backbone input, tokens per side (28: 448 px at patch 16).", "panel": _MODEL},
    )
    embed_grid: int = field(
        default=224,  # 3584 px
        metadata={"help": "Query-embedding grid, tokens per side.", "panel": _MODEL},
    )
    window: int | None = field(
        default=None, metadata={"help": "Cross-attention window in tokens (default: global).", "panel": _MODEL}
    )
    # ViT-Up weights to start from (fine-tuning); None: a fresh ViT-Up from `seed`
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "Fine-tune from ViT-Up weights: vit-up:dinov3_splus, vit-up:dinov3_b, hf:ORG/REPO/FILE, an "
            "official .safetensors file or a vitup checkpoint (same backbone and shape as this run).",
            "panel": _MODEL,
        },
    )
    # sizes of the distillation task
    canvas: int | None = field(
        default=None,  # None: input_tokens * patch (448)
        metadata={"help": "Student canvas side in px (default: input tokens x patch = 448).", "panel": _SIZES},
    )
    queries: int | None = field(
        default=None,  # None: the finest teacher grid (56)
        metadata={"help": "Query grid side over the pasted crop (default: finest teacher grid, 56).", "panel": _SIZES},
    )
    teacher_sizes: list[int] = field(
        default_factory=lambda: [224, 448, 896],  # 14, 28, 56 tokens
        metadata={"help": "Teacher input sizes in px (14, 28, 56 tokens at patch 16).", "panel": _SIZES},
    )
    # the crop is pasted at s ~ U(scale_min, scale_max) of the canvas
    scale_min: float = field(default=0.1, metadata={"help": "Smallest paste scale s.", "panel": _SIZES})
    scale_max: float = field(default=1.0, metadata={"help": "Largest paste scale s.", "panel": _SIZES})
    crop_min: float = field(
        default=1.0,
        metadata={"help": "Square crop side ~ U(crop-min, 1) x short side (1: largest square).", "panel": _SIZES},
    )
    # losses
    w_l2: float = field(default=1.0, metadata={"help": "Weight of the target-normalised L2.", "panel": _LOSSES})
    w_cos: float = field(default=1.0, metadata={"help": "Weight of the cosine distance.", "panel": _LOSSES})
    w_kl: float = field(default=1.0, metadata={"help": "Weight of the relational KL.", "panel": _LOSSES})
    tau: float = field(default=0.5, metadata={"help": "Relational KL temperature.", "panel": _LOSSES})
    kl_window: int = field(
        default=28,  # 7x7 blocks of 4x4
        metadata={"help": "Relational KL within windows of this many positions per side.", "panel": _LOSSES},
    )
    # LoRA on the student backbone (r = 0: no adapters)
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (0: no adapters).", "panel": _LORA})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha.", "panel": _LORA})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout.", "panel": _LORA})


def _int_list(name: str, value: Any) -> list[int] | None:
    if value is None:
        return None
    items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        out = [int(v) for v in items if v != ""]
    except (TypeError, ValueError):
        raise VitupError(f"{name} '{value}': expected comma-separated integers, e.g. 224,448,896") from None
    if not out:
        raise VitupError(f"{name}: empty list")
    return out


def _kind(f: Any) -> str:
    """``int``, ``float``, ``str``, ``bool``, ``int-list`` or ``dict`` from a field's annotation."""
    annotation = str(f.type)
    if "list[int]" in annotation:
        return "int-list"
    for kind in ("dict", "bool", "float", "int", "str"):
        if annotation.startswith(kind):
            return kind
    return "any"


def coerce(values: dict[str, Any], source: str, cls: type[CommonConfig] | None = None) -> dict[str, Any]:
    """Validate names and types of settings from a file or flags -> keyword arguments of ``cls``
    (default ``TrainConfig``). A ``str`` field is a single value, a ``list[int]`` field takes
    ``"1,2,3"`` or a list."""

    cls = cls or TrainConfig
    known_fields = {f.name: f for f in fields(cls)}
    method = known_fields["method"].default
    out: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in known_fields:
            known = ", ".join(sorted(known_fields))
            raise VitupError(f"{source}: unknown setting '{raw_key}' for --method {method} (known: {known})")
        kind = _kind(known_fields[key])
        if key == "method":
            if value != method:
                raise VitupError(f"{source}: method {value!r} contradicts --method {method}")
        elif kind == "int-list":
            value = _int_list(key, value)
        elif kind == "dict":
            value = parse_overrides(value) if isinstance(value, str) else dict(value or {})
        elif value is not None:
            try:
                if kind == "bool" and isinstance(value, str):
                    value = value.lower() in {"1", "true", "yes", "on"}
                elif kind == "float" and not isinstance(value, bool):
                    value = float(value)
                elif kind == "int" and not isinstance(value, bool):
                    if float(value) != int(float(value)):
                        raise ValueError
                    value = int(float(value))
                elif kind == "str":
                    value = str(value)
            except (TypeError, ValueError):
                raise VitupError(f"{source}: {raw_key} = {value!r} is not a valid {kind}") from None
        out[key] = value
    return out


@dataclass(frozen=True)
class Sizes:
    """The distillation geometry once the patch size is known (paper values for patch 16)."""

    patch: int
    canvas: int  # 448
    queries: int  # 56
    teacher_sizes: tuple[int, ...]  # 224, 448, 896
    teacher_grids: tuple[int, ...]  # 14, 28, 56

    @property
    def crop(self) -> int:
        """The crop is decoded once at the largest teacher size."""
        return max(self.teacher_sizes)


SCHEDULES = ("cosine", "constant")


def check_common(cfg: CommonConfig, world_size: int = 1) -> None:
    """The checks of the shared settings; raises ``VitupError`` naming the flag."""
    if not cfg.data:
        raise VitupError("--data is required: an image folder, @list.txt, or one image")
    if not cfg.out:
        raise VitupError("--out is required: the run directory")
    checks = [
        (cfg.steps > 0, "--steps must be positive"),
        (cfg.batch_size > 0 and cfg.accum > 0, "--batch-size and --accum must be positive"),
        (0 <= cfg.warmup < 1, f"--warmup {cfg.warmup}: a fraction of --steps in [0, 1)"),
        (
            cfg.lr > 0 and 0 <= cfg.min_lr <= cfg.lr,
            f"--lr {cfg.lr} / --min-lr {cfg.min_lr}: need lr > 0 and 0 <= min-lr <= lr",
        ),
        (cfg.schedule in SCHEDULES, f"--schedule {cfg.schedule}: use one of {', '.join(SCHEDULES)}"),
        (cfg.grad_clip >= 0, "--grad-clip must be >= 0 (0: off)"),
        (cfg.precision in PRECISIONS, f"--precision {cfg.precision}: use one of {', '.join(PRECISIONS)}"),
        (cfg.workers >= 0, "--workers must be >= 0"),
        (cfg.log_every > 0 and cfg.save_every > 0, "--log-every and --save-every must be positive"),
        (cfg.val_images > 0, "--val-images must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise VitupError(message)
    per_rank, rest = divmod(cfg.batch_size, world_size * cfg.accum)
    if rest or per_rank == 0:
        raise VitupError(
            f"--batch-size {cfg.batch_size} must be a multiple of processes x --accum = {world_size} x {cfg.accum}"
        )


def check(cfg: TrainConfig, world_size: int = 1) -> None:
    """Every check of a ViT-Up run that needs no backbone; raises ``VitupError`` naming the flag."""
    check_common(cfg, world_size)
    checks = [
        (
            0 < cfg.scale_min <= cfg.scale_max <= 1,
            f"--scale-min {cfg.scale_min} / --scale-max {cfg.scale_max}: need 0 < min <= max <= 1",
        ),
        (0 < cfg.crop_min <= 1, f"--crop-min {cfg.crop_min}: need 0 < crop-min <= 1"),
        (cfg.tau > 0, "--tau must be positive"),
        (cfg.kl_window > 0, "--kl-window must be positive"),
        (cfg.lora_r >= 0, "--lora-r must be >= 0 (0: no LoRA)"),
        (0 <= cfg.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
        (min(cfg.w_l2, cfg.w_cos, cfg.w_kl) >= 0, "loss weights must be >= 0"),
        (cfg.canvas is None or cfg.canvas >= 8, f"--canvas {cfg.canvas}: too small"),
        (cfg.input_tokens > 0 and cfg.embed_grid > 0, "--input-tokens and --embed-grid must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise VitupError(message)


def resolve(cfg: TrainConfig, patch: int, world_size: int = 1) -> tuple[TrainConfig, Sizes]:
    """Check every setting and fill the derived sizes; raises ``VitupError`` naming the flag."""
    check(cfg, world_size)
    canvas = cfg.canvas or cfg.input_tokens * patch
    bad_sizes = [s for s in cfg.teacher_sizes if s <= 0 or s % patch]
    if bad_sizes:
        raise VitupError(f"--teacher-sizes {bad_sizes}: each must be a positive multiple of the patch size {patch}")
    grids = tuple(s // patch for s in cfg.teacher_sizes)
    queries = cfg.queries or max(grids)
    not_dividing = [g for g in grids if queries % g]
    if not_dividing:
        raise VitupError(
            f"--queries {queries}: predictions are mean-pooled to every teacher grid {list(grids)}, so each must "
            f"divide it (teacher grids {not_dividing} do not); use --queries {max(grids)}"
        )
    resolved = replace(
        cfg, canvas=canvas, queries=queries, val_every=cfg.val_every or cfg.save_every, window=cfg.window or None
    )
    return resolved, Sizes(patch, canvas, queries, tuple(cfg.teacher_sizes), grids)
