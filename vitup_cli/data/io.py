"""Local paths and fsspec URLs alike: what every reader of images, lists and shards opens files with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec

from vitup_cli.errors import VitupError


def is_url(path: Any) -> bool:
    """An fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``...); ``file://`` counts as local."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def open_binary(path: str | Path, storage_options: dict[str, Any] | None = None) -> Any:
    """A binary file object for a local path or an fsspec URL."""
    if is_url(path):
        try:
            return fsspec.open(str(path), "rb", **(storage_options or {})).open()
        except ImportError as exc:
            raise VitupError(f"{path}: cannot read this URL ({exc})") from None
    return open(str(path).removeprefix("file://"), "rb")
