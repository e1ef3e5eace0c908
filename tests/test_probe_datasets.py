"""Probe dataset readers: the five layouts, their class conventions, errors for wrong or partial roots."""

import numpy as np
import pytest
from PIL import Image
from probe_fixtures import (
    CITYSCAPES_RAW,
    COCO_RAW,
    make_ade20k,
    make_cityscapes,
    make_cocostuff,
    make_folder,
    make_nyu,
    make_voc,
    scene,
)

from vitup_cli.errors import VitupError
from vitup_cli.probe.datasets import (
    ADE20K_CLASSES,
    COCOSTUFF_CLASSES,
    IGNORE,
    cocostuff_fine_to_coarse,
    cocostuff_lut,
    crop_geometry,
    crop_target,
    load_depth,
    open_dataset,
    open_splits,
)


def _truth(seed, n, classes, h=40, w=56):
    rng = np.random.default_rng(seed)
    return [scene(rng, h, w, classes)[1] for _ in range(n)]


@pytest.mark.parametrize(
    ("maker", "name", "classes", "k", "index"),
    [
        (make_voc, "voc", [0, 1, 2, 3], 21, lambda stem: int(stem[-4:])),
        (make_cityscapes, "cityscapes", [0, 2, 8, 10], 19, lambda stem: int(stem.split("_")[1])),
        (make_cocostuff, "cocostuff", [9, 18, 23, 21], 27, lambda stem: int(stem) % 500000),
    ],
)
def test_layout_reads_pairs_and_maps_labels_to_train_ids(tmp_path, maker, name, classes, k, index):
    maker(tmp_path)
    train, val = open_splits(name, tmp_path)
    assert (len(train), len(val)) == (6, 4) and train.num_classes == k
    for ds, seed in ((train, 0), (val, 1)):
        truth = _truth(seed, len(ds), classes)
        assert sorted(index(p.stem) for p in ds.images) == list(range(len(ds)))
        for i in range(len(ds)):
            # raw label values mapped back to the train ids, 255 kept
            np.testing.assert_array_equal(ds.load_target(i), truth[index(ds.images[i].stem)])
            assert ds.images[i].is_file()


def test_ade20k_keeps_other_as_class_zero(tmp_path):
    make_ade20k(tmp_path)
    train, _ = open_splits("ade20k", tmp_path)
    assert train.num_classes == 151 == len(ADE20K_CLASSES) and train.class_names[0] == "other"
    want = _truth(0, 6, [0, 1, 2, 3])
    for i, w in enumerate(want):
        np.testing.assert_array_equal(train.load_target(i), np.where(w == 255, 0, w))
    assert train.root.name == "ADEChallengeData2016"


def test_cityscapes_prefers_train_id_pngs(tmp_path):
    make_cityscapes(tmp_path, train_ids=True)
    train = open_dataset("cityscapes", tmp_path, "train")
    assert all(t.name.endswith("_labelTrainIds.png") for t in train.targets)
    np.testing.assert_array_equal(train.load_target(0), _truth(0, 1, [0, 2, 8, 10])[0])


def test_cityscapes_label_id_table():
    from vitup_cli.probe.datasets import CITYSCAPES_CLASSES, CITYSCAPES_TRAIN_IDS

    assert sorted(CITYSCAPES_TRAIN_IDS.values()) == list(range(19)) == list(range(len(CITYSCAPES_CLASSES)))
    for label_id, train_id in CITYSCAPES_RAW.items():
        if label_id != 255:
            assert CITYSCAPES_TRAIN_IDS[train_id] == label_id


def test_cocostuff_coarse_table():
    fine = cocostuff_fine_to_coarse()
    names = dict(enumerate(COCOSTUFF_CLASSES))
    assert len(COCOSTUFF_CLASSES) == 27 and (fine < 27).all()
    # stuffthingmaps value = COCO id - 1
    spot = {0: "person", 2: "vehicle", 15: "animal", 61: "furniture-things", 71: "electronic",
            101: "ceiling", 113: "floor", 148: "ground", 156: "sky", 168: "plant", 170: "wall", 176: "wall",
            177: "water", 179: "window", 181: "solid", 94: "building", 119: "water"}  # fmt: skip
    for value, name in spot.items():
        assert names[int(fine[value])] == name, value
    assert set(np.unique(fine)) == set(range(27))  # every coarse class is reachable
    lut = cocostuff_lut()
    assert lut[255] == IGNORE and lut[200] == IGNORE and lut[156] == 23
    for coarse, raw in COCO_RAW.items():
        assert lut[raw] == coarse
    mm = cocostuff_lut(mmseg_train_ids=True)  # 171 ids: the 11 never-annotated thing ids removed
    assert mm[0] == 9 and mm[11] == 8 and mm[170] == fine[181] and mm[171] == IGNORE


def test_cocostuff_curated_list_is_used(tmp_path):
    make_cocostuff(tmp_path)
    (tmp_path / "curated" / "val2017").mkdir(parents=True)
    (tmp_path / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse.txt").write_text("000000500002\n000000500000\n")
    val = open_dataset("cocostuff", tmp_path, "val")
    assert [p.stem for p in val.images] == ["000000500002", "000000500000"]
    assert any("curated" in n for n in val.notes)


def test_folder_classes_inferred_or_named(tmp_path):
    make_folder(tmp_path, classes=3)
    train, val = open_splits("folder", tmp_path)
    assert train.class_names == ["class 0", "class 1", "class 2"] == val.class_names
    (tmp_path / "classes.txt").write_text("red\ngreen\nblue\nunused\n")
    train, _ = open_splits("folder", tmp_path)
    assert train.class_names == ["red", "green", "blue", "unused"]


def test_folder_kind_first_layout(tmp_path):
    make_folder(tmp_path / "a")
    for split in ("train", "val"):
        (tmp_path / "b" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "b" / "labels").mkdir(parents=True, exist_ok=True)
        (tmp_path / "a" / split / "images").rename(tmp_path / "b" / "images" / split)
        (tmp_path / "a" / split / "labels").rename(tmp_path / "b" / "labels" / split)
    train, val = open_splits("folder", tmp_path / "b", limit=3)
    assert (len(train), len(val)) == (3, 3) and train.targets[0].parent == tmp_path / "b" / "labels" / "train"


@pytest.mark.parametrize("fmt", ["png", "npy"])
def test_folder_depth_maps_in_metres(tmp_path, fmt):
    make_folder(tmp_path, task="depth", depth_format=fmt)
    train, _ = open_splits("folder", tmp_path, "depth")
    d = train.load_target(0)
    assert d.dtype == np.float32 and d.shape == (40, 56)
    ids = _truth(0, 1, [0, 1, 2])[0]
    assert (d[ids == 255] == 0).all()
    valid = d[ids != 255]
    assert valid.min() >= 1.0 and valid.max() <= 6.51  # metres, mm PNGs divided by 1000
    if fmt == "png":
        custom = open_splits("folder", tmp_path, "depth", depth_scale=500)[0].load_target(0)
        np.testing.assert_allclose(custom, 2 * d, rtol=1e-6)


def test_depth_npy_is_never_unpickled(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(VitupError, match="cannot read this depth map"):
        load_depth(path)


def test_limit_takes_the_first_images(tmp_path):
    make_voc(tmp_path)
    train, val = open_splits("voc", tmp_path, limit=2)
    assert [p.stem for p in train.images] == ["2007_train0000", "2007_train0001"] and len(val) == 2


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("voc", "JPEGImages/, SegmentationClass/ and ImageSets/Segmentation"),
        ("ade20k", "images/{training,validation}/"),
        ("cityscapes", "leftImg8bit/{train,val}/CITY/*_leftImg8bit.png"),
        ("cocostuff", "images/{train,val}2017/*.jpg"),
        ("folder", "train/images/"),
    ],
)
def test_wrong_root_says_what_was_expected_where(tmp_path, name, expected):
    (tmp_path / "something").mkdir()
    with pytest.raises(VitupError) as info:
        open_splits(name, tmp_path)
    message = str(info.value)
    assert expected in message and str(tmp_path) in message and "\n" not in message


def test_missing_root(tmp_path):
    with pytest.raises(VitupError, match="no such folder"):
        open_dataset("voc", tmp_path / "nope", "train")


def test_partial_voc_root(tmp_path):
    make_voc(tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(VitupError, match=r"missing: ImageSets/Segmentation/val.txt"):
        open_splits("voc", tmp_path)
    make_voc(tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_train0003.png").unlink()
    with pytest.raises(VitupError, match=r"1 of 6 VOC2012 images have no target file .*2007_train0003.png"):
        open_splits("voc", tmp_path)


def test_partial_ade_and_cityscapes_roots(tmp_path):
    make_ade20k(tmp_path / "ade")
    (tmp_path / "ade/ADEChallengeData2016/annotations/validation/ADE_val_00000002.png").unlink()
    with pytest.raises(VitupError, match="ADE_val_00000002.png"):
        open_splits("ade20k", tmp_path / "ade")
    make_cityscapes(tmp_path / "city")
    import shutil

    shutil.rmtree(tmp_path / "city/gtFine/val")
    with pytest.raises(VitupError, match=r"missing: gtFine/val/"):
        open_splits("cityscapes", tmp_path / "city")


def test_colour_labels_are_refused(tmp_path):
    make_folder(tmp_path)
    label = tmp_path / "train" / "labels" / "scene_000.png"
    Image.open(label).convert("RGB").save(label)
    with pytest.raises(VitupError, match="RGB label image"):
        open_splits("folder", tmp_path)


def test_depth_needs_a_folder_layout(tmp_path):
    make_voc(tmp_path)
    with pytest.raises(VitupError, match="--task depth"):
        open_splits("voc", tmp_path, "depth")


def test_nyu_reads_the_official_split_in_metres(tmp_path):
    make_nyu(tmp_path)
    train, val = open_splits("nyu", tmp_path, "depth")
    assert (len(train), len(val)) == (5, 2)
    assert train.images[0].name == "rgb_00000.jpg" and train.images[0].parent.name == "bathroom_0002"
    assert [t.name for t in val.targets] == ["sync_depth_00000.png", "sync_depth_00001.png"]
    depth = val.load_target(1)
    assert depth[0, 0] == 0 and depth[5, 5] == pytest.approx(2.0)


def test_nyu_is_depth_only_and_says_what_is_missing(tmp_path):
    make_nyu(tmp_path)
    with pytest.raises(VitupError, match="nyu is a depth dataset: pass --task depth"):
        open_splits("nyu", tmp_path, "seg")
    next((tmp_path / "nyu_depth_v2").rglob("sync_depth_00001.png")).unlink()
    with pytest.raises(VitupError, match="have no target file"):
        open_splits("nyu", tmp_path, "depth")
    with pytest.raises(VitupError, match="no nyu layout found"):
        open_splits("nyu", tmp_path / "nyu_depth_v2" / "official_splits" / "train", "depth")


# -- geometry -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("h", "w"), [(40, 56), (56, 40), (33, 33), (375, 500), (1024, 2048)])
def test_target_crop_matches_extract_fit_crop(h, w):
    """A sharp edge lands on the same column/row in the image crop extract makes and in the target crop."""
    from vitup_cli.extract import fit_image

    size = 32
    x0, y0 = w // 2 + 3, h // 2 - 2
    ids = np.zeros((h, w), np.uint8)
    ids[:, x0:] = 1
    ids[y0:, :] = 2
    img = Image.fromarray((np.stack([ids == 1, ids == 2, ids == 0], -1) * 255).astype(np.uint8))
    fitted, box = fit_image(img, size, "crop")
    assert box == (0, 0, size, size)
    crop = crop_target(ids, size)
    assert crop.shape == (size, size)
    from_image = np.argmax(fitted.numpy()[[2, 0, 1]], axis=0)  # channels back to ids
    assert (crop == from_image).mean() > 0.9
    nh, nw, top, left = crop_geometry(h, w, size)
    assert min(nh, nw) == size and 0 <= top <= nh - size and 0 <= left <= nw - size


def test_crop_target_keeps_depth_values():
    d = np.arange(12 * 20, dtype=np.float32).reshape(12, 20)
    out = crop_target(d, 6)
    assert out.dtype == np.float32 and out.shape == (6, 6) and set(out.ravel()) <= set(d.ravel())
