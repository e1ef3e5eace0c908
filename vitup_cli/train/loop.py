"""The one training loop of every method: AdamW + schedule, precision, accumulation, clipping, DDP,
checkpoints, exact resume, metrics, progress, the NaN stop.

What is trained on what, and against what, belongs to the method (``vitup_cli.train.methods``,
picked by ``cfg.method``). One optimiser step = ``batch_size`` images over all processes
(``batch_size / (world * accum)`` per micro-batch). Under ``torchrun`` each process takes its own
slice of every global batch and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitup_cli._version import __version__
from vitup_cli.data.images import list_images
from vitup_cli.errors import VitupError
from vitup_cli.fileio import atomic_write_bytes
from vitup_cli.hub import init_from
from vitup_cli.hub.format import checkpoint_paths
from vitup_cli.progress import NullReporter, Reporter, default_reporter
from vitup_cli.train.config import CommonConfig, check_common
from vitup_cli.train.data import TRAIN_STREAM, VAL_STREAM, StepBatches, make_loader
from vitup_cli.train.methods import METHODS, TrainMethod
from vitup_cli.train.methods.vitup import build_model  # noqa: F401 - `vitup_cli.train.build_model`
from vitup_cli.train.report import MetricsLog, plot_loss_curve
from vitup_cli.train.state import (
    STATE_NAME,
    RunState,
    load_state,
    restore_host_rng,
    save_state,
    set_torch_rng_state,
    torch_rng_state,
)

log = logging.getLogger("vitup.train")


class TrainingDiverged(VitupError):
    """The loss or the gradient became NaN/inf; nothing of that step was applied."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    finished: bool  # reached ``steps`` (False when stopped by ``stop_after``)
    last_checkpoint: Path | None
    best_checkpoint: Path | None = None
    best_val: float | None = None
    final_loss: float | None = None
    bad_files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


# -- schedule ---------------------------------------------------------------------------------------
def lr_at(step: int, cfg: CommonConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up over ``warmup * steps``, then
    cosine from ``lr`` down to ``min_lr`` at the last step (``schedule = "constant"``: after the
    warm-up, ``lr`` throughout)."""
    return _Schedule(cfg).lr(step)


class _Schedule:
    """``LambdaLR`` factor. Plain numbers only: ``LambdaLR.state_dict`` stores this object's fields."""

    def __init__(self, cfg: CommonConfig) -> None:
        self.base, self.floor, self.steps = cfg.lr, cfg.min_lr, cfg.steps
        self.warm = round(cfg.warmup * cfg.steps)
        self.constant = cfg.schedule == "constant"

    def lr(self, step: int) -> float:
        if step < self.warm:
            return self.base * (step + 1) / self.warm
        if self.constant:
            return self.base
        span = max(self.steps - self.warm - 1, 1)
        progress = min((step - self.warm) / span, 1.0)
        return self.floor + (self.base - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.base


# -- processes --------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialised: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_processes(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise VitupError(f"--device {device}: CUDA is not available here; use --device cpu")
    if want_cuda:
        dev = torch.device(f"cuda:{local}") if device in {"auto", "cuda"} else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    initialised = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo")
            initialised = True
    return _Dist(rank=rank, world=world, local_rank=local, device=dev, initialised=initialised)


def _all_reduce_mean(values: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= d.world
    return values


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _gather(obj: Any, d: _Dist) -> list[Any]:
    if d.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


# -- the method ------------------------------------------------------------------------------------
def make_method(cfg: CommonConfig, world_size: int = 1) -> TrainMethod:
    """The ``TrainMethod`` of ``cfg.method``, built (its model initialised from ``cfg.seed``)."""
    if cfg.method not in METHODS:
        raise VitupError(f"--method {cfg.method}: unknown training method; use one of {', '.join(METHODS)}")
    cls = METHODS[cfg.method]
    if not isinstance(cfg, cls.config_class):
        raise VitupError(f"--method {cfg.method}: the settings are not {cls.config_class.__name__}")
    method = cls(cfg, world_size)
    method.build()
    return method


def _autocast(precision: str, device: torch.device) -> Any:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- the run ----------------------------------------------------------------------------------------
def _write_config(run_dir: Path, cfg: CommonConfig, method: TrainMethod, n_images: int, d: _Dist) -> None:
    import timm

    record = {
        "config": cfg.to_json(),
        "method": method.name,
        "vitup_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **method.describe(),
        "train_images": n_images,
        "world_size": d.world,
        "trainable_parameters": sum(p.numel() for _, p in method.trainable_parameters()),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    atomic_write_bytes(run_dir / "config.json", (json.dumps(record, indent=2) + "\n").encode())


def _evaluate(method: TrainMethod, files: list[Path], cfg: CommonConfig, d: _Dist) -> dict[str, float]:
    """Mean loss terms over the held-out images (fixed samples), all processes."""
    n = min(len(files), cfg.val_images)
    mine = list(range(d.rank, n, d.world))
    micro = max(1, cfg.batch_size // (d.world * cfg.accum))
    batches = [mine[i : i + micro] for i in range(0, len(mine), micro)]
    dataset = method.dataset(files, VAL_STREAM)
    student = method.student()
    autocast = _autocast(cfg.precision, d.device)
    sums: dict[str, float] = {}
    method.model.eval()
    try:
        with torch.no_grad():
            loader = make_loader(
                dataset, batches, cfg.workers, pin_memory=d.device.type == "cuda", collate_fn=method.collate
            )
            for batch in loader:
                _, terms = method.loss(student, batch, d.device, autocast)
                size = len(batch["position"])
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * size
    finally:
        method.set_train_mode()
    keys = method.term_keys()
    count = float(sum(len(b) for b in batches))
    vector = torch.tensor([sums.get(k, 0.0) for k in keys] + [count], dtype=torch.float64)
    if d.world > 1:
        import torch.distributed as dist

        vector = vector.to(d.device)
        dist.all_reduce(vector)
        vector = vector.cpu()
    count = max(vector[-1].item(), 1.0)
    return {f"val_{k}": vector[i].item() / count for i, k in enumerate(keys)}


def train(
    cfg: CommonConfig,
    *,
    resume: bool = False,
    reporter: Reporter | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``cfg.method`` into ``cfg.out``; see the module docstring.

    Args:
        resume: continue the run in ``cfg.out`` exactly where its last save left it (``cfg`` should
            come from ``resume_config``).
        reporter: progress sink (default: tqdm in a terminal, plain lines otherwise; rank 0 only).
        stop_after: end this session after that many optimiser steps, with a save (time-limited jobs;
            ``resume`` continues).
    Raises:
        VitupError: bad settings or inputs; ``TrainingDiverged`` on a NaN/inf loss or gradient.
    """
    started = time.monotonic()
    d = _setup_processes(cfg.device)
    try:
        return _train(cfg, d, resume, reporter, stop_after, started)
    finally:
        if d.initialised:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(
    cfg: CommonConfig, d: _Dist, resume: bool, reporter: Reporter | None, stop_after: int | None, started: float
) -> TrainResult:
    run_dir = Path(cfg.out) if cfg.out else None
    if run_dir is not None and not resume and (run_dir / "config.json").exists():
        raise VitupError(
            f"--out {run_dir} already holds a run: continue it with --resume {run_dir}, or choose another --out"
        )
    if resume and run_dir is not None and not (run_dir / STATE_NAME).is_file():
        raise VitupError(f"--resume {run_dir}: no {STATE_NAME} there; the run never reached its first save")
    _barrier(d)  # every process has checked the folder before rank 0 writes into it
    check_common(cfg, d.world)
    train_list = list_images(cfg.data)
    val_files = list_images(cfg.val_data).files if cfg.val_data else []
    method = make_method(cfg, d.world)
    cfg = method.cfg
    model = method.model
    run_dir = Path(cfg.out)
    reporter = (reporter or default_reporter()) if d.main else NullReporter()
    if getattr(cfg, "init_from", None) and not resume:  # on --resume the saved state replaces them anyway
        source = init_from(model, cfg.init_from, notify=reporter.message)
        reporter.message(f"--init-from: starting from the ViT-Up weights of {source}")

    model.to(d.device)
    method.set_train_mode()
    params = method.trainable_parameters()
    optimizer = method.optimizer(params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(cfg))
    run = RunState(world_size=d.world)

    if resume:
        recorded = json.loads((run_dir / "config.json").read_text()).get("backbone", {}).get("weights_id")
        if recorded is not None and recorded != method.weights_id():
            raise VitupError(
                f"--resume {run_dir}: the run was trained on backbone weights {recorded}, not "
                f"{method.weights_id()}; pass the same --weights / --pretrained as the run"
            )
        state = load_state(run_dir / STATE_NAME)
        method.load_state_tensors(state.model, run_dir / STATE_NAME)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        run = replace(state.run, world_size=d.world)
        restore_host_rng(state)
        if len(state.rng) == d.world:
            set_torch_rng_state(state.rng[d.rank], d.device)
        else:
            torch.manual_seed(hash((cfg.seed, run.step, d.rank)) % 2**63)
            reporter.message(
                f"resuming on {d.world} processes (saved with {len(state.rng)}): dropout noise will differ from "
                "an uninterrupted run; data order and everything else is unchanged"
            )
        reporter.message(f"resuming {run_dir} at step {run.step}/{cfg.steps}")
    else:
        if d.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_config(run_dir, cfg, method, len(train_list.files), d)
        torch.manual_seed(cfg.seed * 1000 + 17 + d.rank)  # per-process dropout noise

    for note in method.notes():
        reporter.message(note)
    dataset = method.dataset(train_list.files, TRAIN_STREAM)
    batches = StepBatches(cfg.batch_size, cfg.steps, run.step, d.rank, d.world, cfg.accum)

    student: nn.Module = method.student()
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        student = DistributedDataParallel(student, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    autocast = _autocast(cfg.precision, d.device)
    metrics = (
        MetricsLog(run_dir, resume_step=run.step if resume else None, tensorboard=cfg.tensorboard) if d.main else None
    )
    if metrics is not None and metrics.tensorboard_note and not resume:
        reporter.message(metrics.tensorboard_note)

    last_path = checkpoint_paths(run_dir / "last")[0]
    best_path = checkpoint_paths(run_dir / "best")[0]

    def checkpoint_extra(step: int, **more: Any) -> dict[str, Any]:
        return {
            "step": step,
            "train": {"config": cfg.to_json(), "data": str(train_list.root), "images": len(train_list.files), **more},
        }

    def save(step: int, loss: float | None) -> None:
        rngs = _gather(torch_rng_state(d.device), d)
        bad = {}
        for part in _gather(run.bad_files, d):
            bad.update(part)
        run.bad_files = bad
        run.last_checkpoint_step = step
        if not d.main:
            return
        method.save_checkpoint(run_dir / "last", checkpoint_extra(step, loss=loss))
        if cfg.keep_every and step % cfg.keep_every == 0:
            method.save_checkpoint(run_dir / f"step-{step:07d}", checkpoint_extra(step, loss=loss))
        save_state(
            run_dir / STATE_NAME,
            model=method.state_tensors(),
            optimizer=optimizer,
            scheduler=scheduler,
            run=run,
            rng_states=rngs,
            config=cfg.to_json(),
        )
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        if run.bad_files:
            listing = "".join(f"{path}\t{reason}\n" for path, reason in sorted(run.bad_files.items()))
            atomic_write_bytes(run_dir / "skipped_images.tsv", listing.encode())

    def validate(step: int) -> None:
        if not val_files:
            return
        scores = _evaluate(method, val_files, cfg, d)
        improved = run.best_val is None or scores["val_loss"] < run.best_val
        if improved:
            run.best_val, run.best_step = scores["val_loss"], step
        if d.main:
            metrics.write({"step": step, **scores})
            reporter.message(
                f"step {step}: held-out loss {scores['val_loss']:.4f}" + ("  (best so far)" if improved else "")
            )
            if improved:
                method.save_checkpoint(run_dir / "best", checkpoint_extra(step, val_loss=scores["val_loss"]))

    loader = make_loader(dataset, batches, cfg.workers, pin_memory=d.device.type == "cuda", collate_fn=method.collate)
    batch_iter = iter(loader)
    reporter.start(cfg.steps, "train", done=run.step, unit="step")
    window: dict[str, float] = {}
    window_steps, window_t0 = 0, time.monotonic()
    last_loss: float | None = None
    session_steps = 0
    keys: list[str] | None = None
    try:
        while run.step < cfg.steps:
            optimizer.zero_grad(set_to_none=True)
            step_terms: dict[str, float] = {}
            sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.accum):
                batch = next(batch_iter)
                for path, reason in batch["failed"]:
                    if path not in run.bad_files:
                        run.bad_files[path] = reason
                        reporter.message(f"skipped unreadable image {path}: {reason}")
                sync = contextlib.nullcontext()
                if d.world > 1 and micro < cfg.accum - 1:
                    sync = student.no_sync()
                with sync:
                    loss, terms = method.loss(student, batch, d.device, autocast)
                    (loss / cfg.accum).backward()
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0) + value / cfg.accum
            keys = keys or sorted(sums)
            vector = _all_reduce_mean(torch.stack([sums[k].float() for k in keys]).to(d.device), d).cpu()
            step_terms = dict(zip(keys, vector.tolist(), strict=True))
            bad = [k for k in (method.checked_terms or keys) if not math.isfinite(step_terms[k])]
            if bad:
                _diverged(run, cfg, run_dir, metrics, f"loss term {', '.join(bad)} is {step_terms[bad[0]]}")
            clip = method.grad_clip_at(run.step)
            clip = clip if clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in params], clip))
            if not math.isfinite(grad_norm):
                _diverged(run, cfg, run_dir, metrics, f"gradient norm is {grad_norm}")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            method.after_step(run.step)
            run.step += 1
            run.images_seen += cfg.batch_size
            session_steps += 1
            last_loss = step_terms["loss"]
            for key, value in step_terms.items():
                window[key] = window.get(key, 0.0) + value
            window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm
            window_steps += 1
            reporter.update(
                run.step, {**{k: step_terms[k] for k in ("loss", "l2", "cos", "kl") if k in step_terms}, "lr": lr}
            )

            stopping = stop_after is not None and session_steps >= stop_after
            if run.step % cfg.log_every == 0 or run.step == cfg.steps or stopping:
                elapsed = time.monotonic() - window_t0
                record = {"step": run.step, **{k: v / window_steps for k, v in window.items()}, "lr": lr}
                record["it_s"] = window_steps / max(elapsed, 1e-9)
                record["images_s"] = record["it_s"] * cfg.batch_size
                record["elapsed_s"] = time.monotonic() - started
                if metrics is not None:
                    metrics.write(record)
                window, window_steps, window_t0 = {}, 0, time.monotonic()

            if run.step % cfg.val_every == 0 or run.step == cfg.steps:
                validate(run.step)
            if run.step % cfg.save_every == 0 or run.step == cfg.steps or stopping:
                save(run.step, last_loss)
            if stopping:
                break
    finally:
        reporter.close()
        if metrics is not None:
            metrics.close()
        del batch_iter, loader
    if d.main and run.bad_files:
        reporter.message(f"{len(run.bad_files)} unreadable image(s) skipped (listed in {run_dir}/skipped_images.tsv)")
    return TrainResult(
        run_dir=run_dir,
        step=run.step,
        finished=run.step >= cfg.steps,
        last_checkpoint=last_path if last_path.exists() else None,
        best_checkpoint=best_path if best_path.exists() else None,
        best_val=run.best_val,
        final_loss=last_loss,
        bad_files=dict(run.bad_files),
        seconds=time.monotonic() - started,
    )


def _diverged(run: RunState, cfg: CommonConfig, run_dir: Path, metrics: MetricsLog | None, what: str) -> None:
    step = run.step + 1
    if metrics is not None:
        metrics.write({"step": step, "event": "diverged", "reason": what})
    if run.last_checkpoint_step is not None:
        good = f"last good checkpoint: {checkpoint_paths(run_dir / 'last')[0]} (step {run.last_checkpoint_step})"
    else:
        good = "no checkpoint was written yet"
    raise TrainingDiverged(
        f"training diverged at step {step}: {what}; the step was not applied. {good}. "
        f"Try a lower --lr (now {cfg.lr:g}), a longer --warmup or --precision fp32 in a new run"
    )
