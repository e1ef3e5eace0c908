"""A tiny SPair-71k layout made from the real photos in examples/images, with known correspondences.

Categories (all in the ``test`` split; one ``val`` pair too):

- ``cat``: targets are crops of the same photo shifted by whole 16-pixel cells (96x64 images: padded to a
  96x96 square, a 6x6 token grid at input 96, no resize), keypoints at cell centres. A per-token backbone's
  ``lowres`` features match exactly, so PCK is 1.0 at every alpha.
- ``bird``: a portrait image paired with itself (80x112, padded to 112 and resized to 96), keypoints at the image
  pixels the cell centres map back to: identical features give PCK 1.0 too.
- ``dog``: a mirrored and a half-size copy of a photo (keypoints transformed accordingly): PCK is whatever
  the features give, used to check the scoring against a hand computation.

JPEGs are written with 4:4:4 chroma so that shifts by whole 16-pixel cells decode to identical blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
CELL = 16


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95, subsampling=0)


def _anno(root: Path, cat: str, name: str, img: Image.Image, kps: dict[str, list[float] | None], box=None) -> None:
    data = {
        "filename": f"{name}.jpg", "src_database": "vitup-test", "image_width": img.width,
        "image_height": img.height, "image_depth": 3, "category": cat, "pose": "Unspecified", "truncated": 0,
        "occluded": 0, "difficult": 0, "bndbox": box or [0, 0, img.width, img.height], "kps": kps,
        "azimuth_id": 0,
    }  # fmt: skip
    path = root / "ImageAnnotation" / cat / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _pair(root: Path, split: str, pid: int, src: str, trg: str, cat: str) -> None:
    path = root / "PairAnnotation" / split / f"{pid:06d}-{src}-{trg}:{cat}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"filename": path.stem, "src_imname": f"{src}.jpg", "trg_imname": f"{trg}.jpg",
                                "category": cat, "mirror": 0}))  # fmt: skip


def _cell_centres(rows: range, cols: range, py: int = 0) -> list[tuple[int, int]]:
    return [(CELL * j + CELL // 2, CELL * i + CELL // 2 - py) for i in rows for j in cols]


def make_spair(root: Path) -> Path:
    """Write the layout under ``root / 'SPair-71k'``; returns that folder."""
    base = root / "SPair-71k"
    (base / "Layout").mkdir(parents=True, exist_ok=True)
    chelsea = Image.open(EXAMPLES / "chelsea.jpg").convert("RGB")
    # cat: horizontal and vertical shifts by one cell; canvas 96x96 (16 px of padding top and bottom)
    shifts = [
        ("2008_000001", "2008_000002", (120, 60), (CELL, 0)),
        ("2008_000003", "2008_000004", (200, 100), (0, CELL)),
    ]
    for pid, (src, trg, (x0, y0), (dx, dy)) in enumerate(shifts):
        a = chelsea.crop((x0, y0, x0 + 96, y0 + 64))
        b = chelsea.crop((x0 + dx, y0 + dy, x0 + dx + 96, y0 + dy + 64))
        # target pixel (u, v) shows source pixel (u + dx, v + dy)
        pts = _cell_centres(range(1, 5), range(0, 6), py=CELL)
        kps_a = {str(k): [x, y] for k, (x, y) in enumerate(pts)}
        kps_b = {str(k): ([x - dx, y - dy] if x - dx >= 0 and y - dy >= 0 else None) for k, (x, y) in enumerate(pts)}
        _save(a, base / "JPEGImages" / "cat" / f"{src}.jpg")
        _save(b, base / "JPEGImages" / "cat" / f"{trg}.jpg")
        _anno(base, "cat", src, a, kps_a)
        _anno(base, "cat", trg, b, kps_b, box=[10, 5, 90, 60])
        _pair(base, "test", pid + 1, src, trg, "cat")
    # bird: a portrait image paired with itself; keypoints where cell centres map back (side 112, 6 cells, px 16)
    rocket = Image.open(EXAMPLES / "rocket.jpg").convert("RGB").resize((80, 112), Image.Resampling.BILINEAR)
    _save(rocket, base / "JPEGImages" / "bird" / "2009_000001.jpg")
    pts = [(int((j + 0.5) * 112 / 6) - 16, int((i + 0.5) * 112 / 6)) for j in (1, 2, 4) for i in (0, 2, 3, 5)]
    _anno(base, "bird", "2009_000001", rocket, {str(k): list(p) for k, p in enumerate(pts)})
    _pair(base, "test", 3, "2009_000001", "2009_000001", "bird")
    # dog: a mirror image and a half-size copy
    coffee = Image.open(EXAMPLES / "coffee.jpg").convert("RGB").resize((120, 80), Image.Resampling.BILINEAR)
    rng = np.random.default_rng(0)
    pts = [(float(x), float(y)) for x, y in zip(rng.integers(8, 112, 6), rng.integers(8, 72, 6), strict=True)]
    mirror = coffee.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    half = coffee.resize((60, 40), Image.Resampling.BILINEAR)
    _save(coffee, base / "JPEGImages" / "dog" / "2010_000001.jpg")
    _save(mirror, base / "JPEGImages" / "dog" / "2010_000002.jpg")
    _save(half, base / "JPEGImages" / "dog" / "2010_000003.jpg")
    _anno(base, "dog", "2010_000001", coffee, {str(k): list(p) for k, p in enumerate(pts)}, box=[4, 4, 116, 76])
    _anno(base, "dog", "2010_000002", mirror, {str(k): [119 - x, y] for k, (x, y) in enumerate(pts)})
    _anno(
        base, "dog", "2010_000003", half, {str(k): [x / 2, y / 2] for k, (x, y) in enumerate(pts)}, box=[2, 2, 58, 38]
    )
    _pair(base, "test", 4, "2010_000001", "2010_000002", "dog")
    _pair(base, "test", 5, "2010_000001", "2010_000003", "dog")
    _pair(base, "val", 6, "2010_000002", "2010_000001", "dog")
    return base


def make_keypoints(root: Path) -> Path:
    """A ``pairs.json`` folder: the cat shift pair of ``make_spair`` in the user layout (one box left out)."""
    chelsea = Image.open(EXAMPLES / "chelsea.jpg").convert("RGB")
    (root / "images").mkdir(parents=True, exist_ok=True)
    a = chelsea.crop((120, 60, 216, 124))
    b = chelsea.crop((136, 60, 232, 124))
    a.save(root / "images" / "a.png")
    b.save(root / "images" / "b.png")
    pts = _cell_centres(range(1, 5), range(1, 6), py=CELL)
    pairs = [
        {"source": "images/a.png", "target": "images/b.png", "source_keypoints": [list(p) for p in pts],
         "target_keypoints": [[x - CELL, y] for x, y in pts], "target_bbox": [0, 0, 96, 64], "category": "shift"},
        {"source": "images/a.png", "target": "images/a.png", "source_keypoints": [list(p) for p in pts] + [None],
         "target_keypoints": [list(p) for p in pts] + [[1, 1]], "category": "same"},
    ]  # fmt: skip
    (root / "pairs.json").write_text(json.dumps({"pairs": pairs}))
    return root
