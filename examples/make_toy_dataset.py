"""Write a small segmentation dataset in vitup's ``folder`` layout, for trying ``vitup probe`` offline.

    python examples/make_toy_dataset.py out/toyseg --train 24 --val 8

Layout (what ``vitup probe folder --root out/toyseg`` reads)::

    out/toyseg/classes.txt                 one class name a line
    out/toyseg/{train,val}/images/NAME.jpg
    out/toyseg/{train,val}/labels/NAME.png  class index per pixel, 255 = ignore

Each scene is a smooth colour gradient ("background") with a brick patch, a gravel patch (textures from
``examples/images``), a red disc and a blue square at random places; a one-pixel band around every
object is marked 255 (ignored), as VOC marks its boundaries.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["background", "brick", "gravel", "red disc", "blue square"]
_HERE = Path(__file__).resolve().parent


def _texture(name: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    tex = np.asarray(Image.open(_HERE / "images" / name).convert("RGB"))
    y = int(rng.integers(0, tex.shape[0] - h))
    x = int(rng.integers(0, tex.shape[1] - w))
    return tex[y : y + h, x : x + w]


def make_scene(rng: np.random.Generator, size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """One ``(size, size, 3)`` uint8 image and its ``(size, size)`` uint8 label map."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    c0, c1 = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    image = (c0 * (1 - yy[..., None]) + c1 * xx[..., None]).clip(0, 255)
    label = np.zeros((size, size), np.uint8)
    boundary = np.zeros((size, size), bool)

    def place(mask: np.ndarray, pixels: np.ndarray | None, colour: np.ndarray | None, cls: int) -> None:
        nonlocal image
        if pixels is not None:
            image[mask] = pixels[mask]
        else:
            image[mask] = colour
        label[mask] = cls
        edge = mask ^ (np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
        boundary[edge] = True

    s = size // 3
    for cls, name in ((1, "brick.jpg"), (2, "gravel.jpg")):
        y, x = (int(v) for v in rng.integers(0, size - s, 2))
        mask = np.zeros((size, size), bool)
        mask[y : y + s, x : x + s] = True
        canvas = np.zeros((size, size, 3))
        canvas[y : y + s, x : x + s] = _texture(name, rng, s, s)
        place(mask, canvas, None, cls)
    cy, cx = rng.integers(s // 2, size - s // 2, 2)
    place(((yy * size - cy) ** 2 + (xx * size - cx) ** 2) < (s / 2) ** 2, None, np.array([210, 40, 40]), 3)
    y, x = (int(v) for v in rng.integers(0, size - s // 2, 2))
    square = np.zeros((size, size), bool)
    square[y : y + s // 2, x : x + s // 2] = True
    place(square, None, np.array([40, 60, 210]), 4)
    label[boundary] = 255
    noise = rng.normal(0, 6, image.shape)
    return (image + noise).clip(0, 255).astype(np.uint8), label


def make_dataset(root: Path, n_train: int = 24, n_val: int = 8, size: int = 160, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label = make_scene(rng, size)
            Image.fromarray(image).save(root / split / "images" / f"scene_{i:03d}.jpg", quality=92)
            Image.fromarray(label).save(root / split / "labels" / f"scene_{i:03d}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--train", type=int, default=24)
    parser.add_argument("--val", type=int, default=8)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_dataset(args.root, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.train} train + {args.val} val scenes, {len(CLASSES)} classes, to {args.root}")


if __name__ == "__main__":
    main()
