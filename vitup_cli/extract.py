"""``vitup extract``: whole image folders to chunked feature stores, robust, resumable and fast.

The job (``run_extract``): list the images; build (or take) an upsampler; create the store at its final
size, or reopen it with ``resume`` after checking that the inputs and settings match; then stream the
images that are left, one shard at a time:

    DataLoader workers (decode, EXIF, RGB, fit) -> batched model work (device) -> background writer thread

A shard is written in one call and its ``status`` after it, so a job killed at any moment resumes where
it stopped and ends with the same store as an uninterrupted run. Unreadable images are skipped and
recorded (``status`` 2, ``error``, and the ``failed`` attribute) unless ``strict``.

Under ``torchrun`` every rank runs this same function: rank 0 creates the store, each rank computes and
writes the shards it owns (whole groups of shards, so no two processes ever write the same file), and
rank 0 finalises. The result equals a single-process run.

The geometry and the feature computation live in ``vitup_cli.features`` (shared with probe and visualize),
the torchrun coordination in ``vitup_cli.distributed``, the reporting in ``vitup_cli.progress``; their
names are re-exported here for existing callers.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import queue
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitup_cli import locks, stores
from vitup_cli.backbones import sha256_file
from vitup_cli.choice import ModelChoice
from vitup_cli.data.images import ImageLoadError, list_images, load_image
from vitup_cli.distributed import Dist
from vitup_cli.errors import VitupError
from vitup_cli.features import (  # noqa: F401 - re-exported for existing callers
    _BUDGET_BYTES,
    FITS,
    RESAMPLING,
    _fit_array,
    box_to_grid,
    check_global,
    compile_upsampler,
    dense_features,
    fill_colour,
    fit_image,
    model_fingerprint,
    resolve_precision,
)
from vitup_cli.hub import checkpoint_method, checkpoint_paths, default_checkpoint, open_upsampler
from vitup_cli.hub.releases import is_release_ref, resolve_weights
from vitup_cli.models import TRAINING_FREE, Upsampler, spec_of, specs
from vitup_cli.progress import (  # noqa: F401 - re-exported for existing callers
    Reporter,
    RichReporter,
    SilentReporter,
    TqdmReporter,
    default_reporter,
    human_bytes,
)

DTYPES = ("float16", "float32")
DEFAULT_COMPRESSION = "zstd"
DEFAULT_LOCK_TIMEOUT = 1800.0
_CREATE_MARKER = "create.json"
_CREATE_WAIT = 600.0  # seconds a part waits for the part that creates the store
_SHARD_BYTES = 256 << 20  # stored features per batch (= per shard) when --batch-size is not given


def parse_storage_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``["endpoint_url=http://h:9000", "anon=true", 'client_kwargs={"region_name": "x"}']`` -> a dict for fsspec.

    Values are JSON when they parse as JSON (numbers, true/false, objects), text otherwise.
    """
    import json

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VitupError(f"--storage-option {item!r}: expected KEY=VALUE, e.g. --storage-option anon=true")
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value
        out[key.strip()] = parsed
    return out


def parse_part(text: str | None) -> tuple[int, int] | None:
    """``"2/8"`` -> ``(2, 8)`` (part 2 of 8, 1-based); None stays None."""
    if text is None:
        return None
    a, sep, b = str(text).partition("/")
    try:
        i, n = int(a), int(b)
    except ValueError:
        i = n = 0
    if not sep or not (n >= 1 and 1 <= i <= n):
        raise VitupError(f"--part {text}: give I/N with 1 <= I <= N, e.g. --part 2/8 (SLURM: $SLURM_ARRAY_TASK_ID)")
    return i, n


def parse_res(text: str | int | Sequence[int]) -> tuple[int, int]:
    """``224`` / ``"224"`` / ``"224,160"`` / ``"224x160"`` -> ``(H, W)``."""
    if isinstance(text, int):
        values = [text]
    elif isinstance(text, str):
        values = [v for v in text.replace("x", ",").split(",") if v.strip()]
    else:
        values = list(text)
    try:
        ints = [int(v) for v in values]
    except ValueError:
        ints = []
    if len(ints) == 1:
        ints = ints * 2
    if len(ints) != 2 or min(ints) < 1:
        raise VitupError(f"--res {text}: give R (square) or H,W, positive integers, e.g. --res 224 or --res 224,320")
    return ints[0], ints[1]


# =================================================================================================
# configuration and results
# =================================================================================================
@dataclass
class ExtractConfig(ModelChoice):
    """Everything ``run_extract`` needs; the defaults are the command's.

    ``images``: a folder (recursive, sorted), ``@list.txt`` or one image. ``out``: ``*.zarr`` or
    ``*.h5``. ``res``: output grid ``(H, W)``. ``batch_size`` (images per model batch = per shard): None
    takes as many images as fit in 256 MB of stored features (at most 8) for a new store, so memory does
    not grow with the output grid, and the store's own for ``resume``. ``workers``: DataLoader processes (None:
    half the CPUs, at most 8). ``pca``: store ``K`` principal components fitted on ``pca_images`` images.
    ``lowres``: also store the backbone tokens. The model fields (``checkpoint``, ``backbone``, ``weights``,
    ``pretrained``, ``backbone_args``, ``input_size``, ``device``, ``seed``) are
    ``vitup_cli.choice.ModelChoice``'s, keyword-only; ``seed`` seeds the random init of ``pretrained='none'``.

    Where the data lives: ``out`` may be an fsspec URL (``s3://bucket/feats.zarr``) and ``images`` an
    ``@list.txt`` of URLs or tar shards (``shards/{000..099}.tar``); ``storage_options`` go to fsspec for
    both. ``part``: ``(I, N)``, this job is part ``I`` of ``N`` of a job array (no rendezvous: parts own
    disjoint shard groups, the first to arrive creates the store); ``create_only``: create the store at its
    final size and stop. ``retry_failed``: rerun only the shards holding failed rows of an existing store.
    ``compression``: the Zarr features' Blosc codec. ``global_pool``: also store ``global (image, channel)``,
    the class token (``cls``) or the mean patch token (``mean``) at the tap, from the same forward pass.
    ``lock_timeout``: seconds without a heartbeat after
    which another host's (or a remote store's) lock counts as stale.
    """

    images: str | Path
    out: str | Path
    res: tuple[int, int] = (224, 224)
    upsampler: str | None = None  # None: vitup (the checkpoint, else the backbone's published weights)
    _: KW_ONLY
    fit: str = "pad"
    resample: str | None = None  # PIL filter of the fit (--resize-filter); None: the method's reference filter
    tap: int | None = None
    dtype: str = "float16"
    pca: int | None = None
    pca_images: int = 64
    lowres: bool = False
    batch_size: int | None = None
    workers: int | None = None
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere (features.resolve_precision)
    compile: bool = False  # torch.compile the heavy modules (features.compile_upsampler)
    chunk_queries: int | None = None
    minmax: str = "image"  # LoftUp's guidance-image scaling: per image, or per batch (the reference)
    overwrite: bool = False
    resume: bool = False
    force: bool = False
    strict: bool = False
    command: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    part: tuple[int, int] | None = None
    create_only: bool = False
    retry_failed: bool = False
    compression: str = DEFAULT_COMPRESSION
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    global_pool: str | None = None  # "cls" or "mean": also store one vector per image, from the same pass
    writer_threads: int | None = None  # shard compression threads (None: the cores available; 0: zarr's own)


@dataclass
class ExtractSummary:
    """What a run did. ``done``/``failed``/``pending`` count the store's rows at the end; ``skipped`` the
    rows already finished before this run (``resume``); ``processed`` the rows this run handled."""

    store: str | Path
    format: str
    total: int
    done: int
    failed: int
    pending: int
    skipped: int
    processed: int
    failures: list[tuple[str, str]]
    bytes_on_disk: int | None  # None for a store at a URL (counting would list every object)
    estimate_bytes: int
    seconds: float
    images_per_s: float
    model_seconds: float = 0.0
    write_seconds: float = 0.0
    part: tuple[int, int] | None = None
    complete: bool = True  # False: a --part finished its own rows while other parts still run


# =================================================================================================
# data loading
# =================================================================================================
class _ImageRows(torch.utils.data.Dataset):
    """Row ``i`` of the store: decoded, fitted image (uint8) or the reason it could not be read."""

    def __init__(
        self,
        files: Sequence[Any],
        size: int,
        fit: str,
        fill: tuple[int, int, int],
        resample: str = "bicubic",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.files, self.size, self.fit, self.fill, self.resample = list(files), size, fit, fill, resample
        self.storage_options = storage_options or {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:

        path = self.files[index]
        try:
            img = load_image(path, self.storage_options)
            arr, box = _fit_array(img, self.size, self.fit, self.fill, self.resample)
            h, w = img.height, img.width
        except ImageLoadError as exc:
            return {"index": index, "error": exc.reason}
        except Exception as exc:  # a decoder bug must not end a million-image job
            return {"index": index, "error": f"unexpected {type(exc).__name__}: {exc}"}
        image = torch.from_numpy(np.array(arr)).permute(2, 0, 1)
        return {"index": index, "image": image, "size": (h, w), "box": box, "error": ""}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [it for it in items if not it["error"]]
    return {
        "indices": [it["index"] for it in items],
        "ok": np.array([not it["error"] for it in items], dtype=bool),
        "images": torch.stack([it["image"] for it in ok]) if ok else None,
        "sizes": np.array([it.get("size", (0, 0)) for it in items], dtype=np.int64).reshape(-1, 2),
        "boxes": np.array([it.get("box", (0, 0, 0, 0)) for it in items], dtype=np.int64).reshape(-1, 4),
        "errors": [it["error"] for it in items],
    }


def _loader(dataset: _ImageRows, batches: list[list[int]], workers: int, pin: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin,
        prefetch_factor=2 if workers else None,
    )


# =================================================================================================
# the background writer
# =================================================================================================
class BackgroundWriter:
    """Writes shards in ``workers`` threads so the model never waits for the disk, with backpressure: at
    most ``depth`` shards wait in the queue and ``workers`` are being written, so ``submit`` blocks (and the
    model pauses) once ``depth + workers`` shards are outstanding; memory never grows beyond that.

    Several workers overlap one shard's disk write with the next one's compression (a store writer may
    compress each shard in threads of its own: ``stores.ShardEncoder``). Rows of different shards are
    independent; each shard's ``status`` is still written after its features."""

    def __init__(
        self,
        writer: stores.StoreWriter,
        reporter: Reporter,
        depth: int = 2,
        on_write: Any = None,
        workers: int = 1,
    ) -> None:
        self.writer, self.reporter = writer, reporter
        self.on_write = on_write
        self.seconds = 0.0
        self.rows = self.failed = 0
        self.depth, self.workers = max(1, depth), max(1, workers)
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._error: BaseException | None = None
        self._count = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, name=f"vitup-store-writer-{i}", daemon=True) for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            shard, rows = item
            try:
                t0 = time.perf_counter()
                self.writer.write_shard(shard, **rows)
                n = len(rows["status"])
                with self._count:
                    self.seconds += time.perf_counter() - t0
                    self.rows += n
                    self.failed += int((rows["status"] == stores.FAILED).sum())
                    self.reporter.advance(n)
                    if self.on_write is not None:
                        self.on_write()
            except BaseException as exc:  # re-raised in the main thread
                self._error = exc

    def submit(self, shard: int, rows: dict[str, Any]) -> None:
        """Queue one whole shard; blocks while ``depth`` shards already wait."""
        self._raise()
        self._queue.put((shard, rows))

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._raise()


def writer_workers(writer: stores.StoreWriter) -> int:
    """Shards written at once: two for a Zarr store compressing in threads (one shard's write overlaps the
    next one's compression), else one."""
    return 2 if writer.format == "zarr" and getattr(writer, "threads", 0) > 0 else 1


def _free_bytes(path: Path) -> tuple[int, Path]:
    probe = Path(path).resolve().parent
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free, probe


def _device(name: str, dist_ctx: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in {"cpu", "cuda"} and not name.startswith("cuda:"):
        raise VitupError(f"--device {name}: use auto, cpu or cuda")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VitupError("--device cuda: no CUDA device is available here; use --device cpu")
        if name == "cuda":
            name = f"cuda:{dist_ctx.local_rank % torch.cuda.device_count()}"
    return torch.device(name)


def _validate(config: ExtractConfig) -> None:
    stores.store_format(config.out)
    if config.fit not in FITS:
        raise VitupError(f"--fit {config.fit}: use one of {', '.join(FITS)}")
    resolve_precision(config.precision, "cpu")  # a bad value is one line before anything loads
    if config.dtype not in DTYPES:
        raise VitupError(f"--dtype {config.dtype}: use float16 or float32")
    if config.overwrite and config.resume:
        raise VitupError("--overwrite and --resume contradict each other: pick one")
    if config.batch_size is not None and config.batch_size < 1:
        raise VitupError(f"--batch-size {config.batch_size}: must be at least 1")
    if config.pca is not None and config.pca < 1:
        raise VitupError(f"--pca {config.pca}: the number of components must be at least 1")
    if config.pca_images < 1:
        raise VitupError(f"--pca-images {config.pca_images}: must be at least 1")
    if config.chunk_queries is not None and config.chunk_queries < 1:
        raise VitupError(f"--chunk-queries {config.chunk_queries}: must be at least 1")
    if config.writer_threads is not None and config.writer_threads < 0:
        raise VitupError(f"--writer-threads {config.writer_threads}: use 0 (zarr's own pipeline) or more threads")
    if config.compression not in stores.CODECS:
        raise VitupError(f"--compression {config.compression}: use one of {', '.join(stores.CODECS)}")
    if config.part is not None:
        i, n = config.part
        if not (n >= 1 and 1 <= i <= n):
            raise VitupError(f"--part {i}/{n}: give I/N with 1 <= I <= N, e.g. --part 2/8")
        if stores.store_format(config.out) != "zarr":
            raise VitupError(
                f"--part: {config.out} is HDF5, which has one writer per file; use NAME.zarr for job arrays"
            )
        if config.overwrite:
            raise VitupError(
                "--part with --overwrite would let each part delete the others' work: delete the store first, or "
                "create it once with --create-only --overwrite"
            )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise VitupError("--part splits a job without a rendezvous; under torchrun the ranks already split it")
    if config.retry_failed and config.overwrite:
        raise VitupError("--retry-failed continues an existing store; --overwrite would delete it: pick one")
    parse_res(config.res)


def _build_upsampler(
    config: ExtractConfig, device: torch.device, notify: Callable[[str], None] | None = None
) -> Upsampler:
    if config.checkpoint is not None and config.upsampler in TRAINING_FREE:
        raise VitupError(
            f"--checkpoint is a trained upsampler; --upsampler {config.upsampler} cannot be combined with it "
            "(drop --checkpoint to store a training-free upsampler)"
        )
    torch.manual_seed(config.seed)  # a random-init backbone (--pretrained none) is the same in every run
    method = config.upsampler if config.checkpoint is None else checkpoint_method(config.checkpoint, config.upsampler)
    any_input_size = method is None or not spec_of(method).capabilities.input_size_from_weights
    try:
        model = open_upsampler(
            config.upsampler or "bilinear",
            checkpoint=config.checkpoint,
            backbone=config.backbone,
            weights=config.weights,
            pretrained=config.pretrained,
            overrides=config.backbone_args,
            input_size=config.input_size if (config.checkpoint is None or any_input_size) else None,
            device=device,
            notify=notify,
            minmax=config.minmax,
        )
    except ValueError as exc:
        raise VitupError(f"--input-size {config.input_size}: {exc}") from None
    if config.checkpoint is not None and config.upsampler not in (None, model.name):
        raise VitupError(
            f"--upsampler {config.upsampler}: --checkpoint {config.checkpoint} holds a {model.name} upsampler; "
            f"use --upsampler {model.name} or drop the flag"
        )
    if config.checkpoint is not None and config.input_size not in (None, model.input_size):
        raise VitupError(
            f"--input-size {config.input_size}: this {model.name} checkpoint was trained at {model.input_size}; "
            "drop the flag"
        )
    return model


def resize_filter(upsampler: Upsampler, requested: str | None = None) -> str:
    """``requested`` (``--resize-filter``), else the PIL filter of the method's reference preprocessing."""
    if requested is not None:
        if requested not in RESAMPLING:
            raise VitupError(f"--resize-filter {requested}: use one of {', '.join(RESAMPLING)}")
        return requested
    spec = specs().get(upsampler.name)
    return spec.preprocessing.resize_filter if spec is not None else "bicubic"


def _resolve_tap(upsampler: Upsampler, tap: int | None) -> int:
    resolved = upsampler.backbone.taps[-1] if tap is None else int(tap)
    upsampler.check_tap(resolved)
    return resolved


@dataclass(frozen=True)
class _Inputs:
    """What rank 0 decides about the store from: the images, the settings the store must record, the tap
    and the output grid."""

    settings: dict[str, Any]
    paths: list[str]
    files: list[Any]
    root: str
    tap: int
    grid: tuple[int, int]


@dataclass
class _Plan:
    """What rank 0 decided about the store, shared with every rank."""

    layout: dict[str, Any]
    paths: list[str]
    files: list[str]
    root: str
    skipped: int
    estimate: int
    fresh: bool


def _settings(
    config: ExtractConfig, upsampler: Upsampler, tap: int, grid: tuple[int, int], paths: Sequence[str]
) -> dict[str, Any]:
    """What must match for ``resume`` to continue a store (the store records it as ``settings``)."""
    bb = upsampler.backbone.describe()
    checkpoint = config.checkpoint
    return {
        "images": {"count": len(paths), "sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest()},
        "upsampler": upsampler.name,
        "checkpoint_sha256": _checkpoint_sha256(upsampler, checkpoint),
        "antialias": getattr(getattr(upsampler, "config", None), "antialias", None),
        "model_sha256": model_fingerprint(upsampler),
        "backbone": {k: bb[k] for k in ("timm_name", "weights_id", "overrides", "taps", "embed_dim", "depth", "lora")},
        "tap": tap,
        "input_size": upsampler.input_size,
        "res": list(grid),
        "fit": config.fit,
        "resample": config.resample,
        "dtype": config.dtype,
        "pca": config.pca,
        "pca_images": config.pca_images if config.pca else None,
        "lowres": bool(config.lowres),
        **({"upsampler_settings": extra} if (extra := upsampler.settings()) else {}),
        **({"global": config.global_pool} if config.global_pool else {}),  # absent: stores made before --global
        **({"precision": "bf16"} if _precision(config, upsampler) == "bf16" else {}),  # absent: fp32
    }


def _precision(config: ExtractConfig, upsampler: Upsampler) -> str:
    """The resolved ``--precision`` on the upsampler's device (``fp32`` or ``bf16``)."""
    device = next(iter(upsampler.parameters()), torch.empty(0)).device
    return resolve_precision(config.precision, device)


def _checkpoint_sha256(upsampler: Upsampler, checkpoint: str | Path | None) -> str | None:
    info = getattr(upsampler, "weights_info", None)
    if info is not None:
        return info["file_sha256"]
    if getattr(upsampler, "weights_sha256", None):  # LoftUp: the file its weights came from
        return upsampler.weights_sha256
    return sha256_file(_checkpoint_file(checkpoint)) if checkpoint else None


def _native_attrs(upsampler: Upsampler, grid: tuple[int, int]) -> dict[str, Any]:
    """For an upsampler with a fixed native grid (FeatSharp): that grid, and how the store's grid was made."""
    native = getattr(upsampler, "native_grid", None)
    if native is None:
        return {}
    resized = tuple(native) != tuple(grid)
    return {
        "native_res": list(native),
        "resized_from_native": f"bilinear from {native[0]}x{native[1]}" if resized else None,
    }


def _checkpoint_file(checkpoint: str | Path) -> Path:
    """The weights file of a checkpoint path (``NAME``, ``NAME.safetensors`` or ``NAME.json``) or of a
    published release (``uplift:dinov3_splus``, ``hf:ORG/REPO/FILE``)."""

    if is_release_ref(str(checkpoint)):
        return resolve_weights(str(checkpoint)).path
    return checkpoint_paths(checkpoint)[0]


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if key == "images":
                out.append(f"inputs: store has {old[key]['count']} images, now {new[key]['count']} (or other names)")
            else:
                out.append(f"{key}: store has {old.get(key)!r}, now {new.get(key)!r}")
    return out


def fit_pca(
    upsampler: Upsampler,
    files: Sequence[Any],
    k: int,
    *,
    grid: tuple[int, int],
    fit: str,
    tap: int,
    chunk_queries: int | None = None,
    sample: int = 64,
    batch_size: int = 8,
    resample: str = "bicubic",
    storage_options: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of the features of ``sample`` evenly spaced images (every pixel inside the
    real image, float64 moments, so the result does not depend on batching).

    Returns:
        ``components (k, C)`` float32 (orthonormal rows, largest entry positive) and ``mean (C,)``.
    """

    channels = upsampler.dim
    if k > channels:
        raise VitupError(f"--pca {k}: the features have only {channels} channels")
    device = next(upsampler.parameters()).device
    fill = fill_colour(upsampler)
    picks = sorted(set(np.linspace(0, len(files) - 1, min(sample, len(files))).round().astype(int).tolist()))
    count, total = 0, torch.zeros(channels, dtype=torch.float64)
    moments = torch.zeros(channels, channels, dtype=torch.float64)
    per_image = channels * grid[0] * grid[1] * 4
    batch = max(1, min(batch_size, _BUDGET_BYTES // max(per_image, 1)))
    loaded: list[tuple[np.ndarray, tuple[int, int, int, int]]] = []

    def flush() -> None:
        nonlocal count, total, moments
        if not loaded:
            return
        x = torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for a, _ in loaded]).to(device).float() / 255
        feats, _ = dense_features(upsampler, x, grid, tap=tap, chunk_queries=chunk_queries, dtype=torch.float32)
        gh, gw = feats.shape[-2:]
        for f, (_, box) in zip(feats, loaded, strict=True):
            y0, x0, y1, x1 = box_to_grid(box, upsampler.input_size, (gh, gw))
            v = f[:, y0:y1, x0:x1].reshape(channels, -1).double()
            count += v.shape[1]
            total += v.sum(1)
            moments += v @ v.T
        loaded.clear()

    for i in picks:
        try:
            loaded.append(_fit_array(load_image(files[i], storage_options), upsampler.input_size, fit, fill, resample))
        except ImageLoadError:
            continue
        if len(loaded) == batch:
            flush()
    flush()
    if count < 2:
        raise VitupError("--pca: none of the sampled images could be read, so no projection can be fitted")
    mean = total / count
    cov = moments / count - torch.outer(mean, mean)
    _, vecs = torch.linalg.eigh(cov)  # ascending
    comps = vecs[:, -k:].flip(1).T.contiguous()  # (k, C), largest variance first
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    return comps.float().numpy(), mean.float().numpy()


def run_extract(
    config: ExtractConfig, upsampler: Upsampler | None = None, reporter: Reporter | None = None
) -> ExtractSummary:
    """Extract features for ``config.images`` into ``config.out`` (see the module docstring).

    Args:
        upsampler: use this model instead of building one from ``config`` (its settings are recorded).
        reporter: progress and messages; default ``vitup_cli.progress.default_reporter()``.
    Raises:
        VitupError: bad input or settings, an existing store without ``overwrite``/``resume``, settings
            that differ from the store's on ``resume``, too little disk space (unless ``force``), another
            job holding the store's lock, or the first unreadable image with ``strict``.
    """
    _validate(config)
    dist_ctx = Dist.setup()
    try:
        return _run(config, upsampler, reporter, dist_ctx)
    finally:
        dist_ctx.teardown()


def _store_attrs(out: str | Path, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    """The root attributes of an existing Zarr store, read from its ``zarr.json`` by name (no listing)."""
    import json

    if stores.store_format(out) != "zarr":
        return None
    data = stores.Location(out, storage_options).read("zarr.json")
    if data is None:
        return None
    try:
        return dict(json.loads(data).get("attributes") or {})
    except (ValueError, AttributeError):
        return None


def _take_lock(config: ExtractConfig, reporter: Reporter) -> locks.StoreLock:
    """Rank 0 / each part: the store's lock. A whole job also respects the locks of the parts a store was
    made for; a part respects a whole job's lock."""
    so = config.storage_options
    if config.part is None:
        attrs = _store_attrs(config.out, so) or {}
        n = attrs.get("parts")
        others = [locks.lock_name((i, n)) for i in range(1, n + 1)] if isinstance(n, int) else []
    else:
        others = [locks.lock_name(None)]
    return locks.acquire(
        config.out,
        part=config.part,
        also_check=others,
        storage_options=so,
        timeout=config.lock_timeout,
        command=_command(config),
        warn=reporter.warning,
    )


def _command(config: ExtractConfig) -> str:
    return config.command or shlex.join(["vitup", "extract", *sys.argv[1:]])


def _run(
    config: ExtractConfig, upsampler: Upsampler | None, reporter: Reporter | None, dist_ctx: Dist
) -> ExtractSummary:

    started = time.perf_counter()
    rank0 = dist_ctx.rank == 0
    reporter = (reporter or default_reporter()) if rank0 else SilentReporter()
    out = stores.store_path(config.out)
    so = config.storage_options
    held: list[locks.StoreLock] = []  # rank 0 only: other ranks must never release or refresh it
    dist_ctx.on_rank0(lambda: held.append(_take_lock(config, reporter)))
    lock = held[0] if held else None
    try:

        def listing() -> tuple[list[str], list[Any], str]:
            found = list_images(config.images, so)
            return [found.relative(p) for p in found.files], list(found.files), str(found.root)

        paths, files, root = dist_ctx.on_rank0(listing)
        device = _device(config.device, dist_ctx)
        if upsampler is None and config.checkpoint is None and config.upsampler is None:
            release = default_checkpoint(config.backbone, pretrained=config.pretrained, overrides=config.backbone_args)
            reporter.info(f"no --checkpoint or --upsampler: ViT-Up with the published weights {release}")
            config = replace(config, checkpoint=release)
        upsampler = _build_upsampler(config, device, reporter.info) if upsampler is None else upsampler.to(device)
        config = replace(config, resample=resize_filter(upsampler, config.resample))
        upsampler.eval()
        if config.compile:
            reporter.info(f"--compile: {compile_upsampler(upsampler)} modules compiled (the first batch waits for it)")
        if upsampler.backbone.random_init:
            reporter.info(
                "backbone: random init (--pretrained none), recorded in the store: a pipeline check, not features"
            )
        tap = _resolve_tap(upsampler, config.tap)
        check_global(upsampler, config.global_pool)
        grid = upsampler.token_grid if upsampler.native_resolution_only else parse_res(config.res)
        settings = _settings(config, upsampler, tap, grid, paths)

        def prepare() -> _Plan:
            return _prepare(config, upsampler, reporter, _Inputs(settings, paths, files, root, tap, grid))

        plan: _Plan = dist_ctx.on_rank0(prepare)
        if config.create_only:
            return _created_summary(config, plan, started, reporter)
        return _extract(config, upsampler, reporter, dist_ctx, plan, tap, grid, device, started, lock)
    finally:
        if lock is not None:
            lock.release()
            locks.remove_folder_if_empty(out)


def _extract(
    config: ExtractConfig,
    upsampler: Upsampler,
    reporter: Reporter,
    dist_ctx: Dist,
    plan: _Plan,
    tap: int,
    grid: tuple[int, int],
    device: torch.device,
    started: float,
    lock: locks.StoreLock | None,
) -> ExtractSummary:
    out = stores.store_path(config.out)
    layout = stores.StoreLayout.from_json(plan.layout)
    writer = stores.open_writer(out, storage_options=config.storage_options, threads=config.writer_threads)
    pca = writer.pca()
    projection = None if pca is None else (torch.from_numpy(pca[0]), torch.from_numpy(pca[1]))

    done = writer.done_shards(retry_failed=config.retry_failed)
    if config.part is not None:
        writers, me = config.part[1], config.part[0] - 1
    else:
        writers, me = dist_ctx.world, dist_ctx.rank
    mine = [k for k in range(layout.num_shards) if layout.owner(k, writers) == me and k not in done]
    batches = [list(range(*layout.shard_rows(k))) for k in mine]
    todo = sum(len(b) for b in batches)
    workers = config.workers
    if workers is None:
        workers = max(1, min(8, (os.cpu_count() or 2) // max(1, dist_ctx.local_world) // 2))
    workers = min(workers, max(0, len(batches)))
    if config.part is not None:
        label = f"extract (part {config.part[0]}/{config.part[1]})"
    else:
        label = "extract" if dist_ctx.world == 1 else f"extract (rank 0 of {dist_ctx.world})"
    dataset = _ImageRows(
        plan.files, upsampler.input_size, config.fit, fill_colour(upsampler), config.resample, config.storage_options
    )
    out_dtype = torch.float16 if layout.dtype == "float16" else torch.float32
    precision = _precision(config, upsampler)
    model_seconds = 0.0
    loop_start = time.perf_counter()
    reporter.start(todo, label)
    workers = writer_workers(writer)
    background = BackgroundWriter(
        writer, reporter, depth=3 - workers, workers=workers, on_write=None if lock is None else lock.heartbeat
    )  # at most 3 shards outstanding, as with one worker and a queue of 2
    try:
        for batch in _loader(dataset, batches, workers, pin=device.type == "cuda"):
            shard = batch["indices"][0] // layout.shard_size
            ok = batch["ok"]
            if config.strict and not ok.all():
                i = int(np.flatnonzero(~ok)[0])
                raise VitupError(
                    f"{plan.files[batch['indices'][i]]}: {batch['errors'][i]} (--strict stops at the first "
                    "unreadable image; without it such images are skipped and reported)"
                )
            t0 = time.perf_counter()
            n = len(ok)
            feats = tokens = None
            pooled: list[torch.Tensor] = []
            if batch["images"] is not None:
                x = batch["images"].to(device, non_blocking=True).float().div_(255)
                feats, tokens = dense_features(
                    upsampler, x, grid, tap=tap, chunk_queries=config.chunk_queries, projection=projection,
                    dtype=out_dtype, with_tokens=layout.lowres is not None, pooled=pooled,
                    global_kind=layout.global_kind, precision=precision,
                )  # fmt: skip
            vectors = pooled[0] if pooled else None
            if not ok.all():  # failed rows are NaN
                feats = _scatter_rows(feats, ok, (layout.channels, layout.height, layout.width), out_dtype)
                if layout.lowres:
                    tokens = _scatter_rows(tokens, ok, layout.lowres, out_dtype)
                if layout.global_dim:
                    vectors = _scatter_rows(vectors, ok, (layout.global_dim,), torch.float32)
            model_seconds += time.perf_counter() - t0
            valid = np.zeros((n, 4), dtype=np.int64)
            for i in np.flatnonzero(ok):
                valid[i] = box_to_grid(batch["boxes"][i], upsampler.input_size, (layout.height, layout.width))
            rows = {
                "features": feats.numpy(),
                "status": np.where(ok, stores.DONE, stores.FAILED).astype(np.uint8),
                "sizes": batch["sizes"],
                "valid": valid,
                "errors": batch["errors"],
                "lowres": None if tokens is None else tokens.numpy(),
                "global_": None if vectors is None else vectors.numpy(),
            }
            background.submit(shard, rows)
    finally:
        try:
            background.close()
        finally:
            reporter.finish()
    loop_seconds = time.perf_counter() - loop_start
    stats = dist_ctx.gather(  # also waits for every rank to finish writing
        {"rows": background.rows, "model": model_seconds, "write": background.seconds, "loop": loop_seconds}
    )

    def finish() -> ExtractSummary:
        return _finalize(config, writer, plan, stats, started, reporter)

    summary = dist_ctx.on_rank0(finish)
    writer.close()
    return summary


def _scatter_rows(
    values: torch.Tensor | None, ok: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """``values`` for the rows where ``ok``, NaN elsewhere: ``(sum(ok), *shape)`` -> ``(len(ok), *shape)``."""
    full = torch.full((len(ok), *shape), float("nan"), dtype=dtype)
    if values is not None:
        full[torch.from_numpy(ok)] = values
    return full


def _join_existing(config: ExtractConfig, reporter: Reporter, inputs: _Inputs) -> _Plan:
    """Continue an existing store (``--resume``, ``--retry-failed``, or a ``--part`` joining its job array)."""
    settings, paths, files, root = inputs.settings, inputs.paths, inputs.files, inputs.root
    out = stores.store_path(config.out)
    fmt = stores.store_format(out)
    # a part never deletes temporary files: they may be another part's writes in flight
    writer = stores.open_writer(out, recover=config.part is None, storage_options=config.storage_options)
    made_for = writer.attrs.get("parts")
    if config.part is not None and made_for not in (None, config.part[1]):
        raise VitupError(
            f"--part {config.part[0]}/{config.part[1]}: {out} was made for {made_for} parts; every part of one store "
            "must use the same N"
        )
    old = writer.attrs.get("settings", {})
    diffs = _differences(old, settings)
    if not diffs and writer.paths() != paths:
        diffs = ["inputs: the image names differ"]
    if config.batch_size is not None and config.batch_size != writer.layout.shard_size:
        diffs.append(f"batch_size: store has {writer.layout.shard_size}, now {config.batch_size}")
    if diffs:
        flag = "--part" if config.part else "--resume"
        raise VitupError(
            f"{flag} {out}: settings differ from the store's ({'; '.join(diffs)}). Use the same inputs and "
            "flags, or --overwrite to start over"
        )
    status = writer.status()
    left = int((status == stores.PENDING).sum())
    failed = int((status == stores.FAILED).sum())
    redo = left + (failed if config.retry_failed else 0)
    needed = redo * writer.layout.image_bytes + (writer.layout.n * writer.layout.image_bytes if fmt == "hdf5" else 0)
    _check_space(out, needed, config.force, reporter, writer.layout, redo)
    if config.retry_failed:
        reporter.info(f"--retry-failed {out}: {failed} failed rows (and the other rows of their shards) run again")
    who = f"part {config.part[0]}/{config.part[1]}: joining" if config.part else "resuming"
    reporter.info(f"{who} {out}: {writer.layout.n - left} of {writer.layout.n} images already done")
    kept = writer.done_shards(retry_failed=config.retry_failed)
    skipped = sum(b - a for a, b in (writer.layout.shard_rows(k) for k in kept))
    return _Plan(writer.layout.to_json(), paths, files, root, skipped, 0, fresh=False)


def _wait_for_store(config: ExtractConfig, holder: dict[str, Any] | None, reporter: Reporter) -> None:
    """A part that lost the creation race waits until the winner has created the store."""
    out = stores.store_path(config.out)
    if not (_store_attrs(out, config.storage_options) or {}).get("layout"):
        reporter.info(f"part {config.part[0]}/{config.part[1]}: waiting for another part to create {out}")
    deadline = time.time() + _CREATE_WAIT
    while time.time() < deadline:
        attrs = _store_attrs(out, config.storage_options)
        if attrs and attrs.get("format") == stores.STORE_FORMAT and "layout" in attrs:
            return
        time.sleep(0.5)
    who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "another part"
    raise VitupError(
        f"--part: {out} is being created by {who} but is not there after {_CREATE_WAIT:.0f} s. If that job died, "
        f"delete {locks.lock_location(out, config.storage_options).key(_CREATE_MARKER)} and start again (or create "
        "the store first with --create-only)"
    )


def _prepare(config: ExtractConfig, upsampler: Upsampler, reporter: Reporter, inputs: _Inputs) -> _Plan:
    """Rank 0: apply the overwrite/resume policy, check disk space, fit PCA, create the store."""
    out = stores.store_path(config.out)
    so = config.storage_options
    exists = stores.store_exists(out, so)
    joining = config.resume or config.retry_failed or config.part is not None
    if exists and not (config.overwrite or joining):
        raise VitupError(
            f"--out {out} already exists; nothing was changed. "
            "Pass --resume to continue it or --overwrite to replace it"
        )
    if exists and joining:
        if config.part is not None:  # it may still be being created by another part
            _wait_for_store(config, None, reporter)
        return _join_existing(config, reporter, inputs)
    if config.retry_failed:
        raise VitupError(f"--retry-failed: {out} does not exist; there are no failed rows to run again")
    claimed = False
    if config.part is not None:  # the first part to arrive creates the store; the others wait and join
        claimed, holder = locks.claim(out, _CREATE_MARKER, so)
        if not claimed:
            _wait_for_store(config, holder, reporter)
            return _join_existing(config, reporter, inputs)
        if stores.store_exists(out, so):  # created (and its marker removed) between our two looks
            locks.unclaim(out, _CREATE_MARKER, so)
            return _join_existing(config, reporter, inputs)
    try:
        if not exists and config.resume:
            reporter.info(f"--resume: {out} does not exist yet, starting it")
        return _create(config, upsampler, reporter, inputs, exists)
    finally:
        if claimed:
            locks.unclaim(out, _CREATE_MARKER, so)


def _create(config: ExtractConfig, upsampler: Upsampler, reporter: Reporter, inputs: _Inputs, exists: bool) -> _Plan:
    """Rank 0: create a new store (``exists``: an old one that ``--overwrite`` removes first)."""
    settings, paths, files, root = inputs.settings, inputs.paths, inputs.files, inputs.root
    tap, grid = inputs.tap, inputs.grid
    out = stores.store_path(config.out)
    so = config.storage_options
    fmt = stores.store_format(out)
    channels = config.pca or upsampler.dim
    lowres = (upsampler.dim, *upsampler.token_grid) if config.lowres else None
    extra = {"global_dim": upsampler.dim, "global_kind": config.global_pool} if config.global_pool else {}
    layout = stores.StoreLayout.for_images(
        len(paths), channels, grid[0], grid[1], config.batch_size or 8, dtype=config.dtype, lowres=lowres,
        pca=config.pca, backbone_channels=upsampler.dim, **extra,
    )  # fmt: skip
    if config.batch_size is None:  # memory must not grow with the output grid: bound the bytes per shard
        auto = max(1, min(8, _SHARD_BYTES // layout.image_bytes))
        layout = stores.StoreLayout.for_images(
            len(paths), channels, grid[0], grid[1], auto, dtype=config.dtype, lowres=lowres, pca=config.pca,
            backbone_channels=upsampler.dim, **extra,
        )  # fmt: skip
    needed = layout.n * layout.image_bytes * (2 if fmt == "hdf5" else 1)
    freed = (stores.disk_usage(out) or 0) if exists else 0  # --overwrite: the old store goes first
    _check_space(out, needed - freed, config.force, reporter, layout, layout.n)
    pca = None
    if config.pca:
        reporter.info(f"fitting a {config.pca}-component PCA on {min(config.pca_images, len(files))} images")
        pca = fit_pca(
            upsampler, files, config.pca, grid=grid, fit=config.fit, tap=tap,
            chunk_queries=config.chunk_queries, sample=config.pca_images, batch_size=layout.shard_size,
            resample=config.resample, storage_options=so,
        )  # fmt: skip
    if exists:  # --overwrite, only now that every check that can fail has passed (and we hold the lock)
        stores.remove_store(out, so)
        reporter.info(f"--overwrite: removed the old {out}")
    backbone = upsampler.backbone
    attrs = {
        "images": root,
        "backbone": backbone.describe(),
        "weights_id": backbone.weights_id,
        "random_init": backbone.random_init,
        "seed": config.seed if backbone.random_init else None,
        "checkpoint": str(config.checkpoint) if config.checkpoint else None,
        "checkpoint_sha256": settings["checkpoint_sha256"],
        "weights_release": (getattr(upsampler, "weights_info", None) or {}).get("release"),
        "weights_licence": (getattr(upsampler, "weights_info", None) or {}).get("licence"),
        "resize_antialias": settings["antialias"],
        "upsampler": upsampler.name,
        "upsampler_notes": upsampler.output_notes(grid),
        **_native_attrs(upsampler, grid),
        "tap": tap,
        "input_size": upsampler.input_size,
        "res": list(grid),
        "dtype": config.dtype,
        "precision": _precision(config, upsampler),
        "fit": config.fit,
        "resample": config.resample,
        "resize_filter": config.resample,
        "compression": config.compression if fmt == "zarr" else "gzip",
        "normalization": {
            "mean": [round(v, 6) for v in backbone.mean.flatten().tolist()],
            "std": [round(v, 6) for v in backbone.std.flatten().tolist()],
        },
        "pca": {"components": config.pca, "images": config.pca_images} if config.pca else None,
        "parts": config.part[1] if config.part else None,
        "command": _command(config),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "failed": [],
        "complete": False,
    }
    writer = stores.create_writer(
        out, layout, paths, attrs, pca, storage_options=so, compression=config.compression, threads=0
    )  # fmt: skip
    writer.close()
    return _Plan(layout.to_json(), paths, files, root, 0, layout.n * layout.image_bytes, fresh=True)


def _created_summary(config: ExtractConfig, plan: _Plan, started: float, reporter: Reporter) -> ExtractSummary:
    """``--create-only``: the store exists at its final size, nothing computed."""
    layout = stores.StoreLayout.from_json(plan.layout)
    out = stores.store_path(config.out)
    status = stores.store_status(out, config.storage_options)
    reporter.info(f"--create-only: {out} is ready for {layout.n} images ({layout.num_shards} shards)")
    return ExtractSummary(
        store=out, format=stores.store_format(out), total=layout.n, done=int((status == stores.DONE).sum()),
        failed=int((status == stores.FAILED).sum()), pending=int((status == stores.PENDING).sum()),
        skipped=plan.skipped, processed=0, failures=[], bytes_on_disk=stores.disk_usage(out),
        estimate_bytes=layout.n * layout.image_bytes, seconds=time.perf_counter() - started, images_per_s=0.0,
        part=config.part, complete=False,
    )  # fmt: skip


def _check_space(
    out: str | Path, needed: int, force: bool, reporter: Reporter, layout: stores.StoreLayout, rows: int
) -> None:
    line = (
        f"store: {layout.n} images x {layout.channels} x {layout.height} x {layout.width} {layout.dtype}; "
        f"{human_bytes(layout.image_bytes)} per image, about {human_bytes(rows * layout.image_bytes)} to write "
        f"(uncompressed; features compress about 1.1-1.5x)"
    )
    if stores.is_remote(out):
        reporter.info(line + "; remote store: no free-space check")
        return
    free, where = _free_bytes(Path(out))
    reporter.info(f"{line}; {human_bytes(free)} free on {where}")
    if needed > free:
        twice = " (an HDF5 store briefly exists twice while its shards are joined)"
        message = (
            f"--out {out}: needs about {human_bytes(needed)} but only {human_bytes(free)} is free on {where}"
            + (twice if stores.store_format(out) == "hdf5" else "")
            + ". Free space, lower --res, use --pca K or --dtype float16, or pass --force"
        )  # fmt: skip
        if not force:
            raise VitupError(message)
        reporter.warning(message + " (continuing: --force)")


def _finalize(
    config: ExtractConfig,
    writer: stores.StoreWriter,
    plan: _Plan,
    stats: list[dict[str, float]],
    started: float,
    reporter: Reporter,
) -> ExtractSummary:
    status = writer.status()
    errors = writer.errors()
    failures = [(plan.paths[i], errors[i]) for i in np.flatnonzero(status == stores.FAILED)]
    done, failed = int((status == stores.DONE).sum()), int((status == stores.FAILED).sum())
    pending = int((status == stores.PENDING).sum())
    processed = int(sum(s["rows"] for s in stats))
    loop = max(s["loop"] for s in stats)
    common = {
        "format": writer.format, "total": len(status), "done": done, "failed": failed, "pending": pending,
        "skipped": plan.skipped, "processed": processed,
        "estimate_bytes": plan.estimate or writer.layout.n * writer.layout.image_bytes,
        "images_per_s": processed / loop if loop > 0 else 0.0, "model_seconds": max(s["model"] for s in stats),
        "write_seconds": max(s["write"] for s in stats), "part": config.part,
    }  # fmt: skip
    if pending and config.part is not None:  # other parts still run; the last part to finish finalises
        reporter.info(
            f"part {config.part[0]}/{config.part[1]} finished its rows; {pending} rows of other parts are pending "
            "(the store is finalised by the last part to finish)"
        )
        return ExtractSummary(
            store=writer.path, failures=failures, bytes_on_disk=stores.disk_usage(writer.path),
            seconds=time.perf_counter() - started, complete=False, **common,
        )  # fmt: skip
    attrs: dict[str, Any] = {
        "failed": [{"path": p, "reason": r} for p, r in failures],
        "counts": {"done": done, "failed": failed, "pending": pending},
        "complete": pending == 0,
        "completed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if not plan.fresh:
        history = list(writer.attrs.get("resumed") or [])
        history.append({"command": _command(config), "time": attrs["completed"]})
        attrs["resumed"] = history
    if pending == 0 and writer.format == "hdf5" and not Path(writer.path).exists():
        reporter.info(f"joining {writer.layout.num_shards} shards into {writer.path}")
    path = writer.finalize(attrs) if pending == 0 else writer.path
    if pending:  # unreachable unless a writer lost rows; say so instead of finishing silently
        raise VitupError(f"{path}: {pending} rows are still pending after the run; rerun with --resume")
    return ExtractSummary(
        store=path, failures=failures, bytes_on_disk=stores.disk_usage(path),
        seconds=time.perf_counter() - started, **common,
    )  # fmt: skip
