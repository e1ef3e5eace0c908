"""vitup train --method featsharp: views and homographies, the downsampler, the objective, the run, resume, DDP."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _train_helpers import (
    _textures,
    _tiny_train_args,
    assert_killed_run_resumes_bit_exact,
    assert_stopped_run_resumes_bit_exact,
    assert_torchrun_two_match_one,
)
from conftest import TINY
from PIL import Image
from typer.testing import CliRunner

from vitup_cli.cli import app
from vitup_cli.errors import VitupError
from vitup_cli.hub import open_upsampler
from vitup_cli.models import FeatSharp
from vitup_cli.train import build_config, resume_config
from vitup_cli.train import loop as train_loop
from vitup_cli.train.data import TRAIN_STREAM
from vitup_cli.train.methods import METHODS
from vitup_cli.train.methods.featsharp import (
    AttentionDownsampler,
    FeatSharpMethod,
    FeatSharpTrainConfig,
    MultiViewDataset,
    ViewSpec,
    apply_homography,
    cell_centres,
    homography,
    make_views,
    seam_grid,
)
from vitup_cli.train.state import load_state


def tiny_config(data: Path, out: Path, **kw) -> FeatSharpTrainConfig:
    """64 px global views (4x4 tokens), 128 px student crops: a few steps take seconds on a CPU."""
    base = dict(
        data=str(data), out=str(out), backbone="dinov3_s", pretrained="none", backbone_args=dict(TINY),
        input_tokens=4, steps=6, batch_size=2, workers=0, save_every=3, log_every=1, lr=1e-3, warmup=0.2,
        phis_images=6,
    )  # fmt: skip
    base.update(kw)
    return FeatSharpTrainConfig(**base)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    return _textures(tmp_path_factory.mktemp("fs_images"), 6)


# -- configuration ------------------------------------------------------------------------------------
def test_defaults_are_the_papers():
    cfg = FeatSharpTrainConfig()
    assert METHODS["featsharp"] is FeatSharpMethod and cfg.method == "featsharp"
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.jitters, cfg.downsampler_kernel) == (9000, 32, 1e-4, 5, 7)
    assert round(cfg.warmup * cfg.steps) == 100 and cfg.factor == 2 and cfg.window == 7 and cfg.precision == "fp32"
    assert build_config(None, {"method": "featsharp", "factor": 4}).factor == 4
    with pytest.raises(VitupError, match="unknown setting 'lora_r' for --method featsharp"):
        build_config(None, {"method": "featsharp", "lora_r": 4})


@pytest.mark.parametrize(("change", "message"), [({"factor": 3}, "--factor 3"), ({"jitters": 0}, "--jitters")])
def test_bad_settings_name_the_flag(change, message, image_dir, tmp_path):
    with pytest.raises(VitupError, match=message):
        train_loop.make_method(tiny_config(image_dir, tmp_path / "x", **change))


# -- views ---------------------------------------------------------------------------------------------
def test_homography_maps_the_four_points():
    src = np.array([[-1.0, -1], [1, -1], [1, 1], [-1, 1]])
    dst = np.array([[3.0, 4], [20, 2], [22, 19], [1, 17]])
    h = homography(src, dst)
    out = apply_homography(torch.from_numpy(h), torch.from_numpy(src)).numpy()
    assert np.allclose(out, dst)


def _smooth_image(h=300, w=400) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([np.sin(xx / 23.0), np.cos(yy / 17.0), np.sin((xx + yy) / 31.0)], -1) * 0.5 + 0.5
    return Image.fromarray((img * 255).astype(np.uint8))


def test_each_view_is_the_student_through_its_homography():
    """Sampling the student crop through a view's transform reproduces that view where it is valid."""
    spec = ViewSpec(student=128, view=64, grid=4, jitters=5, rotation=5.0, shift=0.1, perspective=(0.01, 0.05))
    sample = make_views(_smooth_image(), spec, np.random.default_rng(3))
    student = sample["student"].float()[None] / 255
    assert sample["views"].shape == (5, 3, 64, 64) and sample["transforms"].shape == (5, 3, 3)
    for i in range(5):
        grid = apply_homography(sample["transforms"][i].double(), cell_centres(64)).reshape(1, 64, 64, 2).float()
        back = F.grid_sample(student, grid, mode="bilinear", align_corners=False)[0]
        view = sample["views"][i].float() / 255
        inside = (grid[0].abs() <= 0.97).all(-1)
        assert inside.float().mean() > 0.6
        err = (back - view).abs()[:, inside]
        assert err.mean() < 0.02, (i, err.mean())
        other = sample["views"][(i + 1) % 5].float() / 255
        assert (back - other).abs()[:, inside].mean() > 2 * err.mean()  # the transforms are not interchangeable


def test_identity_jitter_and_validity():
    spec = ViewSpec(student=64, view=32, grid=4, jitters=2, jitter_zoom=1.0, rotation=0, shift=0, perspective=(0, 0))
    sample = make_views(_smooth_image(), spec, np.random.default_rng(0))
    assert torch.allclose(sample["transforms"], torch.eye(3).expand(2, 3, 3), atol=1e-5)
    assert torch.all(sample["valid"] == 1)
    wide = ViewSpec(student=64, view=32, grid=4, jitters=12, jitter_zoom=0.5, rotation=0, shift=0, perspective=(0, 0))
    zoomed_out = make_views(_smooth_image(), wide, np.random.default_rng(1))  # views up to 2x the crop: borders out
    scale = zoomed_out["transforms"][:, 0, 0]
    assert (scale > 1.5).any() and (scale < 1.3).any()
    for v in zoomed_out["valid"][scale > 1.5]:  # the outer tokens see beyond the student crop
        assert v[0, 0] == 0 and v[1:3, 1:3].all()
    assert torch.all(zoomed_out["valid"][scale < 1.3] == 1)


def test_samples_depend_only_on_their_position(image_dir):
    spec = ViewSpec(student=128, view=64, grid=4, seed=1)
    files = sorted(image_dir.glob("*.png"))
    a, b = MultiViewDataset(files, spec, TRAIN_STREAM), MultiViewDataset(files, spec, TRAIN_STREAM)
    assert all(torch.equal(a[5][k], b[5][k]) for k in ("student", "views", "transforms", "valid"))
    assert not torch.equal(a[5]["views"], a[6]["views"])


def test_seam_grid():
    g = seam_grid(4, 2, 2.0)
    assert g.shape == (1, 1, 8, 8) and torch.isclose(g.mean(), torch.tensor(1.0))
    assert g[0, 0, 3, 0] == g[0, 0, 4, 7] == g[0, 0, 0, 4] and g[0, 0, 3, 0] == 2 * g[0, 0, 0, 0]
    assert torch.all(seam_grid(4, 4, 2.0)[0, 0, :, 11] > 1)


# -- the objective ---------------------------------------------------------------------------------------
def test_attention_downsampler_with_flat_logits_is_a_window_mean():
    torch.manual_seed(0)
    down = AttentionDownsampler(6, kernel=3, factor=2).eval()
    with torch.no_grad():
        down.attn_kernel.zero_()
        down.kernel_bias.zero_()
        down.logit_bias.zero_()
    x = torch.randn(2, 6, 8, 8)
    blurred = F.conv2d(x, down.blur.expand(6, 1, 5, 5), padding=2, groups=6)
    expected = F.avg_pool2d(F.pad(blurred, [1] * 4), 3, stride=2)
    torch.testing.assert_close(down(x), expected)
    assert AttentionDownsampler(6, kernel=7, factor=4)(torch.randn(1, 6, 16, 16)).shape == (1, 6, 4, 4)


def _fixed_batch(method: FeatSharpMethod, files):
    ds = method.dataset(files, TRAIN_STREAM)
    batch = method.collate([ds[i] for i in range(2)])
    return batch


def test_a_few_steps_reduce_the_loss_and_the_fidelity_stays_finite(image_dir, tmp_path):
    method = train_loop.make_method(tiny_config(image_dir, tmp_path / "x", downsampler_dropout=0.0))
    files = sorted(image_dir.glob("*.png"))
    batch = _fixed_batch(method, files)
    fs = method.featsharp
    assert fs.phis.fitted and int(fs.phis.samples) == 6 * 16
    method.set_train_mode()
    params = method.trainable_parameters()
    names = {n for n, _ in params}
    assert any(n.startswith("featsharp.head.block.") for n in names) and "featsharp.head.debias" in names
    assert any(n.startswith("downsampler.") for n in names) and any(n.startswith("uncertainty.") for n in names)
    assert not any(n.startswith("featsharp.backbone.") for n in names)
    opt = method.optimizer(params)
    assert isinstance(opt, torch.optim.NAdam) and opt.param_groups[1]["lr"] == pytest.approx(1e-4)
    history = []
    for step in range(10):
        opt.zero_grad()
        loss, terms = method.loss(method.student(), batch, torch.device("cpu"), torch.autocast("cpu", enabled=False))
        loss.backward()
        if step == 0:
            for name, p in method.model.named_parameters():
                if name.startswith("featsharp.backbone."):
                    assert p.grad is None, name
                else:
                    assert p.grad is not None and torch.isfinite(p.grad).all(), name
        history.append({k: float(v) for k, v in terms.items()})
        assert all(math.isfinite(v) for v in history[-1].values())
        # fidelity = MSE(Y, mu_Y) / MSE(X, Y): the dataset variance over the raw-space error
        variance = float(fs.phis.alpha) ** -2
        assert history[-1]["fidelity"] == pytest.approx(variance / history[-1]["rec_raw"], rel=1e-4)
        opt.step()
    print([round(h["loss"], 4) for h in history], [round(h["fidelity"], 3) for h in history])
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["fidelity"] > history[0]["fidelity"]


def test_fidelity_is_one_over_the_phis_error():
    """PHI-S is a similarity: MSE in raw space = alpha^-2 x MSE in PHI-S space, so fidelity = 1 / that."""
    from conftest import tiny_backbone

    from vitup_cli.models import FeatSharpConfig

    fs = FeatSharp(tiny_backbone(), FeatSharpConfig(input_tokens=4))
    fs.fit_statistics([torch.rand(8, 3, 96, 96, generator=torch.Generator().manual_seed(0))])
    x, y = torch.randn(3, 64, 4, 4), torch.randn(3, 64, 4, 4)
    raw = (fs.phis.denormalize(x) - fs.phis.denormalize(y)).pow(2).mean()
    torch.testing.assert_close(raw * fs.phis.alpha**2, (x - y).pow(2).mean(), rtol=1e-4, atol=0)


# -- the run ---------------------------------------------------------------------------------------------
def test_a_run_saves_a_featsharp_checkpoint_and_logs_fidelity(image_dir, tmp_path):
    cfg = tiny_config(image_dir, tmp_path / "run", steps=3, save_every=3, val_data=str(image_dir), val_images=2)
    result = train_loop.train(cfg, reporter=train_loop.NullReporter())
    assert result.finished and result.last_checkpoint is not None and result.best_checkpoint is not None
    up = open_upsampler(checkpoint=result.last_checkpoint)
    assert isinstance(up, FeatSharp) and up.phis.fitted and up.factor == 2
    with torch.no_grad():
        assert up.features(torch.rand(1, 3, 128, 128), 8).shape == (1, 64, 8, 8)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(line["fidelity"]) for line in lines if "fidelity" in line)
    assert any("val_fidelity" in line for line in lines)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["method"] == "featsharp" and record["parameters"]["total"] > 0
    meta = json.loads((tmp_path / "run" / "last.json").read_text())
    assert meta["upsampler"] == "featsharp" and meta["train"]["config"]["method"] == "featsharp"


def test_resume_is_bit_exact(image_dir, tmp_path):
    """3 steps, stop, resume for 3 more == 6 uninterrupted steps (weights, PHI-S, optimiser, metrics)."""
    config = partial(tiny_config, image_dir, steps=6, save_every=100)
    straight, _ = assert_stopped_run_resumes_bit_exact(config, resume_config, tmp_path, stop_after=3)
    assert "featsharp.phis.rotation" in load_state(straight / "state.safetensors").model


def _cli_args(image_dir: Path, out: Path, *extra: str) -> list[str]:
    return _tiny_train_args(
        image_dir, out, "--method", "featsharp", "--factor", "2", "--input-tokens", "4", "--phis-images", "6", *extra
    )


def test_cli_trains_featsharp_and_refuses_other_methods_flags(image_dir, tmp_path):
    result = CliRunner().invoke(app, _cli_args(image_dir, tmp_path / "cli", "--steps", "2", "--jitters", "2"))
    assert result.exit_code == 0, result.output
    assert "FeatSharp 2x" in result.output and "finished at step 2" in result.output
    saved = json.loads((tmp_path / "cli" / "config.json").read_text())["config"]
    assert saved["method"] == "featsharp" and saved["jitters"] == 2 and saved["lr"] == 1e-4
    bad = CliRunner().invoke(app, _cli_args(image_dir, tmp_path / "bad", "--lora-r", "4"))
    assert bad.exit_code == 2 and "unknown setting 'lora_r' for --method featsharp" in bad.output


@pytest.mark.integration
@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(image_dir, tmp_path):
    """SIGKILL a CLI run after its first saves; --resume ends where an uninterrupted run ends, bit for bit."""
    steps = ["--steps", "8", "--save-every", "1", "--lr", "1e-3"]
    assert_killed_run_resumes_bit_exact(partial(_cli_args, image_dir), tmp_path, steps, deadline_s=180)


@pytest.mark.integration
@pytest.mark.slow
def test_torchrun_two_processes_match_one(image_dir, tmp_path):
    """2 gloo processes (1 image each per step, PHI-S statistics sharded and merged) reach the weights of
    1 process with the same global batch."""
    no_dropout = tmp_path / "c.toml"  # the downsampler's logit dropout draws per-process noise
    no_dropout.write_text("downsampler_dropout = 0.0\n")
    common = ["--steps", "3", "--save-every", "3", "--log-every", "1", "--config", str(no_dropout)]
    a, b = assert_torchrun_two_match_one(
        partial(_cli_args, image_dir), tmp_path, common, timeout=400, reported_once=False, atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(a.model["featsharp.phis.mean"], b.model["featsharp.phis.mean"], rtol=1e-6, atol=1e-6)
