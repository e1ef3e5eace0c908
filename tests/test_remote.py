"""Stores and inputs where users' data lives: Zarr at fsspec URLs (S3 through a moto server on 127.0.0.1,
started by the test, and memory://), remote @list.txt inputs, HDF5 to a URL refused."""

import os
import socket

import numpy as np
import pytest
from _extract_helpers import TINY_ARGS, _assert_same_store, _cli, _folder, _kill_extract_after, _torchrun_extract
from conftest import single_thread

from vitup_cli.errors import VitupError
from vitup_cli.extract import ExtractConfig, parse_storage_options, run_extract
from vitup_cli.progress import SilentReporter
from vitup_cli.stores import open_store, store_status

moto_server = pytest.importorskip("moto.server", reason="moto[server] is a dev extra")
s3fs = pytest.importorskip("s3fs", reason="s3fs is the 's3' extra")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port; the AWS environment points at it (subprocesses inherit it)."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("feats")
    yield {"endpoint": endpoint, "fs": fs}
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


ARGS = ["--res", "16", "--batch-size", "2", *TINY_ARGS]


def test_extract_to_s3_equals_the_local_store_and_xarray_reads_it(s3, tmp_path):
    images = _folder(tmp_path / "in", n=5)
    (images / "bad.png").write_bytes(b"")
    local, url = tmp_path / "local.zarr", "s3://feats/one.zarr"
    assert _cli(images, "--out", local, *ARGS).exit_code == 0
    result = _cli(images, "--out", url, *ARGS, "--storage-option", f"endpoint_url={s3['endpoint']}")
    assert result.exit_code == 0, result.output
    assert "5 done, 1 failed" in result.stdout and "remote store" in result.stdout
    so = {"endpoint_url": s3["endpoint"]}
    _assert_same_store(local, url, None, so)
    import xarray as xr

    ds = xr.open_zarr(url, storage_options=so)
    assert ds["features"].dims == ("image", "channel", "y", "x") and ds["features"].shape == (6, 64, 16, 16)
    with open_store(local) as store:
        assert np.array_equal(ds["features"].values.astype(np.float32), store[0:6], equal_nan=True)
    again = _cli(images, "--out", url, *ARGS)  # an existing store in the bucket is refused like a local one
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_resume_over_a_bucket_reads_status_and_never_lists(s3, tmp_path, monkeypatch):
    images = _folder(tmp_path / "in", n=6)
    config = ExtractConfig(
        images, "s3://feats/resume.zarr", res=(8, 8), backbone="dinov3_s", pretrained="none",
        backbone_args={"depth": 2, "embed_dim": 64, "num_heads": 1}, input_size=64, workers=0, batch_size=2,
        upsampler="bilinear",
    )  # fmt: skip
    run_extract(config, reporter=SilentReporter())
    listed = []

    def no_listing(self, path, *a, **kw):
        listed.append(path)
        raise AssertionError(f"listed {path}")

    for name in ("_lsdir", "_find", "_ls"):
        monkeypatch.setattr(s3fs.S3FileSystem, name, no_listing)
    from dataclasses import replace

    summary = run_extract(replace(config, resume=True), reporter=SilentReporter())
    assert summary.skipped == 6 and summary.processed == 0 and not listed
    assert store_status("s3://feats/resume.zarr").tolist() == [1] * 6


@pytest.mark.integration
@pytest.mark.slow
def test_sigkill_then_resume_against_the_bucket_equals_uninterrupted(s3, tmp_path):
    images = _folder(tmp_path / "in", n=20)
    (images / "zz broken.jpg").write_text("not an image")
    args = ["--res", "16", "--batch-size", "1", "--workers", "1", *TINY_ARGS[:-2]]
    reference, killed = tmp_path / "ref.zarr", "s3://feats/killed.zarr"
    assert _cli(images, "--out", reference, *args).exit_code == 0
    left = _kill_extract_after(
        images, killed, args, 3, poll_s=0.02, transient=(VitupError, OSError, ValueError, KeyError)
    )
    assert 0 < left < 21
    # the killed job's lock is stale (its pid is dead) but on a remote store only age tells: a short timeout
    result = _cli(images, "--out", killed, *args, "--resume", "--lock-timeout", "0")
    assert result.exit_code == 0, result.output
    assert "stale lock" in result.stderr and f"{21 - left} skipped" in result.stdout
    _assert_same_store(reference, killed)


@pytest.mark.integration
@pytest.mark.slow
def test_torchrun_two_processes_into_one_bucket_store_equal_one(s3, tmp_path):
    images = _folder(tmp_path / "in", n=9)
    (images / "bad.png").write_bytes(b"")
    args = ["--res", "16", "--batch-size", "2", "--tokens", *TINY_ARGS]
    single, double = tmp_path / "one.zarr", "s3://feats/two.zarr"
    assert _cli(images, "--out", single, *args).exit_code == 0
    result = _torchrun_extract(images, double, args)
    assert "9 done, 1 failed" in result.stdout
    _assert_same_store(single, double)


def test_memory_urls_and_remote_list_inputs(tmp_path):
    import fsspec

    images = _folder(tmp_path / "in", n=3)
    mem = fsspec.filesystem("memory")
    for p in sorted(images.iterdir()):
        mem.pipe_file(f"/imgs/{p.name}", p.read_bytes())
    lines = ["img00.png", "memory://imgs/img01.png", "# a comment", "img02.png", "missing.png"]
    mem.pipe_file("/imgs/list.txt", "\n".join(lines).encode())
    url = "memory://out/list.zarr"
    result = _cli("@memory://imgs/list.txt", "--out", url, *ARGS)
    assert result.exit_code == 0, result.output
    assert "3 done, 1 failed" in result.stdout and "missing.png" in result.stderr
    local = tmp_path / "local.zarr"
    assert _cli(images, "--out", local, *ARGS).exit_code == 0
    with open_store(url) as remote, open_store(local) as here:
        assert remote.paths == ["img00.png", "img01.png", "img02.png", "missing.png"]
        assert remote.errors[3] == "file does not exist"
        assert np.array_equal(remote[0:3], here[0:3], equal_nan=True)


def test_hdf5_to_a_url_and_bad_storage_options_are_one_line(tmp_path, one_line_error):
    images = _folder(tmp_path / "in", n=1)
    one_line_error(_cli(images, "--out", "s3://feats/x.h5", *ARGS), "HDF5 stores are local files")
    one_line_error(_cli(images, "--out", "memory://x/y.zarr", *ARGS, "--storage-option", "novalue"), "--storage-option")
    assert parse_storage_options(["anon=true", "endpoint_url=http://h:1", 'client_kwargs={"a": 1}']) == {
        "anon": True, "endpoint_url": "http://h:1", "client_kwargs": {"a": 1},
    }  # fmt: skip
