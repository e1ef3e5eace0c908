"""Robust image discovery and decoding, shared by extract, train, probe and visualize.

Inputs are a folder (recursive, sorted, stable order), a file list (``@list.txt``: one path a line,
relative to the list's folder, ``#`` comments), or a single image. Every Pillow format is read; EXIF
orientation applied; any mode converted to RGB; the first frame of animations. Unreadable files raise
``ImageLoadError`` with a reason, so batch jobs can skip and report them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

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
    """The images of one input: ``files`` in a stable order, each relative to ``root`` when possible."""

    root: Path
    files: list[Path]

    def relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(source: str | Path) -> ImageList:
    """Images under a folder (recursive, sorted), from ``@list.txt``, or one file.

    Non-image extensions are ignored in folders. Broken symlinks are kept (they are reported when
    loaded). Raises ``VitupError`` for a missing path or an input with no images.
    """
    text = str(source)
    if text.startswith("@"):
        listing = Path(text[1:])
        if not listing.is_file():
            raise VitupError(f"file list {listing} does not exist: pass @PATH to a text file of image paths")
        root = listing.parent
        files = []
        for line in listing.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                path = Path(line)
                files.append(path if path.is_absolute() else root / path)
        if not files:
            raise VitupError(f"file list {listing} names no images")
        return ImageList(root=root, files=files)
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


def load_image(path: str | Path) -> Image.Image:
    """Decode one image to RGB (EXIF orientation applied, first frame). Raises ``ImageLoadError``."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ImageLoadError(path, "broken symbolic link")
    if not path.exists():
        raise ImageLoadError(path, "file does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise ImageLoadError(path, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
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
