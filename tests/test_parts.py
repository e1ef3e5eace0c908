"""Job arrays without a rendezvous: ``--part I/N`` processes share one store (created once, by whichever
part arrives first), own disjoint shard groups, resume per part, and end equal to one run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from _extract_helpers import TINY_ARGS, _cli, _env, _folder

from vitup_cli.errors import VitupError
from vitup_cli.extract import parse_part
from vitup_cli.stores import open_store, store_status

ARGS = ["--res", "16", "--batch-size", "1", *TINY_ARGS[:-2], "--workers", "1"]


def _same_as_one_run(one, parts, made_for=3):
    with open_store(one) as x, open_store(parts) as y:
        assert x.shape == y.shape and x.paths == y.paths
        assert np.array_equal(x.status, y.status) and x.errors == y.errors
        assert np.array_equal(x.sizes, y.sizes) and np.array_equal(x.valid, y.valid)
        assert np.array_equal(x[0 : len(x)], y[0 : len(y)], equal_nan=True)
        ax, ay = x.attrs, y.attrs
        assert ay["parts"] == made_for and ay["complete"] is True
        for key in ("command", "created", "completed", "resumed", "parts"):
            ax.pop(key, None), ay.pop(key, None)
        assert ax == ay


def _part(images, out, i, n=3, *extra):
    cmd = [sys.executable, "-m", "vitup_cli", "extract", str(images), "--out", str(out), *ARGS,
           "--part", f"{i}/{n}", *extra]  # fmt: skip
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.integration
@pytest.mark.slow
def test_three_concurrent_parts_equal_one_run(tmp_path):
    images = _folder(tmp_path / "in", n=10)
    (images / "zz bad.png").write_bytes(b"")
    one, parts = tmp_path / "one.zarr", tmp_path / "parts.zarr"
    assert _cli(images, "--out", one, *ARGS).exit_code == 0
    procs = [_part(images, parts, i) for i in (1, 2, 3)]  # all at once: they race to create the store
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert sum("waiting for another part" in err or "joining" in err for _o, err in outs) == 2  # one created it
    assert any("10 done, 1 failed" in out for out, _e in outs)  # the last part to finish finalised
    _same_as_one_run(one, parts)
    assert not (tmp_path / "parts.zarr.vitup-lock").exists()  # every part released its lock


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_part_resumes_and_the_store_equals_one_run(tmp_path):
    n = 120  # 40 rows per part (~1 s of work): the victim is killed with most still pending, even on a loaded box
    images = _folder(tmp_path / "in", n=n)
    one, parts = tmp_path / "one.zarr", tmp_path / "parts.zarr"
    assert _cli(images, "--out", one, *ARGS).exit_code == 0
    create = _cli(images, "--out", parts, *ARGS, "--create-only")  # the explicit first step of an sbatch script
    assert create.exit_code == 0 and f"ready for {n} images" in create.stderr
    assert (store_status(parts) == 0).all()
    victim = _part(images, parts, 2)
    with open_store(parts) as store:  # shards of one image; whole groups of them go round-robin over parts
        group = store.attrs["layout"]["group_shards"]
    mine = [k for k in range(n) if (k // group) % 3 == 1]
    deadline = time.time() + 120
    while victim.poll() is None and time.time() < deadline:
        if int((store_status(parts)[mine] != 0).sum()) >= 2:
            os.kill(victim.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stderr.read()
    others = [_part(images, parts, i) for i in (1, 3)]
    for p in others:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        assert "pending" in out  # part 2's rows are missing: nobody finalised
    status = store_status(parts)
    assert (status[mine] == 0).any() and (np.delete(status, mine) != 0).all()
    again = _part(images, parts, 2, 3, "--resume")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    assert "stale lock" in err and f"{n} done, 0 failed" in out
    _same_as_one_run(one, parts, made_for=None)  # --create-only serves parts of any N


def test_part_values_and_combinations_are_one_line(tmp_path, one_line_error):
    assert parse_part("2/8") == (2, 8) and parse_part(None) is None
    for bad in ("0/3", "4/3", "a/b", "3"):
        with pytest.raises(VitupError, match="--part"):
            parse_part(bad)
    images = _folder(tmp_path / "in", n=1)
    for extra, message in (
        (["--part", "1/2", "--out", tmp_path / "x.h5"], "HDF5"),
        (["--part", "1/2", "--out", tmp_path / "x.zarr", "--overwrite"], "--create-only --overwrite"),
        (["--part", "5/2", "--out", tmp_path / "x.zarr"], "--part 5/2"),
    ):
        one_line_error(_cli(images, *extra, *ARGS), message)


def test_a_part_refuses_a_store_made_for_another_count(tmp_path):
    images = _folder(tmp_path / "in", n=4)
    out = tmp_path / "p.zarr"
    assert _cli(images, "--out", out, *ARGS, "--part", "1/2").exit_code == 0
    result = _cli(images, "--out", out, *ARGS, "--part", "1/4")
    assert result.exit_code == 2 and "made for 2 parts" in result.stderr
    done = _cli(images, "--out", out, *ARGS, "--part", "2/2")
    assert done.exit_code == 0 and "4 done, 0 failed" in done.stdout
    with open_store(out) as store:
        assert store.attrs["complete"] and store.attrs["parts"] == 2
