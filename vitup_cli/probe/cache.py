"""The probe's cache: feature stores (made by ``vitup_cli.extract``), cropped targets and CLS tokens.

Everything is keyed by what decides its content, so a second run with the same settings finds it and
does no work, and any change (another checkpoint, resolution, image list, ...) gets a new entry:

    CACHE/stores/DATASET-SPLIT-UPSAMPLER-KEY.zarr   features, via run_extract (fit=crop), resumable
    CACHE/stores/DATASET-SPLIT-UPSAMPLER-KEY.json   the key, readable
    CACHE/stores/DATASET-SPLIT-UPSAMPLER-KEY.txt    the image list handed to extract (@list)
    CACHE/stores/...-KEY.cls.npy                    CLS tokens (depth probes)
    CACHE/targets/DATASET-SPLIT-TASK-SIZE-KEY.npy   (N, S, S) centre-cropped targets (memory-mapped),
                                                    beside .sizes.npy and .counts.npy (class pixels)

Files are written under a temporary name and renamed, so a killed run leaves no half entry (a killed
extraction leaves an incomplete store, which the next run resumes).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitup_cli.data.images import ImageLoadError, load_image
from vitup_cli.errors import VitupError
from vitup_cli.extract import ExtractConfig, run_extract
from vitup_cli.features import fit_image, model_fingerprint
from vitup_cli.fileio import atomic_write_bytes
from vitup_cli.models import Upsampler
from vitup_cli.probe.datasets import DEPTH, ProbeDataset, crop_target, image_size
from vitup_cli.progress import human_bytes
from vitup_cli.stores import open_store, store_exists


def default_cache_dir() -> Path:
    """``$VITUP_CACHE/probe``, else ``$XDG_CACHE_HOME/vitup/probe``, else ``~/.cache/vitup/probe``."""
    if os.environ.get("VITUP_CACHE"):
        return Path(os.environ["VITUP_CACHE"]).expanduser() / "probe"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vitup" / "probe"


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# =================================================================================================
# targets
# =================================================================================================
@dataclass
class Targets:
    """Centre-cropped targets of one split: ``array`` ``(N, S, S)`` (uint8 classes or float32 metres,
    memory-mapped), ``sizes`` ``(N, 3)``: each target's original height and width and whether its image
    was readable, and whether this run had to make them."""

    array: np.ndarray
    sizes: np.ndarray
    path: Path
    cached: bool
    counts: np.ndarray | None = None  # (256,) pixels per label value over the split (segmentation)

    @property
    def readable(self) -> np.ndarray:
        """``(N,)`` bool: the image's header could be read (the others are left out of the probe)."""
        return self.sizes[:, 2].astype(bool)


def prepare_targets(
    dataset: ProbeDataset,
    size: int,
    cache_dir: Path,
    *,
    workers: int = 4,
    reporter: Any = None,
) -> Targets:
    """Load, check and centre-crop every target of ``dataset`` once, into a memory-mapped ``.npy``
    (found again, not redone, by the next run).

    Each target must have its image's size (read from the image header, EXIF orientation applied);
    otherwise a ``VitupError`` names both files.
    """
    folder = cache_dir / "targets"
    folder.mkdir(parents=True, exist_ok=True)
    key = _digest({"dataset": dataset.fingerprint(), "size": size, "v": 2})[:16]
    stem = f"{dataset.name}-{dataset.split}-{dataset.task}-{size}-{key}"
    path, sizes_path = folder / f"{stem}.npy", folder / f"{stem}.sizes.npy"
    counts_path = folder / f"{stem}.counts.npy"
    if path.is_file() and sizes_path.is_file() and counts_path.is_file():
        return Targets(np.load(path, mmap_mode="r"), np.load(sizes_path), path, True, np.load(counts_path))
    dtype = np.float32 if dataset.task == DEPTH else np.uint8
    n = len(dataset)
    tmp = path.with_name(f".{path.name}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, size, size))
    sizes = np.zeros((n, 3), dtype=np.int64)
    counts = np.zeros(256, dtype=np.int64)
    if reporter is not None:
        reporter.start(n, f"targets {dataset.split}")

    def one(i: int) -> tuple[int, np.ndarray, tuple[int, int, int]]:
        target = dataset.load_target(i)
        try:
            expected, readable = image_size(dataset.images[i]), 1
        except Exception:  # an unreadable image: reported and left out, not an error
            expected, readable = target.shape, 0
        if tuple(target.shape) != tuple(expected):
            raise VitupError(
                f"{dataset.targets[i]}: target is {target.shape[0]}x{target.shape[1]} but its image "
                f"{dataset.images[i]} is {expected[0]}x{expected[1]}; they must have the same size"
            )
        return i, crop_target(target, size), (*target.shape, readable)

    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for i, cropped, shape in pool.map(one, range(n)):
                out[i] = cropped
                sizes[i] = shape
                if dataset.task != DEPTH:
                    counts += np.bincount(cropped.reshape(-1), minlength=256)
                if reporter is not None:
                    reporter.advance(1)
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if reporter is not None:
            reporter.finish()
    _atomic_save_npy(sizes_path, sizes)
    _atomic_save_npy(counts_path, counts)
    return Targets(np.load(path, mmap_mode="r"), sizes, path, False, counts)


# =================================================================================================
# feature stores
# =================================================================================================
def store_key(dataset: ProbeDataset, upsampler: Upsampler, *, res: int, dtype: str, tap: int,
              teacher: bool = False, fit: str = "crop", precision: str = "fp32") -> dict[str, Any]:  # fmt: skip
    """What decides a probe store's content (its cache key); ``fit`` is extract's geometry (the linear
    probes crop; the correspondence probe squashes images it has already padded to a square)."""

    bb = upsampler.backbone.describe()
    files = [str(p.resolve()) for p in dataset.images]
    return {
        "dataset": dataset.name,
        "split": dataset.split,
        "images": {"count": len(files), "sha256": hashlib.sha256("\n".join(files).encode()).hexdigest()},
        "upsampler": upsampler.name,
        "model_sha256": model_fingerprint(upsampler),
        "teacher": teacher,
        "backbone": {k: bb[k] for k in ("timm_name", "weights_id", "overrides", "taps", "embed_dim", "depth", "lora")},
        "tap": tap,
        "input_size": upsampler.input_size,
        "res": res,
        "fit": fit,
        "dtype": dtype,
        **({"precision": precision} if precision != "fp32" else {}),  # absent: fp32 (stores made before bf16)
    }


@dataclass
class StoreEntry:
    """One cached store: where it is, whether it was reused as it was, and the extraction's summary."""

    path: Path
    list_path: Path
    key: dict[str, Any]
    cached: bool
    seconds: float = 0.0
    failed: list[tuple[str, str]] | None = None


def store_entry(dataset: ProbeDataset, upsampler: Upsampler, cache_dir: Path, *, res: int, dtype: str,
                tap: int, teacher: bool = False, fit: str = "crop", precision: str = "fp32") -> StoreEntry:  # fmt: skip
    """Where the store for ``(dataset split, upsampler, settings)`` lives; ``cached`` if it is complete."""

    key = store_key(dataset, upsampler, res=res, dtype=dtype, tap=tap, teacher=teacher, fit=fit, precision=precision)
    digest = _digest(key)[:16]
    folder = cache_dir / "stores"
    stem = f"{dataset.name}-{dataset.split}-{upsampler.name}-{digest}"
    path = folder / f"{stem}.zarr"
    cached = False
    if store_exists(path):
        try:
            with open_store(path) as store:
                cached = bool(store.attrs.get("complete"))
        except VitupError:
            cached = False
    return StoreEntry(path, folder / f"{stem}.txt", key, cached)


def ensure_store(
    entry: StoreEntry,
    dataset: ProbeDataset,
    upsampler: Upsampler,
    *,
    res: int,
    dtype: str = "float16",
    checkpoint: str | Path | None = None,
    device: str = "auto",
    workers: int | None = None,
    seed: int = 0,
    reporter: Any = None,
) -> StoreEntry:
    """Make the store through ``run_extract`` unless it is already complete (then nothing runs).

    A store left incomplete by a killed run is resumed.
    """
    if entry.cached:
        return entry

    entry.path.parent.mkdir(parents=True, exist_ok=True)
    listing = "".join(f"{p.resolve()}\n" for p in dataset.images)
    atomic_write_bytes(entry.list_path, listing.encode())
    atomic_write_bytes(entry.path.with_suffix(".json"), (json.dumps(entry.key, indent=2) + "\n").encode())
    config = ExtractConfig(
        images=f"@{entry.list_path}",
        out=entry.path,
        res=(res, res),
        upsampler=upsampler.name,
        checkpoint=checkpoint,
        fit=entry.key.get("fit", "crop"),
        resample="bilinear",
        dtype=dtype,
        precision=entry.key.get("precision", "fp32"),
        resume=store_exists(entry.path),
        device=device,
        workers=workers,
        seed=seed,
        command=f"vitup probe {dataset.name} (cache for the {dataset.split} split)",
    )
    summary = run_extract(config, upsampler=upsampler, reporter=reporter)
    entry.seconds = summary.seconds
    entry.failed = list(summary.failures)
    return entry


def _store_bytes(n: int, channels: int, res: int, dtype: str) -> int:
    """The uncompressed size of ``n`` images' ``channels x res x res`` features in ``dtype``."""
    return n * channels * res * res * (2 if dtype == "float16" else 4)


def reuse_or_make_store(
    label: str,
    dataset: ProbeDataset,
    upsampler: Upsampler,
    cache_dir: Path,
    *,
    res: int,
    dtype: str,
    tap: int,
    teacher: bool,
    precision: str,
    fit: str = "crop",
    checkpoint: str | Path | None,
    device: str,
    workers: int | None,
    seed: int,
    reporter: Any,
) -> StoreEntry:
    """``dataset``'s store: reused as it is when complete, else made (after saying how large it will be);
    ``label`` (``"UPSAMPLER SPLIT"``) begins each line said to ``reporter``."""
    entry = store_entry(
        dataset, upsampler, cache_dir, res=res, dtype=dtype, tap=tap, teacher=teacher, fit=fit, precision=precision
    )
    if entry.cached:
        reporter.info(f"{label}: reusing {entry.path}")
        return entry

    grid = upsampler.token_grid[0] if upsampler.native_resolution_only else res
    size = _store_bytes(len(dataset), upsampler.dim, grid, dtype)
    reporter.info(
        f"{label}: caching features of {len(dataset)} images at {grid}x{grid} "
        f"({upsampler.dim} channels, {dtype}): about {human_bytes(size)} in {entry.path}"
    )
    return ensure_store(
        entry, dataset, upsampler, res=res, dtype=dtype, checkpoint=checkpoint, device=device,
        workers=workers, seed=seed, reporter=reporter,
    )  # fmt: skip


# =================================================================================================
# CLS tokens (depth)
# =================================================================================================
@torch.no_grad()
def cls_tokens(upsampler: Upsampler, files: list[Path], batch_size: int = 8) -> np.ndarray:
    """``(N, C)`` float32: the backbone's final, normalised CLS token for each image (``extract``'s
    centre crop at the backbone's own input size, for FeatSharp its global view), with any LoRA adapters
    off (the frozen backbone, as JAFAR), or the mean patch token for a backbone without prefix tokens.
    Unreadable images get zeros."""

    backbone = upsampler.backbone
    device = next(upsampler.parameters()).device
    out = np.zeros((len(files), backbone.embed_dim), dtype=np.float32)
    for a in range(0, len(files), batch_size):
        batch, where = [], []
        for i in range(a, min(a + batch_size, len(files))):
            try:
                batch.append(fit_image(load_image(files[i]), upsampler.backbone_size, "crop", resample="bilinear")[0])
                where.append(i)
            except ImageLoadError:
                continue
        if not batch:
            continue
        x = backbone.normalize(torch.stack(batch).to(device))
        with backbone.adapters_disabled():
            tokens = backbone.model.forward_features(x)
        tok = tokens[:, 0] if backbone.num_prefix_tokens else tokens.mean(1)
        out[where] = tok.float().cpu().numpy()
    return out


def ensure_cls(
    entry: StoreEntry | None, upsampler: Upsampler, dataset: ProbeDataset, batch_size: int = 8
) -> np.ndarray:
    """CLS tokens for ``dataset``, cached beside ``entry``'s store (computed every time without one)."""
    if entry is None:
        return cls_tokens(upsampler, dataset.images, batch_size)
    path = entry.path.with_suffix(".cls.npy")
    if path.is_file():
        return np.load(path, allow_pickle=False)
    tokens = cls_tokens(upsampler, dataset.images, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save_npy(path, tokens)
    return tokens
