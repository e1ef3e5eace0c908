"""What the `vitup extract` tests share (extract, parts, shards, locks, remote stores): a tiny random-init
backbone's flags, small image folders, the command in-process and as processes, and store comparison."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from vitup_cli.cli import app
from vitup_cli.errors import VitupError
from vitup_cli.stores import open_store, store_status

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
BACKBONE = ["--backbone", "dinov3_s", "--pretrained", "none", "--backbone-args", "depth=2,embed_dim=64,num_heads=1"]
TINY_ARGS = [*BACKBONE, "--upsampler", "bilinear", "--input-size", "64", "--workers", "0"]


def _rgb(h=40, w=60, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _folder(root, n=6, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_rgb(30 + 3 * i, 50, seed=seed + i)).save(root / f"img{i:02d}.png")
    return root


def _cli(*args, **kw):
    return runner.invoke(app, ["extract", *[str(a) for a in args]], **kw)


def _assert_same_store(a, b, so_a=None, so_b=None):
    """Two stores (``so_a``/``so_b``: their storage options) hold the same rows, features and attributes,
    but for when and how they were made."""
    with open_store(a, so_a) as x, open_store(b, so_b) as y:
        assert x.shape == y.shape and x.paths == y.paths
        assert np.array_equal(x.status, y.status)
        assert np.array_equal(x.sizes, y.sizes) and np.array_equal(x.valid, y.valid)
        assert x.errors == y.errors
        assert np.array_equal(x[0 : len(x)], y[0 : len(y)], equal_nan=True)
        ax, ay = x.attrs, y.attrs
        for key in ("command", "created", "completed", "resumed"):
            ax.pop(key, None), ay.pop(key, None)
        assert ax == ay


# -- crash and resume, torchrun: whole processes -----------------------------------------------------
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # like torchrun's workers; the in-process runs match it (one_thread)
    return env


def _kill_extract_after(
    images: Path,
    out: Path | str,
    args: list,
    rows: int,
    *,
    poll_s: float,
    transient: tuple[type[Exception], ...] = (VitupError, OSError, ValueError),
) -> int:
    """Run ``vitup extract IMAGES --out OUT ARGS`` as a process, SIGKILL it once ``rows`` rows are written
    (reading the store's status every ``poll_s``; ``transient``: errors of a store still being made) and
    return how many rows it left pending."""
    cmd = [sys.executable, "-m", "vitup_cli", "extract", str(images), "--out", str(out), *map(str, args)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        try:
            done = int((store_status(out) != 0).sum())
        except transient:
            done = 0
        if done >= rows:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(poll_s)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-run (rc {proc.returncode}): {proc.stderr.read()}"
    return int((store_status(out) == 0).sum())


def _torchrun_extract(images: Path, out: Path | str, args: list[str]) -> subprocess.CompletedProcess:
    """``vitup extract`` on 2 CPU processes under ``torchrun --standalone``; it must succeed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vitup_cli",
           "extract", str(images), "--out", str(out), *args, "--device", "cpu"]  # fmt: skip
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
