"""Keypoint-pair datasets for the correspondence probe: SPair-71k's layout and a small JSON layout of your own.

Both readers give a ``PairSet``: image pairs with the keypoints visible in both images (source and target
in the same order), the target's box (the PCK threshold is ``alpha x max(box w, box h)``) and a category.

SPair-71k (``--root`` is the ``SPair-71k`` folder, or the folder holding it)::

    JPEGImages/<category>/<id>.jpg
    ImageAnnotation/<category>/<id>.json     kps {"0": [x, y] | null, ...}, bndbox [x1, y1, x2, y2], ...
    PairAnnotation/{trn,val,test}/<pair>-<src>-<trg>:<category>.json   src_imname, trg_imname, category, ...

As the ViT-Up reference does: the pairs of a category are its pair files in sorted order (the
``*:<category>.json`` glob), keypoints and boxes come from the two ImageAnnotation files, and only the
keypoint ids visible in both images count.

Your own pairs (``vitup probe keypoints --root DIR``): ``DIR/pairs.json``::

    {"pairs": [
        {"source": "images/a.jpg", "target": "images/b.jpg",     # relative to DIR (or absolute)
         "source_keypoints": [[x, y], ...],                       # pixels of the image as displayed
         "target_keypoints": [[x, y], ...],                       # same order; null = not visible
         "target_bbox": [x1, y1, x2, y2],                         # optional: else the whole target image
         "category": "mugs"}                                      # optional: "all"
    ]}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitup_cli.errors import VitupError

#: SPair-71k's 18 categories, in the reference's (alphabetical) order.
SPAIR_CATEGORIES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog", "horse",
    "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
)  # fmt: skip
#: ``--split`` -> the PairAnnotation folder.
SPAIR_SPLITS = {"test": "test", "val": "val", "trn": "trn", "train": "trn"}
KEYPOINTS_FILE = "pairs.json"


@dataclass(frozen=True)
class KeypointPair:
    """One pair: ``source_kps`` ``(K, 2)`` and ``target_kps`` ``(K, 2)`` float64 ``(x, y)`` pixels, row
    ``k`` of each the same point; ``target_bbox`` ``(x1, y1, x2, y2)`` or None (the whole target image)."""

    name: str
    category: str
    source: Path
    target: Path
    source_kps: np.ndarray
    target_kps: np.ndarray
    target_bbox: tuple[float, float, float, float] | None = None
    kp_ids: tuple[str, ...] = ()


@dataclass
class PairSet:
    """The pairs of one split, grouped by ``category`` in reading order, and the pairs left out."""

    name: str
    split: str
    root: Path
    pairs: list[KeypointPair]
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def categories(self) -> list[str]:
        """The categories present, in order of first appearance."""
        return list(dict.fromkeys(p.category for p in self.pairs))

    def in_category(self, category: str) -> list[KeypointPair]:
        return [p for p in self.pairs if p.category == category]

    @property
    def images(self) -> list[Path]:
        """Every image of the pairs once, sorted."""
        return sorted({p.source for p in self.pairs} | {p.target for p in self.pairs})


def _parse_categories(categories: Sequence[str] | None, known: Sequence[str] | None = None) -> list[str] | None:
    if not categories:
        return None
    names = [c.strip() for c in categories if c.strip()]
    if known is not None:
        unknown = [c for c in names if c not in known]
        if unknown:
            raise VitupError(f"--categories {unknown[0]}: not in this dataset; use some of {', '.join(known)}")
    return names


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise VitupError(f"--limit {limit}: must be at least 1")


# -- SPair-71k --------------------------------------------------------------------------------------
def _spair_base(root: Path) -> Path:
    for base in (root, root / "SPair-71k"):
        if (base / "PairAnnotation").is_dir():
            missing = [d for d in ("JPEGImages", "ImageAnnotation") if not (base / d).is_dir()]
            if missing:
                raise VitupError(
                    f"--root {root}: not a complete SPair-71k layout: {base} has PairAnnotation/ but no "
                    f"{'/, '.join(missing)}/"
                )
            return base
    raise VitupError(
        f"--root {root}: no SPair-71k layout found: expected JPEGImages/, ImageAnnotation/ and "
        f"PairAnnotation/{{trn,val,test}}/ under {root} or {root / 'SPair-71k'}"
    )


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _spair_image_anno(path: Path) -> tuple[dict[str, tuple[float, float]], tuple[float, float, float, float]]:
    data = _read_json(path)
    kps = {str(k): (float(v[0]), float(v[1])) for k, v in (data.get("kps") or {}).items() if v is not None}
    box = data["bndbox"]
    return kps, (float(box[0]), float(box[1]), float(box[2]), float(box[3]))


def open_spair(
    root: str | Path, split: str = "test", categories: Sequence[str] | None = None, limit: int | None = None
) -> PairSet:
    """The pairs of one SPair-71k split (see the module docstring); ``limit``: the first N of each category.

    Pairs whose files are missing or unreadable, or with no keypoint visible in both images, are left out
    and listed in ``skipped``.
    """
    root = Path(root).expanduser()
    _check_limit(limit)
    if split not in SPAIR_SPLITS:
        raise VitupError(f"--split {split}: use test, val or trn")
    base = _spair_base(root)
    folder = base / "PairAnnotation" / SPAIR_SPLITS[split]
    if not folder.is_dir():
        raise VitupError(f"--root {root}: {folder} is missing; --split {split} needs it")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise VitupError(f"--root {root}: no pair files (*.json) in {folder}")
    by_cat: dict[str, list[Path]] = {}
    for f in files:
        cat = f.stem.rsplit(":", 1)[-1] if ":" in f.stem else ""
        by_cat.setdefault(cat, []).append(f)
    present = [c for c in SPAIR_CATEGORIES if c in by_cat] + sorted(c for c in by_cat if c not in SPAIR_CATEGORIES)
    wanted = _parse_categories(categories, present) or present
    pairs: list[KeypointPair] = []
    skipped: list[dict[str, str]] = []
    annos: dict[Path, Any] = {}

    def anno(path: Path) -> Any:
        if path not in annos:
            annos[path] = _spair_image_anno(path)
        return annos[path]

    for cat in wanted:
        for f in by_cat[cat][:limit] if limit else by_cat[cat]:
            try:
                data = _read_json(f)
                category = str(data.get("category") or cat)
                names = (str(data["src_imname"]), str(data["trg_imname"]))
                images = [base / "JPEGImages" / category / n for n in names]
                (src_kps, _), (trg_kps, trg_box) = (
                    anno(base / "ImageAnnotation" / category / f"{Path(n).stem}.json") for n in names
                )
            except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
                skipped.append({"pair": str(f), "reason": f"unreadable annotation: {type(exc).__name__}: {exc}"})
                continue
            absent = [p for p in images if not p.is_file()]
            if absent:
                skipped.append({"pair": str(f), "reason": f"image missing: {absent[0]}"})
                continue
            ids = sorted(set(src_kps) & set(trg_kps), key=lambda k: (len(k), k))
            if not ids:
                skipped.append({"pair": str(f), "reason": "no keypoint visible in both images"})
                continue
            pairs.append(
                KeypointPair(
                    name=f.stem, category=category, source=images[0], target=images[1],
                    source_kps=np.array([src_kps[k] for k in ids], dtype=np.float64),
                    target_kps=np.array([trg_kps[k] for k in ids], dtype=np.float64),
                    target_bbox=trg_box, kp_ids=tuple(ids),
                )
            )  # fmt: skip
    if not pairs:
        raise VitupError(f"--root {root}: none of the {split} pairs could be read (first problem: "
                         f"{skipped[0]['pair']}: {skipped[0]['reason']})" if skipped else
                         f"--root {root}: no {split} pairs in the chosen categories")  # fmt: skip
    notes = [f"SPair-71k {split} split: {len(pairs)} pairs in {len({p.category for p in pairs})} categories"]
    if limit:
        notes.append(f"--limit {limit}: the first {limit} pairs of each category (sorted pair files)")
    return PairSet("spair", split, base, pairs, skipped, notes)


# -- your own pairs ---------------------------------------------------------------------------------
def _points(value: Any, where: str) -> list[tuple[float, float] | None]:
    if not isinstance(value, list):
        raise VitupError(f"{where}: expected a list of [x, y] points")
    out: list[tuple[float, float] | None] = []
    for p in value:
        if p is None:
            out.append(None)
            continue
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p)):
            raise VitupError(f"{where}: {p!r} is not an [x, y] point (or null)")
        out.append((float(p[0]), float(p[1])))
    return out


def open_keypoints(
    root: str | Path, split: str = "test", categories: Sequence[str] | None = None, limit: int | None = None
) -> PairSet:
    """Your pairs from ``ROOT/pairs.json`` (the module docstring shows the layout); ``split`` is only a
    label. Any error in the file names the pair and the field: this file is small and yours to fix."""
    root = Path(root).expanduser()
    _check_limit(limit)
    path = root / KEYPOINTS_FILE if root.is_dir() else root
    if not path.is_file():
        raise VitupError(f"--root {root}: no {KEYPOINTS_FILE} there (the pairs file; see `vitup probe --help`)")
    base = path.parent
    try:
        data = _read_json(path)
    except (OSError, ValueError) as exc:
        raise VitupError(f"{path}: not readable JSON ({exc})") from None
    items = data.get("pairs") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise VitupError(f'{path}: expected {{"pairs": [{{"source": ..., "target": ..., ...}}, ...]}}')
    pairs: list[KeypointPair] = []
    for i, item in enumerate(items):
        where = f"{path}: pair {i}"
        if not isinstance(item, dict):
            raise VitupError(f"{where}: expected an object with source, target, source_keypoints, target_keypoints")
        try:
            src, trg = (Path(str(item[k])) for k in ("source", "target"))
            s_pts = _points(item["source_keypoints"], f"{where} source_keypoints")
            t_pts = _points(item["target_keypoints"], f"{where} target_keypoints")
        except KeyError as exc:
            raise VitupError(f"{where}: the field {exc.args[0]} is missing") from None
        if len(s_pts) != len(t_pts):
            raise VitupError(f"{where}: {len(s_pts)} source but {len(t_pts)} target keypoints; they pair up by order")
        src, trg = (p if p.is_absolute() else base / p for p in (src, trg))
        for p in (src, trg):
            if not p.is_file():
                raise VitupError(f"{where}: image {p} does not exist")
        box = item.get("target_bbox")
        if box is not None:
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                raise VitupError(f"{where} target_bbox: expected [x1, y1, x2, y2] in pixels")
            if max(box[2] - box[0], box[3] - box[1]) <= 0:
                raise VitupError(f"{where} target_bbox: {box} is empty; x2 > x1 or y2 > y1 is needed")
        both = [k for k, (a, b) in enumerate(zip(s_pts, t_pts, strict=True)) if a is not None and b is not None]
        if not both:
            raise VitupError(f"{where}: no keypoint is given in both images")
        pairs.append(
            KeypointPair(
                name=str(item.get("name") or f"pair{i:05d}"), category=str(item.get("category") or "all"),
                source=src, target=trg,
                source_kps=np.array([s_pts[k] for k in both], dtype=np.float64),
                target_kps=np.array([t_pts[k] for k in both], dtype=np.float64),
                target_bbox=None if box is None else tuple(float(v) for v in box),  # type: ignore[arg-type]
                kp_ids=tuple(str(k) for k in both),
            )
        )  # fmt: skip
    present = list(dict.fromkeys(p.category for p in pairs))
    wanted = _parse_categories(categories, present) or present
    chosen = []
    for cat in wanted:
        chosen += [p for p in pairs if p.category == cat][:limit]
    notes = [f"{path}: {len(chosen)} pairs in {len(wanted)} categories"]
    if any(p.target_bbox is None for p in chosen):
        notes.append("pairs without target_bbox use the whole target image as the PCK box")
    return PairSet("keypoints", split, base, chosen, [], notes)


#: ``vitup probe NAME`` -> its pair reader.
PAIR_READERS: dict[str, Callable[..., PairSet]] = {"spair": open_spair, "keypoints": open_keypoints}
