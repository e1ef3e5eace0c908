"""Images with class-agnostic masks (what LoftUp's training needs), in two layouts.

``sa1b``: SA-1B as distributed: ``sa_N.jpg`` beside ``sa_N.json`` (anywhere under the root), the JSON's
``annotations[i].segmentation`` a COCO RLE (``{"size": [h, w], "counts": "..."}``, compressed string or
a list of run lengths). Decoded by this module's own exact decoder (no pycocotools needed).

``folder``: ``ROOT/images/**`` (any Pillow format) and, for an image ``images/a/b.jpg``, its masks in the
first of: ``masks/a/b.json`` (SA-1B-style ``{"annotations": [{"segmentation": RLE}, ...]}`` or a plain list
of RLEs), ``masks/a/b.png`` (an id map: every non-zero value is one mask, in increasing order; 8 or 16
bit), ``masks/a/b/*.png`` (one binary mask per file, sorted by name). Images without masks are skipped and
counted; a folder where no image has masks is one clear error.

Masks are kept in file order and cut at ``max_masks`` (150: the released LoftUp code takes the first 150).
Every item is resized so its short side is ``size`` and centre-cropped to ``size x size`` (images
bicubic, masks nearest), as the reference's ``Resize + CenterCrop``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitup_cli.data.images import ImageLoadError, load_image, to_tensor
from vitup_cli.errors import VitupError

LAYOUTS = ("auto", "sa1b", "folder")
MAX_MASKS = 150
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


# -- COCO run-length encoding -----------------------------------------------------------------------
def _counts_from_string(text: str) -> list[int]:
    """COCO's compressed counts (6-bit chars, 5 payload bits, continuation 0x20, sign 0x10, delta from m-2)."""
    counts: list[int] = []
    p, n = 0, len(text)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("truncated RLE string")
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _counts_to_string(counts: list[int]) -> str:
    out = []
    for i, value in enumerate(counts):
        x = value - counts[i - 2] if i > 2 else value
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """A COCO RLE (``size`` ``[h, w]``, ``counts`` string or list; column-major runs starting with 0s)
    -> ``(h, w)`` bool."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = _counts_from_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    runs_arr = np.asarray(runs, dtype=np.int64)
    if (runs_arr < 0).any() or runs_arr.sum() != h * w:
        raise ValueError(f"RLE runs sum to {int(runs_arr.sum())}, not {h}x{w}")
    values = np.arange(len(runs_arr)) % 2 == 1
    flat = np.repeat(values, runs_arr)
    return flat.reshape(w, h).T


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """``(h, w)`` bool -> a compressed COCO RLE ``{"size": [h, w], "counts": str}`` (what SA-1B stores)."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"size": [int(h), int(w)], "counts": _counts_to_string([int(r) for r in runs])}


# -- geometry -----------------------------------------------------------------------------------------
def _resize_short(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)``'s output (w, h): the short side to ``size``, the long side truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _centre_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    left = round((width - size) / 2.0)
    top = round((height - size) / 2.0)
    return left, top, left + size, top + size


def resize_crop(image: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Short side to ``size`` then centre crop ``size x size``."""
    w, h = _resize_short(image.width, image.height, size)
    return image.resize((w, h), resample).crop(_centre_box(w, h, size))


def _mask_to_size(mask: np.ndarray, size: int) -> np.ndarray:
    pil = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(resize_crop(pil, size, Image.NEAREST)) > 127


# -- the datasets -------------------------------------------------------------------------------------
@dataclass
class MaskedImages(torch.utils.data.Dataset):
    """Images and their mask files; ``item(i)`` -> image ``(3, S, S)`` in ``[0, 1]`` and masks ``(M, S, S)``.

    ``__getitem__`` returns ``{"image", "masks" (max_masks, S, S) int8 padded with -1, "count", "index"}``
    so the default collate stacks a batch.
    """

    root: Path
    layout: str
    images: list[Path]
    sources: list[Path]  # per image: a JSON, an id-map PNG, or a folder of PNGs
    size: int = 224
    max_masks: int = MAX_MASKS
    skipped: list[str] = field(default_factory=list)  # images without masks (folder layout)

    def __len__(self) -> int:
        return len(self.images)

    def load_masks(self, i: int) -> list[np.ndarray]:
        """Image ``i``'s masks at full resolution, in file order, at most ``max_masks``."""
        src = self.sources[i]
        try:
            if src.is_dir():
                files = sorted(p for p in src.iterdir() if p.suffix.lower() == ".png")[: self.max_masks]
                return [np.asarray(Image.open(p).convert("L")) > 0 for p in files]
            if src.suffix.lower() == ".png":
                ids = np.asarray(Image.open(src))
                if ids.ndim != 2:
                    raise ValueError("an id-map PNG must have one channel (8 or 16 bit)")
                values = [int(v) for v in np.unique(ids) if v != 0][: self.max_masks]
                return [ids == v for v in values]
            data = json.loads(src.read_text())
            anns = data.get("annotations", []) if isinstance(data, dict) else data
            rles = [a["segmentation"] if isinstance(a, dict) and "segmentation" in a else a for a in anns]
            return [decode_rle(r) for r in rles[: self.max_masks]]
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise VitupError(f"{src}: cannot read the masks of {self.images[i]} ({exc})") from None

    def item(self, i: int, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``(3, S, S)`` in ``[0, 1]`` and its masks ``(M, S, S)`` bool at ``size`` (default ``self.size``)."""

        size = size or self.size
        try:
            pil = load_image(self.images[i])
        except ImageLoadError as exc:
            raise VitupError(f"{exc.path}: cannot read this image ({exc.reason})") from None
        masks = self.load_masks(i)
        for m in masks:
            if m.shape != (pil.height, pil.width):
                raise VitupError(
                    f"{self.sources[i]}: a mask is {m.shape[0]}x{m.shape[1]} but {self.images[i]} is "
                    f"{pil.height}x{pil.width}; masks must have their image's size"
                )
        image = to_tensor(resize_crop(pil, size))
        stack = np.stack([_mask_to_size(m, size) for m in masks]) if masks else np.zeros((0, size, size), bool)
        return image, torch.from_numpy(stack)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, masks = self.item(i)
        padded = torch.full((self.max_masks, *masks.shape[1:]), -1, dtype=torch.int8)
        padded[: masks.shape[0]] = masks.to(torch.int8)
        return {"image": image, "masks": padded, "count": masks.shape[0], "index": i}


def _sa1b(root: Path) -> tuple[list[Path], list[Path]]:
    images = sorted(p for p in root.rglob("sa_*.jpg") if p.with_suffix(".json").is_file())
    return images, [p.with_suffix(".json") for p in images]


def _folder(root: Path) -> tuple[list[Path], list[Path], list[str]]:
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir():
        raise VitupError(f"{root}: no images/ folder; the folder layout is ROOT/images/** with masks under ROOT/masks/")
    images, sources, skipped = [], [], []
    for p in sorted(q for q in img_dir.rglob("*") if q.suffix.lower() in _IMAGE_SUFFIXES and q.is_file()):
        stem = mask_dir / p.relative_to(img_dir).with_suffix("")
        found = next(
            (c for c in (stem.with_suffix(".json"), stem.with_suffix(".png"), stem) if c.exists()),
            None,
        )
        if found is None:
            skipped.append(str(p.relative_to(root)))
            continue
        images.append(p)
        sources.append(found)
    return images, sources, skipped


def open_masked_images(
    root: str | Path, layout: str = "auto", *, size: int = 224, max_masks: int = MAX_MASKS
) -> MaskedImages:
    """The images-with-masks dataset under ``root`` (see the module docstring for the layouts)."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise VitupError(f"--layout {layout}: use one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise VitupError(f"--data {root}: no such folder")
    if max_masks < 1:
        raise VitupError(f"--max-masks {max_masks}: must be at least 1")
    if layout == "auto":
        layout = "folder" if (root / "images").is_dir() else "sa1b"
    skipped: list[str] = []
    if layout == "sa1b":
        images, sources = _sa1b(root)
    else:
        images, sources, skipped = _folder(root)
    if not images:
        raise VitupError(
            f"--data {root}: no image with masks found ({layout} layout). LoftUp trains on class-agnostic masks: "
            "use SA-1B (sa_N.jpg + sa_N.json) or ROOT/images + ROOT/masks (per-image .json RLE, id-map .png or a "
            "folder of mask .png files)"
        )
    return MaskedImages(root, layout, images, sources, size=size, max_masks=max_masks, skipped=skipped)
