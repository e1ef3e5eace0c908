"""Tar shards in (webdataset layout): brace patterns, members grouped by key, stable order, corrupt
members reported; a store from shards equals the store from the same images in a folder."""

import io
import json
import tarfile

import numpy as np
import pytest
from _extract_helpers import TINY_ARGS, _cli, _rgb
from PIL import Image

from vitup_cli.data.images import ImageLoadError, list_images, load_image
from vitup_cli.data.shards import expand_braces, is_shard_input
from vitup_cli.errors import VitupError
from vitup_cli.stores import open_store


def test_brace_expansion():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert is_shard_input("x/{0..9}.tar") and is_shard_input("one.tar") and not is_shard_input("folder")
    with pytest.raises(VitupError, match="brace"):
        expand_braces("s/{x}.tar")


def _png(seed, h=30, w=50):
    buf = io.BytesIO()
    Image.fromarray(_rgb(h, w, seed=seed)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    """Two shards of three samples (image + json + cls members), one sample's image corrupt, and the same
    images as a folder ``folder/<shard>/<key>.png`` (sorted the same way)."""
    root, folder = tmp_path / "shards", tmp_path / "folder"
    root.mkdir()
    seed = 0
    for s in range(2):
        (folder / f"{s:03d}.tar").mkdir(parents=True)
        with tarfile.open(root / f"{s:03d}.tar", "w") as tar:
            for k in range(3):
                key = f"sample{s}{k}"
                _add(tar, f"{key}.json", json.dumps({"k": k}).encode())  # metadata before the image
                data = b"\x89PNG broken" if (s, k) == (1, 1) else _png(seed, 30 + 4 * k, 50)
                _add(tar, f"{key}.png", data)
                _add(tar, f"{key}.cls", b"3")
                (folder / f"{s:03d}.tar" / f"{key}.png").write_bytes(data)
                seed += 1
    return root, folder


def test_listing_groups_members_by_key_in_a_stable_order(shards):
    root, _ = shards
    found = list_images(f"{root}/{{000..001}}.tar")
    names = [found.relative(m) for m in found.files]
    assert names == [f"{s:03d}.tar/sample{s}{k}" for s in range(2) for k in range(3)]
    img = load_image(found.files[0])
    assert img.size == (50, 30) and np.array_equal(np.asarray(img), _rgb(30, 50, seed=0))


def test_a_store_from_shards_equals_the_store_from_a_folder(shards, tmp_path):
    root, folder = shards
    args = ["--res", "16", "--batch-size", "2", *TINY_ARGS]
    a, b = tmp_path / "tar.zarr", tmp_path / "folder.zarr"
    result = _cli(f"{root}/{{000..001}}.tar", "--out", a, *args)
    assert result.exit_code == 0, result.output
    assert "5 done, 1 failed" in result.stdout and "sample11" in result.stderr  # reported, not fatal
    assert _cli(folder, "--out", b, *args).exit_code == 0
    with open_store(a) as x, open_store(b) as y:
        assert x.paths == [p.removesuffix(".png") for p in y.paths]  # shard/key for shard/key.png
        assert np.array_equal(x.status, y.status) and np.array_equal(x.sizes, y.sizes)
        assert np.array_equal(x.valid, y.valid)
        assert np.array_equal(x[0 : len(x)], y[0 : len(y)], equal_nan=True)
        assert x.status.tolist() == [1, 1, 1, 1, 2, 1]


def test_a_truncated_shard_keeps_what_it_can_and_reports_the_rest(shards, tmp_path):
    root, _ = shards
    data = (root / "001.tar").read_bytes()
    (root / "001.tar").write_bytes(data[:700] + b"\x01" * 600)  # a corrupt header after the first member
    found = list_images(f"{root}/{{000..001}}.tar")
    names = [found.relative(m) for m in found.files]
    assert names[:3] == ["000.tar/sample00", "000.tar/sample01", "000.tar/sample02"]
    assert "unreadable" in names[-1]
    result = _cli(f"{root}/{{000..001}}.tar", "--out", tmp_path / "t.zarr", "--res", "8", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    assert "corrupt tar" in result.stderr and "3 done, 1 failed" in result.stdout
    (root / "001.tar").write_bytes(data[: 512 * 5 + 100])  # cut inside the first image's data
    found = list_images(f"{root}/001.tar")
    with pytest.raises(ImageLoadError, match="ends .* early"):
        load_image(found.files[0])


def test_a_missing_shard_is_one_line(tmp_path, one_line_error):
    one_line_error(_cli(f"{tmp_path}/{{0..1}}.tar", "--out", tmp_path / "x.zarr", *TINY_ARGS), "no such tar shard")


def test_remote_shards_read_through_fsspec(shards):
    import fsspec

    root, _ = shards
    mem = fsspec.filesystem("memory")
    for s in ("000", "001"):
        mem.pipe_file(f"/tars/{s}.tar", (root / f"{s}.tar").read_bytes())
    remote = list_images("memory://tars/{000..001}.tar")
    local = list_images(f"{root}/{{000..001}}.tar")
    assert [remote.relative(m) for m in remote.files] == [local.relative(m) for m in local.files]
    assert np.array_equal(np.asarray(load_image(remote.files[2])), np.asarray(load_image(local.files[2])))
