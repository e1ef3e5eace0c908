"""The store lock: a second job on one store is refused naming the holder; stale locks are taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from _extract_helpers import TINY_ARGS, _assert_same_store, _cli, _env, _folder

from vitup_cli import locks
from vitup_cli.errors import VitupError


def test_second_holder_is_refused_with_pid_host_and_start_time(tmp_path):
    store = tmp_path / "s.zarr"
    first = locks.acquire(store, command="vitup extract a")
    with pytest.raises(VitupError) as err:
        locks.acquire(store)
    message = str(err.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "started" in message
    assert "another job is writing this store" in message
    with pytest.raises(VitupError, match="another job"):  # a part respects a whole job's lock
        locks.acquire(store, part=(1, 2), also_check=["job.json"])
    first.release()
    again = locks.acquire(store)
    again.release()
    assert not (tmp_path / "s.zarr.vitup-lock" / "job.json").exists()


def test_a_dead_pid_on_this_host_is_stale_and_taken_over(tmp_path):
    store = tmp_path / "s.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / "s.zarr.vitup-lock"
    folder.mkdir()
    record = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "then", "heartbeat": time.time()}
    (folder / "job.json").write_text(json.dumps(record))
    warnings = []
    lock = locks.acquire(store, warn=warnings.append)
    assert warnings and "stale lock" in warnings[0] and f"pid {record['pid']}" in warnings[0]
    assert json.loads((folder / "job.json").read_text())["pid"] == os.getpid()
    lock.release()


def test_remote_locks_go_stale_by_age_and_release_only_their_own(tmp_path):
    store = "memory://locks/a.zarr"
    lock = locks.acquire(store)
    with pytest.raises(VitupError, match="another job"):
        locks.acquire(store, timeout=3600)  # a live heartbeat
    warnings = []
    taker = locks.acquire(store, timeout=0, warn=warnings.append)  # no pid can be checked remotely: age only
    assert warnings
    lock.release()  # not its lock any more: the taker keeps it
    with pytest.raises(VitupError, match="another job"):
        locks.acquire(store, timeout=3600)
    taker.release()
    locks.acquire(store).release()


@pytest.mark.integration
@pytest.mark.slow
def test_two_concurrent_jobs_the_second_is_refused_and_the_first_finishes(tmp_path, one_line_error):
    images = _folder(tmp_path / "in", n=24)
    args = ["--res", "16", "--batch-size", "1", *TINY_ARGS]
    reference, store = tmp_path / "ref.zarr", tmp_path / "shared.zarr"
    assert _cli(images, "--out", reference, *args).exit_code == 0
    cmd = [sys.executable, "-m", "vitup_cli", "extract", str(images), "--out", str(store), *args]
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock_file = tmp_path / "shared.zarr.vitup-lock" / "job.json"
    deadline = time.time() + 60
    while not lock_file.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert lock_file.exists(), "the first job should hold the lock while it runs"
    for extra in ([], ["--resume"], ["--overwrite"]):
        one_line_error(_cli(images, "--out", store, *args, *extra), f"pid {first.pid} on {socket.gethostname()}")
    assert first.poll() is None, "the second job was checked while the first still ran"
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert "24 done, 0 failed" in out
    _assert_same_store(reference, store)  # --overwrite deleted nothing
    assert not lock_file.exists()
