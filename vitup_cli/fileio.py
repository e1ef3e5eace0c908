"""Small file helpers every layer uses: atomic writes and JSON-safe values."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes | Sequence[bytes], *, fsync: bool = True) -> None:
    """Write ``data`` (or its parts, one after another) to ``path`` via a temporary file and ``os.replace``:
    readers, and a process killed at any moment, never see half a file.

    ``fsync=False`` skips flushing to the device before the rename (what zarr's own local store does): a
    killed process still leaves the old file or the whole new one, but a power cut may not. The file gets
    the usual permissions (``0666`` minus the umask), not ``mkstemp``'s private ``0600``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            for part in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                fh.write(part)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: mappings and sequences recursively (keys as ``str``), numpy scalars
    and arrays and torch tensors as Python numbers and lists, paths as ``str``, NaN and infinities as
    ``None``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
