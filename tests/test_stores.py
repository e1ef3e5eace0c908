import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import zarr

from vitup_cli.errors import VitupError
from vitup_cli.stores import (
    DONE,
    FAILED,
    PENDING,
    StoreLayout,
    create_writer,
    open_store,
    open_writer,
    parts_dir,
    remove_store,
    store_exists,
    store_status,
)

FORMATS = ["a.zarr", "a.h5"]
PATHS = ["ü dir/a b.png", "b.jpg", "c.tif", "d.png", "e.png", "f.png", "g.png"]


def _rows(n=7, c=5, h=60, w=70, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, c, h, w)).astype(np.float32)
    tokens = rng.standard_normal((n, 4, 3, 3)).astype(np.float32)
    status = np.full(n, DONE, np.uint8)
    status[2] = FAILED
    feats[2] = np.nan
    tokens[2] = np.nan
    sizes = np.stack([np.arange(n) + 10, np.arange(n) + 20], 1)
    valid = np.tile([1, 2, 50, 60], (n, 1))
    errors = ["" if s == DONE else "not an image Pillow can read" for s in status]
    return feats, tokens, status, sizes, valid, errors


def _write_all(path, layout=None, attrs=None, pca=None):
    feats, tokens, status, sizes, valid, errors = _rows()
    layout = layout or StoreLayout.for_images(7, 5, 60, 70, 3, lowres=(4, 3, 3))
    writer = create_writer(path, layout, PATHS, attrs or {"note": {"nested": [1, 2]}, "tap": 12}, pca)
    writer.write_rows(0, feats, status, sizes, valid, errors, tokens if layout.lowres else None)
    writer.finalize({"failed": [{"path": PATHS[2], "reason": errors[2]}]})
    return feats, tokens, status, sizes, valid, errors


def _f16(a):
    return a.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("name", FORMATS)
def test_round_trip_through_the_reader(tmp_path, name):
    feats, tokens, status, sizes, valid, errors = _write_all(tmp_path / name)
    with open_store(tmp_path / name) as store:
        assert store.format == ("zarr" if name.endswith(".zarr") else "hdf5")
        assert len(store) == 7 and store.shape == (7, 5, 60, 70)
        assert store.paths == PATHS
        assert np.array_equal(store.status, status)
        assert np.array_equal(store.sizes, sizes) and np.array_equal(store.valid, valid)
        assert store.errors == errors
        for i in (0, 1, 6, -1):
            assert store[i].dtype == np.float32
            assert np.array_equal(store[i], _f16(feats[i]))
        assert np.isnan(store[2]).all()
        assert np.array_equal(store[0:7], _f16(feats), equal_nan=True)
        assert np.array_equal(store.lowres(4), _f16(tokens[4]))
        attrs = store.attrs
        assert attrs["note"] == {"nested": [1, 2]} and attrs["tap"] == 12
        assert attrs["failed"] == [{"path": PATHS[2], "reason": errors[2]}]
        assert attrs["format"] == "vitup-store/1"
        assert store.layout.shard_size == 3
        assert store.pca is None
        with pytest.raises(IndexError):
            store[7]
    assert not parts_dir(tmp_path / name).exists()


def test_plain_zarr_h5py_and_xarray_read_the_stores_without_vitup(tmp_path):
    feats, *_ = _write_all(tmp_path / "a.zarr")
    _write_all(tmp_path / "a.h5")
    np.save(tmp_path / "expected.npy", _f16(feats))
    script = f"""
import sys, json, numpy as np, zarr, h5py
root = {str(tmp_path)!r}
expected = np.load(root + "/expected.npy")
g = zarr.open_group(root + "/a.zarr", mode="r")
assert np.array_equal(g["features"][:].astype("float32"), expected, equal_nan=True)
assert g["features"].metadata.dimension_names == ("image", "channel", "y", "x")
assert list(g["status"][:]) == [1, 1, 2, 1, 1, 1, 1]
assert str(g["path"][0]) == "ü dir/a b.png"
with h5py.File(root + "/a.h5", "r") as f:
    assert np.array_equal(f["features"][:].astype("float32"), expected, equal_nan=True)
    assert f["path"].asstr()[0] == "ü dir/a b.png" and list(f["status"][:]) == [1, 1, 2, 1, 1, 1, 1]
    assert [d.label for d in f["features"].dims] == ["image", "channel", "y", "x"]
    assert json.loads(f.attrs["note"]) == {{"nested": [1, 2]}}
try:
    import xarray as xr
except ImportError:
    pass
else:
    ds = xr.open_zarr(root + "/a.zarr")
    assert ds["features"].dims == ("image", "channel", "y", "x") and ds.sizes["image"] == 7
    assert np.array_equal(ds["features"].values.astype("float32"), expected, equal_nan=True)
assert not any(m.startswith("vitup") for m in sys.modules)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("name", FORMATS)
def test_unwritten_rows_are_pending_and_nan(tmp_path, name):
    feats, _tokens, status, sizes, valid, errors = _rows()
    layout = StoreLayout.for_images(7, 5, 60, 70, 3)
    writer = create_writer(tmp_path / name, layout, PATHS, {})
    writer.write_shard(1, feats[3:6], status[3:6], sizes[3:6], valid[3:6], errors[3:6])
    assert list(store_status(tmp_path / name)) == [0, 0, 0, 1, 1, 1, 0]
    assert open_writer(tmp_path / name).done_shards() == {1}
    if name.endswith(".zarr"):
        with open_store(tmp_path / name) as store:
            assert np.isnan(store[0]).all() and np.array_equal(store[4], _f16(feats[4]))
    else:  # an unfinished HDF5 store lives in its parts folder and is not readable as a store yet
        assert not (tmp_path / name).exists()
        with pytest.raises(VitupError, match="not finished"):
            open_store(tmp_path / name)
        with pytest.raises(VitupError, match="not written yet"):
            open_writer(tmp_path / name).finalize()


@pytest.mark.parametrize("name", FORMATS)
def test_pca_projection_round_trips(tmp_path, name):
    rng = np.random.default_rng(1)
    comps = np.linalg.qr(rng.standard_normal((8, 8)))[0].T.astype(np.float32)  # orthonormal rows
    mean = rng.standard_normal(8).astype(np.float32)
    backbone_feats = rng.standard_normal((3, 8, 6, 7)).astype(np.float32)
    projected = np.einsum("kc,nchw->nkhw", comps, backbone_feats - mean[:, None, None])
    layout = StoreLayout.for_images(3, 8, 6, 7, 3, dtype="float32", pca=8, backbone_channels=8)
    writer = create_writer(tmp_path / name, layout, ["a", "b", "c"], {}, (comps, mean))
    writer.write_rows(0, projected, np.ones(3), np.ones((3, 2)), np.zeros((3, 4)))
    writer.finalize()
    with open_store(tmp_path / name) as store:
        got_comps, got_mean = store.pca
        assert np.array_equal(got_comps, comps) and np.array_equal(got_mean, mean)
        assert np.allclose(store.unproject(store[1]), backbone_feats[1], atol=1e-5)
        assert np.allclose(store.unproject(store[0:3]), backbone_feats, atol=1e-5)


def test_missing_features_array_is_a_clear_error(tmp_path):
    g = zarr.open_group(tmp_path / "x.zarr", mode="w")
    g.create_array("status", shape=(2,), dtype="uint8")
    with pytest.raises(VitupError, match="no 'features' array"):
        open_store(tmp_path / "x.zarr")
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["status"] = np.zeros(2)
    with pytest.raises(VitupError, match="no 'features' array"):
        open_store(tmp_path / "x.h5")


def test_bad_paths_and_suffixes(tmp_path):
    with pytest.raises(VitupError, match=r"NAME\.zarr"):
        open_store(tmp_path / "x.npz")
    with pytest.raises(VitupError, match="no such store"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(VitupError, match="not a readable HDF5"):
        open_store(tmp_path / "junk.h5")


@pytest.mark.parametrize("name", FORMATS)
def test_writer_refuses_partial_shards_and_existing_paths(tmp_path, name):
    feats, _tokens, status, sizes, valid, _errors = _rows()
    layout = StoreLayout.for_images(7, 5, 60, 70, 3)
    writer = create_writer(tmp_path / name, layout, PATHS, {})
    with pytest.raises(ValueError, match="whole shards"):
        writer.write_rows(1, feats[1:4], status[1:4], sizes[1:4], valid[1:4])
    with pytest.raises(ValueError, match="features"):
        writer.write_shard(0, feats[:2], status[:2], sizes[:2], valid[:2])
    with pytest.raises(ValueError, match="DONE or FAILED"):
        writer.write_shard(0, feats[:3], np.array([PENDING, 1, 1]), sizes[:3], valid[:3])
    writer.write_rows(6, feats[6:], status[6:], sizes[6:], valid[6:])  # the short last shard is whole
    assert store_exists(tmp_path / name)
    with pytest.raises(VitupError, match="already exists"):
        create_writer(tmp_path / name, layout, PATHS, {})


def test_zarr_layout_is_the_measured_one(tmp_path):
    layout = StoreLayout.for_images(10, 16, 224, 100, 4)
    writer = create_writer(tmp_path / "a.zarr", layout, [str(i) for i in range(10)], {})
    writer.finalize()
    meta = json.loads((tmp_path / "a.zarr" / "features" / "zarr.json").read_text())
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, 16, 224, 112]  # shards of 4 whole images
    assert sharding["configuration"]["chunk_shape"] == [1, 16, 56, 56]
    blosc = sharding["configuration"]["codecs"][-1]
    assert blosc["name"] == "blosc" and blosc["configuration"]["cname"] == "zstd"
    assert blosc["configuration"]["clevel"] == 1 and blosc["configuration"]["shuffle"] == "shuffle"
    assert meta["fill_value"] == "NaN" and meta["dimension_names"] == ["image", "channel", "y", "x"]
    assert (tmp_path / "a.zarr" / "zarr.json").exists()
    assert "consolidated_metadata" in json.loads((tmp_path / "a.zarr" / "zarr.json").read_text())


def test_zarr_group_chunks_keep_parallel_writers_apart():
    layout = StoreLayout.for_images(1000, 4, 8, 8, 2)  # 500 shards -> groups of 8 shards
    assert layout.group_shards == 8 and layout.group_rows == 16
    owners = [layout.owner(k, 3) for k in range(layout.num_shards)]
    for k in range(layout.num_shards):  # every row chunk (= one group) has a single owner
        assert owners[k] == owners[(k // 8) * 8]
    counts = [owners.count(r) for r in range(3)]
    assert sum(counts) == 500 and max(counts) - min(counts) <= layout.group_shards


def test_zarr_resume_discards_interrupted_writes(tmp_path):
    feats, _tokens, status, sizes, valid, errors = _rows()
    layout = StoreLayout.for_images(7, 5, 60, 70, 3)
    writer = create_writer(tmp_path / "a.zarr", layout, PATHS, {})
    writer.write_shard(0, feats[:3], status[:3], sizes[:3], valid[:3], errors[:3])
    shard = tmp_path / "a.zarr" / "features" / "c" / "1" / "0" / "0" / "0"
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_bytes(b"half a shard")  # as if a writer died mid-shard without the atomic rename
    (shard.parent / "0.abc.partial").write_bytes(b"temporary file of a killed write")
    assert open_writer(tmp_path / "a.zarr").done_shards() == {0}
    assert list((tmp_path / "a.zarr").rglob("*.partial"))  # a plain open leaves other writers' files alone
    reopened = open_writer(tmp_path / "a.zarr", recover=True)
    assert not list((tmp_path / "a.zarr").rglob("*.partial"))
    assert reopened.done_shards() == {0}
    reopened.write_shard(1, feats[3:6], status[3:6], sizes[3:6], valid[3:6], errors[3:6])
    with open_store(tmp_path / "a.zarr") as store:
        assert np.array_equal(store[4], _f16(feats[4]))


def test_remove_store_refuses_foreign_folders(tmp_path):
    folder = tmp_path / "mine.zarr"
    folder.mkdir()
    (folder / "precious.txt").write_text("do not delete")
    with pytest.raises(VitupError, match="not a Zarr store"):
        remove_store(folder)
    assert (folder / "precious.txt").exists()
    _write_all(tmp_path / "b.h5")
    remove_store(tmp_path / "b.h5")
    assert not store_exists(tmp_path / "b.h5")


# -- the threaded shard encoder (benchmarks/writer_throughput.py measures it) --------------------------
@pytest.mark.parametrize(
    ("n", "shape", "shard", "compression", "dtype"),
    [
        (7, (5, 60, 70), 3, "zstd", "float16"),  # a short last shard, edge chunks on both axes
        (6, (8, 56, 112), 2, "lz4", "float32"),  # chunks that tile the image exactly
        (5, (4, 20, 24), 4, "none", "float16"),  # one chunk per image, no compression
    ],
)
def test_threaded_zarr_shards_equal_zarrs_own(tmp_path, n, shape, shard, compression, dtype):
    """The same rows written by vitup's shard encoder (4 threads) and by zarr's own codec pipeline read back
    identically, through zarr, for every codec, dtype and edge case; failed rows stay NaN."""
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((n, *shape)).astype(dtype)
    status = np.full(n, DONE, np.uint8)
    status[1], feats[1] = FAILED, np.nan
    read = {}
    for threads in (0, 4):
        path = tmp_path / f"t{threads}.zarr"
        layout = StoreLayout.for_images(n, *shape, shard, dtype=dtype)
        with create_writer(path, layout, [f"{i}.png" for i in range(n)], compression=compression, threads=threads) as w:
            for k in range(layout.num_shards):
                a, b = layout.shard_rows(k)
                w.write_shard(k, feats[a:b], status[a:b], np.zeros((b - a, 2)), np.zeros((b - a, 4)))
            w.finalize()
        read[threads] = np.asarray(zarr.open_array(path / "features", mode="r")[:])
        with open_store(path) as store:
            assert (store.status == status).all()
    np.testing.assert_array_equal(read[4], read[0])
    np.testing.assert_array_equal(read[4][0], feats[0])
    assert np.isnan(read[4][1]).all()


def test_threaded_writer_survives_a_half_written_shard(tmp_path):
    """A shard file left by a killed writer is replaced whole, and rows whose status is not done read as
    pending (the status is written after the shard)."""
    feats, _, status, sizes, valid, errors = _rows()
    layout = StoreLayout.for_images(7, 5, 60, 70, 3)
    path = tmp_path / "a.zarr"
    with create_writer(path, layout, PATHS, threads=2) as w:
        w.write_shard(0, feats[:3], status[:3], sizes[:3], valid[:3], errors[:3])
    half = path / "features" / "c" / "1" / "0" / "0" / "0"
    half.parent.mkdir(parents=True)
    half.write_bytes(b"half a shard")
    with open_store(path) as store:
        assert (store.status[3:] == PENDING).all()
    with open_writer(path, recover=True, threads=2) as w:
        w.write_shard(1, feats[3:6], status[3:6], sizes[3:6], valid[3:6], errors[3:6])
        w.write_shard(2, feats[6:], status[6:], sizes[6:], valid[6:], errors[6:])
        w.finalize()
    with open_store(path) as store:
        np.testing.assert_array_equal(store[0:7], feats.astype(np.float16).astype(np.float32))
