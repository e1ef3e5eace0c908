"""Robust image discovery and decoding, shared by extract, train, probe and visualize.

Inputs are a folder (recursive, sorted, stable order), a file list (``@list.txt``: one path a line,
relative to the list's folder, ``#`` comments; the list and its lines may be fsspec URLs such as
``s3://bucket/key.jpg``, read through fsspec), a single image, or tar shards (``shards/{000..099}.tar``, the
webdataset layout, local or remote: see ``vitup_cli.data.shards``). Every Pillow format is read; EXIF
orientation applied; any mode converted to RGB; the first frame of animations. Unreadable files raise
``ImageLoadError`` with a reason, so batch jobs can skip and report them.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vitup_cli.data.io import is_url, open_binary
from vitup_cli.data.shards import BrokenShard, TarMember, expand_braces, is_shard_input, list_shard, read_member
from vitup_cli.errors import VitupError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff",
        ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".sgi", ".pcx",
        ".dds", ".eps", ".psd", ".avif", ".heic", ".qoi",
    }
)  # fmt: skip


class ImageLoadError(Exception):
    """One file could not be read; ``reason`` says why in a few words."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class ImageList:
    """The images of one input: ``files`` in a stable order, each relative to ``root`` when possible.

    ``files`` holds ``Path``s, URL strings (``@list.txt`` lines) or tar members (``TarMember``/``BrokenShard``).
    """

    root: Path | str
    files: list[Any]

    def relative(self, path: Any) -> str:

        if isinstance(path, (TarMember, BrokenShard)):
            return path.name
        if is_url(path) or is_url(self.root):
            text, root = str(path), str(self.root).rstrip("/") + "/"
            return text[len(root) :] if text.startswith(root) else text
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return Path(path).as_posix()


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _read_list(listing: str, storage_options: dict[str, Any] | None) -> tuple[str, str | Path]:
    if is_url(listing):
        try:
            with open_binary(listing, storage_options) as fh:
                return fh.read().decode("utf-8"), listing.rsplit("/", 1)[0]
        except FileNotFoundError:
            raise VitupError(f"file list {listing} does not exist: pass @URL of a text file of image paths") from None
    path = Path(listing)
    if not path.is_file():
        raise VitupError(f"file list {listing} does not exist: pass @PATH to a text file of image paths")
    return path.read_text(encoding="utf-8"), path.parent


def _list_shards(pattern: str, storage_options: dict[str, Any] | None) -> ImageList:

    shards = expand_braces(pattern)
    head = pattern.split("{", 1)[0]
    root = head.rsplit("/", 1)[0] if "/" in head else ""
    files: list[Any] = []
    for shard in shards:
        label = shard[len(root) + 1 :] if root and shard.startswith(root + "/") else shard
        files.extend(list_shard(shard, label, IMAGE_EXTENSIONS, storage_options))
    if not files:
        raise VitupError(f"{pattern}: the tar shards hold no images (members named KEY.jpg, KEY.png, ...)")
    return ImageList(root=root if is_url(root) else Path(root or "."), files=files)


def list_images(source: str | Path, storage_options: dict[str, Any] | None = None) -> ImageList:
    """Images under a folder (recursive, sorted), from ``@list.txt`` (lines may be URLs), tar shards
    (``shards/{000..099}.tar``), or one file.

    Non-image extensions are ignored in folders. Broken symlinks are kept (they are reported when
    loaded). Raises ``VitupError`` for a missing path or an input with no images.
    """

    text = str(source)
    if text.startswith("@"):
        body, root = _read_list(text[1:], storage_options)
        files: list[Any] = []
        for line in body.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                if is_url(line):
                    files.append(line)
                elif is_url(root):
                    files.append(line if line.startswith("/") else f"{root}/{line}")
                else:
                    path = Path(line)
                    files.append(path if path.is_absolute() else Path(root) / path)
        if not files:
            raise VitupError(f"file list {text[1:]} names no images")
        return ImageList(root=root, files=files)
    if is_shard_input(text):
        return _list_shards(text, storage_options)
    path = Path(source)
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if _is_image_name(p) and (p.is_file() or p.is_symlink())),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise VitupError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...)")
        return ImageList(root=path, files=files)
    if path.is_file():
        return ImageList(root=path.parent, files=[path])
    if path.is_symlink():
        raise VitupError(f"{path}: broken symbolic link (its target does not exist)")
    raise VitupError(f"{path}: no such file or folder")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        # 16-bit / int / float grayscale: scale the full range to 8 bits instead of clipping
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    if img.mode in {"RGBA", "LA", "PA"} or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _remote_bytes(source: Any, storage_options: dict[str, Any] | None) -> bytes:
    """The bytes of a URL or a tar member, or ``ImageLoadError`` with the reason."""

    if isinstance(source, BrokenShard):
        raise ImageLoadError(source.shard, source.reason)
    try:
        if isinstance(source, TarMember):
            return read_member(source, storage_options)
        with open_binary(source, storage_options) as fh:
            return fh.read()
    except FileNotFoundError:
        raise ImageLoadError(source, "file does not exist") from None
    except VitupError as exc:
        raise ImageLoadError(source, str(exc)) from None
    except Exception as exc:  # network, permissions, a shard that ends early
        raise ImageLoadError(source, f"cannot be read ({type(exc).__name__}: {exc})") from None


def load_image(path: Any, storage_options: dict[str, Any] | None = None) -> Image.Image:
    """Decode one image to RGB (EXIF orientation applied, first frame). Raises ``ImageLoadError``.

    ``path``: a local path, an fsspec URL (read with ``storage_options``) or a tar member.
    """

    source: Any
    if is_url(path) or isinstance(path, (TarMember, BrokenShard)):
        data = _remote_bytes(path, storage_options)
        if not data:
            raise ImageLoadError(path, "empty file")
        source = io.BytesIO(data)
    else:
        path = Path(path)
        if path.is_symlink() and not path.exists():
            raise ImageLoadError(path, "broken symbolic link")
        if not path.exists():
            raise ImageLoadError(path, "file does not exist")
        if path.is_file() and path.stat().st_size == 0:
            raise ImageLoadError(path, "empty file")
        source = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img) or img
                return _to_rgb(img).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageLoadError(path, f"over Pillow's pixel limit ({Image.MAX_IMAGE_PIXELS} pixels)") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image Pillow can read") from None
    except OSError as exc:
        raise ImageLoadError(path, f"unreadable or truncated ({exc})") from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise ImageLoadError(path, f"corrupt image ({exc})") from None


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> ``(3, H, W)`` float32 in ``[0, 1]``."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)
