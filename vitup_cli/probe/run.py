"""``vitup probe``: linear probes on standard datasets, from cached feature stores, side by side.

``run_probe(ProbeConfig(...))``:

1. reads the train and val splits of the dataset (``datasets``) and crops their targets once into the
   cache (short side to the crop size, centre square: the protocol's 448 x 448 by default);
2. for each upsampler, makes (or finds) one feature store per split through ``vitup_cli.extract``
   (``--fit crop`` at the upsampler's input size, output grid ``res x res``), keyed by everything that
   decides its content, so the next run reuses it; ``no_cache`` computes the features from the images
   at every epoch instead;
3. trains the head (1x1 conv for segmentation, JAFAR's binned head for depth) streaming features from the
   store (held in memory only when they fit ``memory_budget``), the stored maps bilinearly resized to the
   label size; then scores it on the val split;
4. writes ``report.json``, ``predictions.png`` (image | truth | each upsampler) and the heads' weights
   (``heads/NAME.safetensors``) to ``out``, and returns a ``ProbeReport`` (``report.results_table`` renders it).

With a ViT-Up checkpoint, training-free upsamplers (``bilinear``, ...) run on the same backbone with the
LoRA adapters off: the original backbone, what the paper compares against (``vitup_cli.probe.upsamplers``
builds them, for this run and for ``correspondence``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitup_cli.choice import ModelChoice
from vitup_cli.data.images import ImageLoadError, load_image
from vitup_cli.errors import VitupError
from vitup_cli.features import compile_upsampler, fit_image, resolve_precision
from vitup_cli.fileio import atomic_write_bytes
from vitup_cli.probe import cache as _cache
from vitup_cli.probe.datasets import DEFAULT_EPOCHS, DEPTH, DEPTH_EPOCHS, SEG, TASKS, ProbeDataset, open_splits
from vitup_cli.probe.heads import SCHEDULES
from vitup_cli.probe.metrics import majority_baseline
from vitup_cli.probe.report import ProbeReport, UpsamplerResult, save_grid, write_json
from vitup_cli.probe.train import (
    FeatureSource,
    LiveFeatures,
    StoreFeatures,
    TrainSettings,
    evaluate,
    fit_head,
)
from vitup_cli.probe.upsamplers import build_upsamplers, checkpoint_refs, choose_names, resolve_device
from vitup_cli.progress import default_reporter
from vitup_cli.stores import DONE

SEG_LR, DEPTH_LR = 2e-3, 5e-3


@dataclass
class ProbeConfig(ModelChoice):
    """Everything ``run_probe`` needs; the defaults are the protocol's (ViT-Up's runs).

    The model fields (``checkpoint``, ``backbone``, ``weights``, ``pretrained``, ``backbone_args``,
    ``input_size``, ``device``, ``seed``) are ``vitup_cli.choice.ModelChoice``'s, keyword-only; ``seed`` also
    seeds the heads' training unless ``head_seed`` is given (repeats over seeds of one fixed model, as
    ``vitup leaderboard --seeds`` runs them). ``checkpoint``: one reference or one per trained upsampler.
    ``upsamplers``: names to compare (default ``vitup`` with a checkpoint, else ``bilinear``); the first is
    the reference column. ``epochs``/``lr``: None takes the task's default (seg 20 epochs, COCO-Stuff 5,
    lr 2e-3; depth 5 epochs, lr 5e-3). ``crop``: label (and score) size. ``res``: stored feature grid.
    ``input_size``: backbone input (default the upsampler's). ``cache``: None for ``default_cache_dir()``.
    ``out``: report folder (None: write nothing but the cache). ``memory_budget``: bytes of stored
    features a split may hold in RAM before streaming (None: a quarter of physical memory).
    """

    dataset: str
    root: str | Path
    upsamplers: Sequence[str] | None = None
    _: KW_ONLY
    checkpoint: str | Path | Sequence[str | Path] | None = None  # one per trained upsampler
    task: str = SEG
    epochs: int | None = None
    lr: float | None = None
    batch_size: int = 4
    weight_decay: float = 1e-5
    schedule: str = "cosine"
    flip: bool = True
    res: int = 224
    crop: int = 448
    dtype: str = "float16"
    cache: str | Path | None = None
    no_cache: bool = False
    out: str | Path | None = None
    overwrite: bool = False  # replace a report already in ``out``
    limit: int | None = None
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = False  # torch.compile the heavy modules (features.compile_upsampler)
    workers: int | None = None
    memory_budget: int | None = None
    depth_scale: float | None = None
    max_depth: float = 10.0
    visualize: int = 4
    head_seed: int | None = None


# =================================================================================================
# helpers
# =================================================================================================
def _default_budget() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def check_protocol(
    *, res: int, crop: int, batch_size: int, epochs: int | None, lr: float | None, schedule: str, dtype: str,
    precision: str,
) -> None:  # fmt: skip
    """The linear-probe protocol's settings, each refused in one line naming its flag, before anything loads
    (``vitup probe`` and ``vitup leaderboard`` both check theirs here)."""
    resolve_precision(precision, "cpu")
    if schedule not in SCHEDULES:
        raise VitupError(f"--schedule {schedule}: use {' or '.join(SCHEDULES)}")
    for flag, value in (("--res", res), ("--crop", crop), ("--batch-size", batch_size)):
        if value < 1:
            raise VitupError(f"{flag} {value}: must be at least 1")
    if epochs is not None and epochs < 1:
        raise VitupError(f"--epochs {epochs}: must be at least 1")
    if lr is not None and not lr > 0:
        raise VitupError(f"--lr {lr}: must be positive")
    if dtype not in ("float16", "float32"):
        raise VitupError(f"--dtype {dtype}: use float16 or float32")


def _validate(config: ProbeConfig) -> None:
    check_protocol(
        res=config.res, crop=config.crop, batch_size=config.batch_size, epochs=config.epochs, lr=config.lr,
        schedule=config.schedule, dtype=config.dtype, precision=config.precision,
    )  # fmt: skip
    if config.out is not None and (Path(config.out) / "report.json").exists() and not config.overwrite:
        raise VitupError(
            f"--out {config.out} already holds a probe report; nothing was changed. Pass --overwrite to "
            "replace it, or choose another --out"
        )
    if config.task not in TASKS:
        raise VitupError(f"--task {config.task}: use seg or depth")


def _with_progress(reporter: Any, total: int, label: str):
    reporter.start(total, label)
    return reporter.advance


def _visual_rows(rows: np.ndarray, count: int) -> list[int]:
    if count <= 0 or len(rows) == 0:
        return []
    picks = np.linspace(0, len(rows) - 1, min(count, len(rows))).round().astype(int)
    return sorted({int(rows[p]) for p in picks})


# =================================================================================================
# the run
# =================================================================================================
def run_probe(config: ProbeConfig, reporter: Any = None) -> ProbeReport:
    """Probe every upsampler of ``config`` on its dataset (see the module docstring).

    Args:
        reporter: progress and messages (``vitup_cli.progress.Reporter`` interface); default tqdm on a
            terminal, plain lines otherwise.
    Raises:
        VitupError: a wrong or partial dataset root, bad flags, unreadable targets, or a failed extraction.
    """
    started = time.perf_counter()
    _validate(config)
    if reporter is None:
        reporter = default_reporter()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    train_ds, val_ds = open_splits(
        config.dataset, config.root, config.task, limit=config.limit, depth_scale=config.depth_scale
    )
    refs = checkpoint_refs(config.checkpoint)
    names = choose_names(config.upsamplers, refs)
    task = config.task
    epochs = config.epochs or (DEPTH_EPOCHS if task == DEPTH else DEFAULT_EPOCHS[config.dataset])
    lr = config.lr or (DEPTH_LR if task == DEPTH else SEG_LR)
    settings = TrainSettings(
        task=task, epochs=epochs, lr=lr, batch_size=config.batch_size, weight_decay=config.weight_decay,
        schedule=config.schedule, flip=config.flip, seed=config.seed if config.head_seed is None else config.head_seed,
        device=device, max_depth=config.max_depth,
    )  # fmt: skip
    cache_dir = Path(config.cache).expanduser() if config.cache else _cache.default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    workers = config.workers if config.workers is not None else min(8, os.cpu_count() or 1)
    reporter.info(
        f"{config.dataset} ({task}): {len(train_ds)} train / {len(val_ds)} val images from {train_ds.root}; "
        f"cache {cache_dir}"
    )
    targets = {
        ds.split: _cache.prepare_targets(ds, config.crop, cache_dir, workers=workers, reporter=reporter)
        for ds in (train_ds, val_ds)
    }
    num_classes = train_ds.num_classes
    upsamplers = build_upsamplers(config, names)
    budget = config.memory_budget if config.memory_budget is not None else _default_budget()
    results = []
    predictions: dict[str, list[np.ndarray]] = {}
    vis_rows: list[int] | None = None
    for (upsampler, teacher), name in zip(upsamplers, names, strict=True):
        upsampler.to(device).eval()
        if config.compile:
            reporter.info(f"{name}: --compile: {compile_upsampler(upsampler)} modules compiled")
        tap = upsampler.backbone.taps[-1]
        res_info = UpsamplerResult(name, {}, input_size=upsampler.input_size, channels=upsampler.dim)
        sources: dict[str, FeatureSource] = {}
        entries: dict[str, _cache.StoreEntry | None] = {}
        t0 = time.perf_counter()
        if config.no_cache:
            reporter.info(f"{name}: --no-cache, features computed from the images at every epoch (nothing written)")
            for ds in (train_ds, val_ds):
                sources[ds.split] = LiveFeatures(
                    upsampler, ds.images, (config.res, config.res), workers=workers, precision=precision
                )
                entries[ds.split] = None
                res_info.stores[ds.split], res_info.cached[ds.split] = None, False
        else:
            for ds in (train_ds, val_ds):
                entry = _cache.reuse_or_make_store(
                    f"{name} {ds.split}", ds, upsampler, cache_dir, res=config.res, dtype=config.dtype, tap=tap,
                    teacher=teacher, precision=precision, checkpoint=refs.get(name), device=device,
                    workers=config.workers, seed=config.seed, reporter=reporter,
                )  # fmt: skip
                src = StoreFeatures(entry.path, memory_budget=budget)
                sources[ds.split], entries[ds.split] = src, entry
                res_info.stores[ds.split], res_info.cached[ds.split] = str(entry.path), entry.cached
                res_info.streamed[ds.split] = not src.in_memory
        res_info.extract_seconds = time.perf_counter() - t0
        try:
            rows = {ds.split: _usable_rows(ds, sources[ds.split], targets[ds.split], res_info, reporter)
                    for ds in (train_ds, val_ds)}  # fmt: skip
            cls = {}
            if task == DEPTH:
                for ds in (train_ds, val_ds):
                    cls[ds.split] = _cache.ensure_cls(entries[ds.split], upsampler, ds)
            if vis_rows is None:
                vis_rows = _visual_rows(rows["val"], config.visualize)
            t1 = time.perf_counter()
            advance = _with_progress(reporter, len(rows["train"]) * epochs, f"train {name}")
            try:
                fit = fit_head(
                    sources["train"], targets["train"].array, settings, num_classes, rows=rows["train"],
                    cls=cls.get("train"), progress=advance,
                )  # fmt: skip
            finally:
                reporter.finish()
            res_info.train_seconds = time.perf_counter() - t1
            res_info.epoch_loss = fit.epoch_loss
            t2 = time.perf_counter()
            advance = _with_progress(reporter, len(rows["val"]), f"score {name}")
            try:
                ev = evaluate(
                    fit.head, sources["val"], targets["val"].array, settings, num_classes, rows=rows["val"],
                    cls=cls.get("val"), keep=vis_rows, progress=advance,
                )  # fmt: skip
            finally:
                reporter.finish()
            res_info.eval_seconds = time.perf_counter() - t2
        finally:
            for src in sources.values():
                src.close()
        if ev.seg is not None:
            scores = ev.seg.scores()
            res_info.metrics = {"miou": scores.miou, "accuracy": scores.accuracy}
            res_info.per_class_iou = {
                n: (None if np.isnan(v) else float(v)) for n, v in zip(train_ds.class_names, scores.iou, strict=True)
            }
            res_info.confusion = ev.seg.confusion.tolist()
        else:
            res_info.metrics = ev.metrics()
        predictions[name] = [ev.kept[i] for i in vis_rows]
        if config.out is not None:
            res_info.head = str(_save_head(fit.head, Path(config.out), name, config, train_ds))
        results.append(res_info)
        upsampler.to("cpu")
    baseline = None
    if task == SEG and results and results[0].confusion is not None:
        counts = targets["train"].counts[:num_classes]
        cls_id, base = majority_baseline(counts, np.asarray(results[0].confusion))
        baseline = {"class": train_ds.class_names[cls_id], "miou": base.miou, "accuracy": base.accuracy}
    protocol = {
        "crop": config.crop, "res": config.res, "fit": "crop", "epochs": epochs, "lr": lr,
        "batch_size": config.batch_size, "weight_decay": config.weight_decay, "schedule": config.schedule,
        "flip": config.flip, "seed": config.seed, "dtype": config.dtype, "no_cache": config.no_cache,
        **({"head_seed": config.head_seed} if config.head_seed is not None else {}),
        "limit": config.limit, "cache": str(cache_dir), "device": device,
        "backbone": upsamplers[0][0].backbone.describe(),
        "checkpoint": (list(refs.values()) if len(refs) > 1 else next(iter(refs.values()))) if refs else None,
        "optimizer": "AdamW", "loss": "cross-entropy, ignore 255" if task == SEG else "SigLoss + 0.5 GradientLoss",
    }  # fmt: skip
    report = ProbeReport(
        dataset=config.dataset, task=task, root=str(train_ds.root), class_names=list(train_ds.class_names),
        train_images=len(train_ds), val_images=len(val_ds), notes=[*train_ds.notes, *val_ds.notes],
        protocol=protocol, results=results, baseline=baseline,
    )  # fmt: skip
    report.seconds = time.perf_counter() - started
    if config.out is not None:
        _write_outputs(report, Path(config.out), val_ds, targets["val"].array, vis_rows or [], predictions, config)
    return report


def _usable_rows(
    ds: ProbeDataset, source: FeatureSource, targets: _cache.Targets, result: UpsamplerResult, reporter: Any
) -> np.ndarray:
    """Rows whose features exist (the extraction could read the image) and whose image was readable."""
    ok = targets.readable.copy()
    if isinstance(source, StoreFeatures):
        ok &= source.store.status == DONE
    bad = np.flatnonzero(~ok)
    for i in bad:
        result.skipped.append({"split": ds.split, "path": str(ds.images[i])})
    if len(bad):
        reporter.warning(
            f"{ds.split}: {len(bad)} unreadable images left out of the probe (first: {ds.images[int(bad[0])]})"
        )
    rows = np.flatnonzero(ok)
    if len(rows) == 0:
        raise VitupError(f"{ds.split} split: none of its {len(ds)} images could be read")
    return rows


def _save_head(head: torch.nn.Module, out: Path, name: str, config: ProbeConfig, ds: ProbeDataset) -> Path:
    from safetensors.torch import save

    path = out / "heads" / f"{name}.safetensors"
    meta = {
        "format": "vitup-probe-head/1",
        "upsampler": name,
        "dataset": config.dataset,
        "task": config.task,
        "head": type(head).__name__,
        "classes": json.dumps(list(ds.class_names)),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def _write_outputs(
    report: ProbeReport,
    out: Path,
    val_ds: ProbeDataset,
    val_targets: np.ndarray,
    vis_rows: list[int],
    predictions: dict[str, list[np.ndarray]],
    config: ProbeConfig,
) -> None:

    out.mkdir(parents=True, exist_ok=True)
    if vis_rows:
        images, truths, keep = [], [], []
        for j, i in enumerate(vis_rows):
            try:
                img = fit_image(load_image(val_ds.images[i]), config.crop, "crop", resample="bilinear")[0]
            except ImageLoadError:
                continue
            images.append((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            truths.append(np.asarray(val_targets[i]))
            keep.append(j)
        preds = {name: [p[j] for j in keep] for name, p in predictions.items()}
        if images:
            report.files["predictions"] = str(save_grid(out / "predictions.png", images, truths, preds, config.task))
    for res in report.results:
        if res.head:
            report.files[f"head:{res.name}"] = res.head
    report.files["report"] = str(out / "report.json")
    write_json(report, out / "report.json")
