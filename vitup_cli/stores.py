"""Feature stores: Zarr v3 and HDF5 behind one interface, the same names and meaning in both.

Contents of a store of ``N`` images (``C`` stored channels, ``H x W`` output grid):

===================  ========================  ==================================================
name                 shape, dtype              meaning
===================  ========================  ==================================================
``features``         (N, C, H, W) f16 or f32   dense features, NaN where not (yet) written
``path``             (N,) str                  image path relative to the input root
``status``           (N,) uint8                0 pending, 1 done, 2 failed; set only after that
                                               row's features are on disk
``size``             (N, 2) int32              original image (height, width), EXIF applied
``valid``            (N, 4) int32              the real image in the output grid: (y0, x0, y1, x1),
                                               end-exclusive (``--fit pad`` leaves borders)
``error``            (N,) str                  why a failed row failed ('' otherwise)
``lowres``           (N, Cb, h, w), optional   the backbone's own tokens at the tap (LoRA off)
``global``           (N, Cb) f32, optional     one vector per image (``--global cls|mean``), same pass
``pca_components``   (K, Cb) f32, optional     ``features = (x - pca_mean) @ pca_components.T``
``pca_mean``         (Cb,) f32, optional
===================  ========================  ==================================================

Root attributes describe how the store was made (see ``vitup_cli.extract``); ``layout`` holds what a
writer needs to reopen it.

Zarr (``.zarr``, v3): ``features`` has inner chunks ``(1, C, 56, 56)`` inside shards of ``S`` whole images
(``S`` = the writer's batch), Blosc zstd level 1 with byte shuffle, fill value NaN, ``dimension_names``
for xarray, metadata consolidated when the store is finished. The per-row arrays are chunked by groups of
shards, and a group belongs to exactly one writer, so parallel writers never share a file (zarr loses
data when two processes rewrite the same shard). Zarr's local store replaces files atomically, so a
killed writer leaves either the old or the new version of every file.

Zarr stores may live at any fsspec URL (``s3://bucket/feats.zarr``, ``gs://``, ``memory://``): pass
``storage_options`` (or rely on the usual environment, e.g. ``AWS_ENDPOINT_URL_S3`` and the credentials
chain). Object stores replace each object atomically too. Reopening a store to continue it reads known
keys only (``zarr.json`` files, ``status``, ...), it never lists objects.

HDF5 (``.h5`` / ``.hdf5``): the same datasets with the same chunks, compressed with shuffle + gzip (level 1),
filters every HDF5 build has. HDF5 files are not crash-safe while open for writing, so while a job runs
each shard is written to its own small file in ``STORE.parts/`` (compressed in threads, atomically
renamed); when every shard is there, the parts are joined into ``STORE`` by copying the compressed chunks
as they are, and the folder is removed. Until then ``STORE`` does not exist, and the disk briefly holds
the store twice.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import threading
import warnings
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitup_cli._version import __version__
from vitup_cli.errors import VitupError
from vitup_cli.fileio import atomic_write_bytes

STORE_FORMAT = "vitup-store/1"
PENDING, DONE, FAILED = 0, 1, 2
STATUS_CODES = {PENDING: "pending", DONE: "done", FAILED: "failed"}
SPATIAL_CHUNK = 56
ARRAYS = ("features", "path", "status", "size", "valid", "error")
_PARTS_SUFFIX = ".parts"
_MANIFEST = "manifest.json"
_GZIP_LEVEL = 1


def is_remote(path: str | Path) -> bool:
    """True for an fsspec URL (``s3://...``, ``memory://...``); ``file://`` and plain paths are local."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def store_path(path: str | Path) -> str | Path:
    """A store's location as the rest of the code keeps it: the URL text for remote stores (``Path`` would
    fold ``s3://`` into ``s3:/``), a ``Path`` otherwise."""
    text = str(path)
    if is_remote(text):
        return text.rstrip("/")
    return Path(text.removeprefix("file://"))


def store_format(path: str | Path) -> str:
    """``'zarr'`` for ``*.zarr``, ``'hdf5'`` for ``*.h5`` / ``*.hdf5``; anything else is a user error."""
    suffix = Path(str(path).rstrip("/")).suffix.lower()
    if suffix == ".zarr":
        return "zarr"
    if suffix in {".h5", ".hdf5"}:
        if is_remote(path):
            raise VitupError(
                f"--out {path}: HDF5 stores are local files (h5py writes local files only); "
                "use NAME.zarr for a store at a URL, or a local NAME.h5"
            )
        return "hdf5"
    raise VitupError(f"--out {path}: the store format comes from its suffix; use NAME.zarr (Zarr v3) or NAME.h5 (HDF5)")


class Location:
    """Small objects next to a store's arrays, on a local disk or at an fsspec URL: read a key, write it
    (atomically; ``exclusive`` fails with ``FileExistsError`` when it exists), delete it. Reads and writes
    name their keys: nothing here lists a folder or a bucket."""

    def __init__(self, path: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        self.path = store_path(path)
        self.remote = is_remote(self.path)
        self.storage_options = dict(storage_options or {})
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            try:
                self._fs, self._root = fsspec.core.url_to_fs(str(self.path), **self.storage_options)
            except (ImportError, ValueError) as exc:
                scheme = str(self.path).split("://", 1)[0]
                extra = " (pip install 'vitup[s3]')" if scheme in {"s3", "s3a"} else ""
                raise VitupError(f"{self.path}: cannot open this URL ({exc}){extra}") from None
        return self._fs

    def key(self, name: str) -> str:
        if self.remote:
            self.fs  # noqa: B018 - resolves the root
            return f"{self._root.rstrip('/')}/{name}"
        return str(Path(self.path) / name)

    def read(self, name: str) -> bytes | None:
        if not self.remote:
            try:
                return (Path(self.path) / name).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return None
        try:
            return self.fs.cat_file(self.key(name))
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes | Sequence[bytes], exclusive: bool = False, fsync: bool = True) -> None:
        """Write key ``name`` (``data`` may come in parts); ``fsync=False``: atomic against a killed process
        but not flushed to the device first (bulk data, as zarr's own store writes it)."""
        if not self.remote:
            target = Path(self.path) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if exclusive:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                return

            atomic_write_bytes(target, data, fsync=fsync)
            return
        if exclusive:
            try:
                self.fs.pipe_file(self.key(name), data, mode="create")
                return
            except FileExistsError:
                raise
            except (TypeError, NotImplementedError):  # a filesystem without exclusive writes: best effort
                if self.read(name) is not None:
                    raise FileExistsError(self.key(name)) from None
            except Exception as exc:  # S3 answers 412 PreconditionFailed when the key exists
                if "PreconditionFailed" in repr(exc) or "412" in str(exc):
                    raise FileExistsError(self.key(name)) from None
                raise
        self.fs.pipe_file(self.key(name), data if isinstance(data, bytes) else b"".join(data))

    def delete(self, name: str) -> None:
        if not self.remote:
            (Path(self.path) / name).unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key(name))

    def zarr_store(self, read_only: bool = False) -> Any:
        """What ``zarr.open_group`` takes: the local path, or an ``FsspecStore`` over the URL."""
        if not self.remote:
            return self.path
        from zarr.storage import FsspecStore

        self.fs  # noqa: B018 - turns a missing s3fs into one line
        try:
            return FsspecStore.from_url(str(self.path), storage_options=self.storage_options, read_only=read_only)
        except (ImportError, ValueError, TypeError) as exc:
            raise VitupError(f"{self.path}: cannot open this URL as a Zarr store ({exc})") from None


def parts_dir(path: str | Path) -> Path:
    """Where an HDF5 store keeps its shards while it is being written."""
    p = Path(path)
    return p.with_name(p.name + _PARTS_SUFFIX)


def store_exists(path: str | Path, storage_options: dict[str, Any] | None = None) -> bool:
    """True when ``path`` or (for HDF5) its unfinished parts folder exists (a URL: when its ``zarr.json``
    does, read by name)."""
    if is_remote(path):
        return Location(path, storage_options).read("zarr.json") is not None
    p = Path(store_path(path))
    return p.exists() or p.is_symlink() or (store_format(p) == "hdf5" and parts_dir(p).exists())


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and chunking of a store; fixed when it is created.

    Args:
        n: number of images (rows).
        channels: stored channels per pixel (``K`` with PCA).
        height, width: output grid.
        dtype: ``float16`` or ``float32``.
        shard_size: images per shard (``S``), the unit one writer call writes.
        group_shards: shards per chunk of the per-row arrays (the unit a writer owns).
        lowres: ``(channels, h, w)`` of the optional token array.
        pca: number of PCA components (``None``: no projection stored).
        backbone_channels: channels of the backbone (the PCA input width).
        global_dim: width of the optional per-image ``global`` vector (``None``: not stored).
        global_kind: what it is, ``cls`` or ``mean``.
    """

    n: int
    channels: int
    height: int
    width: int
    dtype: str = "float16"
    shard_size: int = 8
    group_shards: int = 1
    lowres: tuple[int, int, int] | None = None
    pca: int | None = None
    backbone_channels: int | None = None
    global_dim: int | None = None
    global_kind: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in {"float16", "float32"}:
            raise VitupError(f"--dtype {self.dtype}: use float16 or float32")
        if min(self.n, self.channels, self.height, self.width, self.shard_size, self.group_shards) < 1:
            raise ValueError(f"every size in a store layout must be positive: {self}")

    @classmethod
    def for_images(cls, n: int, channels: int, height: int, width: int, shard_size: int, **kw: Any) -> StoreLayout:
        """A layout with the per-row chunking chosen from ``n``: at least 64 groups when there are enough
        shards (so parallel writers share the work), and at most 4096 rows per group."""
        shard_size = max(1, min(shard_size, n))
        n_shards = math.ceil(n / shard_size)
        group = max(1, min(math.ceil(n_shards / 64), max(1, 4096 // shard_size)))
        return cls(n, channels, height, width, shard_size=shard_size, group_shards=group, **kw)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.n / self.shard_size)

    @property
    def group_rows(self) -> int:
        return self.shard_size * self.group_shards

    @property
    def chunk_hw(self) -> tuple[int, int]:
        return min(SPATIAL_CHUNK, self.height), min(SPATIAL_CHUNK, self.width)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.n, self.channels, self.height, self.width

    @property
    def image_bytes(self) -> int:
        """Uncompressed bytes per image (features and tokens)."""
        item = np.dtype(self.dtype).itemsize
        extra = math.prod(self.lowres) if self.lowres else 0
        return (self.channels * self.height * self.width + extra) * item

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """``[start, stop)`` rows of one shard."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.n)

    def owner(self, shard: int, world: int) -> int:
        """The writer (rank) that owns a shard: whole groups go round-robin."""
        return (shard // self.group_shards) % world

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["lowres"] = list(self.lowres) if self.lowres else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoreLayout:
        data = dict(data)
        data["lowres"] = tuple(data["lowres"]) if data.get("lowres") else None
        return cls(**data)


def _dims(layout: StoreLayout) -> dict[str, tuple[str, ...]]:
    return {
        "features": ("image", "channel", "y", "x"),
        "path": ("image",),
        "status": ("image",),
        "size": ("image", "hw"),
        "valid": ("image", "box"),
        "error": ("image",),
        "lowres": ("image", "backbone_channel", "token_y", "token_x"),
        "pca_components": ("channel", "backbone_channel"),
        "pca_mean": ("backbone_channel",),
        # the global vector lives in backbone space: "channel" when features do too, else "backbone_channel"
        "global": ("image", "backbone_channel" if layout.pca else "channel"),
    }


# =================================================================================================
# reading
# =================================================================================================
class FeatureStore:
    """A read-only view of a finished (or growing) store, in either format.

    ``store[i]`` is row ``i``'s features as ``(C, H, W)`` float32 (NaN if not written); a slice gives
    ``(n, C, H, W)``. Use as a context manager, or call ``close()``.
    """

    def __init__(self, path: str | Path, fmt: str, handle: Any) -> None:
        self.path = path
        self.format = fmt
        self._h = handle
        if "features" not in self._keys():
            self.close()
            raise VitupError(
                f"{path}: no 'features' array, so this is not a vitup feature store (made by vitup extract)"
            )
        self._paths: list[str] | None = None

    # -- plumbing -------------------------------------------------------------------------------
    def _keys(self) -> set[str]:
        if self.format == "hdf5":
            return set(self._h.keys())
        with warnings.catch_warnings():  # zarr warns about temporary files of writes in flight
            warnings.simplefilter("ignore")
            return set(self._h.array_keys())

    def _array(self, name: str) -> Any:
        if name not in self._keys():
            raise VitupError(f"{self.path}: no '{name}' array in this store")
        return self._h[name]

    def has(self, name: str) -> bool:
        return name in self._keys()

    def close(self) -> None:
        if self.format == "hdf5" and self._h is not None:
            self._h.close()
        self._h = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- contents -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._array("features").shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self._array("features").shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._array("features").dtype)

    def __getitem__(self, index: int | slice) -> np.ndarray:
        feats = self._array("features")
        if isinstance(index, slice):
            return np.asarray(feats[index], dtype=np.float32)
        i = int(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {index} out of range for a store of {n} images")
        return np.asarray(feats[i % n], dtype=np.float32)

    @property
    def attrs(self) -> dict[str, Any]:
        raw = dict(self._h.attrs)
        return raw if self.format == "zarr" else _h5_attrs_decode(raw)

    @property
    def layout(self) -> StoreLayout | None:
        data = self.attrs.get("layout")
        return StoreLayout.from_json(data) if data else None

    @property
    def paths(self) -> list[str]:
        if self._paths is None:
            self._paths = [_as_str(p) for p in np.asarray(self._array("path")[...]).tolist()]
        return self._paths

    @property
    def status(self) -> np.ndarray:
        return np.asarray(self._array("status")[...], dtype=np.uint8)

    @property
    def sizes(self) -> np.ndarray:
        return np.asarray(self._array("size")[...], dtype=np.int64)

    @property
    def valid(self) -> np.ndarray:
        return np.asarray(self._array("valid")[...], dtype=np.int64)

    @property
    def errors(self) -> list[str]:
        if not self.has("error"):
            return [""] * len(self)
        return [_as_str(e) for e in np.asarray(self._array("error")[...]).tolist()]

    @property
    def global_vectors(self) -> np.ndarray | None:
        """``(N, C)`` float32 per-image vectors (``--global``), NaN where not written; None when not stored."""
        if not self.has("global"):
            return None
        return np.asarray(self._array("global")[...], dtype=np.float32)

    def lowres(self, index: int) -> np.ndarray | None:
        """Row ``index``'s backbone tokens ``(Cb, h, w)`` float32, or None when not stored."""
        if not self.has("lowres"):
            return None
        return np.asarray(self._array("lowres")[int(index)], dtype=np.float32)

    @property
    def pca(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(components (K, Cb), mean (Cb,))`` float32 when features were PCA-projected, else None."""
        if not self.has("pca_components"):
            return None
        comps = np.asarray(self._array("pca_components")[...], dtype=np.float32)
        mean = np.asarray(self._array("pca_mean")[...], dtype=np.float32)
        return comps, mean

    def unproject(self, features: np.ndarray) -> np.ndarray:
        """Map stored PCA features ``(K, H, W)`` (or ``(n, K, H, W)``) back to backbone space ``(Cb, H, W)``.

        Without PCA the features are returned unchanged (as float32).
        """
        feats = np.asarray(features, dtype=np.float32)
        pca = self.pca
        if pca is None:
            return feats
        comps, mean = pca
        if feats.shape[-3] != comps.shape[0]:
            raise ValueError(f"features have {feats.shape[-3]} channels but the projection has {comps.shape[0]}")
        out = np.einsum("kc,...khw->...chw", comps, feats, optimize=True)
        return out + mean[:, None, None]

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, format={self.format!r}, shape={self.shape})"


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def open_store(path: str | Path, storage_options: dict[str, Any] | None = None) -> FeatureStore:
    """Open a store read-only (format from the suffix; Zarr also at an fsspec URL, with ``storage_options``).
    Raises ``VitupError`` for missing or foreign stores."""
    fmt = store_format(path)
    p = store_path(path)
    if fmt == "zarr" and is_remote(p):
        import zarr

        loc = Location(p, storage_options)
        if loc.read("zarr.json") is None:
            raise VitupError(f"{p}: no such store (no zarr.json at this URL)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                group = zarr.open_group(loc.zarr_store(read_only=True), mode="r", zarr_format=3)
        except VitupError:
            raise
        except Exception as exc:
            raise VitupError(f"{p}: not a readable Zarr v3 store ({type(exc).__name__}: {exc})") from None
        return FeatureStore(p, fmt, group)
    p = Path(p)
    if fmt == "hdf5" and not p.exists() and parts_dir(p).exists():
        raise VitupError(
            f"{p}: this HDF5 store is not finished yet (its shards are in {parts_dir(p)}); "
            "complete it with `vitup extract ... --resume`"
        )
    if not p.exists():
        raise VitupError(f"{p}: no such store")
    if fmt == "zarr":
        import zarr

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                group = zarr.open_group(p, mode="r")
        except Exception as exc:
            raise VitupError(f"{p}: not a readable Zarr v3 store ({type(exc).__name__}: {exc})") from None
        return FeatureStore(p, fmt, group)
    import h5py

    try:
        handle = h5py.File(p, "r")
    except OSError as exc:
        raise VitupError(f"{p}: not a readable HDF5 file ({exc})") from None
    return FeatureStore(p, fmt, handle)


def store_status(path: str | Path, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Row status of a store, including one still being written (HDF5: read from its parts)."""
    p = store_path(path)
    if is_remote(p) or (store_format(p) == "hdf5" and not Path(p).exists() and parts_dir(p).exists()):
        return open_writer(p, storage_options=storage_options).status()
    with open_store(p) as store:
        return store.status


# =================================================================================================
# HDF5 attribute and chunk encoding
# =================================================================================================
def _h5_attrs_encode(attrs: dict[str, Any]) -> dict[str, Any]:
    """HDF5 attributes hold scalars and strings; everything else is stored as JSON text, and the keys
    so stored are listed in ``json_attrs`` so readers can decode them."""
    out: dict[str, Any] = {}
    encoded = []
    for key, value in attrs.items():
        if isinstance(value, (str, bool, int, float)) and not isinstance(value, np.generic):
            out[key] = value
        else:
            out[key] = json.dumps(value)
            encoded.append(key)
    out["json_attrs"] = json.dumps(sorted(encoded))
    return out


def _h5_attrs_decode(raw: dict[str, Any]) -> dict[str, Any]:
    encoded = set(json.loads(_as_str(raw.get("json_attrs", "[]"))))
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "json_attrs":
            continue
        if isinstance(value, np.generic):
            value = value.item()
        value = _as_str(value) if isinstance(value, (bytes, str)) else value
        out[key] = json.loads(value) if key in encoded else value
    return out


def _h5_chunk_bytes(block: np.ndarray) -> bytes:
    """One chunk as HDF5's shuffle + deflate filters would store it (the filters h5py declares with
    ``shuffle=True, compression='gzip'``): bytes regrouped by significance, then zlib-compressed."""
    raw = np.ascontiguousarray(block)
    shuffled = raw.view(np.uint8).reshape(-1, raw.itemsize).T.tobytes()
    return zlib.compress(shuffled, _GZIP_LEVEL)


def _h5_chunk_offsets(layout: StoreLayout) -> list[tuple[int, int]]:
    cy, cx = layout.chunk_hw
    return [(y, x) for y in range(0, layout.height, cy) for x in range(0, layout.width, cx)]


def _h5_padded_chunk(image: np.ndarray, y: int, x: int, cy: int, cx: int) -> np.ndarray:
    block = image[:, y : y + cy, x : x + cx]
    if block.shape[1:] != (cy, cx):  # edge chunks are stored at full size
        full = np.full((image.shape[0], cy, cx), np.nan, dtype=image.dtype)
        full[:, : block.shape[1], : block.shape[2]] = block
        block = full
    return block


def _h5_create_arrays(h5: Any, layout: StoreLayout, rows: int, with_path: bool) -> None:
    import h5py

    cy, cx = layout.chunk_hw
    common = {"compression": "gzip", "compression_opts": _GZIP_LEVEL, "shuffle": True}
    h5.create_dataset(
        "features",
        shape=(rows, layout.channels, layout.height, layout.width),
        dtype=layout.dtype,
        chunks=(1, layout.channels, cy, cx),
        fillvalue=np.nan,
        **common,
    )
    if layout.lowres:
        h5.create_dataset(
            "lowres",
            shape=(rows, *layout.lowres),
            dtype=layout.dtype,
            chunks=(1, *layout.lowres),
            fillvalue=np.nan,
            **common,
        )
    text = h5py.string_dtype("utf-8")
    h5.create_dataset("status", shape=(rows,), dtype="uint8", fillvalue=0)
    h5.create_dataset("size", shape=(rows, 2), dtype="int32", fillvalue=0)
    h5.create_dataset("valid", shape=(rows, 4), dtype="int32", fillvalue=0)
    h5.create_dataset("error", shape=(rows,), dtype=text)
    if layout.global_dim:
        h5.create_dataset("global", shape=(rows, layout.global_dim), dtype="float32", fillvalue=np.nan)
    if with_path:
        h5.create_dataset("path", shape=(rows,), dtype=text)


def _h5_label(h5: Any, layout: StoreLayout) -> None:
    for name, dims in _dims(layout).items():
        if name in h5:
            for axis, label in enumerate(dims):
                h5[name].dims[axis].label = label


# =================================================================================================
# writing
# =================================================================================================
class StoreWriter(ABC):
    """Creates and fills one store. Create it with ``create_writer`` (one process: rank 0) at its final
    size; other processes ``open_writer`` it. Rows are written a whole shard at a time
    (``write_rows`` / ``write_shard``), features first and ``status`` last; ``finalize`` (rank 0, after
    every writer is done) records the closing attributes and makes the store readable by plain tools.
    """

    format: str

    def __init__(self, path: str | Path, layout: StoreLayout, attrs: dict[str, Any]) -> None:
        self.path = path
        self.layout = layout
        self.attrs = attrs
        self.bytes_written = 0

    # -- interface ------------------------------------------------------------------------------
    @abstractmethod
    def status(self) -> np.ndarray:
        """``(N,)`` uint8: the status of every row as it is on disk now."""

    @abstractmethod
    def errors(self) -> list[str]:
        """``(N,)`` reasons of failed rows ('' elsewhere)."""

    @abstractmethod
    def paths(self) -> list[str]:
        """The stored input paths."""

    @abstractmethod
    def pca(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The stored projection, if any."""

    @abstractmethod
    def _write_shard(self, shard: int, rows: dict[str, Any]) -> None: ...

    @abstractmethod
    def finalize(self, attrs: dict[str, Any] | None = None) -> str | Path:
        """Merge ``attrs`` into the root attributes and make the store final; returns its path."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles (nothing to do for the built-in formats)."""

    @abstractmethod
    def recover(self) -> None:
        """Delete temporary files that interrupted writes left (see ``open_writer(recover=True)``)."""

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def done_shards(self, retry_failed: bool = False) -> set[int]:
        """Shards whose every row is done or failed (nothing left to compute); with ``retry_failed`` only
        shards whose every row is done (a shard is rewritten whole, so its other rows are computed again)."""
        status = self.status()
        out = set()
        for k in range(self.layout.num_shards):
            a, b = self.layout.shard_rows(k)
            rows = status[a:b]
            if (rows == DONE).all() if retry_failed else (rows != PENDING).all():
                out.add(k)
        return out

    # -- writing --------------------------------------------------------------------------------
    def write_shard(
        self,
        shard: int,
        features: np.ndarray,
        status: np.ndarray,
        sizes: np.ndarray,
        valid: np.ndarray,
        errors: Sequence[str] | None = None,
        lowres: np.ndarray | None = None,
        global_: np.ndarray | None = None,
    ) -> None:
        """Write one whole shard (its rows from ``layout.shard_rows(shard)``), status last.

        Args:
            features: ``(n, C, H, W)``; rows that failed should be NaN.
            status: ``(n,)`` ``DONE`` or ``FAILED`` per row.
            sizes: ``(n, 2)`` original (height, width); valid: ``(n, 4)`` boxes in the output grid.
            errors: ``n`` reasons ('' for done rows). lowres: ``(n, Cb, h, w)`` when the layout has it.
        """
        lay = self.layout
        start, stop = lay.shard_rows(shard)
        n = stop - start
        feats = np.asarray(features)
        if feats.shape != (n, lay.channels, lay.height, lay.width):
            raise ValueError(f"shard {shard}: features {feats.shape}, expected {(n, *lay.shape[1:])}")
        if (lowres is None) != (lay.lowres is None):
            raise ValueError("lowres must be given exactly when the layout stores it")
        rows = {
            "features": feats.astype(lay.dtype, copy=False),
            "status": np.asarray(status, dtype=np.uint8).reshape(n),
            "size": np.asarray(sizes, dtype=np.int32).reshape(n, 2),
            "valid": np.asarray(valid, dtype=np.int32).reshape(n, 4),
            "error": np.asarray(list(errors) if errors is not None else [""] * n, dtype=object),
        }
        if lowres is not None:
            rows["lowres"] = np.asarray(lowres).astype(lay.dtype, copy=False).reshape(n, *lay.lowres)
        if (global_ is None) != (lay.global_dim is None):
            raise ValueError("global_ must be given exactly when the layout stores it")
        if global_ is not None:
            rows["global"] = np.asarray(global_, dtype=np.float32).reshape(n, lay.global_dim)
        if not np.isin(rows["status"], (DONE, FAILED)).all():
            raise ValueError("a written row is either DONE or FAILED")
        self._write_shard(shard, rows)
        self.bytes_written += rows["features"].nbytes + (rows["lowres"].nbytes if lowres is not None else 0)

    def write_rows(self, start: int, features: np.ndarray, status: np.ndarray, sizes: np.ndarray, valid: np.ndarray,
                   errors: Sequence[str] | None = None, lowres: np.ndarray | None = None) -> None:  # fmt: skip
        """Write rows ``[start, start + n)``: whole shards only (``start`` a multiple of the shard size and
        ``n`` a multiple of it, or running to the end). Each shard is written in one call, status last."""
        n = len(features)
        s = self.layout.shard_size
        if start % s or (n % s and start + n != self.layout.n) or start + n > self.layout.n:
            raise ValueError(f"write_rows({start}, {n} rows): write whole shards of {s} rows")
        errors = list(errors) if errors is not None else [""] * n
        for a in range(0, n, s):
            b = min(a + s, n)
            self.write_shard(
                (start + a) // s, features[a:b], status[a:b], sizes[a:b], valid[a:b], errors[a:b],
                None if lowres is None else lowres[a:b],
            )  # fmt: skip


def _common_attrs(layout: StoreLayout, attrs: dict[str, Any]) -> dict[str, Any]:

    return {
        "format": STORE_FORMAT,
        "vitup_version": __version__,
        "status_codes": {str(k): v for k, v in STATUS_CODES.items()},
        "valid_units": "output-grid pixels (y0, x0, y1, x1), end-exclusive",
        **attrs,
        "layout": layout.to_json(),
    }


def create_writer(
    path: str | Path,
    layout: StoreLayout,
    paths: Sequence[str],
    attrs: dict[str, Any] | None = None,
    pca: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    compression: str = "zstd",
    threads: int | None = None,
) -> StoreWriter:
    """Create a new store at its final size (``path`` must not exist: remove it first to overwrite).

    Args:
        paths: ``N`` input paths relative to the image root.
        attrs: JSON-able root attributes (settings, provenance).
        pca: ``(components (K, Cb), mean (Cb,))`` when features are stored projected.
        storage_options: for a Zarr store at an fsspec URL.
        compression: the Zarr features' Blosc codec, ``zstd``, ``lz4`` or ``none`` (HDF5 keeps gzip).
        threads: compression threads (default: the cores available, at most 8); 0 lets zarr's own codec
            pipeline write Zarr features (vitup 0.2's writer).
    """
    p = store_path(path)
    if store_exists(p, storage_options):
        raise VitupError(f"{p} already exists")
    if len(paths) != layout.n:
        raise ValueError(f"{len(paths)} paths for a store of {layout.n} rows")
    if (pca is None) != (layout.pca is None):
        raise ValueError("pass a projection exactly when the layout has pca components")
    full = _common_attrs(layout, dict(attrs or {}))
    if store_format(p) == "zarr":
        return _ZarrWriter.create(p, layout, list(paths), full, pca, storage_options, compression, threads)
    return _H5Writer.create(Path(p), layout, list(paths), full, pca, threads)


def open_writer(
    path: str | Path,
    *,
    recover: bool = False,
    storage_options: dict[str, Any] | None = None,
    threads: int | None = None,
) -> StoreWriter:
    """Reopen an existing store (or an unfinished HDF5 one) to continue writing it.

    ``recover``: first delete the temporary files of writes that a killed writer left behind. Only when no
    other process is writing this store (``vitup extract`` does it on rank 0 before any rank starts).
    """
    p = store_path(path)
    zarr_store = store_format(p) == "zarr"
    writer = _ZarrWriter.open(p, storage_options, threads) if zarr_store else _H5Writer.open(Path(p), threads)
    if recover:
        writer.recover()
    return writer


def remove_store(path: str | Path, storage_options: dict[str, Any] | None = None) -> None:
    """Delete a store (and an HDF5 store's parts). Refuses folders that are not Zarr stores."""
    p = store_path(path)
    if is_remote(p):
        loc = Location(p, storage_options)
        if loc.read("zarr.json") is None:
            raise VitupError(f"--overwrite: {p} has no zarr.json, so it is not a Zarr store; not deleting it")
        loc.fs.rm(loc.key("").rstrip("/"), recursive=True)
        return
    p = Path(p)
    if store_format(p) == "hdf5":
        if p.is_dir() and not p.is_symlink():
            raise VitupError(f"--overwrite: {p} is a folder, not an HDF5 file; remove it yourself if you mean it")
        p.unlink(missing_ok=True)
        if parts_dir(p).is_dir():
            shutil.rmtree(parts_dir(p))
        return
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        if any(p.iterdir()) and not (p / "zarr.json").exists():
            raise VitupError(f"--overwrite: {p} is a non-empty folder but not a Zarr store; not deleting it")
        shutil.rmtree(p)


CODECS = ("zstd", "lz4", "none")


def _compressors(name: str) -> Any:
    from zarr.codecs import BloscCodec

    if name not in CODECS:
        raise VitupError(f"--compression {name}: use one of {', '.join(CODECS)}")
    if name == "none":
        return None
    return BloscCodec(cname=name, clevel=1, shuffle="shuffle")


def default_writer_threads() -> int:
    """Compression threads for a store writer: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class ShardEncoder:
    """Encodes whole shards of a sharded Zarr v3 array the way zarr's codec pipeline would (inner chunks
    through ``bytes`` and an optional Blosc codec, the index through ``bytes`` + ``crc32c`` at the end), with
    the inner chunks compressed by a pool of threads: Blosc releases the GIL, so ``threads`` chunks compress
    at once. zarr itself compresses concurrently too, but its per-chunk bookkeeping (the empty-chunk scan,
    merging each chunk into a fresh buffer) runs on its one event-loop thread and keeps a 2-core box at
    about 0.6 cores (``benchmarks/writer_throughput.py``). Inner chunks go in C order; readers use the index.
    """

    def __init__(self, array: Any, threads: int) -> None:
        from numcodecs import Blosc
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

        (sharding,) = array.metadata.codecs
        if not isinstance(sharding, ShardingCodec) or sharding.index_location.value != "end":
            raise ValueError("not a sharded array with its index at the end")
        inner = list(sharding.codecs)
        if not isinstance(inner[0], BytesCodec) or [type(c) for c in sharding.index_codecs] != [
            BytesCodec,
            Crc32cCodec,
        ]:
            raise ValueError("unknown codecs")
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.blosc = None
        if len(inner) == 2 and isinstance(inner[1], BloscCodec):
            b = inner[1]
            shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
            self.blosc = Blosc(
                cname=b.cname.value, clevel=b.clevel, shuffle=shuffle[b.shuffle.value], blocksize=b.blocksize,
                typesize=b.typesize,
            )  # fmt: skip
        elif len(inner) != 1:
            raise ValueError("unknown codecs")
        self.chunk = tuple(sharding.chunk_shape)
        self.shard = tuple(array.metadata.chunk_grid.chunk_shape)
        self.shape = tuple(array.shape)
        self.fill = array.metadata.fill_value
        self.per_shard = tuple(s // c for s, c in zip(self.shard, self.chunk, strict=True))
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="vitup-compress")

    def _compress(self, block: np.ndarray) -> bytes:
        raw = np.ascontiguousarray(block, dtype=self.dtype)
        return raw.tobytes() if self.blosc is None else bytes(self.blosc.encode(raw))

    def encode(self, data: np.ndarray, shard: int) -> list[bytes]:
        """The bytes of shard ``shard`` (along the first axis; the array is one shard wide in every other
        axis) holding ``data``: its rows of the array, ``(n, *shape[1:])``. Chunks outside the array are
        left empty; edge chunks are padded with the fill value, as zarr does."""
        import google_crc32c

        start = shard * self.shard[0]
        jobs: list[tuple[tuple[int, ...], np.ndarray]] = []
        for coords in np.ndindex(*self.per_shard):
            lo = [k * c for k, c in zip(coords, self.chunk, strict=True)]
            if start + lo[0] >= self.shape[0]:
                continue  # beyond the array's last row: zarr writes no chunk there
            block = data[tuple(slice(a, a + c) for a, c in zip(lo, self.chunk, strict=True))]
            if block.shape != self.chunk:
                padded = np.full(self.chunk, self.fill, dtype=self.dtype)
                padded[tuple(slice(0, n) for n in block.shape)] = block
                block = padded
            jobs.append((coords, block))
        blobs = list(self._pool.map(self._compress, [b for _, b in jobs]))
        index = np.full((*self.per_shard, 2), np.iinfo(np.uint64).max, dtype="<u8")
        offset = 0
        for (coords, _), blob in zip(jobs, blobs, strict=True):
            index[coords] = (offset, len(blob))
            offset += len(blob)
        index_bytes = index.tobytes()
        checksum = np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes()
        return [*blobs, index_bytes, checksum]  # the shard's bytes, in order

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# -- Zarr -----------------------------------------------------------------------------------------
class _ZarrWriter(StoreWriter):
    format = "zarr"

    def __init__(
        self,
        path: str | Path,
        layout: StoreLayout,
        attrs: dict[str, Any],
        group: Any,
        loc: Location,
        threads: int | None = None,
    ) -> None:
        super().__init__(path, layout, attrs)
        self._g = group
        self._loc = loc
        names = [*ARRAYS, *(["lowres"] if layout.lowres else []), *(["global"] if layout.global_dim else [])]
        # (by name: listing a bucket is slow and costly)
        self._arrays = {name: group[name] for name in names}  # lookups cost a metadata read
        self.threads = default_writer_threads() if threads is None else int(threads)
        # threads == 0: zarr's own codec pipeline for every array (what vitup 0.2 did; the benchmark's baseline)
        self._encoders = {}
        if self.threads > 0:
            for name in ("features", "lowres"):
                if name in self._arrays:
                    with contextlib.suppress(ValueError):  # an unexpected layout keeps zarr's own path
                        self._encoders[name] = ShardEncoder(self._arrays[name], self.threads)
        self._small = threading.Lock()  # per-row arrays: several shards share one of their chunks

    @classmethod
    def create(
        cls,
        path: str | Path,
        layout: StoreLayout,
        paths: list[str],
        attrs: dict[str, Any],
        pca: tuple[np.ndarray, np.ndarray] | None,
        storage_options: dict[str, Any] | None = None,
        compression: str = "zstd",
        threads: int | None = None,
    ) -> _ZarrWriter:
        import zarr

        dims = _dims(layout)
        loc = Location(path, storage_options)
        blosc = _compressors(compression)
        group = zarr.open_group(loc.zarr_store(), mode="w-", zarr_format=3)
        cy, cx = layout.chunk_hw
        s, rows = layout.shard_size, layout.group_rows
        group.create_array(
            "features",
            shape=layout.shape,
            chunks=(1, layout.channels, cy, cx),
            shards=(s, layout.channels, math.ceil(layout.height / cy) * cy, math.ceil(layout.width / cx) * cx),
            dtype=layout.dtype,
            compressors=blosc,
            fill_value=np.nan,
            dimension_names=dims["features"],
        )
        if layout.lowres:
            group.create_array(
                "lowres",
                shape=(layout.n, *layout.lowres),
                chunks=(1, *layout.lowres),
                shards=(s, *layout.lowres),
                dtype=layout.dtype,
                compressors=blosc,
                fill_value=np.nan,
                dimension_names=dims["lowres"],
            )
        n = layout.n
        path_arr = group.create_array("path", shape=(n,), chunks=(rows,), dtype=str, dimension_names=dims["path"])
        group.create_array(
            "status", shape=(n,), chunks=(rows,), dtype="uint8", fill_value=0, dimension_names=("image",)
        )
        group.create_array(
            "size", shape=(n, 2), chunks=(rows, 2), dtype="int32", fill_value=0, dimension_names=dims["size"]
        )
        group.create_array(
            "valid", shape=(n, 4), chunks=(rows, 4), dtype="int32", fill_value=0, dimension_names=dims["valid"]
        )
        group.create_array("error", shape=(n,), chunks=(rows,), dtype=str, dimension_names=dims["error"])
        if layout.global_dim:
            group.create_array(
                "global", shape=(n, layout.global_dim), chunks=(rows, layout.global_dim), dtype="float32",
                fill_value=np.nan, dimension_names=dims["global"], attributes={"kind": layout.global_kind},
            )  # fmt: skip
        path_arr[:] = np.array(paths, dtype=object)
        if pca is not None:
            comps, mean = (np.asarray(a, dtype=np.float32) for a in pca)
            group.create_array("pca_components", data=comps, chunks=comps.shape, dimension_names=dims["pca_components"])
            group.create_array("pca_mean", data=mean, chunks=mean.shape, dimension_names=dims["pca_mean"])
        group.attrs.update(attrs)  # last: a store without `format` was not fully created
        return cls(path, layout, attrs, group, loc, threads)

    @classmethod
    def open(
        cls, path: str | Path, storage_options: dict[str, Any] | None = None, threads: int | None = None
    ) -> _ZarrWriter:
        import zarr

        loc = Location(path, storage_options)
        if loc.read("zarr.json") is None:
            raise VitupError(f"{path}: not a Zarr store; use --overwrite to replace it")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            group = zarr.open_group(loc.zarr_store(), mode="r+", zarr_format=3, use_consolidated=False)
        attrs = dict(group.attrs)
        if attrs.get("format") != STORE_FORMAT or "layout" not in attrs:
            raise VitupError(
                f"{path}: not a complete vitup store (creation was interrupted, or another tool made it); "
                "use --overwrite to start over"
            )
        return cls(path, StoreLayout.from_json(attrs["layout"]), attrs, group, loc, threads)

    def recover(self) -> None:
        if self._loc.remote:  # an object is PUT whole or not at all: no temporary files
            return
        for leftover in Path(self.path).rglob("*.partial"):  # zarr's temporary files of interrupted writes
            leftover.unlink(missing_ok=True)

    def status(self) -> np.ndarray:
        return np.asarray(self._arrays["status"][...], dtype=np.uint8)

    def errors(self) -> list[str]:
        return [_as_str(e) for e in np.asarray(self._arrays["error"][...]).tolist()]

    def paths(self) -> list[str]:
        return [_as_str(e) for e in np.asarray(self._arrays["path"][...]).tolist()]

    def pca(self) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.layout.pca:
            return None
        return np.asarray(self._g["pca_components"][...]), np.asarray(self._g["pca_mean"][...])

    def _write_shard(self, shard: int, rows: dict[str, Any]) -> None:
        start, stop = self.layout.shard_rows(shard)
        arrays = self._arrays
        for name in ("features", "lowres"):
            if name in rows:
                key = f"{name}/c/{shard}/0/0/0"
                # a shard left by an interrupted attempt is replaced, never merged into
                self._loc.delete(key)
                if name in self._encoders:  # one atomic write of the whole shard, compressed in threads
                    self._loc.write(key, self._encoders[name].encode(rows[name], shard), fsync=False)
                else:
                    arrays[name][start:stop] = rows[name]
        with self._small:  # shards written at once by several threads share the chunks of these arrays
            if "global" in rows:
                arrays["global"][start:stop] = rows["global"]
            arrays["size"][start:stop] = rows["size"]
            arrays["valid"][start:stop] = rows["valid"]
            arrays["error"][start:stop] = rows["error"]
            arrays["status"][start:stop] = rows["status"]  # last: the row is on disk

    def close(self) -> None:
        for encoder in self._encoders.values():
            encoder.close()

    def finalize(self, attrs: dict[str, Any] | None = None) -> str | Path:
        import zarr

        if attrs:
            self._g.attrs.update(attrs)
            self.attrs.update(attrs)
        if self._loc.remote:
            self._consolidate_by_name()
            return self.path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(self._loc.zarr_store(), zarr_format=3)
        return self.path

    def _consolidate_by_name(self) -> None:
        """What ``zarr.consolidate_metadata`` writes (every array's metadata inline in the root ``zarr.json``),
        built from the arrays this store has by name: zarr's own walks the hierarchy, which lists objects."""
        names = [
            *ARRAYS,
            *(["lowres"] if self.layout.lowres else []),
            *(["global"] if self.layout.global_dim else []),
            *(["pca_components", "pca_mean"] if self.layout.pca else []),
        ]
        root = json.loads(self._loc.read("zarr.json") or b"{}")
        meta = {}
        for name in sorted(names):
            data = self._loc.read(f"{name}/zarr.json")
            if data is not None:
                meta[name] = json.loads(data)
        root["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": meta}
        self._loc.write("zarr.json", json.dumps(root, indent=2).encode())


# -- HDF5 -----------------------------------------------------------------------------------------
class _H5Writer(StoreWriter):
    format = "hdf5"

    def __init__(self, path: Path, layout: StoreLayout, attrs: dict[str, Any], threads: int | None = None) -> None:
        super().__init__(path, layout, attrs)
        self._parts = parts_dir(path)
        self._threads = max(1, default_writer_threads() if threads is None else int(threads))

    @classmethod
    def create(
        cls,
        path: Path,
        layout: StoreLayout,
        paths: list[str],
        attrs: dict[str, Any],
        pca: tuple[np.ndarray, np.ndarray] | None,
        threads: int | None = None,
    ) -> _H5Writer:

        parts = parts_dir(path)
        parts.mkdir(parents=True)
        if pca is not None:
            np.save(parts / "pca_components.npy", np.asarray(pca[0], dtype=np.float32), allow_pickle=False)
            np.save(parts / "pca_mean.npy", np.asarray(pca[1], dtype=np.float32), allow_pickle=False)
        manifest = {"attrs": attrs, "paths": paths}
        atomic_write_bytes(parts / _MANIFEST, json.dumps(manifest).encode())  # last: marks a complete creation
        return cls(path, layout, attrs, threads)

    @classmethod
    def open(cls, path: Path, threads: int | None = None) -> _H5Writer:
        parts = parts_dir(path)
        if path.exists():  # finished (a kill may have come between the final rename and the cleanup)
            with open_store(path) as store:
                attrs = store.attrs
            if attrs.get("format") != STORE_FORMAT:
                raise VitupError(f"{path}: not a vitup store; use --overwrite to replace it")
            return cls(path, StoreLayout.from_json(attrs["layout"]), attrs, threads)
        manifest = parts / _MANIFEST
        if not manifest.is_file():
            raise VitupError(f"{parts}: an HDF5 store whose creation was interrupted; use --overwrite to start over")
        attrs = json.loads(manifest.read_text())["attrs"]
        return cls(path, StoreLayout.from_json(attrs["layout"]), attrs, threads)

    def recover(self) -> None:
        if self.finished and self._parts.is_dir():  # a kill came between the final rename and the cleanup
            shutil.rmtree(self._parts)
        if self._parts.is_dir():
            for leftover in self._parts.glob(".*.tmp"):  # parts being written when a kill came
                leftover.unlink(missing_ok=True)
            for part in self._parts.glob("shard-*.h5"):
                if not _h5_readable(part):
                    part.unlink()
        self.path.with_name(f".{self.path.name}.tmp").unlink(missing_ok=True)  # an interrupted join

    @property
    def finished(self) -> bool:
        return self.path.exists()

    def _part(self, shard: int) -> Path:
        return self._parts / f"shard-{shard:08d}.h5"

    def _manifest(self) -> dict[str, Any]:
        return json.loads((self._parts / _MANIFEST).read_text())

    def _read_rows(self, name: str, fill: Any, dtype: Any) -> np.ndarray:
        import h5py

        if self.finished:
            with h5py.File(self.path, "r") as h5:
                return np.asarray(h5[name][...])
        out = np.full(self.layout.n, fill, dtype=dtype)
        for k in range(self.layout.num_shards):
            part = self._part(k)
            if part.is_file():
                a, b = self.layout.shard_rows(k)
                try:
                    with h5py.File(part, "r") as h5:
                        out[a:b] = h5[name][...]
                except (OSError, KeyError):  # e.g. emptied by a power loss before it reached the disk
                    continue
        return out

    def status(self) -> np.ndarray:
        return self._read_rows("status", 0, np.uint8).astype(np.uint8)

    def errors(self) -> list[str]:
        return [_as_str(e) for e in self._read_rows("error", "", object).tolist()]

    def paths(self) -> list[str]:
        if self.finished:
            with open_store(self.path) as store:
                return store.paths
        return list(self._manifest()["paths"])

    def pca(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.finished:
            with open_store(self.path) as store:
                return store.pca
        if not (self._parts / "pca_components.npy").is_file():
            return None
        load = lambda name: np.load(self._parts / name, allow_pickle=False)
        return load("pca_components.npy"), load("pca_mean.npy")

    def _compressed_chunks(self, feats: np.ndarray, status: np.ndarray) -> list[tuple[tuple[int, ...], bytes]]:
        cy, cx = self.layout.chunk_hw
        jobs = [(i, y, x) for i in range(len(feats)) if status[i] == DONE for (y, x) in _h5_chunk_offsets(self.layout)]
        encode = lambda job: _h5_chunk_bytes(_h5_padded_chunk(feats[job[0]], job[1], job[2], cy, cx))
        with ThreadPoolExecutor(self._threads) as pool:  # zlib releases the GIL
            blobs = list(pool.map(encode, jobs))
        return [((i, 0, y, x), blob) for (i, y, x), blob in zip(jobs, blobs, strict=True)]

    def _write_shard(self, shard: int, rows: dict[str, Any]) -> None:
        import h5py

        if self.finished:
            raise VitupError(f"{self.path} is finished; there is nothing left to write")
        final = self._part(shard)
        tmp = final.with_name(f".{final.name}.tmp")
        n = len(rows["status"])
        chunks = self._compressed_chunks(rows["features"], rows["status"])
        with h5py.File(tmp, "w") as h5:
            _h5_create_arrays(h5, self.layout, n, with_path=False)
            dset = h5["features"].id
            for offset, blob in chunks:
                dset.write_direct_chunk(offset, blob, 0)
            if "lowres" in rows:
                ok = rows["status"] == DONE
                for i in np.flatnonzero(ok):
                    h5["lowres"][i] = rows["lowres"][i]
            if "global" in rows:
                h5["global"][...] = rows["global"]
            h5["size"][...] = rows["size"]
            h5["valid"][...] = rows["valid"]
            h5["error"][...] = rows["error"]
            h5["status"][...] = rows["status"]
        os.replace(tmp, final)  # atomic: a part is complete or absent (unreadable ones count as absent)

    def finalize(self, attrs: dict[str, Any] | None = None) -> Path:
        """Join the shards into ``STORE`` (compressed chunks copied as they are), then drop the parts."""
        import h5py

        if attrs:
            self.attrs.update(attrs)
        if self.finished:  # nothing was left to write; an HDF5 file is never reopened for writing
            return self.path
        lay = self.layout
        missing = [k for k in range(lay.num_shards) if not self._part(k).is_file()]
        if missing:
            raise VitupError(f"{self.path}: shards {missing[:5]} are not written yet; finish with --resume")
        manifest = self._manifest()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.unlink(missing_ok=True)
        with h5py.File(tmp, "w") as out:
            _h5_create_arrays(out, lay, lay.n, with_path=True)
            out["path"][...] = np.array(manifest["paths"], dtype=object)
            pca = self.pca()
            if pca is not None:
                out.create_dataset("pca_components", data=pca[0])
                out.create_dataset("pca_mean", data=pca[1])
            small_names = ("status", "size", "valid", "error", *(("global",) if lay.global_dim else ()))
            small = {name: np.asarray(out[name][...]) for name in small_names}
            names = ["features", *(["lowres"] if lay.lowres else [])]
            for k in range(lay.num_shards):
                a, b = lay.shard_rows(k)
                with h5py.File(self._part(k), "r") as part:
                    status = np.asarray(part["status"][...])
                    for name in small:
                        small[name][a:b] = part[name][...]
                    for name in names:
                        src, dst = part[name].id, out[name].id
                        for i in np.flatnonzero(status == DONE):
                            for offset in _chunk_grid(part[name].chunks, part[name].shape[1:]):
                                mask, blob = src.read_direct_chunk((int(i), *offset))
                                dst.write_direct_chunk((a + int(i), *offset), blob, mask)
            for name, values in small.items():
                out[name][...] = values
            _h5_label(out, lay)
            out.attrs.update(_h5_attrs_encode(self.attrs))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        shutil.rmtree(self._parts)
        return self.path


def _h5_readable(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return "status" in h5
    except OSError:
        return False


def _chunk_grid(chunks: tuple[int, ...], shape: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """Offsets of every chunk of one row: ``chunks`` ``(1, c, cy, cx)`` over a row of ``shape`` ``(c, H, W)``."""
    import itertools

    axes = [range(0, size, step) for size, step in zip(shape, chunks[1:], strict=True)]
    yield from itertools.product(*axes)


def disk_usage(path: str | Path) -> int | None:
    """Bytes a store occupies on disk now (its parts included); None for a URL (it would list every object)."""
    if is_remote(path):
        return None
    total = 0
    for p in (Path(path), parts_dir(path)):
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total
