"""Images with masks: the exact COCO RLE codec, the SA-1B and folder layouts, and their errors."""

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from _helpers import make_sa1b
from PIL import Image

from vitup_cli.data.masks import decode_rle, encode_rle, open_masked_images
from vitup_cli.errors import VitupError

RLE_FIXTURE = Path(__file__).parent / "data" / "coco_rle" / "pycocotools_rle.json"


def _cases():
    for case in json.loads(RLE_FIXTURE.read_text())["cases"]:
        h, w = case["size"]
        bits = np.unpackbits(np.frombuffer(base64.b64decode(case["mask_bits"]), np.uint8))[: h * w]
        yield case, bits.reshape(h, w).astype(bool)


def test_decoder_and_encoder_agree_with_pycocotools():
    n = 0
    for case, mask in _cases():
        got = decode_rle({"size": case["size"], "counts": case["counts"]})
        assert got.shape == mask.shape and np.array_equal(got, mask), case["kind"]
        assert int(got.sum()) == case["area"]
        assert encode_rle(mask)["counts"] == case["counts"], case["kind"]
        n += 1
    assert n == 25


def test_uncompressed_counts_and_bad_rle():
    mask = np.zeros((3, 4), bool)
    mask[1:, 2] = True
    assert np.array_equal(decode_rle({"size": [3, 4], "counts": [7, 2, 3]}), mask)
    with pytest.raises(ValueError, match="sum"):
        decode_rle({"size": [3, 4], "counts": [7, 2]})


def test_sa1b_layout_reads_masks_in_order(tmp_path):
    root = make_sa1b(tmp_path / "sa", n=3)
    (tmp_path / "sa" / "sa_99.jpg").write_bytes((tmp_path / "sa" / "sa_1.jpg").read_bytes())  # no JSON: not listed
    ds = open_masked_images(root, size=32, max_masks=3)
    assert ds.layout == "sa1b" and len(ds) == 3
    full = ds.load_masks(0)
    anns = json.loads((root / "sa_1.json").read_text())["annotations"]
    assert len(full) == min(3, len(anns))
    assert np.array_equal(full[0], decode_rle(anns[0]["segmentation"]))
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["masks"].shape == (3, 32, 32)
    assert set(np.unique(item["masks"][: item["count"]].numpy())) <= {0, 1}


def test_resize_crop_keeps_masks_aligned_with_the_image(tmp_path):
    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 40:] = 255  # right half white
    Image.fromarray(img).save(root / "images" / "a.png")
    ids = np.zeros((40, 80), np.uint8)
    ids[:, 40:] = 7
    Image.fromarray(ids).save(root / "masks" / "a.png")
    image, masks = open_masked_images(root, size=20).item(0)
    assert masks.shape == (1, 20, 20)
    white = image.mean(0) > 0.5
    assert (white == masks[0]).float().mean() > 0.95


def test_folder_layout_all_three_mask_forms(tmp_path):
    root = tmp_path / "f"
    (root / "images" / "sub").mkdir(parents=True)
    (root / "masks" / "sub" / "c").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "sub/c", "d"):
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(root / "images" / f"{name}.jpg")
    m = np.zeros((24, 30), bool)
    m[3:10, 4:20] = True
    (root / "masks" / "a.json").write_text(json.dumps([encode_rle(m), encode_rle(~m)]))
    ids = np.zeros((24, 30), np.uint16)
    ids[m] = 300
    ids[20:, :] = 5
    Image.fromarray(ids).save(root / "masks" / "b.png")
    Image.fromarray(m.astype(np.uint8) * 255).save(root / "masks" / "sub" / "c" / "0.png")
    ds = open_masked_images(root, size=16)
    assert ds.layout == "folder" and len(ds) == 3 and ds.skipped == ["images/d.jpg"]
    a, b, c = (ds.load_masks(i) for i in range(3))
    assert len(a) == 2 and np.array_equal(a[1], ~m)
    assert len(b) == 2 and np.array_equal(b[1], m)  # ids in increasing order: 5, then 300
    assert len(c) == 1 and np.array_equal(c[0], m)


def test_no_masks_is_one_clear_error(tmp_path):
    root = tmp_path / "plain"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "images" / "x.png")
    with pytest.raises(VitupError, match="no image with masks found") as err:
        open_masked_images(root)
    assert "\n" not in str(err.value)
    with pytest.raises(VitupError, match="no image with masks found"):
        open_masked_images(tmp_path / "plain" / "images")  # sa1b: no sa_N.json
    with pytest.raises(VitupError, match="no such folder"):
        open_masked_images(tmp_path / "nope")


def test_mask_of_the_wrong_size_names_the_file(tmp_path):
    root = make_sa1b(tmp_path / "sa", n=1)
    data = json.loads((root / "sa_1.json").read_text())
    data["annotations"][0]["segmentation"] = encode_rle(np.zeros((5, 5), bool))
    (root / "sa_1.json").write_text(json.dumps(data))
    with pytest.raises(VitupError, match="sa_1.json: a mask is 5x5"):
        open_masked_images(root).item(0)
