"""The correspondence probe's pair readers: the SPair-71k layout and the user's pairs.json."""

import json

import numpy as np
import pytest
from spair_fixtures import make_keypoints, make_spair

from vitup_cli.errors import VitupError
from vitup_cli.probe.spair import open_keypoints, open_spair


def test_spair_reads_pairs_like_the_reference(tmp_path):
    base = make_spair(tmp_path)
    for root in (tmp_path, base):  # the folder holding SPair-71k, or SPair-71k itself
        ps = open_spair(root)
        assert ps.root == base and ps.split == "test"
    assert ps.categories == ["bird", "cat", "dog"]  # the reference's category order
    assert [p.name for p in ps.in_category("cat")] == sorted(p.name for p in ps.in_category("cat"))
    first = ps.in_category("cat")[0]
    assert first.source == base / "JPEGImages" / "cat" / "2008_000001.jpg"
    # keypoint ids visible in both images only, rows paired by id, in numeric id order
    anno = json.loads((base / "ImageAnnotation" / "cat" / "2008_000002.json").read_text())
    visible = sorted((k for k, v in anno["kps"].items() if v is not None), key=int)
    assert list(first.kp_ids) == visible
    assert np.array_equal(first.target_kps, [anno["kps"][k] for k in visible])
    assert np.array_equal(first.target_kps, first.source_kps - [16, 0])
    assert first.target_bbox == (10.0, 5.0, 90.0, 60.0)  # the target's ImageAnnotation bndbox
    assert len(ps.images) == 1 + 4 + 3


def test_spair_split_categories_and_limit(tmp_path):
    make_spair(tmp_path)
    val = open_spair(tmp_path, split="val")
    assert len(val) == 1 and val.pairs[0].source.name == "2010_000002.jpg"
    some = open_spair(tmp_path, categories=["dog", "cat"], limit=1)
    assert [p.category for p in some.pairs] == ["dog", "cat"] and any("--limit 1" in n for n in some.notes)
    with pytest.raises(VitupError, match="--categories horse"):
        open_spair(tmp_path, categories=["horse"])
    with pytest.raises(VitupError, match="--split"):
        open_spair(tmp_path, split="dev")
    with pytest.raises(VitupError, match="--limit"):
        open_spair(tmp_path, limit=0)


def test_spair_skips_and_reports_bad_pairs(tmp_path):
    base = make_spair(tmp_path)
    test = base / "PairAnnotation" / "test"
    (test / "000099-x-y:dog.json").write_text("{not json")
    (test / "000098-2010_000001-2010_000009:dog.json").write_text(
        json.dumps({"src_imname": "2010_000001.jpg", "trg_imname": "2010_000009.jpg", "category": "dog"})
    )
    anno = base / "ImageAnnotation" / "dog" / "2010_000009.json"
    anno.write_text(json.dumps({"kps": {"0": [1, 1]}, "bndbox": [0, 0, 5, 5]}))
    (base / "JPEGImages" / "dog" / "2010_000009.jpg").write_bytes(b"")
    # a pair whose images share no visible keypoint
    (base / "ImageAnnotation" / "dog" / "2010_000010.json").write_text(
        json.dumps({"kps": {"99": [1, 1]}, "bndbox": [0, 0, 5, 5]})
    )
    (base / "JPEGImages" / "dog" / "2010_000010.jpg").write_bytes(b"x")
    (test / "000097-2010_000001-2010_000010:dog.json").write_text(
        json.dumps({"src_imname": "2010_000001.jpg", "trg_imname": "2010_000010.jpg", "category": "dog"})
    )
    ps = open_spair(tmp_path, categories=["dog"])
    reasons = {s["pair"].rsplit("/", 1)[-1]: s["reason"] for s in ps.skipped}
    assert "unreadable annotation" in reasons["000099-x-y:dog.json"]
    assert "no keypoint visible in both" in reasons["000097-2010_000001-2010_000010:dog.json"]
    assert len(ps) == 3  # the two good pairs, and the one with an empty image (left to the image reader)


def test_spair_layout_errors(tmp_path):
    with pytest.raises(VitupError, match="no SPair-71k layout found"):
        open_spair(tmp_path)
    (tmp_path / "PairAnnotation" / "test").mkdir(parents=True)
    with pytest.raises(VitupError, match="not a complete SPair-71k layout.*JPEGImages"):
        open_spair(tmp_path)
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "ImageAnnotation").mkdir()
    with pytest.raises(VitupError, match=r"no pair files \(\*\.json\)"):
        open_spair(tmp_path)


def test_keypoints_layout(tmp_path):
    root = make_keypoints(tmp_path / "mine")
    ps = open_keypoints(root)
    assert ps.categories == ["shift", "same"] and len(ps) == 2
    shift, same = ps.pairs
    assert shift.target_bbox == (0.0, 0.0, 96.0, 64.0) and same.target_bbox is None
    assert len(same.source_kps) == 20  # the point given in one image only is dropped
    assert open_keypoints(root / "pairs.json").pairs[0].name == shift.name  # the file itself works too


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.pop("target"), "the field target is missing"),
        (lambda p: p["target_keypoints"].pop(), "20 source but 19 target keypoints"),
        (lambda p: p.update(target_bbox=[5, 5, 5, 5]), "is empty"),
        (lambda p: p.update(target_bbox=[1, 2]), r"expected \[x1, y1, x2, y2\]"),
        (lambda p: p.update(source="images/none.png"), "none.png does not exist"),
        (lambda p: p["source_keypoints"].__setitem__(0, [1, "a"]), "is not an"),
        (lambda p: p.update(source_keypoints=[None] * 20), "no keypoint is given in both"),
    ],
)
def test_keypoints_errors_name_the_pair_and_field(tmp_path, edit, message):
    root = make_keypoints(tmp_path / "mine")
    data = json.loads((root / "pairs.json").read_text())
    edit(data["pairs"][0])
    (root / "pairs.json").write_text(json.dumps(data))
    with pytest.raises(VitupError, match=message) as info:
        open_keypoints(root)
    assert "pair 0" in str(info.value)


def test_keypoints_file_errors(tmp_path):
    with pytest.raises(VitupError, match="no pairs.json"):
        open_keypoints(tmp_path)
    (tmp_path / "pairs.json").write_text("[1, 2]")
    with pytest.raises(VitupError, match='expected {"pairs"'):
        open_keypoints(tmp_path)
    (tmp_path / "pairs.json").write_text("{")
    with pytest.raises(VitupError, match="not readable JSON"):
        open_keypoints(tmp_path)
