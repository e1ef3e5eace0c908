import os

import numpy as np
import pytest
from PIL import Image

from vitup_cli.data.images import ImageLoadError, list_images, load_image, to_tensor
from vitup_cli.errors import VitupError


def _rgb(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def mixed(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "a.jpg")
    sub = tmp_path / "sub dir ü"
    sub.mkdir()
    Image.fromarray(_rgb()).save(sub / "ünïcode name.png")
    Image.fromarray((np.random.rand(20, 30) * 60000).astype(np.uint16)).save(tmp_path / "gray16.png")
    Image.fromarray(_rgb()).convert("CMYK").save(tmp_path / "cmyk.tif")
    Image.fromarray(np.random.randint(0, 255, (20, 30, 4), np.uint8)).save(tmp_path / "rgba.png")
    frames = [Image.fromarray(_rgb(seed=i)).convert("P") for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    os.symlink(tmp_path / "missing.png", tmp_path / "broken.png")
    os.symlink(tmp_path / "a.jpg", tmp_path / "link.jpg")
    return tmp_path


def test_folder_listing_is_recursive_sorted_and_skips_other_extensions(mixed):
    images = list_images(mixed)
    names = [images.relative(p) for p in images.files]
    assert names == sorted(names)
    assert "notes.txt" not in names
    assert "sub dir ü/ünïcode name.png" in names
    assert "broken.png" in names  # kept: reported when loaded


@pytest.mark.parametrize("name", ["a.jpg", "gray16.png", "cmyk.tif", "rgba.png", "anim.gif", "link.jpg"])
def test_every_mode_decodes_to_rgb(mixed, name):
    img = load_image(mixed / name)
    assert img.mode == "RGB" and img.size == (30, 20)
    t = to_tensor(img)
    assert t.shape == (3, 20, 30) and t.min() >= 0 and t.max() <= 1


def test_sixteen_bit_uses_full_range(mixed):
    arr = np.asarray(load_image(mixed / "gray16.png"))
    assert arr.min() == 0 and arr.max() == 255


def test_animation_gives_first_frame(mixed):
    first = np.asarray(Image.open(mixed / "anim.gif").convert("RGB"))
    assert np.array_equal(np.asarray(load_image(mixed / "anim.gif")), first)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("empty.png", "empty"), ("text.jpg", "not an image"), ("truncated.jpg", "truncated"), ("broken.png", "broken")],
)
def test_bad_files_raise_with_reason(mixed, name, reason):
    with pytest.raises(ImageLoadError) as info:
        load_image(mixed / name)
    assert reason in info.value.reason and name in str(info.value)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.fromarray(_rgb(100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="pixel limit"):
        load_image(tmp_path / "big.png")


def test_exif_orientation_applied(tmp_path):
    img = Image.fromarray(_rgb(20, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 30)


def test_file_list_and_single_file(mixed, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\na.jpg\n\ncmyk.tif\n")
    images = list_images(f"@{listing}")
    assert [p.name for p in images.files] == ["a.jpg", "cmyk.tif"]
    single = list_images(mixed / "a.jpg")
    assert single.files == [mixed / "a.jpg"]


def test_missing_and_empty_inputs_are_clear_errors(tmp_path):
    with pytest.raises(VitupError, match="no such file or folder"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitupError, match="no images found"):
        list_images(tmp_path / "empty")
    with pytest.raises(VitupError, match="does not exist"):
        list_images(f"@{tmp_path / 'missing.txt'}")
