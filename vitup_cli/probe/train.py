"""Training and scoring a probe head from features that come batch by batch.

Features come from a ``FeatureSource``: ``StoreFeatures`` reads a feature store (in memory when it fits
a budget, otherwise streamed row by row, so datasets larger than RAM work), ``LiveFeatures`` computes
them from the images on every call (``--no-cache``). Targets are an ``(N, S, S)`` array (usually a
memory-mapped file), so they stream too. The next batch is read in a background thread while the head
trains on the current one.
"""

from __future__ import annotations

import math
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitup_cli.data.images import load_image
from vitup_cli.features import dense_features, fit_image
from vitup_cli.probe.datasets import DEPTH, IGNORE, SEG
from vitup_cli.probe.heads import DepthHead, LinearHead, depth_loss, lr_at
from vitup_cli.probe.metrics import DepthMetrics, SegMetrics
from vitup_cli.stores import open_store


# =================================================================================================
# feature sources
# =================================================================================================
class FeatureSource(ABC):
    """Rows of dense features, read a batch at a time."""

    channels: int

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, indices: Sequence[int], flip: Sequence[bool] | None = None) -> torch.Tensor:
        """Rows ``indices`` as ``(B, C, h, w)`` float32 on the CPU; rows with ``flip`` set mirrored
        left-right."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files."""


def _mirror(x: torch.Tensor, flip: Sequence[bool] | None) -> torch.Tensor:
    if flip is None:
        return x
    mask = torch.as_tensor(np.asarray(flip, dtype=bool))
    if bool(mask.any()):
        x[mask] = x[mask].flip(-1)
    return x


class StoreFeatures(FeatureSource):
    """Features from a store (``vitup_cli.stores``), held in memory when they fit ``memory_budget`` bytes
    (at the stored precision), otherwise read from disk for every batch.

    Attributes:
        in_memory: whether the rows were loaded up front.
        rows_read: rows read from disk so far (the up-front load counts too).
        max_rows_held: the most rows one read held at once (streaming: one batch).
    """

    def __init__(self, path: str | Path, memory_budget: int | None = None, threads: int = 4) -> None:

        self.store = open_store(path)
        self._pool = ThreadPoolExecutor(max(1, threads))  # rows of a batch decompress in parallel
        n, c, h, w = self.store.shape
        self.channels = c
        self.grid = (h, w)
        self.nbytes = n * c * h * w * self.store.dtype.itemsize
        self.in_memory = memory_budget is not None and self.nbytes <= memory_budget
        self.rows_read = 0
        self.max_rows_held = 0
        self._data: np.ndarray | None = None
        if self.in_memory:
            data = np.empty((n, c, h, w), dtype=self.store.dtype)
            step = max(1, (64 << 20) // max(1, c * h * w * 4))
            for a in range(0, n, step):
                data[a : a + step] = self.store[a : a + step]
            self._data = data
            self.rows_read = n
            self.max_rows_held = n

    def __len__(self) -> int:
        return self.store.shape[0]

    def read(self, indices: Sequence[int], flip: Sequence[bool] | None = None) -> torch.Tensor:
        idx = [int(i) for i in indices]
        if self._data is not None:
            rows = self._data[idx].astype(np.float32)
        else:
            rows = np.stack(list(self._pool.map(self.store.__getitem__, idx)))
            self.rows_read += len(idx)
            self.max_rows_held = max(self.max_rows_held, len(idx))
        return _mirror(torch.from_numpy(rows), flip)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.store.close()
        self._data = None


class LiveFeatures(FeatureSource):
    """Features computed from the images at every read (``--no-cache``): decode, ``extract``'s centre
    crop to the upsampler's input size, mirror (the image itself), then the upsampler at ``grid``."""

    def __init__(
        self, upsampler: Any, files: Sequence[Path], grid: tuple[int, int], workers: int = 4, precision: str = "fp32"
    ) -> None:
        self.upsampler = upsampler
        self.precision = precision
        self.files = [Path(f) for f in files]
        self.grid = upsampler.token_grid if upsampler.native_resolution_only else tuple(grid)
        self.channels = upsampler.dim
        self._pool = ThreadPoolExecutor(max(1, workers))
        self.images_computed = 0

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> torch.Tensor:

        return fit_image(load_image(self.files[i]), self.upsampler.input_size, "crop", resample="bilinear")[0]

    def read(self, indices: Sequence[int], flip: Sequence[bool] | None = None) -> torch.Tensor:

        x = torch.stack(list(self._pool.map(self._load, [int(i) for i in indices])))
        x = _mirror(x, flip)
        device = next(self.upsampler.parameters()).device
        feats, _ = dense_features(
            self.upsampler, x.to(device), self.grid, dtype=torch.float32, precision=self.precision
        )
        self.images_computed += len(indices)
        return feats

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _prefetch(make: Callable[[Any], Any], jobs: Sequence[Any], depth: int = 2) -> Iterator[tuple[Any, Any]]:
    """``(job, make(job))`` for every job, computing the next ones in a background thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        for job in jobs:
            if stop.is_set():
                return
            try:
                q.put((job, make(job), None))
            except BaseException as exc:  # handed to the consumer
                q.put((job, None, exc))
                return
        q.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            job, value, exc = item
            if exc is not None:
                raise exc
            yield job, value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


# =================================================================================================
# training
# =================================================================================================
@dataclass
class TrainSettings:
    """The probe's optimisation (the defaults are ViT-Up's segmentation runs)."""

    task: str = SEG
    epochs: int = 20
    lr: float = 2e-3
    batch_size: int = 4
    weight_decay: float = 1e-5
    schedule: str = "cosine"
    flip: bool = True
    seed: int = 0
    device: str = "cpu"
    bins: int = 256
    min_depth: float = 1e-3
    max_depth: float = 10.0
    warm_up_iters: int = 100  # SigLoss warm-up (depth)


@dataclass
class FitResult:
    head: nn.Module
    epoch_loss: list[float] = field(default_factory=list)
    steps: int = 0
    lrs: list[float] = field(default_factory=list)


def build_head(settings: TrainSettings, channels: int, num_classes: int, use_cls: bool = True) -> nn.Module:
    torch.manual_seed(settings.seed)
    if settings.task == DEPTH:
        return DepthHead(channels, settings.bins, settings.min_depth, settings.max_depth, use_cls=use_cls)
    return LinearHead(channels, num_classes)


def _targets(targets: np.ndarray, idx: Sequence[int], flip: np.ndarray | None) -> torch.Tensor:
    y = torch.from_numpy(np.stack([np.asarray(targets[int(i)]) for i in idx]))
    return _mirror(y, flip)


def fit_head(
    source: FeatureSource,
    targets: np.ndarray,
    settings: TrainSettings,
    num_classes: int = 0,
    *,
    rows: Sequence[int] | None = None,
    cls: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
) -> FitResult:
    """Train a head on ``rows`` of ``source`` (default all) against ``targets`` ``(N, S, S)``.

    Each epoch visits the rows in a seeded random order, mirrors each with probability 1/2 (features and
    target together), and takes one AdamW step per batch; the learning rate follows ``settings.schedule``
    per iteration. ``cls``: ``(N, C)`` CLS tokens for the depth head. ``progress(n)`` after each batch.
    """
    device = torch.device(settings.device)
    rows = np.arange(len(source)) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        raise ValueError("no rows to train on")
    head = build_head(settings, source.channels, num_classes, use_cls=cls is not None).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    size = tuple(np.asarray(targets[int(rows[0])]).shape[-2:])
    per_epoch = math.ceil(len(rows) / settings.batch_size)
    total = per_epoch * settings.epochs
    rng = np.random.default_rng(settings.seed)
    result = FitResult(head)
    step = 0
    head.train()
    for _epoch in range(settings.epochs):
        order = rows[rng.permutation(len(rows))]
        flips = rng.random(len(rows)) < 0.5 if settings.flip else np.zeros(len(rows), dtype=bool)
        batches = [
            (order[a : a + settings.batch_size], flips[a : a + settings.batch_size])
            for a in range(0, len(order), settings.batch_size)
        ]
        running, counted = 0.0, 0
        for (idx, flip), x in _prefetch(lambda job: source.read(job[0], job[1]), batches):
            lr = lr_at(step, settings.lr, total, settings.epochs, settings.schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            result.lrs.append(lr)
            y = _targets(targets, idx, flip).to(device)
            x = x.to(device, non_blocking=True)
            if settings.task == DEPTH:
                tok = None if cls is None else torch.from_numpy(np.asarray(cls[idx], dtype=np.float32)).to(device)
                pred = head(x, tok, size)[:, 0]
                valid = (y > 0) & (y <= settings.max_depth)
                loss = depth_loss(pred, y.float(), settings.max_depth, warm_up=step < settings.warm_up_iters)
            else:
                valid = y != IGNORE
                loss = F.cross_entropy(head(x, size), y.long(), ignore_index=IGNORE) if bool(valid.any()) else None
            if loss is not None and bool(valid.any()):
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running += float(loss.detach())
                counted += 1
            step += 1
            if progress is not None:
                progress(len(idx))
        result.epoch_loss.append(running / max(counted, 1))
    result.steps = step
    head.eval()
    return result


@dataclass
class EvalResult:
    """Scores on a split, and the predictions kept for the picture."""

    seg: SegMetrics | None
    depth: DepthMetrics | None
    kept: dict[int, np.ndarray]

    def metrics(self) -> dict[str, float]:
        if self.seg is not None:
            s = self.seg.scores()
            return {"miou": s.miou, "accuracy": s.accuracy}
        assert self.depth is not None
        return self.depth.scores()


@torch.no_grad()
def evaluate(
    head: nn.Module,
    source: FeatureSource,
    targets: np.ndarray,
    settings: TrainSettings,
    num_classes: int = 0,
    *,
    rows: Sequence[int] | None = None,
    cls: np.ndarray | None = None,
    keep: Sequence[int] = (),
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Score ``head`` on ``rows`` of ``source`` (no mirroring); keep the predictions of rows ``keep``."""
    device = torch.device(settings.device)
    rows = np.arange(len(source)) if rows is None else np.asarray(rows, dtype=np.int64)
    head = head.to(device).eval()
    seg = SegMetrics(num_classes) if settings.task == SEG else None
    depth = DepthMetrics(settings.min_depth, settings.max_depth) if settings.task == DEPTH else None
    wanted = {int(k) for k in keep}
    kept: dict[int, np.ndarray] = {}
    batches = [rows[a : a + settings.batch_size] for a in range(0, len(rows), settings.batch_size)]
    for idx, x in _prefetch(lambda job: source.read(job), batches):
        y = _targets(targets, idx, None)
        size = tuple(y.shape[-2:])
        x = x.to(device)
        if depth is not None:
            tok = None if cls is None else torch.from_numpy(np.asarray(cls[idx], dtype=np.float32)).to(device)
            pred = head(x, tok, size)[:, 0].float().cpu()
            depth.update(pred, y.float())
        else:
            assert seg is not None
            pred = head(x, size).argmax(1).to(torch.uint8).cpu()
            seg.update(pred, y)
        for j, i in enumerate(idx):
            if int(i) in wanted:
                kept[int(i)] = pred[j].numpy().copy()
        if progress is not None:
            progress(len(idx))
    return EvalResult(seg, depth, kept)
