"""What the `vitup train` tests of every method share: tiny runs' arguments and images, and the checks that
a run resumes bit for bit (stopped in-process, or SIGKILLed) and that 2 torchrun processes match 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import single_thread
from PIL import Image
from typer.testing import CliRunner

from vitup_cli.cli import app
from vitup_cli.train import loop as train_loop
from vitup_cli.train.state import LoadedState, load_state

REPO = Path(__file__).resolve().parents[1]

CliArgs = Callable[..., list[str]]
"""``cli_args(out, *extra)``: the ``vitup train`` arguments of a method's tiny run writing to ``out``."""


def _tiny_train_args(data: Path, out: Path, *flags: str) -> list[str]:
    """``vitup train`` of ``data`` into ``out`` on a random-init 2-block 64-d DINOv3-S, 2 images a step and
    no loader workers, then ``flags`` (the method's and the test's)."""
    return [
        "train", "--data", str(data), "--out", str(out), "--backbone", "dinov3_s", "--pretrained", "none",
        "--backbone-args", "depth=2,embed_dim=64,num_heads=1", "--batch-size", "2", "--workers", "0", *flags,
    ]  # fmt: skip


def _textures(folder: Path, n: int, seed: int = 0) -> Path:
    """Small images with structure: gradients, stripes, discs and noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.zeros((h, w, 3))
        for c in range(3):
            f = rng.uniform(0.05, 0.5)
            img[..., c] = 0.5 + 0.5 * np.sin(f * (xx * rng.normal() + yy * rng.normal()) + rng.uniform(0, 6))
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(5, 25)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0, 1, 3)
        img += rng.normal(0, 0.05, img.shape)
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


def _env(threads: int = 1) -> dict[str, str]:
    """This checkout on PYTHONPATH and ``threads`` torch threads, for a ``vitup`` subprocess."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}


def _losses(run: Path) -> list[float]:
    """The ``loss`` of every line of a run's metrics.jsonl."""
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def poison_loss(monkeypatch, module: Any, name: str, *, at_call: int, terms: Sequence[str] = ("loss",)) -> None:
    """Patch ``module.name``, a loss returning ``(total, terms)``, to return a NaN total at its ``at_call``-th
    call, logged as the value of each of ``terms`` too; every other call is the real loss."""
    real = getattr(module, name)
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        total, logged = real(*args)
        if calls["n"] == at_call:
            total = total * float("nan")
            logged = {**logged, **dict.fromkeys(terms, total.detach())}
        return total, logged

    monkeypatch.setattr(module, name, poisoned)


def assert_same_state(a: LoadedState, b: LoadedState) -> None:
    """Every model tensor and every optimiser state tensor of ``a`` equals ``b``'s, bit for bit."""
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name
    for index, slot in a.optimizer["state"].items():
        for key, value in slot.items():
            assert torch.equal(value, b.optimizer["state"][index][key])


def assert_stopped_run_resumes_bit_exact(
    config: Callable[[Path], Any],
    resume: Callable[[Path], Any],
    tmp_path: Path,
    *,
    stop_after: int,
    optimizer: bool = True,
) -> tuple[Path, Path]:
    """Train ``config(tmp_path / "a")`` through; train ``config(tmp_path / "b")``, stop it after ``stop_after``
    steps and go on with ``resume(tmp_path / "b")`` (the run's configuration read back: ``resume_config`` with
    the settings a resume may change). Both must end finished at the configured step with the same model
    tensors (and, with ``optimizer``, optimiser state), bit for bit, having logged the same losses. Returns
    the (straight, resumed) run folders."""
    straight, stopped = tmp_path / "a", tmp_path / "b"
    done = train_loop.train(config(straight), reporter=train_loop.NullReporter())
    first = train_loop.train(config(stopped), reporter=train_loop.NullReporter(), stop_after=stop_after)
    assert not first.finished and first.step == stop_after
    cfg = resume(stopped)
    second = train_loop.train(cfg, resume=True, reporter=train_loop.NullReporter())
    assert done.finished and second.finished and second.step == done.step == cfg.steps
    a, b = load_state(straight / "state.safetensors"), load_state(stopped / "state.safetensors")
    assert a.model.keys() == b.model.keys()
    if optimizer:
        assert_same_state(a, b)
    else:
        for name in a.model:
            assert torch.equal(a.model[name], b.model[name]), name
    assert _losses(straight) == _losses(stopped)
    return straight, stopped


def assert_killed_run_resumes_bit_exact(
    cli_args: CliArgs, tmp_path: Path, steps: Sequence[str], *, deadline_s: float
) -> None:
    """SIGKILL a CLI run (8 steps, saving every step) once it has saved step 3; ``--resume`` must end
    where an uninterrupted run with the same ``steps`` arguments ends, bit for bit."""
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitup_cli", *cli_args(killed, *steps)],
        env=_env(torch.get_num_threads()),  # same thread count as this process: same float reductions
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + deadline_s
    state = killed / "state.safetensors"
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and load_state(state).run.step >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = load_state(state).run.step
    assert 3 <= stopped_at < 8
    resumed = CliRunner().invoke(app, ["train", "--resume", str(killed)])
    assert resumed.exit_code == 0, resumed.output
    straight = tmp_path / "straight"
    done = CliRunner().invoke(app, cli_args(straight, *steps))
    assert done.exit_code == 0, done.output
    a, b = load_state(straight / "state.safetensors"), load_state(state)
    assert a.run.step == b.run.step == 8
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name


def assert_torchrun_two_match_one(
    cli_args: CliArgs,
    tmp_path: Path,
    common: Sequence[str],
    *,
    timeout: float,
    single_extra: Sequence[str] = (),
    reported_once: bool = True,
    skip: tuple[str, ...] = (),
    compared_includes: str = "",
    atol: float,
    rtol: float,
) -> tuple[LoadedState, LoadedState]:
    """Train with ``common`` on 2 torchrun gloo processes, then in this process single-threaded as each
    worker (plus ``single_extra``); check what every method shares (exit codes, rank 0 alone reporting
    when ``reported_once``, two ranks' RNG state, the same losses) and that every model tensor but those
    whose names end in ``skip`` is close (``atol``, ``rtol``), some of them named with ``compared_includes``;
    return the (single, ddp) states for the method's own checks."""
    ddp = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # torchrun picks a free port: concurrent test runs cannot collide
        "--nproc-per-node",
        "2",
        "-m",
        "vitup_cli",
        *cli_args(ddp, *common),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if reported_once:
        assert proc.stderr.count("finished at step 3") == 1  # rank 0 reports alone
    single = tmp_path / "single"
    with single_thread():  # as each torchrun worker
        done = CliRunner().invoke(app, cli_args(single, *common, *single_extra))
    assert done.exit_code == 0, done.output
    a, b = load_state(single / "state.safetensors"), load_state(ddp / "state.safetensors")
    assert len(b.rng) == 2 and b.run.world_size == 2
    assert _losses(single) == pytest.approx(_losses(ddp), rel=1e-4)
    compared = [name for name in a.model if not name.endswith(skip)]
    assert any(compared_includes in name for name in compared)
    for name in compared:
        assert torch.allclose(a.model[name], b.model[name], atol=atol, rtol=rtol), name
    return a, b
