"""Training data by global position (``PositionDataset``, shared by every method) and ViT-Up's
samples: per image a random square crop (for the teacher) and the student canvas.

Every random choice of a sample is drawn from its own generator seeded by ``(seed, stream, position)``,
where ``position`` counts samples over the whole run (epoch after epoch, each in its own shuffled
order). So a sample never depends on worker count, process count or where a run was resumed:
step ``k`` of a run always sees the same images, crops, scales and noise.

Per sample (``CanvasSample``):
- ``crop``: a random square crop (side ~ U(crop_min, 1) x the short side) resized to the largest
  teacher size, ``(3, T, T)`` uint8; the teacher sees it resized to each teacher size.
- ``canvas``: the student input, ``(3, S, S)`` uint8: uniform noise with the crop downscaled to
  ``s * S`` (``s ~ U(scale_min, scale_max)``) pasted at a uniformly random place.
- ``box``: ``(x0, y0, side)`` of the pasted crop in canvas units ``[0, 1]``; the queries are the
  ``Q x Q`` cell centres over it (``box_queries``).
Unreadable images are skipped (the next image of the same shuffled order takes their place) and
reported with the batch, never fatal.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vitup_cli.data.images import ImageLoadError, load_image
from vitup_cli.errors import VitupError

TRAIN_STREAM, VAL_STREAM = 0, 1


@dataclass(frozen=True)
class CanvasSpec:
    """Geometry and randomness of the samples (pixels)."""

    canvas: int = 448
    crop_size: int = 896
    scale_min: float = 0.1
    scale_max: float = 1.0
    crop_min: float = 1.0
    seed: int = 0


def sample_rng(seed: int, stream: int, position: int) -> np.random.Generator:
    """The generator of one sample: independent of everything but its seed, stream and position."""
    return np.random.default_rng([seed, stream, position])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``n`` images in ``epoch`` (same for every process)."""
    return np.random.default_rng([seed, 2, epoch]).permutation(n)


def make_sample(img: Image.Image, spec: CanvasSpec, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """One crop + canvas pair from an RGB image (see the module docstring for the fields)."""
    w, h = img.size
    short = min(w, h)
    side = max(1, round(short * rng.uniform(spec.crop_min, 1.0))) if spec.crop_min < 1 else short
    x0 = int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    square = img.crop((x0, y0, x0 + side, y0 + side))
    crop = square.resize((spec.crop_size, spec.crop_size), Image.Resampling.BICUBIC)
    s = rng.uniform(spec.scale_min, spec.scale_max)
    paste = max(1, min(spec.canvas, round(s * spec.canvas)))
    px = int(rng.integers(0, spec.canvas - paste + 1))
    py = int(rng.integers(0, spec.canvas - paste + 1))
    canvas = rng.integers(0, 256, size=(spec.canvas, spec.canvas, 3), dtype=np.uint8)
    small = square.resize((paste, paste), Image.Resampling.BICUBIC)
    canvas[py : py + paste, px : px + paste] = np.asarray(small, dtype=np.uint8)
    return {
        "crop": torch.from_numpy(np.ascontiguousarray(np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1))),
        "canvas": torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1))),
        "box": torch.tensor([px / spec.canvas, py / spec.canvas, paste / spec.canvas], dtype=torch.float64),
    }


def box_queries(box: torch.Tensor, side: int) -> torch.Tensor:
    """Cell centres of a ``side x side`` grid over each box: ``(B, 3)`` -> ``(B, side*side, 2)`` xy in
    canvas units, row-major (x right, y down)."""
    t = (torch.arange(side, dtype=torch.float64, device=box.device) + 0.5) / side
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    unit = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)  # (N, 2)
    xy = box[:, None, :2] + unit[None] * box[:, None, 2:3]
    return xy.float()


class PositionDataset(Dataset):
    """Samples by global position (see module docstring); ``len`` is the number of images.

    A training method's dataset subclasses this and implements ``make(img, rng)``: one sample (a dict
    of tensors) from an RGB image and that position's own generator.
    """

    def __init__(self, files: Sequence[Path], seed: int = 0, stream: int = TRAIN_STREAM) -> None:
        if not files:
            raise VitupError("no images to train on")
        self.files = [Path(f) for f in files]
        self.seed = seed
        self.stream = stream
        self._orders: dict[int, np.ndarray] = {}  # per process: each loader worker keeps its own

    def make(self, img: Image.Image, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.files)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = epoch_order(len(self.files), self.seed, epoch)
        return self._orders[epoch]

    def image_index(self, position: int) -> int:
        n = len(self.files)
        if self.stream != TRAIN_STREAM:
            return position % n
        return int(self._order(position // n)[position % n])

    def __getitem__(self, position: int) -> dict[str, Any]:
        """The sample at ``position``; unreadable files are replaced by the next ones and listed in
        ``failed`` as ``(path, reason)``."""
        failed: list[tuple[str, str]] = []
        n = len(self.files)
        for attempt in range(n):
            path = self.files[self.image_index(position + attempt)]
            try:
                img = load_image(path)
            except ImageLoadError as exc:
                failed.append((exc.path, exc.reason))
                continue
            sample: dict[str, Any] = self.make(img, sample_rng(self.seed, self.stream, position))
            sample["failed"] = failed
            sample["position"] = position
            return sample
        raise VitupError(f"none of the {n} images could be read (first: {failed[0][0]}: {failed[0][1]})")


class CanvasDataset(PositionDataset):
    """ViT-Up's crop + canvas samples (``make_sample``)."""

    def __init__(self, files: Sequence[Path], spec: CanvasSpec, stream: int = TRAIN_STREAM) -> None:
        super().__init__(files, spec.seed, stream)
        self.spec = spec

    def make(self, img: Image.Image, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return make_sample(img, self.spec, rng)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack every tensor field; ``position`` becomes a tensor, ``failed`` one flat list."""
    out: dict[str, Any] = {
        key: torch.stack([s[key] for s in samples])
        for key, value in samples[0].items()
        if isinstance(value, torch.Tensor)
    }
    out["position"] = torch.tensor([s["position"] for s in samples])
    out["failed"] = [f for s in samples for f in s["failed"]]
    return out


class StepBatches:
    """Positions of this process's micro-batches from ``start_step`` on.

    Step ``k`` covers global positions ``[k * B, (k + 1) * B)``; rank ``r`` of ``W`` takes the ``r``-th
    of ``W`` equal slices of it, cut into ``accum`` micro-batches in order.
    """

    def __init__(self, batch_size: int, steps: int, start_step: int = 0, rank: int = 0, world: int = 1, accum: int = 1):
        self.batch_size, self.steps, self.start_step = batch_size, steps, start_step
        self.rank, self.world, self.accum = rank, world, accum
        self.micro = batch_size // (world * accum)

    def positions(self, step: int, micro: int) -> list[int]:
        base = step * self.batch_size + self.rank * self.micro * self.accum + micro * self.micro
        return list(range(base, base + self.micro))

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            for micro in range(self.accum):
                yield self.positions(step, micro)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum


def make_loader(
    dataset: Dataset, batches: Any, workers: int, pin_memory: bool = False, collate_fn: Any = collate
) -> DataLoader:
    """A loader over ``batches`` (lists of positions). It owns its generator, so creating it never
    draws from the global torch RNG (a resumed run would otherwise diverge)."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
