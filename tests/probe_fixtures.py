"""Tiny generated datasets in each layout `vitup probe` reads, with classes separable by colour/texture.

Every scene is split into a few axis-aligned regions; each region's class decides its colour and texture
(stripes of a class-specific period), and a thin band of ignore pixels (255) runs along one boundary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vitup_cli.probe.report import label_palette

# base colours per training id (well apart, so a linear probe on random ViT features separates them)
COLOURS = np.array(
    [[220, 40, 40], [40, 200, 60], [40, 60, 220], [230, 220, 50], [200, 60, 210], [40, 210, 220]], dtype=np.float32
)


def scene(rng: np.random.Generator, h: int, w: int, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """An ``(h, w, 3)`` uint8 image and its ``(h, w)`` uint8 training-id map (255 = ignore)."""
    ids = np.zeros((h, w), dtype=np.uint8)
    cut_x = int(rng.integers(w // 3, 2 * w // 3))
    cut_y = int(rng.integers(h // 3, 2 * h // 3))
    picks = rng.choice(len(classes), size=3, replace=len(classes) < 3)
    a, b, c = (classes[int(p)] for p in picks)
    ids[:, :cut_x] = a
    ids[:cut_y, cut_x:] = b
    ids[cut_y:, cut_x:] = c
    img = np.zeros((h, w, 3), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for k in np.unique(ids):
        m = ids == k
        stripes = ((xx + yy) // (2 + int(k) % 3) % 2).astype(np.float32) * 25
        img[m] = COLOURS[int(k) % len(COLOURS)] + stripes[m, None]
    img += rng.normal(0, 8, img.shape)
    ids[:, max(cut_x - 1, 0) : cut_x + 1] = 255  # an ignore band along one boundary
    return np.clip(img, 0, 255).astype(np.uint8), ids


def _encode(ids: np.ndarray, table: dict[int, int]) -> np.ndarray:
    """Training ids -> raw label values of a layout (``table``: train id -> raw; 255 -> ``table[255]``)."""
    out = np.zeros_like(ids)
    for train_id, raw in table.items():
        out[ids == train_id] = raw
    return out


def _scenes(n: int, seed: int, h: int, w: int, classes: list[int]):
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield i, *scene(rng, h, w, classes)


def make_voc(root: Path, n_train: int = 6, n_val: int = 4, h: int = 40, w: int = 56) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True, exist_ok=True)
    pal = label_palette().reshape(-1).tolist()
    for split, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        names = []
        for i, img, ids in _scenes(n, seed, h, w, [0, 1, 2, 3]):
            name = f"2007_{split}{i:04d}"
            Image.fromarray(img).save(base / "JPEGImages" / f"{name}.jpg", quality=95)
            lab = Image.fromarray(ids, mode="P")
            lab.putpalette(pal)
            lab.save(base / "SegmentationClass" / f"{name}.png")
            names.append(name)
        (base / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def make_ade20k(root: Path, n_train: int = 6, n_val: int = 4, h: int = 40, w: int = 56) -> Path:
    base = root / "ADEChallengeData2016"
    for split, sub, n, seed in (("train", "training", n_train, 0), ("val", "validation", n_val, 1)):
        (base / "images" / sub).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / sub).mkdir(parents=True, exist_ok=True)
        for i, img, ids in _scenes(n, seed, h, w, [0, 1, 2, 3]):
            name = f"ADE_{split}_{i:08d}"
            Image.fromarray(img).save(base / "images" / sub / f"{name}.jpg", quality=95)
            ids = np.where(ids == 255, 0, ids)  # ADE20K has no ignore value: 0 is "other"
            Image.fromarray(ids, mode="L").save(base / "annotations" / sub / f"{name}.png")
    return root


#: train id -> Cityscapes labelId (road 7, building 11, vegetation 21, sky 23; ignore -> 0 "unlabeled")
CITYSCAPES_RAW = {0: 7, 2: 11, 8: 21, 10: 23, 255: 0}


def make_cityscapes(
    root: Path, n_train: int = 6, n_val: int = 4, h: int = 40, w: int = 56, train_ids: bool = False
) -> Path:
    for split, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        for i, img, ids in _scenes(n, seed, h, w, [0, 2, 8, 10]):
            city = "aachen" if i % 2 == 0 else "bremen"
            stem = f"{city}_{i:06d}_000019"
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            gt = root / "gtFine" / split / city
            Image.fromarray(_encode(ids, CITYSCAPES_RAW), mode="L").save(gt / f"{stem}_gtFine_labelIds.png")
            if train_ids:
                Image.fromarray(ids, mode="L").save(gt / f"{stem}_gtFine_labelTrainIds.png")
    return root


#: coarse train id -> a stuffthingmaps value (person 0 -> 9, wall-brick 170 -> 18, sky-other 156 -> 23,
#: road 148 -> 21; unlabeled 255)
COCO_RAW = {9: 0, 18: 170, 23: 156, 21: 148, 255: 255}


def make_cocostuff(root: Path, n_train: int = 6, n_val: int = 4, h: int = 40, w: int = 56) -> Path:
    for split, n, seed in (("train2017", n_train, 0), ("val2017", n_val, 1)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i, img, ids in _scenes(n, seed, h, w, [9, 18, 23, 21]):
            name = f"{(1 if split == 'val2017' else 0) * 500000 + i:012d}"
            Image.fromarray(img).save(root / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(_encode(ids, COCO_RAW), mode="L").save(root / "annotations" / split / f"{name}.png")
    return root


def make_folder(
    root: Path,
    n_train: int = 8,
    n_val: int = 4,
    h: int = 40,
    w: int = 56,
    task: str = "seg",
    classes: int = 3,
    depth_format: str = "png",
) -> Path:
    """``ROOT/{train,val}/images`` + ``labels`` (seg) or ``depth`` (16-bit PNG in mm, or .npy in m)."""
    for split, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        img_dir = root / split / "images"
        tgt_dir = root / split / ("depth" if task == "depth" else "labels")
        img_dir.mkdir(parents=True, exist_ok=True)
        tgt_dir.mkdir(parents=True, exist_ok=True)
        for i, img, ids in _scenes(n, seed, h, w, list(range(classes))):
            name = f"scene_{i:03d}"
            Image.fromarray(img).save(img_dir / f"{name}.png")
            if task == "depth":
                # depth from the region's class (near/mid/far) plus a gentle vertical ramp; 0 = invalid
                cls = np.where(ids == 255, 0, ids).astype(np.float32)
                metres = 1.0 + 2.5 * cls + np.linspace(0, 0.5, h, dtype=np.float32)[:, None]
                metres[ids == 255] = 0
                if depth_format == "npy":
                    np.save(tgt_dir / f"{name}.npy", metres.astype(np.float32))
                else:
                    Image.fromarray((metres * 1000).round().astype(np.uint16)).save(tgt_dir / f"{name}.png")
            else:
                Image.fromarray(ids, mode="L").save(tgt_dir / f"{name}.png")
    return root


def make_nyu(root, scenes=(("kitchen_0001", 3), ("bathroom_0002", 2)), test=(("office_0003", 2),)):
    """BTS's ``official_splits/{train,test}/SCENE/rgb_N.jpg`` + ``sync_depth_N.png`` (16-bit millimetres)."""
    rng = np.random.default_rng(0)
    for split, listing in (("train", scenes), ("test", test)):
        for room, n in listing:
            folder = root / "nyu_depth_v2" / "official_splits" / split / room
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(folder / f"rgb_{i:05d}.jpg")
                mm = np.full((24, 32), 1000 * (i + 1), dtype=np.uint16)
                mm[0, 0] = 0  # invalid
                Image.fromarray(mm).save(folder / f"sync_depth_{i:05d}.png")
    return root
