"""``vitup leaderboard``: every upsampler on every task, one protocol, one table.

``run_leaderboard(LeaderboardConfig(...))`` runs each *cell* (task x upsampler x seed) through the probe
runs that ``vitup probe`` uses (``vitup_cli.probe.run.run_probe`` for segmentation and depth,
``vitup_cli.probe.correspondence.run_correspondence`` for SPair and keypoints), one upsampler at a time, with
the ViT-Up paper's protocol (JAFAR's linear probe with the learning-rate schedule fixed; SPair as in the
paper). Features go to the probe cache, so a cell's features are extracted once and every seed (and every
later run) reuses them.

Layout of ``out``::

    cells/TASK/UPSAMPLER/s{SEED}-{KEY}/cell.json   one finished cell (written last, atomically)
    cells/TASK/UPSAMPLER/s{SEED}-{KEY}/probe/      that cell's probe report (report.json, head weights)
    leaderboard.md, leaderboard.csv, leaderboard.json, leaderboard.png

``KEY`` digests every setting that decides the cell's numbers, so a rerun with the same settings finds its
finished cells and recomputes nothing (a run killed at any moment loses at most the cells in flight), and a
run with other settings never overwrites them. Cells that fail (a missing dataset, weights missing offline)
are marked in the table with their one-line reason and retried by the next run; the others run.

With ``seeds`` > 1 the probe heads are trained with seeds ``seed .. seed + seeds - 1`` on the same features
(the correspondence probe has nothing random: it runs once). A cell's difference from ``bilinear`` is
*within the noise* when Welch's t-test at 95% cannot tell them apart: ``|delta| <= t(df) * sqrt(s_a^2 / n_a +
s_b^2 / n_b)``, with the Welch-Satterthwaite degrees of freedom.

Published numbers (``published.json``: ViT-Up's Tables 1, 2 and 4, UPLiFT's Tables 1 and 8, JAFAR's README)
are shown beside the cells of the same backbone, task and upsampler, with the difference.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import platform
import re
import traceback
from collections.abc import Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from vitup_cli._version import __version__
from vitup_cli.backbones import resolve_name
from vitup_cli.choice import ModelChoice
from vitup_cli.data.images import ImageLoadError, load_image
from vitup_cli.errors import VitupError
from vitup_cli.features import fit_image
from vitup_cli.fileio import atomic_write_bytes, jsonable
from vitup_cli.hub import RELEASES, checkpoint_paths, resolve_weights
from vitup_cli.models import UPSAMPLERS, spec_of
from vitup_cli.probe.correspondence import CorrespondenceConfig, run_correspondence
from vitup_cli.probe.datasets import DEPTH, SEG, open_splits
from vitup_cli.probe.run import ProbeConfig, check_protocol, run_probe
from vitup_cli.probe.spair import PAIR_READERS
from vitup_cli.probe.upsamplers import checkpoint_refs, choose_names, resolve_device
from vitup_cli.progress import SilentReporter, default_reporter
from vitup_cli.resources import PeakMemory
from vitup_cli.stores import DONE, open_store
from vitup_cli.viz import FeaturePanel, VizRow, render_rows

CELL_FORMAT = "vitup-leaderboard-cell/1"
TABLE_FORMAT = "vitup-leaderboard/1"
CORRESPONDENCE = "correspondence"
BASELINE = "bilinear"
PAPER_RES = 448  # the protocol's label and feature size


# =================================================================================================
# tasks and metrics
# =================================================================================================
@dataclass(frozen=True)
class TaskKind:
    """A task the leaderboard knows: the probe dataset behind it, what kind of probe, where it usually lives
    under ``--data-root`` (first existing folder wins, else the data root itself), and whether it needs a path."""

    name: str
    dataset: str
    kind: str  # seg | depth | correspondence
    folders: tuple[str, ...] = ()
    needs_path: bool = False


TASK_KINDS: dict[str, TaskKind] = {
    t.name: t
    for t in (
        TaskKind("voc", "voc", SEG, ("VOCdevkit", "VOC2012", "voc", "VOC")),
        TaskKind("ade20k", "ade20k", SEG, ("ADEChallengeData2016", "ade20k", "ADE20K")),
        TaskKind("cityscapes", "cityscapes", SEG, ("cityscapes", "Cityscapes")),
        TaskKind("cocostuff", "cocostuff", SEG, ("cocostuff", "coco-stuff", "coco_stuff", "COCO-Stuff")),
        TaskKind("nyu", "nyu", DEPTH, ("nyu_depth_v2", "nyu", "NYUv2")),
        TaskKind("spair", "spair", CORRESPONDENCE, ("SPair-71k", "spair")),
        TaskKind("folder", "folder", SEG, needs_path=True),
        TaskKind("folder-depth", "folder", DEPTH, needs_path=True),
        TaskKind("keypoints", "keypoints", CORRESPONDENCE, needs_path=True),
    )
}


@dataclass(frozen=True)
class Metric:
    """A score of a task: its key in the probe reports, its label, its direction, and ``scale``: measured value
    times ``scale`` is the number shown (100: fractions shown as percent, as the papers print them)."""

    key: str
    label: str
    higher_is_better: bool
    scale: float  # measured value x scale = the number shown (percent for fractions)


METRICS: dict[str, tuple[Metric, ...]] = {
    SEG: (Metric("miou", "mIoU", True, 100), Metric("accuracy", "Acc", True, 100)),
    DEPTH: (Metric("d1", "δ1", True, 100), Metric("abs_rel", "AbsRel", False, 1), Metric("rmse", "RMSE", False, 1)),
    CORRESPONDENCE: (
        Metric("pck@0.10", "PCK@0.10", True, 100),
        Metric("pck@0.05", "PCK@0.05", True, 100),
        Metric("pck@0.01", "PCK@0.01", True, 100),
    ),
}


@dataclass(frozen=True)
class Task:
    """One column group of the table: ``label`` (unique), its kind, and the dataset root (None: not found)."""

    label: str
    kind: TaskKind
    root: Path | None
    spec: str  # what the user wrote

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return METRICS[self.kind.kind]


_TASK_RE = re.compile(r"^(?:(?P<label>[A-Za-z0-9_][A-Za-z0-9_.+-]*)=)?(?P<name>[A-Za-z0-9_-]+)(?::(?P<path>.+))?$")


def parse_tasks(specs: Sequence[str], data_root: str | Path | None) -> list[Task]:
    """``voc``, ``voc:/data/VOCdevkit``, ``mine=folder:/my/seg`` ... -> tasks (bare names under ``data_root``).

    Raises ``VitupError`` for an unknown name, a name that needs a path without one, or two tasks with one label.
    """
    tasks: list[Task] = []
    for spec in (s.strip() for s in specs):
        if not spec:
            continue
        m = _TASK_RE.match(spec)
        if m is None or m["name"] not in TASK_KINDS:
            name = m["name"] if m else spec
            raise VitupError(
                f"--tasks {spec}: unknown task '{name}'; use {', '.join(TASK_KINDS)} (optionally NAME:PATH, "
                "LABEL=NAME:PATH)"
            )
        kind = TASK_KINDS[m["name"]]
        label = m["label"] or kind.name
        if m["path"]:
            root: Path | None = Path(m["path"]).expanduser()
        elif kind.needs_path:
            raise VitupError(f"--tasks {spec}: {kind.name} needs its folder, e.g. {kind.name}:/path/to/data")
        elif data_root is None:
            raise VitupError(f"--tasks {spec}: give its folder ({kind.name}:/path) or --data-root")
        else:
            base = Path(data_root).expanduser()
            root = next((base / f for f in kind.folders if (base / f).is_dir()), base)
        if any(t.label == label for t in tasks):
            raise VitupError(f"--tasks: '{label}' is given twice; label one of them: other={spec}")
        tasks.append(Task(label, kind, root, spec))
    if not tasks:
        raise VitupError("--tasks: give at least one task, e.g. --tasks voc,spair")
    return tasks


# =================================================================================================
# configuration
# =================================================================================================
@dataclass
class LeaderboardConfig(ModelChoice):
    """Everything ``run_leaderboard`` needs; the defaults are the ViT-Up paper's protocol.

    The model fields (``checkpoint``, ``backbone``, ``weights``, ``pretrained``, ``backbone_args``,
    ``input_size``, ``device``, ``seed``) are ``vitup_cli.choice.ModelChoice``'s. ``checkpoint``: one per
    trained method; each cell loads its own method's, and the cells without one run over the anchor's backbone
    (``CheckpointPlan``; training-free upsamplers with any LoRA off, as the paper compares them).
    ``tasks``: ``parse_tasks`` specs. ``seeds``: probe-head seeds per cell. ``res``: stored feature grid of
    the linear probes (the paper: 448; 224 by default to keep the cache small, resized to the 448 labels);
    ``correspondence_res``: the SPair grid (448). ``limit``: the first K images of each split (K pairs per
    category for correspondence).
    """

    upsamplers: Sequence[str]
    tasks: Sequence[str]
    out: str | Path
    _: KW_ONLY
    checkpoint: str | Path | Sequence[str | Path] | None = None
    data_root: str | Path | None = None
    seeds: int = 1
    limit: int | None = None
    res: int = 224
    crop: int = PAPER_RES
    correspondence_res: int = PAPER_RES
    epochs: int | None = None
    lr: float | None = None
    batch_size: int = 4
    schedule: str = "cosine"
    dtype: str = "float16"
    precision: str = "auto"
    compile: bool = False
    cache: str | Path | None = None
    workers: int | None = None
    depth_scale: float | None = None  # folder-depth: integer PNG value per metre (None: 1000, millimetres)
    max_depth: float = 10.0  # depth probes: the range of the head's bins, metres


def _validate(config: LeaderboardConfig) -> list[str]:
    names = [n.strip() for n in config.upsamplers if n.strip()]
    if not names:
        raise VitupError("--upsamplers: give at least one, e.g. --upsamplers vitup,bilinear")
    unknown = [n for n in names if n not in UPSAMPLERS]
    if unknown:
        raise VitupError(f"--upsamplers {unknown[0]}: unknown; use one of {', '.join(UPSAMPLERS)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise VitupError(f"--upsamplers lists {', '.join(dupes)} twice")
    if config.seeds < 1:
        raise VitupError(f"--seeds {config.seeds}: must be at least 1")
    if config.limit is not None and config.limit < 1:
        raise VitupError(f"--limit {config.limit}: must be at least 1")
    check_protocol(
        res=config.res, crop=config.crop, batch_size=config.batch_size, epochs=config.epochs, lr=config.lr,
        schedule=config.schedule, dtype=config.dtype, precision=config.precision,
    )  # fmt: skip
    if config.correspondence_res < 1:
        raise VitupError(f"--correspondence-res {config.correspondence_res}: must be at least 1")
    if config.depth_scale is not None and not config.depth_scale > 0:
        raise VitupError(f"--depth-scale {config.depth_scale}: must be positive")
    if not config.max_depth > 0:
        raise VitupError(f"--max-depth {config.max_depth}: must be positive")
    resolve_device(config.device)  # --device cuda without CUDA: one line now, not in every cell
    # a trained method with no checkpoint and no published weights fails in its cells, not here
    return names


def _file_signature(ref: str) -> Any:
    """What identifies a local checkpoint's content cheaply (names, sizes, mtimes); a release name as is."""
    path = Path(ref).expanduser()
    if path.is_file():
        st = path.stat()
        return [path.name, st.st_size, st.st_mtime_ns]
    if path.is_dir():
        return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in path.iterdir() if p.is_file())
    return ref


def _digest(data: Any) -> str:
    """sha256 of ``data`` as sorted JSON (cell keys, plans)."""
    return hashlib.sha256(json.dumps(jsonable(data), sort_keys=True).encode()).hexdigest()


# =================================================================================================
# which checkpoints each cell loads
# =================================================================================================
def _unavailable(ref: str) -> str | None:
    """Why ``ref`` cannot be opened (a release missing offline, no such file), in one line; None if it can."""
    try:
        if ref in RELEASES or ref.startswith("hf:"):
            resolve_weights(ref)  # the cache first; fetched once when online
        elif not (Path(ref).expanduser().exists() or checkpoint_paths(Path(ref).expanduser())[0].is_file()):
            return f"--checkpoint {ref}: no such file or folder"
    except VitupError as exc:
        return _one_line(exc)
    return None


@dataclass(frozen=True)
class CheckpointPlan:
    """Which ``--checkpoint`` each cell loads.

    ``refs``: method -> its checkpoint. ``anchor``: the checkpoint whose backbone and input size every cell
    without its own runs over (training-free methods with any LoRA off, published any-backbone weights), and
    that methods free in their input size follow: the first one that can be opened, methods whose weights fix
    their input first. ``missing``: checkpoint -> why it cannot be opened (only its own cells fail).
    """

    refs: dict[str, str]
    anchor: str | None
    missing: dict[str, str]

    @classmethod
    def make(cls, checkpoint: Any) -> CheckpointPlan:
        refs = checkpoint_refs(checkpoint)  # two checkpoints of one method: one line now, not in every cell
        missing = {ref: why for ref in refs.values() if (why := _unavailable(ref)) is not None}
        order = sorted(refs, key=lambda n: not spec_of(n).capabilities.input_size_from_weights)
        anchor = next((refs[n] for n in order if refs[n] not in missing), None)
        return cls(refs, anchor, missing)

    def for_cell(self, name: str, input_size: int | None) -> list[str]:
        """The checkpoints the cell of upsampler ``name`` loads: its own (with the anchor when it must follow the
        anchor's input size), else the anchor."""
        own = self.refs.get(name)
        if own is None:
            return [self.anchor] if self.anchor else []
        fixed = spec_of(name).capabilities.input_size_from_weights
        if own == self.anchor or self.anchor is None or fixed or input_size is not None:
            return [own]
        return [own, self.anchor]


# =================================================================================================
# cells
# =================================================================================================
@dataclass
class Cell:
    """One (task, upsampler, seed) run: its settings key, where it lives, and what it found."""

    task: str
    upsampler: str
    seed: int | None  # None: correspondence (nothing random)
    key: dict[str, Any]
    folder: Path
    checkpoints: list[str] = field(default_factory=list)  # what this cell loads (``plan_checkpoints``)
    status: str = "pending"  # done | failed | pending
    reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    peak_rss: int | None = None
    cuda_peak: int | None = None
    reused: bool = False  # found finished on disk (not recomputed in this run)
    features_cached: bool | None = None
    stores: dict[str, str] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    report: str | None = None
    backbone: dict[str, Any] = field(default_factory=dict)  # what the cell ran over (its report's)
    ran_on: dict[str, Any] = field(default_factory=dict)  # device, versions: where its time and memory come from

    @property
    def cell_json(self) -> Path:
        return self.folder / "cell.json"

    def record(self) -> dict[str, Any]:
        """``cell.json``: everything but where it lives and this run's view of it."""
        out = {k: v for k, v in asdict(self).items() if k not in ("folder", "reused", "status", "reason")}
        return {"format": CELL_FORMAT, "vitup_version": __version__, **out}


def _cell_key(
    config: LeaderboardConfig, task: Task, name: str, seed: int | None, checkpoints: Sequence[str]
) -> dict[str, Any]:
    """Every setting that decides the numbers of one cell (its ``cell.json`` is reused only when they match)."""
    common = {
        "task": task.kind.name, "root": str(task.root.resolve()) if task.root else None, "upsampler": name,
        "checkpoints": [[r, _file_signature(r)] for r in checkpoints], "backbone": config.backbone,
        "weights": str(config.weights) if config.weights else None, "pretrained": config.pretrained,
        "backbone_args": config.backbone_args, "input_size": config.input_size, "model_seed": config.seed,
        "limit": config.limit, "dtype": config.dtype, "precision": config.precision,
    }  # fmt: skip
    if task.kind.kind == CORRESPONDENCE:
        return {**common, "res": config.correspondence_res}
    return {
        **common, "head_seed": seed, "res": config.res, "crop": config.crop, "epochs": config.epochs,
        "lr": config.lr, "batch_size": config.batch_size, "schedule": config.schedule,
        **({"depth_scale": config.depth_scale, "max_depth": config.max_depth} if task.kind.kind == DEPTH else {}),
    }  # fmt: skip


def plan_cells(
    config: LeaderboardConfig, tasks: Sequence[Task], names: Sequence[str], plan: CheckpointPlan
) -> list[Cell]:
    """Every cell of the table, in run order (task by task, upsampler by upsampler, seed by seed)."""
    cells = []
    for task in tasks:
        seeds: list[int | None] = (
            [None] if task.kind.kind == CORRESPONDENCE else [config.seed + k for k in range(config.seeds)]
        )
        for name in names:
            checkpoints = plan.for_cell(name, config.input_size)
            for seed in seeds:
                key = _cell_key(config, task, name, seed, checkpoints)
                tag = f"{'once' if seed is None else f's{seed}'}-{_digest(key)[:12]}"
                folder = Path(config.out) / "cells" / task.label / name / tag
                cells.append(Cell(task.label, name, seed, key, folder, checkpoints=checkpoints))
    return cells


def _load_finished(cell: Cell) -> bool:
    """Fill ``cell`` from its ``cell.json`` when it is there and was made with the same settings."""
    try:
        data = json.loads(cell.cell_json.read_text())
    except (OSError, ValueError):
        return False
    if data.get("format") != CELL_FORMAT or data.get("key") != jsonable(cell.key):
        return False
    fields = ("metrics", "seconds", "peak_rss", "cuda_peak", "features_cached", "stores", "weights", "report",
              "backbone", "ran_on")  # fmt: skip
    for name in fields:
        setattr(cell, name, data.get(name, getattr(cell, name)))
    cell.status, cell.reused = "done", True
    return True


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, VitupError) else f"{type(exc).__name__}: {text}".rstrip(": ")


def _weights_of(stores: dict[str, str], name: str) -> dict[str, Any]:
    """Weights ids and licences, as the cell's feature store recorded them (and the method's code licence)."""
    spec = spec_of(name)
    out: dict[str, Any] = {"code_licence": spec.licence}
    for path in stores.values():
        if not path:
            continue
        try:
            with open_store(path) as store:
                attrs = store.attrs
        except (VitupError, OSError):
            continue
        out.update({
            k: attrs.get(k) for k in ("weights_id", "random_init", "checkpoint", "checkpoint_sha256",
                                      "weights_release", "weights_licence")
        })  # fmt: skip
        break
    return out


def _run_cell(cell: Cell, task: Task, config: LeaderboardConfig, reporter: Any) -> None:
    probe_out = cell.folder / "probe"
    model = {
        "checkpoint": cell.checkpoints or None, "backbone": config.backbone, "weights": config.weights,
        "pretrained": config.pretrained, "backbone_args": config.backbone_args, "input_size": config.input_size,
        "device": config.device, "seed": config.seed,
    }  # fmt: skip
    run = {
        "cache": config.cache, "out": probe_out, "overwrite": True, "precision": config.precision,
        "compile": config.compile, "workers": config.workers, "dtype": config.dtype, "limit": config.limit,
    }  # fmt: skip
    with PeakMemory() as peak:
        if task.kind.kind == CORRESPONDENCE:
            report: Any = run_correspondence(
                CorrespondenceConfig(dataset=task.kind.dataset, root=task.root, upsamplers=[cell.upsampler],
                                     res=config.correspondence_res, visualize=0, **model, **run),
                reporter=reporter,
            )  # fmt: skip
        else:
            report = run_probe(
                ProbeConfig(dataset=task.kind.dataset, root=task.root, upsamplers=[cell.upsampler],
                            task=task.kind.kind, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
                            schedule=config.schedule, res=config.res, crop=config.crop, head_seed=cell.seed,
                            depth_scale=config.depth_scale, max_depth=config.max_depth, visualize=0, **model,
                            **run),
                reporter=reporter,
            )  # fmt: skip
    result = report.results[0]
    cell.metrics = {k: float(v) for k, v in result.metrics.items() if k != "images"}
    cell.seconds, cell.peak_rss, cell.cuda_peak = round(peak.seconds, 3), peak.peak_rss, peak.cuda_peak
    cell.stores = {k: v for k, v in result.stores.items() if v}
    cell.features_cached = bool(result.cached) and all(result.cached.values())
    cell.weights = _weights_of(cell.stores, cell.upsampler)
    cell.report = str((probe_out / "report.json").relative_to(Path(config.out)))
    cell.backbone = dict(report.protocol.get("backbone") or {})
    cell.ran_on = {
        "device": report.protocol.get("device"), "torch": torch.__version__, "vitup": __version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "peak_rss_growth": peak.peak_rss - peak.base_rss,
    }  # fmt: skip
    cell.status, cell.reused = "done", False
    cell.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cell.cell_json, (json.dumps(jsonable(cell.record()), indent=2) + "\n").encode())


def _dataset_problem(task: Task) -> str | None:
    """The one-line reason a task's dataset cannot be read (checked once, before its cells), else None."""
    try:
        if task.root is None or not task.root.is_dir():
            return (
                f"{task.label}: no dataset folder at {task.root} (pass --tasks {task.kind.name}:/path or --data-root)"
            )
        if task.kind.kind == CORRESPONDENCE:
            PAIR_READERS[task.kind.dataset](task.root, split="test", categories=None, limit=1)
        else:
            open_splits(task.kind.dataset, task.root, task.kind.kind, limit=1)
    except Exception as exc:  # an unreadable dataset (a permission, a broken file) marks its cells; others run
        return _one_line(exc)
    return None


# =================================================================================================
# published numbers
# =================================================================================================
def published_numbers() -> dict[str, Any]:
    """``published.json`` (shipped with vitup): ``sources`` and ``rows`` of published results."""
    text = resources.files("vitup_cli").joinpath("published.json").read_text(encoding="utf-8")
    return json.loads(text)


def _canonical_backbone(name: str) -> str:
    try:
        return resolve_name(name)[0]
    except VitupError:
        return name


def published_for(backbone: str, data: dict[str, Any] | None = None) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Published rows for ``backbone`` by ``(task name, upsampler)``, in the file's source order."""
    data = data or published_numbers()
    want = _canonical_backbone(backbone)
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in data["rows"]:
        if _canonical_backbone(row["backbone"]) == want:
            out.setdefault((row["task"], row["upsampler"]), []).append(row)
    return out


# =================================================================================================
# the table
# =================================================================================================
@dataclass
class Aggregate:
    """One (task, upsampler): the mean and standard deviation over its seeds, per metric, and its state."""

    task: str
    upsampler: str
    status: str  # done | failed | partial | pending
    reason: str | None
    n: int
    mean: dict[str, float]
    std: dict[str, float]
    values: dict[str, list[float]]
    seconds: float | None
    peak_rss: int | None
    cuda_peak: int | None
    weights: dict[str, Any]
    deterministic: bool


def aggregate(cells: Sequence[Cell]) -> dict[tuple[str, str], Aggregate]:
    """Group the cells by (task, upsampler): mean, sample standard deviation (0 for one value), time (mean per
    seed) and peak memory (the largest)."""
    groups: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.task, c.upsampler), []).append(c)
    out = {}
    for (task, name), group in groups.items():
        done = [c for c in group if c.status == "done"]
        failed = [c for c in group if c.status == "failed"]
        status = "done" if len(done) == len(group) else ("failed" if not done and failed else "partial")
        if not done and not failed:
            status = "pending"
        keys = sorted({k for c in done for k in c.metrics})
        values = {k: [c.metrics[k] for c in done if k in c.metrics and math.isfinite(c.metrics[k])] for k in keys}
        mean = {k: float(np.mean(v)) for k, v in values.items() if v}
        std = {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items() if v}
        secs = [c.seconds for c in done if c.seconds is not None]
        rss = [c.peak_rss for c in done if c.peak_rss is not None]
        cuda = [c.cuda_peak for c in done if c.cuda_peak is not None]
        out[(task, name)] = Aggregate(
            task, name, status, failed[0].reason if failed else None, len(done), mean, std, values,
            float(np.mean(secs)) if secs else None, max(rss) if rss else None, max(cuda) if cuda else None,
            done[0].weights if done else {}, all(c.seed is None for c in group),
        )  # fmt: skip
    return out


#: Student's t, two-sided 95% (the 0.975 quantile), for 1..30 degrees of freedom; 1.96 beyond
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_critical(df: float) -> float:
    """The two-sided 95% critical value of Student's t at ``df`` degrees of freedom (rounded down: conservative)."""
    k = max(1, math.floor(df))
    return _T975[k - 1] if k <= len(_T975) else 1.96


def versus_baseline(cell: Aggregate, base: Aggregate | None, key: str) -> dict[str, Any] | None:
    """The difference of ``cell`` from the baseline on ``key`` and whether it is within the noise: Welch's t-test
    at 95% over the seeds' finite values (``noise`` is the half-width ``t * SE``). ``within_noise`` None: no
    estimate (one seed, or both deterministic)."""
    if base is None or key not in cell.mean or key not in base.mean:
        return None
    delta = cell.mean[key] - base.mean[key]
    if cell.deterministic and base.deterministic:
        return {"delta": delta, "within_noise": None, "noise": 0.0}
    n1, n2 = len(cell.values.get(key, [])), len(base.values.get(key, []))
    if n1 < 2 or n2 < 2:
        return {"delta": delta, "within_noise": None, "noise": None}
    a, b = cell.std[key] ** 2 / n1, base.std[key] ** 2 / n2
    se = math.sqrt(a + b)
    df = (a + b) ** 2 / (a**2 / (n1 - 1) + b**2 / (n2 - 1)) if a + b > 0 else float(n1 + n2 - 2)
    noise = t_critical(df) * se
    return {"delta": delta, "within_noise": abs(delta) <= noise, "noise": noise}


@dataclass
class Leaderboard:
    """What ``run_leaderboard`` made: the plan, the cells, their aggregates and the files written."""

    config: LeaderboardConfig
    tasks: list[Task]
    upsamplers: list[str]
    cells: list[Cell]
    aggregates: dict[tuple[str, str], Aggregate]
    published: dict[tuple[str, str], list[dict[str, Any]]]
    sources: dict[str, Any]
    header: list[str]
    settings: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what went wrong outside the cells (the picture)

    @property
    def failed(self) -> list[Cell]:
        return [c for c in self.cells if c.status == "failed"]

    @property
    def reasons(self) -> list[str]:
        """The distinct reasons cells failed, in order (the table's footnotes ``[1]``, ``[2]``...)."""
        return list(dict.fromkeys(c.reason or "unknown" for c in self.failed))

    def footnote(self, reason: str | None) -> str:
        key = reason or "unknown"
        return f"failed [{self.reasons.index(key) + 1}]" if key in self.reasons else "failed"

    def empty_text(self, agg: Aggregate | None) -> str:
        """What a (task, upsampler) without a number shows: not run, failed [N], or no score (NaN metrics)."""
        if agg is None or agg.status == "pending":
            return "not run"
        if agg.status == "failed":
            return self.footnote(agg.reason)
        return "no score (its metrics are NaN: no valid target pixel?)"

    def baseline(self, task: str) -> Aggregate | None:
        base = self.aggregates.get((task, BASELINE))
        return base if base is not None and base.mean else None

    def paper(self, task: Task, name: str) -> dict[str, Any] | None:
        rows = self.published.get((task.kind.name, name))
        return rows[0] if rows else None


def _fmt(value: float | None, metric: Metric, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value * metric.scale:.{digits}f}"


def _mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.0f}"


def _cell_text(lb: Leaderboard, task: Task, name: str, metric: Metric) -> str:
    agg = lb.aggregates.get((task.label, name))
    if agg is None or agg.status == "pending":
        return "not run"
    if not agg.mean:
        return lb.empty_text(agg)
    text = _fmt(agg.mean.get(metric.key), metric)
    if agg.n > 1 and not agg.deterministic:
        text += f" ± {_fmt(agg.std.get(metric.key), metric)}"
    if name != BASELINE:
        vs = versus_baseline(agg, lb.baseline(task.label), metric.key)
        if vs is not None:
            sign = "+" if vs["delta"] >= 0 else "−"
            text += f" ({sign}{abs(vs['delta']) * metric.scale:.2f}"
            text += ", within noise)" if vs["within_noise"] else ")"
    paper = lb.paper(task, name)
    if paper is not None and metric.key in paper and metric.key in agg.mean:
        diff = agg.mean[metric.key] * metric.scale - paper[metric.key]
        text += f" · paper {paper[metric.key]:.2f} ({'+' if diff >= 0 else '−'}{abs(diff):.2f})"
    if agg.status == "partial":
        text += f" · {agg.n} seeds, {lb.footnote(agg.reason)}"
    return text


def render_markdown(lb: Leaderboard) -> str:
    """``leaderboard.md``: the header (protocol, deviations), the main table (each task's first metric), then
    one table per task with every metric, time and peak memory, and the published numbers beside them."""
    lines = [f"# vitup leaderboard: {lb.settings['backbone']['describe']}", ""]
    lines += [f"- {h}" for h in [*lb.header, *lb.notes]] + [""]
    cols = [f"{t.label} {t.metrics[0].label}" for t in lb.tasks]
    lines += ["| upsampler | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in lb.upsamplers:
        lines.append(f"| {name} | " + " | ".join(_cell_text(lb, t, name, t.metrics[0]) for t in lb.tasks) + " |")
    lines.append("")
    lines.append(
        'Each cell: the mean over seeds (± the standard deviation), its difference from bilinear ("within noise" '
        "when Welch's t-test at 95% cannot tell them apart), and the published number for this backbone, task and "
        "upsampler with the difference. Percent, except AbsRel and RMSE (metres)."
    )
    for task in lb.tasks:
        lines += ["", f"## {task.label} ({task.kind.dataset}, {task.kind.kind}; {task.root})", ""]
        head = [m.label for m in task.metrics]
        head += ["seeds", "time / seed (s)", "process peak RSS (MiB)", "peak CUDA (MiB)"]
        lines += ["| upsampler | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for name in lb.upsamplers:
            agg = lb.aggregates.get((task.label, name))
            if agg is None or not agg.mean:
                why = lb.empty_text(agg)
                lines.append(f"| {name} | {why} |" + " |" * (len(head) - 1))
                continue
            vals = [_cell_text(lb, task, name, m) for m in task.metrics]
            n = "1 (deterministic)" if agg.deterministic else str(agg.n)
            secs = "–" if agg.seconds is None else f"{agg.seconds:.1f}"
            lines.append(f"| {name} | " + " | ".join([*vals, n, secs, _mb(agg.peak_rss), _mb(agg.cuda_peak)]) + " |")
        rows = [(name, r) for name in lb.upsamplers for r in lb.published.get((task.kind.name, name), [])]
        if rows:
            lines += ["", "Published for this backbone:", ""]
            lines += ["| upsampler | source | " + " | ".join(m.label for m in task.metrics) + " |"]
            lines.append("|---" * (len(task.metrics) + 2) + "|")
            for name, r in rows:
                vals = [f"{r[m.key]:.2f}" if m.key in r else "–" for m in task.metrics]
                lines.append(f"| {name} | {lb.sources[r['source']]['title']} | " + " | ".join(vals) + " |")
    used = {r["source"] for rows in lb.published.values() for r in rows}
    notes = [f"{v['title']}: {v['note']}" for s, v in lb.sources.items() if s in used and "note" in v]
    if notes:
        lines += ["", "Notes on the published numbers:", ""] + [f"- {n}" for n in notes]
    failed = lb.failed
    if failed:
        lines += ["", "Failed cells (rerun the same command to retry them; finished cells are kept):", ""]
        for i, reason in enumerate(lb.reasons, start=1):
            which = [c for c in failed if (c.reason or "unknown") == reason]
            cells = ", ".join(
                dict.fromkeys(
                    f"{c.task} × {c.upsampler}" + (f" seed {c.seed}" if c.seed is not None else "") for c in which
                )
            )
            lines.append(f"{i}. {reason} ({len(which)} cells: {cells})")
    return "\n".join(lines) + "\n"


def _csv_rows(lb: Leaderboard) -> list[dict[str, Any]]:
    rows = []
    for task in lb.tasks:
        for name in lb.upsamplers:
            agg = lb.aggregates.get((task.label, name))
            for metric in task.metrics:
                mean = agg.mean.get(metric.key) if agg else None
                vs = versus_baseline(agg, lb.baseline(task.label), metric.key) if agg and name != BASELINE else None
                paper = lb.paper(task, name)
                pv = paper.get(metric.key) if paper else None
                rows.append({
                    "task": task.label, "dataset": task.kind.dataset, "kind": task.kind.kind, "upsampler": name,
                    "metric": metric.key, "scale": metric.scale,
                    "mean": None if mean is None else mean * metric.scale,
                    "std": None if not agg or metric.key not in agg.std else agg.std[metric.key] * metric.scale,
                    "seeds": agg.n if agg else 0,
                    "delta_vs_bilinear": None if vs is None else vs["delta"] * metric.scale,
                    "within_noise": None if vs is None else vs["within_noise"],
                    "paper": pv, "paper_source": paper["source"] if pv is not None else None,
                    "paper_other": ";".join(f"{r['source']}={r[metric.key]}" for r in
                                            lb.published.get((task.kind.name, name), [])[1:] if metric.key in r),
                    "paper_delta": None if pv is None or mean is None else mean * metric.scale - pv,
                    "status": agg.status if agg else "pending", "reason": agg.reason if agg else None,
                    "seconds_per_seed": agg.seconds if agg else None,
                    "peak_rss_bytes": agg.peak_rss if agg else None, "cuda_peak_bytes": agg.cuda_peak if agg else None,
                })  # fmt: skip
    return rows


def render_csv(lb: Leaderboard) -> str:
    """``leaderboard.csv``: one row per (task, upsampler, metric), numbers as shown (percent for fractions)."""
    rows = _csv_rows(lb)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["task"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in row.items()})
    return buf.getvalue()


def render_json(lb: Leaderboard) -> dict[str, Any]:
    """``leaderboard.json``: every setting, versions, each cell (per seed), the aggregates and the published rows."""
    return jsonable({
        "format": TABLE_FORMAT,
        "settings": lb.settings,
        "header": lb.header,
        "notes": lb.notes,
        "tasks": [{"label": t.label, "name": t.kind.name, "dataset": t.kind.dataset, "kind": t.kind.kind,
                   "root": str(t.root) if t.root else None,
                   "metrics": [{"key": m.key, "label": m.label, "higher_is_better": m.higher_is_better,
                                "scale": m.scale} for m in t.metrics]} for t in lb.tasks],
        "upsamplers": {n: {"licence": spec_of(n).licence, "paper": spec_of(n).paper} for n in lb.upsamplers},
        "cells": [{**c.record(), "status": c.status, "reason": c.reason, "folder": str(c.folder)} for c in lb.cells],
        "table": [
            {**asdict(a), "vs_bilinear": {m.key: versus_baseline(a, lb.baseline(a.task), m.key)
                                          for t in lb.tasks if t.label == a.task for m in t.metrics}}
            for a in lb.aggregates.values()
        ],
        "published": {
            "sources": lb.sources,
            "rows": [r for t in lb.tasks for n in lb.upsamplers for r in lb.published.get((t.kind.name, n), [])],
        },
    })  # fmt: skip


# =================================================================================================
# the picture
# =================================================================================================
def _stored_row(path: str, image: str | None) -> tuple[np.ndarray, str, Any] | None:
    """``(features (C, H, W), image path as stored, images root)`` of the row of ``image`` in the store at
    ``path`` (its first finished row when ``image`` is None); None when there is no such row."""
    with open_store(path) as store:
        paths = store.paths
        rows = [i for i, p in enumerate(paths) if int(store.status[i]) == DONE and (image is None or p == image)]
        if not rows:
            return None
        return np.asarray(store[rows[0]], dtype=np.float32), paths[rows[0]], store.attrs.get("images")


def _pca_row(lb: Leaderboard) -> VizRow | None:
    """The same validation image in every upsampler's stored features (matched by its path; one joint PCA),
    from the first linear-probe task with finished cells; None when there is none."""
    for task in lb.tasks:
        if task.kind.kind == CORRESPONDENCE:
            continue
        panels: list[FeaturePanel] = []
        image, size, label, chosen = None, None, "", None
        for name in lb.upsamplers:
            done = [c for c in lb.cells if c.task == task.label and c.upsampler == name and c.status == "done"]
            path = done[0].stores.get("val") if done else None
            found = _stored_row(path, chosen) if path else None
            if found is None:
                continue
            feats, rel, root = found
            panels.append(FeaturePanel(name, torch.from_numpy(feats), nearest=name in ("lowres", "nearest")))
            if chosen is None:
                chosen = rel
                candidate = Path(rel) if Path(rel).is_absolute() else Path(str(root or "")) / rel
                label = f"{task.label}: {candidate.name}"
                try:
                    img = fit_image(load_image(candidate), lb.config.crop, "crop", resample="bilinear")[0]
                    image = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                    size = image.shape[:2]
                except (ImageLoadError, OSError):
                    size = tuple(feats.shape[-2:])
        if panels:
            return VizRow(label, size or tuple(panels[0].features.shape[-2:]), panels, image=image)
    return None


def render_picture(lb: Leaderboard, out: Path) -> Path:
    """``leaderboard.png``: a grouped bar chart (each task's first metric, one bar per upsampler, ± std) above the
    same image's joint-PCA features for every upsampler side by side."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    pca_png = None
    tmp = out.with_name(f".{out.stem}-pca.png")
    try:
        row = _pca_row(lb)
        if row is not None:
            render_rows([row], tmp, title="the same image, every upsampler: one PCA fitted jointly on all panels")
            pca_png = np.asarray(Image.open(tmp).convert("RGB"))
    except Exception as exc:  # the picture's PCA half is a courtesy: the tables are written either way
        lb.notes.append(f"picture: no PCA panels ({_one_line(exc)})")
    finally:
        tmp.unlink(missing_ok=True)
    width = max(8.0, 1.2 * len(lb.tasks) * max(1, len(lb.upsamplers)) / 2)
    bar_h = 4.0
    pca_h = 0.0 if pca_png is None else width * pca_png.shape[0] / pca_png.shape[1]
    fig = Figure(figsize=(width, bar_h + pca_h), dpi=100)
    FigureCanvasAgg(fig)
    total = bar_h + pca_h
    ax = fig.add_axes((0.06, (pca_h + 0.6) / total, 0.78, (bar_h - 1.1) / total))
    n = max(1, len(lb.upsamplers))
    step = 0.8 / n
    cmap = colormaps["tab10"]
    for j, name in enumerate(lb.upsamplers):
        xs, ys, es = [], [], []
        for i, task in enumerate(lb.tasks):
            agg = lb.aggregates.get((task.label, name))
            m = task.metrics[0]
            if agg is not None and m.key in agg.mean:
                xs.append(i - 0.4 + step * (j + 0.5))
                ys.append(agg.mean[m.key] * m.scale)
                es.append(agg.std.get(m.key, 0.0) * m.scale)
        ax.bar(xs, ys, width=step * 0.95, yerr=es if any(es) else None, label=name, color=cmap(j % 10), capsize=2)
    for i, task in enumerate(lb.tasks):
        if not any((task.label, n) in lb.aggregates and lb.aggregates[(task.label, n)].mean for n in lb.upsamplers):
            ax.text(i, 0.5, "no finished cell", ha="center", va="bottom", fontsize=7, color="grey",
                    transform=ax.get_xaxis_transform())  # fmt: skip
    ax.set_xlim(-0.5, len(lb.tasks) - 0.5)
    ax.set_xticks(range(len(lb.tasks)), [f"{t.label}\n{t.metrics[0].label}" for t in lb.tasks], fontsize=8)
    ax.set_ylabel("score (%)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(lb.settings["backbone"]["describe"], fontsize=9)
    if pca_png is not None:
        pax = fig.add_axes((0.0, 0.0, 1.0, pca_h / (bar_h + pca_h)))
        pax.imshow(pca_png)
        pax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(out, buf.getvalue())
    out.chmod(0o644)
    return out


# =================================================================================================
# the run
# =================================================================================================
def _header(config: LeaderboardConfig, names: Sequence[str], tasks: Sequence[Task]) -> list[str]:
    """The protocol, then every deviation from the paper's that these settings imply."""
    lines = [
        "protocol: the ViT-Up paper's (its probing toolkit): linear probes on 448-px centre crops (short side "
        f"to 448, labels nearest), a 1x1 conv head, AdamW, batch {config.batch_size}, cosine schedule over all "
        "iterations, random flips, seg lr 2e-3 for 20 epochs (COCO-Stuff 5), depth JAFAR's binned head lr 5e-3 for "
        "5 epochs; SPair-71k test: pad to square, 448 px, argmax cosine, PCK per point within a category, mean over "
        "categories",
        f"upsamplers: {', '.join(names)}; tasks: {', '.join(t.spec for t in tasks)}; seeds: {config.seeds} "
        f"(probe heads {config.seed}..{config.seed + config.seeds - 1})",
    ]
    dev = []
    if config.limit is not None:
        dev.append(
            f"--limit {config.limit}: only the first {config.limit} images of each split (pairs per category for "
            "correspondence); the paper uses whole splits, so these numbers are a smoke test, not comparable"
        )
    if config.res != PAPER_RES:
        dev.append(
            f"--res {config.res}: features stored at {config.res}², resized to the {config.crop}² labels (paper: 448²)"
        )
    if config.crop != PAPER_RES:
        dev.append(f"--crop {config.crop}: labels scored at {config.crop}² (paper: 448²)")
    if config.correspondence_res != PAPER_RES:
        dev.append(f"correspondence grid {config.correspondence_res}² (paper: 448²)")
    if config.epochs is not None:
        dev.append(f"--epochs {config.epochs} for every task (paper: 20, COCO-Stuff 5, depth 5)")
    if config.lr is not None:
        dev.append(f"--lr {config.lr:g} (paper: seg 2e-3, depth 5e-3)")
    if config.schedule != "cosine":
        dev.append(f"--schedule {config.schedule}: JAFAR's per-epoch cosine stepped every batch (its published bug)")
    if config.batch_size != 4:
        dev.append(f"--batch-size {config.batch_size} (paper: 4)")
    if config.pretrained == "none":
        dev.append("--pretrained none: a random-init backbone; the numbers say nothing about the methods")
    if config.backbone_args:
        args = ",".join(f"{k}={v}" for k, v in config.backbone_args.items())
        dev.append(f"--backbone-args {args}: not the published backbone")
    if config.input_size is not None:
        dev.append(f"--input-size {config.input_size} (paper: each method's own)")
    if config.seeds < 2:
        dev.append("one seed: no noise estimate (--seeds 3 gives mean ± std and says which differences are noise)")
    lines += [f"deviation: {d}" for d in dev] if dev else ["deviations: none (the paper's protocol)"]
    return lines


def _settings(config: LeaderboardConfig, names: Sequence[str], device_backbone: dict[str, Any]) -> dict[str, Any]:
    return jsonable({
        "config": {k: v for k, v in asdict(config).items() if k != "_"},
        "backbone": device_backbone,
        "versions": {"vitup": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version(), "numpy": np.__version__},
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    })  # fmt: skip


def _describe_backbone(config: LeaderboardConfig, cells: Sequence[Cell]) -> dict[str, Any]:
    """The backbone the cells ran over, as their reports recorded it (a checkpoint brings its own backbone,
    whatever ``--backbone`` says); ``--backbone`` when no cell finished. ``differs``: the two disagree."""
    ran = next((c.backbone for c in cells if c.status == "done" and c.backbone), None)
    try:
        flag_timm, flag_tag = resolve_name(config.backbone)
    except VitupError:
        flag_timm, flag_tag = config.backbone, None
    if ran:
        timm_name, weights_id = str(ran.get("timm_name")), str(ran.get("weights_id"))
        overrides = ran.get("overrides") or {}
        text = f"{ran.get('name') or timm_name} ({timm_name}, weights {weights_id})"
        text += "".join(f", {k}={v}" for k, v in overrides.items())
        return {"name": ran.get("name"), "timm_name": timm_name, "weights_id": weights_id, "describe": text,
                "from": "the cells' reports", "differs": timm_name != flag_timm}  # fmt: skip
    tag = None if config.pretrained == "none" else (flag_tag if config.pretrained == "hub" else config.pretrained)
    text = f"{config.backbone} ({flag_timm}{'.' + tag if tag else ''})"
    if config.weights:
        text += f", weights {config.weights}"
    if config.pretrained == "none":
        text += ", random init"
    text += "".join(f", {k}={v}" for k, v in (config.backbone_args or {}).items())
    return {"name": config.backbone, "timm_name": flag_timm, "weights_id": tag, "describe": text,
            "from": "--backbone (no cell finished)", "differs": False}  # fmt: skip


def run_leaderboard(config: LeaderboardConfig, reporter: Any = None, quiet_cells: bool = True) -> Leaderboard:
    """Run every unfinished cell, then write ``leaderboard.{md,csv,json,png}`` to ``config.out``.

    Args:
        reporter: progress and messages (``vitup_cli.progress.Reporter``); default tqdm/plain lines.
        quiet_cells: keep the cells' own probe messages and bars out of the reporter (one line per cell instead).
    Raises:
        VitupError: bad settings (unknown upsampler or task, a checkpoint given twice). A failing cell does not
        raise: it is marked in the table with its reason.
    """
    names = _validate(config)
    tasks = parse_tasks(config.tasks, config.data_root)
    reporter = reporter or default_reporter()
    plan = CheckpointPlan.make(config.checkpoint)
    for ref, why in plan.missing.items():
        reporter.warning(f"the cells that need {ref} are skipped: {why}")
    out = Path(config.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    config = replace(config, out=out)
    cells = plan_cells(config, tasks, names, plan)
    problems = {t.label: _dataset_problem(t) for t in tasks}
    todo = 0
    for cell in cells:
        if _load_finished(cell):
            continue
        missing = next((plan.missing[r] for r in cell.checkpoints if r in plan.missing), None)
        if problems[cell.task] or missing:
            cell.status, cell.reason = "failed", problems[cell.task] or missing
        else:
            todo += 1
    reporter.info(
        f"leaderboard: {len(cells)} cells ({len(tasks)} tasks x {len(names)} upsamplers, seeds {config.seeds}); "
        f"{sum(c.reused for c in cells)} finished before, {todo} to run, "
        f"{sum(c.status == 'failed' for c in cells)} cannot run; {out}"
    )
    for label, why in problems.items():
        if why:
            reporter.warning(f"{label}: its cells are skipped: {why}")
    by_label = {t.label: t for t in tasks}
    cell_reporter = SilentReporter() if quiet_cells else reporter
    k = 0
    for cell in cells:
        if cell.status != "pending":
            continue
        k += 1
        what = f"{cell.task} x {cell.upsampler}" + (f" seed {cell.seed}" if cell.seed is not None else "")
        try:
            choose_names([cell.upsampler], checkpoint_refs(config.checkpoint))
            _run_cell(cell, by_label[cell.task], config, cell_reporter)
        except Exception as exc:  # a failing cell is reported in the table; the others run
            cell.status, cell.reason = "failed", _one_line(exc)
            if not isinstance(exc, VitupError):
                (out / "cells").mkdir(parents=True, exist_ok=True)
                with (out / "cells" / "errors.log").open("a", encoding="utf-8") as log:
                    log.write(f"{what}\n{traceback.format_exc()}\n")
            where = "" if isinstance(exc, VitupError) else f" (traceback in {out / 'cells' / 'errors.log'})"
            reporter.warning(f"[{k}/{todo}] {what}: failed: {cell.reason}{where}")
            continue
        main = next(iter(cell.metrics.items()), ("", float("nan")))
        reporter.info(
            f"[{k}/{todo}] {what}: {main[0]} {main[1]:.4f} ({cell.seconds:.1f} s, peak RSS "
            f"{_mb(cell.peak_rss)} MiB{'' if cell.cuda_peak is None else f', CUDA {_mb(cell.cuda_peak)} MiB'})"
        )
    backbone = _describe_backbone(config, cells)
    header = _header(config, names, tasks)
    data = published_numbers()
    if backbone["differs"]:
        ran = backbone["timm_name"]
        shown = f"the published numbers shown are {ran}'s" if published_for(ran, data) else "none is published for it"
        header.insert(0, f"backbone: the cells ran over {ran}, from the checkpoints, not over --backbone "
                         f"{config.backbone}; {shown}")  # fmt: skip
    random_init = "random init" in str(backbone.get("weights_id"))
    if random_init and config.pretrained != "none":  # a checkpoint made with --pretrained none carries it
        header.append("deviation: the checkpoints' backbone is random-init; the numbers say nothing about the methods")
    lb = Leaderboard(
        config=config, tasks=tasks, upsamplers=names, cells=cells, aggregates=aggregate(cells),
        published=published_for(backbone["timm_name"], data), sources=data["sources"], header=header,
        settings={**_settings(config, names, backbone), "plan": _digest([c.key for c in cells])[:16]},
    )  # fmt: skip
    previous = out / "leaderboard.json"
    if previous.is_file():
        try:
            old_plan = json.loads(previous.read_text()).get("settings", {}).get("plan")
        except (OSError, ValueError, AttributeError):
            old_plan = None
        if old_plan and old_plan != lb.settings["plan"]:
            reporter.warning(
                f"{out}: replacing the table of other settings; their finished cells are kept under {out / 'cells'} "
                "(rerun their command to draw that table again)"
            )
    write_outputs(lb, out)
    for note in lb.notes:
        reporter.warning(note)
    return lb


def write_outputs(lb: Leaderboard, out: Path) -> None:
    """The three tables and the picture, each written atomically (the tables depend only on the cells, so a
    rerun that recomputes nothing writes the same tables)."""
    png = render_picture(lb, out / "leaderboard.png")  # first: what it could not draw goes into the tables' notes
    atomic_write_bytes(out / "leaderboard.md", render_markdown(lb).encode())
    atomic_write_bytes(out / "leaderboard.csv", render_csv(lb).encode())
    atomic_write_bytes(out / "leaderboard.json", (json.dumps(render_json(lb), indent=2) + "\n").encode())
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.json"):
        (out / name).chmod(0o644)
    lb.files = {k: str(out / f"leaderboard.{k}") for k in ("md", "csv", "json")}
    lb.files["png"] = str(png)
