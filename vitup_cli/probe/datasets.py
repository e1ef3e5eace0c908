"""Probe datasets: the standard on-disk layouts, read into (image, target) pairs with one convention.

Every reader yields the same thing: a ``ProbeDataset`` of image files, target files and a lookup table that
turns the raw label values of that layout into training ids (``0..K-1``, ``255`` ignored), or, for depth,
a scale that turns stored values into metres (``0`` and non-finite values are invalid).

=============  ==================================================================  ======================
name           layout under ``--root`` (what is looked for)                        classes
=============  ==================================================================  ======================
``voc``        ``[VOCdevkit/]VOC2012/{JPEGImages, SegmentationClass,               21 (background + 20),
               ImageSets/Segmentation/{train,val}.txt}``                           255 = boundary
``ade20k``     ``[ADEChallengeData2016/]{images,annotations}/{training,            151 (0 "other" kept)
               validation}/*.{jpg,png}``
``cityscapes`` ``leftImg8bit/{train,val}/CITY/*_leftImg8bit.png`` with             19 trainIds, rest 255
               ``gtFine/{train,val}/CITY/*_gtFine_labelTrainIds.png`` (used as
               they are) or ``*_gtFine_labelIds.png`` (mapped labelId -> trainId)
``cocostuff``  ``[dataset/]{images,annotations}/{train,val}2017/`` (the            27 coarse
               ``stuffthingmaps`` PNGs, 0..181 and 255; or mmseg's
               ``*_labelTrainIds.png``, 171 classes); the curated list
               ``curated/{train,val}2017/Coco164kFull_Stuff_Coarse.txt`` is used
               when present (what JAFAR evaluates on)
``nyu``        ``[nyu_depth_v2/]official_splits/{train,test}/SCENE/rgb_N.jpg``       depth only (metres;
               with ``sync_depth_N.png`` beside each (16-bit millimetres): the     ``--task depth``)
               795 / 654 labelled images of NYU Depth v2's official split, as
               BTS's ``extract_official_train_test_set_from_mat.py`` writes
               them (``val`` reads ``test``)
``folder``     ``{train,val}/images/`` + ``{train,val}/labels/`` (or                ``classes.txt`` (one
               ``images/{train,val}/`` + ``labels/{train,val}/``): label PNGs of    name a line), else the
               class indices with the image's stem; for ``--task depth``            largest label + 1
               ``depth/`` instead of ``labels/``: 16-bit PNG (millimetres by
               default) or ``.npy`` (metres)
=============  ==================================================================  ======================

Geometry (``crop_target``) matches ``vitup_cli.extract``'s ``--fit crop``: the short side is resized to the
crop size and the centre square kept; targets use nearest-neighbour resampling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from vitup_cli.data.images import IMAGE_EXTENSIONS
from vitup_cli.errors import VitupError

SEG, DEPTH = "seg", "depth"
TASKS = (SEG, DEPTH)
SPLITS = ("train", "val")
IGNORE = 255

# -- class conventions ----------------------------------------------------------------------------
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
#: Cityscapes labelId -> trainId (the 19 evaluated classes); every other labelId is ignored.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

ADE20K_CLASSES = (
    "other", "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car",
    "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

#: The 27 coarse COCO-Stuff classes: the 12 thing and 15 stuff supercategories, in the order of the
#: unsupervised-segmentation literature (IIC, PiCIE, STEGO) that JAFAR, NAF and ViT-Up evaluate with.
COCOSTUFF_CLASSES = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window", "building",
    "ground", "plant", "sky", "solid", "structural", "water",
)  # fmt: skip
# COCO thing ids 1..91 (stuffthingmaps value = id - 1), by supercategory, as ranges of ids.
_THING_GROUPS = {
    "person": [(1, 1)], "vehicle": [(2, 9)], "outdoor": [(10, 15)], "animal": [(16, 25)],
    "accessory": [(26, 33)], "sports": [(34, 43)], "kitchen": [(44, 51)], "food-things": [(52, 61)],
    "furniture-things": [(62, 71)], "electronic": [(72, 77)], "appliance": [(78, 83)], "indoor": [(84, 91)],
}  # fmt: skip
# COCO stuff ids 92..182 in id order, each with its supercategory.
_STUFF = """
banner:textile blanket:textile branch:plant bridge:building building-other:building bush:plant
cabinet:furniture-stuff cage:structural cardboard:rawmaterial carpet:floor ceiling-other:ceiling
ceiling-tile:ceiling cloth:textile clothes:textile clouds:sky counter:furniture-stuff cupboard:furniture-stuff
curtain:textile desk-stuff:furniture-stuff dirt:ground door-stuff:furniture-stuff fence:structural
floor-marble:floor floor-other:floor floor-stone:floor floor-tile:floor floor-wood:floor flower:plant fog:water
food-other:food-stuff fruit:food-stuff furniture-other:furniture-stuff grass:plant gravel:ground
ground-other:ground hill:solid house:building leaves:plant light:furniture-stuff mat:textile metal:rawmaterial
mirror-stuff:furniture-stuff moss:plant mountain:solid mud:ground napkin:textile net:structural
paper:rawmaterial pavement:ground pillow:textile plant-other:plant plastic:rawmaterial platform:ground
playingfield:ground railing:structural railroad:ground river:water road:ground rock:solid roof:building
rug:textile salad:food-stuff sand:ground sea:water shelf:furniture-stuff sky-other:sky skyscraper:building
snow:ground solid-other:solid stairs:furniture-stuff stone:solid straw:plant structural-other:structural
table:furniture-stuff tent:building textile-other:textile towel:textile tree:plant vegetable:food-stuff
wall-brick:wall wall-concrete:wall wall-other:wall wall-panel:wall wall-stone:wall wall-tile:wall wall-wood:wall
water-other:water waterdrops:water window-blind:window window-other:window wood:solid
"""
# Thing ids that COCO defines but never annotates (mmseg's 171-class ids skip them).
_COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)


def cocostuff_fine_to_coarse() -> np.ndarray:
    """``(182,)`` uint8: stuffthingmaps value (COCO id - 1) -> coarse class index (0..26)."""
    index = {name: i for i, name in enumerate(COCOSTUFF_CLASSES)}
    out = np.full(182, IGNORE, dtype=np.uint8)
    for group, ranges in _THING_GROUPS.items():
        for a, b in ranges:
            out[a - 1 : b] = index[group]
    stuff = _STUFF.split()
    if len(stuff) != 91:  # pragma: no cover - guards the table above
        raise AssertionError(f"the COCO-Stuff table lists {len(stuff)} stuff classes, not 91")
    for k, item in enumerate(stuff):
        out[91 + k] = index[item.split(":")[1]]
    return out


def _lut(mapping: dict[int, int] | np.ndarray, size: int = 256) -> np.ndarray:
    """A ``(256,)`` uint8 lookup table; unmapped values become ``IGNORE``."""
    lut = np.full(size, IGNORE, dtype=np.uint8)
    if isinstance(mapping, dict):
        for k, v in mapping.items():
            lut[k] = v
    else:
        lut[: len(mapping)] = mapping
    return lut


def _identity_lut(num_classes: int) -> np.ndarray:
    return _lut(np.arange(num_classes, dtype=np.uint8))


def cocostuff_lut(mmseg_train_ids: bool = False) -> np.ndarray:
    """Raw COCO-Stuff label value -> coarse class: ``stuffthingmaps`` values, or mmseg's 171 train ids."""
    fine = cocostuff_fine_to_coarse()
    if not mmseg_train_ids:
        return _lut(fine)
    used = [i for i in range(182) if (i + 1) not in _COCO_UNUSED_IDS]
    return _lut(fine[np.array(used)])


# -- the dataset ----------------------------------------------------------------------------------
@dataclass
class ProbeDataset:
    """One split of a probe dataset.

    Attributes:
        name: ``voc``, ``ade20k``, ``cityscapes``, ``cocostuff``, ``nyu`` or ``folder``.
        split: ``train`` or ``val``. task: ``seg`` or ``depth``.
        root: the folder the layout was found in.
        images, targets: matching files, in a stable (sorted) order.
        class_names: the ``K`` classes (segmentation); empty for depth.
        lut: ``(256,)`` uint8 raw label value -> class id (``255`` ignored); None for depth.
        depth_scale: stored value / ``depth_scale`` = metres, for integer depth PNGs (``.npy`` and float
            images are metres already).
        notes: facts worth reporting (which list or label files were used).
    """

    name: str
    split: str
    task: str
    root: Path
    images: list[Path]
    targets: list[Path]
    class_names: list[str] = field(default_factory=list)
    lut: np.ndarray | None = None
    depth_scale: float = 1000.0
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, limit: int | None) -> ProbeDataset:
        """The first ``limit`` pairs (all when None)."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise VitupError(f"--limit {limit}: must be at least 1")
        return replace(self, images=self.images[:limit], targets=self.targets[:limit])

    def fingerprint(self) -> str:
        """sha256 over everything that decides the targets: files, label table, depth scale."""
        digest = hashlib.sha256()
        for part in (self.name, self.split, self.task, str(self.depth_scale)):
            digest.update(part.encode() + b"\0")
        for img, tgt in zip(self.images, self.targets, strict=True):
            digest.update(str(img).encode() + b"\0" + str(tgt).encode() + b"\0")
        if self.lut is not None:
            digest.update(self.lut.tobytes())
        return digest.hexdigest()

    def load_target(self, index: int) -> np.ndarray:
        """Target ``index`` at its original size: ``(H, W)`` uint8 class ids, or float32 metres for depth."""
        path = self.targets[index]
        return load_depth(path, self.depth_scale) if self.task == DEPTH else load_label(path, self.lut)


def load_label(path: Path, lut: np.ndarray | None) -> np.ndarray:
    """A label PNG of class indices (``L``, ``P`` or 16-bit) -> ``(H, W)`` uint8 through ``lut``."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in {"RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"}:
                raise VitupError(
                    f"{path}: a {mode} label image; labels must be single-channel class indices "
                    "(mode L or P, as VOC/ADE20K/Cityscapes ship them), not colours"
                )
            arr = np.asarray(img)
    except VitupError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise VitupError(f"{path}: cannot read this label image ({exc})") from None
    if arr.ndim != 2:
        raise VitupError(f"{path}: label image has shape {arr.shape}; expected a single channel")
    values = arr.astype(np.int64, copy=False)
    if lut is None:
        return np.where((values >= 0) & (values < 256), values, IGNORE).astype(np.uint8)
    clipped = np.where((values >= 0) & (values < len(lut)), values, len(lut) - 1)
    out = lut[clipped]
    out[(values < 0) | (values >= len(lut))] = IGNORE
    return out


def load_depth(path: Path, scale: float = 1000.0) -> np.ndarray:
    """A depth map -> ``(H, W)`` float32 metres, ``0`` where invalid.

    ``.npy`` (float, metres; never unpickled) or an image: integer PNGs (16-bit) are divided by ``scale``
    (default 1000: millimetres), float images are taken as metres.
    """
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False).astype(np.float32)
            if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
                arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
        else:
            with Image.open(path) as img:
                raw = np.asarray(img)
            arr = raw.astype(np.float32) / (1.0 if np.issubdtype(raw.dtype, np.floating) else scale)
    except (OSError, ValueError, SyntaxError) as exc:
        raise VitupError(f"{path}: cannot read this depth map ({exc})") from None
    if arr.ndim != 2:
        raise VitupError(f"{path}: depth map has shape {arr.shape}; expected (H, W)")
    arr[~np.isfinite(arr) | (arr < 0)] = 0
    return arr


def crop_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """``extract``'s ``--fit crop``: short side to ``size``, centre square.

    Returns ``(new_h, new_w, top, left)``: the resized image and the crop's corner in it.
    """
    scale = size / min(height, width)
    nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
    return nh, nw, (nh - size) // 2, (nw - size) // 2


def crop_target(target: np.ndarray, size: int) -> np.ndarray:
    """A target at its original size -> the ``size x size`` centre crop (nearest neighbour)."""
    h, w = target.shape
    nh, nw, top, left = crop_geometry(h, w, size)
    mode = "F" if target.dtype == np.float32 else "L"
    img = Image.fromarray(target, mode=mode).resize((nw, nh), Image.Resampling.NEAREST)
    out = np.asarray(img)[top : top + size, left : left + size]
    return np.ascontiguousarray(out, dtype=target.dtype)


def image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image as ``load_image`` returns it (EXIF orientation applied), from its header."""
    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


# -- layouts --------------------------------------------------------------------------------------
def _locate(
    root: Path, dataset: str, candidates: Sequence[str], marker: str, expected: Sequence[str], layout: str
) -> Path:
    """The dataset folder under ``root``: the first candidate holding ``marker``, checked to hold every
    ``expected`` entry (``x/`` a folder, else a file). Raises one clear error naming what is missing."""
    base = next((root / c if c else root for c in candidates if ((root / c if c else root) / marker).exists()), None)
    if base is None:
        where = " or ".join(str(root / c) if c else str(root) for c in candidates)
        raise VitupError(f"--root {root}: no {dataset} layout found: expected {layout} under {where}")
    missing = [e for e in expected if not ((base / e).is_dir() if e.endswith("/") else (base / e).is_file())]
    if missing:
        raise VitupError(
            f"--root {root}: not a complete {dataset} layout: expected {', '.join(expected)} under {base}; "
            f"missing: {', '.join(missing)}"
        )
    return base


def _pairs_or_error(dataset: str, images: list[Path], targets: list[Path], root: Path) -> None:
    missing = [t for t in targets if not t.is_file()]
    if missing:
        raise VitupError(
            f"--root {root}: {len(missing)} of {len(targets)} {dataset} images have no target file "
            f"(first expected at {missing[0]}); the layout is partial"
        )
    absent = [p for p in images if not p.is_file()]
    if absent:
        raise VitupError(
            f"--root {root}: {len(absent)} {dataset} images listed are missing (first: {absent[0]}); "
            "the layout is partial"
        )


def _images_in(folder: Path, suffixes: Sequence[str] | None = None) -> list[Path]:
    allowed = set(suffixes) if suffixes else IMAGE_EXTENSIONS
    files = [p for p in folder.rglob("*") if p.suffix.lower() in allowed and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _voc(root: Path, split: str, task: str) -> ProbeDataset:
    candidates = ["VOCdevkit/VOC2012", "VOC2012", ""]
    expected = ["JPEGImages/", "SegmentationClass/", f"ImageSets/Segmentation/{split}.txt"]
    layout = "JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/{train,val}.txt"
    base = _locate(root, "VOC2012", candidates, "JPEGImages", expected, layout)
    ids = [line.strip() for line in (base / expected[2]).read_text().splitlines() if line.strip()]
    if not ids:
        raise VitupError(f"{base / expected[2]}: lists no images")
    images = [base / "JPEGImages" / f"{i}.jpg" for i in ids]
    targets = [base / "SegmentationClass" / f"{i}.png" for i in ids]
    _pairs_or_error("VOC2012", images, targets, root)
    notes = [f"ImageSets/Segmentation/{split}.txt ({len(ids)} images; VOC2012 only, no SBD)"]
    return ProbeDataset("voc", split, task, base, images, targets, list(VOC_CLASSES), _identity_lut(21), notes=notes)


def _ade20k(root: Path, split: str, task: str) -> ProbeDataset:
    candidates = ["ADEChallengeData2016", ""]
    sub = {"train": "training", "val": "validation"}[split]
    expected = [f"images/{sub}/", f"annotations/{sub}/"]
    layout = "images/{training,validation}/ and annotations/{training,validation}/"
    base = _locate(root, "ADE20K", candidates, "images", expected, layout)
    images = _images_in(base / "images" / sub, [".jpg", ".jpeg", ".png"])
    if not images:
        raise VitupError(f"{base / 'images' / sub}: no images")
    targets = [base / "annotations" / sub / p.relative_to(base / "images" / sub).with_suffix(".png") for p in images]
    _pairs_or_error("ADE20K", images, targets, root)
    names = list(ADE20K_CLASSES)
    return ProbeDataset("ade20k", split, task, base, images, targets, names, _identity_lut(151))


def _cityscapes(root: Path, split: str, task: str) -> ProbeDataset:
    candidates = ["cityscapes", ""]
    expected = [f"leftImg8bit/{split}/", f"gtFine/{split}/"]
    layout = "leftImg8bit/{train,val}/CITY/*_leftImg8bit.png and gtFine/{train,val}/CITY/*_gtFine_labelIds.png"
    base = _locate(root, "Cityscapes", candidates, "leftImg8bit", expected, layout)
    img_dir, gt_dir = base / "leftImg8bit" / split, base / "gtFine" / split
    images = sorted(img_dir.glob("*/*_leftImg8bit.png"), key=lambda p: p.relative_to(img_dir).as_posix())
    if not images:
        raise VitupError(f"{img_dir}: no CITY/*_leftImg8bit.png images")

    def target(p: Path, kind: str) -> Path:
        stem = p.name[: -len("_leftImg8bit.png")]
        return gt_dir / p.parent.name / f"{stem}_gtFine_{kind}.png"

    train_ids = [target(p, "labelTrainIds") for p in images]
    if all(t.is_file() for t in train_ids):
        lut, targets, note = _identity_lut(19), train_ids, "gtFine *_labelTrainIds.png"
    else:
        targets = [target(p, "labelIds") for p in images]
        lut, note = _lut(CITYSCAPES_TRAIN_IDS), "gtFine *_labelIds.png mapped to the 19 trainIds"
    _pairs_or_error("Cityscapes", images, targets, root)
    return ProbeDataset("cityscapes", split, task, base, images, targets, list(CITYSCAPES_CLASSES), lut, notes=[note])


def _cocostuff(root: Path, split: str, task: str) -> ProbeDataset:
    candidates = ["", "dataset", "cocostuff", "cocostuff/dataset"]
    sub = f"{split}2017"
    expected = [f"images/{sub}/", f"annotations/{sub}/"]
    layout = "images/{train,val}2017/*.jpg and annotations/{train,val}2017/*.png (stuffthingmaps_trainval2017)"
    base = _locate(root, "COCO-Stuff 164k", candidates, "images", expected, layout)
    img_dir, ann_dir = base / "images" / sub, base / "annotations" / sub
    curated = next(
        (
            c / "curated" / sub / "Coco164kFull_Stuff_Coarse.txt"
            for c in (root, base, base.parent)
            if (c / "curated" / sub / "Coco164kFull_Stuff_Coarse.txt").is_file()
        ),
        None,
    )
    notes = []
    if curated is not None:
        ids = [line.strip() for line in curated.read_text().splitlines() if line.strip()]
        images = [img_dir / f"{i}.jpg" for i in ids]
        notes.append(f"curated list {curated} ({len(ids)} images, as JAFAR)")
    else:
        images = _images_in(img_dir, [".jpg", ".jpeg", ".png"])
        notes.append(f"every image in {img_dir} (no curated/{sub}/Coco164kFull_Stuff_Coarse.txt found)")
    if not images:
        raise VitupError(f"{img_dir}: no images")
    plain = [ann_dir / f"{p.stem}.png" for p in images]
    mmseg = [ann_dir / f"{p.stem}_labelTrainIds.png" for p in images]
    if not plain[0].is_file() and mmseg[0].is_file():
        targets, lut = mmseg, cocostuff_lut(mmseg_train_ids=True)
        notes.append("mmseg *_labelTrainIds.png (171 classes) mapped to the 27 coarse classes")
    else:
        targets, lut = plain, cocostuff_lut()
        notes.append("stuffthingmaps (182 fine ids) mapped to the 27 coarse classes")
    _pairs_or_error("COCO-Stuff", images, targets, root)
    return ProbeDataset("cocostuff", split, task, base, images, targets, list(COCOSTUFF_CLASSES), lut, notes=notes)


_LABEL_DIRS = ("labels", "annotations", "masks")
_DEPTH_DIRS = ("depth",)


def _folder(root: Path, split: str, task: str, depth_scale: float | None) -> ProbeDataset:
    kinds = _DEPTH_DIRS if task == DEPTH else _LABEL_DIRS
    layouts = [(root / split / "images", [root / split / k for k in kinds])]
    layouts.append((root / "images" / split, [root / k / split for k in kinds]))
    img_dir = tgt_dir = None
    for images_at, targets_at in layouts:
        if images_at.is_dir():
            img_dir = images_at
            tgt_dir = next((t for t in targets_at if t.is_dir()), None)
            break
    what = "depth maps (16-bit PNG or .npy)" if task == DEPTH else "label PNGs (class indices)"
    if img_dir is None or tgt_dir is None:
        found = f" (found {img_dir}, but no {' / '.join(kinds)} folder beside it)" if img_dir else ""
        raise VitupError(
            f"--root {root}: not a probe folder for split '{split}': expected {root}/{split}/images/ with "
            f"{root}/{split}/{kinds[0]}/ ({what} named like the images), or {root}/images/{split}/ with "
            f"{root}/{kinds[0]}/{split}/{found}"
        )
    images = [p for p in _images_in(img_dir)]
    if not images:
        raise VitupError(f"{img_dir}: no images")
    suffixes = (".png", ".npy", ".tif", ".tiff") if task == DEPTH else (".png",)
    targets = []
    for p in images:
        rel = p.relative_to(img_dir).with_suffix("")
        found = next((tgt_dir / f"{rel}{s}" for s in suffixes if (tgt_dir / f"{rel}{s}").is_file()), None)
        targets.append(found if found is not None else tgt_dir / f"{rel}{suffixes[0]}")
    _pairs_or_error("folder", images, targets, root)
    notes = [f"images {img_dir}, targets {tgt_dir}"]
    if task == DEPTH:
        scale = 1000.0 if depth_scale is None else float(depth_scale)
        if scale <= 0:
            raise VitupError(f"--depth-scale {depth_scale}: must be positive")
        notes.append(f"integer depth PNGs divided by {scale:g} (metres)")
        return ProbeDataset("folder", split, task, root, images, targets, depth_scale=scale, notes=notes)
    return ProbeDataset("folder", split, task, root, images, targets, notes=notes)


def _nyu(root: Path, split: str) -> ProbeDataset:
    folder = "train" if split == "train" else "test"
    candidates = ["nyu_depth_v2/official_splits", "official_splits", "nyu_depth_v2", ""]
    base = _locate(root, "nyu", candidates, folder, [f"{folder}/"], "official_splits/{train,test}/SCENE/rgb_N.jpg")
    images = [p for p in _images_in(base / folder, (".jpg", ".png")) if p.name.startswith("rgb_")]
    if not images:
        raise VitupError(f"--root {root}: no rgb_*.jpg images under {base / folder} (the nyu layout: see the README)")
    targets = [p.with_name(f"sync_depth_{p.stem[len('rgb_') :]}.png") for p in images]
    _pairs_or_error("nyu", images, targets, root)
    notes = [f"NYU Depth v2 official split '{folder}' from {base}; sync_depth PNGs in millimetres"]
    return ProbeDataset("nyu", split, DEPTH, base, images, targets, depth_scale=1000.0, notes=notes)


DATASETS = ("voc", "ade20k", "cityscapes", "cocostuff", "nyu", "folder")
#: the datasets with depth targets (``--task depth``); ``nyu`` has nothing else
DEPTH_DATASETS = ("nyu", "folder")
#: default epochs per dataset (segmentation); depth probes use ``DEPTH_EPOCHS``.
DEFAULT_EPOCHS = {"voc": 20, "ade20k": 20, "cityscapes": 20, "cocostuff": 5, "folder": 20}
DEPTH_EPOCHS = 5


def open_dataset(
    name: str,
    root: str | Path,
    split: str,
    task: str = SEG,
    *,
    depth_scale: float | None = None,
) -> ProbeDataset:
    """Read one split of a dataset from its standard layout under ``root``.

    Raises ``VitupError`` naming what was expected where when the root is wrong or partial.
    For ``folder`` segmentation the classes come from ``ROOT/classes.txt`` when present; otherwise they
    are filled in by ``open_splits`` (the largest label over both splits, + 1).
    """
    if name not in DATASETS:
        raise VitupError(f"unknown dataset '{name}': use one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    if task not in TASKS:
        raise VitupError(f"--task {task}: use seg or depth")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise VitupError(f"--root {root}: no such folder")
    if task == DEPTH and name not in DEPTH_DATASETS:
        raise VitupError(
            f"--task depth reads depth maps (nyu, or a folder layout); {name} ships no depth. Put the images and "
            "their depth maps in ROOT/{train,val}/{images,depth}/ and use `vitup probe folder --task depth`"
        )
    if name == "nyu":
        if task != DEPTH:
            raise VitupError("nyu is a depth dataset: pass --task depth")
        return _nyu(root, split)
    if name == "voc":
        return _voc(root, split, task)
    if name == "ade20k":
        return _ade20k(root, split, task)
    if name == "cityscapes":
        return _cityscapes(root, split, task)
    if name == "cocostuff":
        return _cocostuff(root, split, task)
    return _folder(root, split, task, depth_scale)


def open_splits(
    name: str,
    root: str | Path,
    task: str = SEG,
    *,
    limit: int | None = None,
    depth_scale: float | None = None,
) -> tuple[ProbeDataset, ProbeDataset]:
    """``(train, val)`` of a dataset, each cut to ``limit`` images; folder classes settled across both."""
    train = open_dataset(name, root, "train", task, depth_scale=depth_scale)
    val = open_dataset(name, root, "val", task, depth_scale=depth_scale)
    if name == "folder" and task == SEG:
        names = _folder_classes(Path(root), train, val)
        lut = _identity_lut(len(names))
        train = replace(train, class_names=names, lut=lut)
        val = replace(val, class_names=names, lut=lut)
    return train.subset(limit), val.subset(limit)


def _folder_classes(root: Path, train: ProbeDataset, val: ProbeDataset) -> list[str]:
    listing = root / "classes.txt"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not 1 <= len(names) <= 255:
            raise VitupError(f"{listing}: lists {len(names)} classes; give 1 to 255 names, one a line")
        train.notes.append(f"classes from {listing}")
        return names
    top = -1
    for ds in (train, val):
        for i in range(len(ds)):
            labels = load_label(ds.targets[i], None)
            values = labels[labels != IGNORE]
            if values.size:
                top = max(top, int(values.max()))
    if top < 0:
        raise VitupError(f"--root {root}: every label pixel is 255 (ignored); there is nothing to learn")
    train.notes.append(f"{top + 1} classes: the largest label + 1 (add {listing} to name them)")
    return [f"class {i}" for i in range(top + 1)]
