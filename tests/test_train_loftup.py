"""`vitup train --method loftup`: the objective's pieces, both stages on SA-1B-layout data, exact resume."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from _helpers import make_sa1b
from _train_helpers import assert_stopped_run_resumes_bit_exact
from typer.testing import CliRunner

from vitup_cli.cli import app
from vitup_cli.errors import VitupError
from vitup_cli.hub import open_upsampler
from vitup_cli.train import build_config, resume_config
from vitup_cli.train import loop as train_loop
from vitup_cli.train.methods.loftup import (
    AttentionDownsampler,
    LoftUpMethod,
    LoftUpTrainConfig,
    affinity_loss,
    refine_with_masks,
)
from vitup_cli.train.state import load_state

TINY = {"backbone": "dinov2_s", "pretrained": "none", "backbone_args": "depth=1,embed_dim=32,num_heads=1"}


def _cfg(data: Path, out: Path, stage: int, **kw):
    sizes = {"image_size": 28} if stage == 1 else {"hr_size": 56, "input_sizes": "28,42", "crops": 1}
    values = {"method": "loftup", "data": str(data), "out": str(out), "stage": stage, "steps": 3, "batch_size": 2,
              "workers": 0, "device": "cpu", "log_every": 1, "save_every": 100, "tensorboard": False, "jitters": 1,
              "max_masks": 4, **TINY, **sizes, **kw}  # fmt: skip
    return build_config(None, values)


@pytest.fixture(scope="module")
def sa1b(tmp_path_factory) -> Path:
    return make_sa1b(tmp_path_factory.mktemp("sa1b"), n=4, h=48, w=64)


@pytest.fixture(scope="module")
def stage1_run(sa1b, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "s1"
    result = train_loop.train(_cfg(sa1b, out, 1), reporter=train_loop.NullReporter())
    assert result.finished and result.step == 3
    return out


def test_defaults_are_the_released_codes():
    one, two = LoftUpTrainConfig(stage=1), LoftUpTrainConfig(stage=2)
    assert (one.lr, one.weight_decay, one.jitters, one.tv_weight) == (1e-4, 0.0, 4, 0.01)
    assert (two.lr, two.weight_decay, two.jitters, two.tv_weight) == (1e-3, 0.01, 2, 0.05)
    assert (one.mask_alpha, two.hr_alpha, one.max_masks, one.batch_size, one.image_size) == (0.8, 0.5, 150, 8, 224)
    assert (two.ema_beta, two.ema_every, two.hr_size, two.input_sizes, two.hr_weight) == (
        0.99, 10, 896, [224, 336, 448, 518], 20.0,
    )  # fmt: skip


def test_masks_refine_sequentially_in_place():
    feats = torch.arange(4.0).view(1, 1, 1, 4)  # values 0 1 2 3
    masks = torch.tensor([[[[1, 1, 0, 0]], [[0, 1, 1, -1]]]], dtype=torch.int8)  # -1: padding, not in the mask
    out = refine_with_masks(feats, masks, 0.5)
    # mask 1 on {0, 1}: mean 0.5 -> 0.25, 0.75; mask 2 on {1, 2} sees the refined 0.75: mean 1.375
    assert torch.allclose(out.flatten(), torch.tensor([0.25, 0.75 * 0.5 + 1.375 * 0.5, 2 * 0.5 + 1.375 * 0.5, 3.0]))
    assert torch.equal(refine_with_masks(feats, masks, 0.0), feats)


def test_affinity_loss_and_its_bound():
    a = torch.randn(2, 8, 20, 20)
    assert affinity_loss(a, a.clone(), 0.1, 4096) == 0
    assert affinity_loss(a, torch.randn(2, 8, 20, 20), 0.1, 50) > 0  # 256 central pixels, 50 of them used


def test_downsampler_reduces_by_the_patch():
    down = AttentionDownsampler(16, 14)
    assert down(torch.randn(2, 16, 56, 42)).shape == (2, 16, 4, 3)


def test_ema_schedule_matches_ema_pytorch():
    method = LoftUpMethod(LoftUpTrainConfig(stage=2))
    assert method.ema_decay(0) == 0 and method.ema_decay(1) == 0
    assert method.ema_decay(10) == pytest.approx(1 - 10 ** (-2 / 3))
    assert method.ema_decay(10**6) == 0.99


def test_both_stages_train_and_stage_two_starts_from_stage_one(sa1b, stage1_run, tmp_path):
    rows = [json.loads(x) for x in (stage1_run / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r) >= {"loss", "mask", "multiview", "tv"} for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    cfg = _cfg(sa1b, tmp_path / "s2", 2, init=str(stage1_run / "last"), steps=2)
    method = train_loop.make_method(cfg)
    s1 = open_upsampler("loftup", checkpoint=stage1_run / "last").net.state_dict()
    for name, value in method.model.net.state_dict().items():
        assert torch.equal(value, s1[name]) and torch.equal(method.model.teacher.state_dict()[name], s1[name])
    result = train_loop.train(cfg, reporter=train_loop.NullReporter())
    assert result.finished
    rows = [json.loads(x) for x in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r) >= {"loss", "affinity", "multiview", "tv"} for r in rows)
    model = open_upsampler("loftup", checkpoint=tmp_path / "s2" / "last")
    assert model.backbone.embed_dim == 32 and model.source.endswith("last")
    with torch.no_grad():
        feats = model.features(torch.rand(1, 3, 28, 28), 20)
    assert feats.shape == (1, 32, 20, 20) and torch.isfinite(feats).all()
    changed = any(not torch.equal(v, s1[k]) for k, v in model.net.state_dict().items())
    assert changed  # stage 2 trained the student


def test_stage_two_needs_init_and_a_loftup_checkpoint(sa1b, tmp_path):
    with pytest.raises(VitupError, match="--stage 2 needs --init"):
        train_loop.make_method(_cfg(sa1b, tmp_path / "x", 2))
    with pytest.raises(VitupError, match="not a LoftUp checkpoint"):
        train_loop.make_method(_cfg(sa1b, tmp_path / "x", 2, init=str(tmp_path / "nope")))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_resume_equals_an_uninterrupted_run(sa1b, stage1_run, tmp_path, stage):
    kw = {"steps": 4, "save_every": 2}
    if stage == 2:
        kw.update(init=str(stage1_run / "last"), ema_every=1)  # EMA updates on both sides of the stop
    config = partial(_cfg, sa1b, stage=stage, **kw)
    straight, _ = assert_stopped_run_resumes_bit_exact(config, resume_config, tmp_path, stop_after=2, optimizer=False)
    if stage == 2:
        assert any(k.startswith("teacher.") for k in load_state(straight / "state.safetensors").model)


def test_cli_trains_loftup_and_refuses_a_folder_without_masks(sa1b, tmp_path):
    base = ["train", "--method", "loftup", "--backbone", "dinov2_s", "--pretrained", "none",
            "--backbone-args", "depth=1,embed_dim=32,num_heads=1", "--steps", "1", "--batch-size", "2",
            "--workers", "0", "--device", "cpu", "--image-size", "28", "--jitters", "0",
            "--no-tensorboard"]  # fmt: skip
    result = CliRunner().invoke(app, [*base, "--stage", "1", "--data", str(sa1b), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "last.safetensors").is_file()
    assert json.loads((tmp_path / "r" / "config.json").read_text())["loftup"]["paper_values"]["lr"] == 1e-3
    plain = tmp_path / "plain"
    (plain / "images").mkdir(parents=True)
    (plain / "images" / "a.jpg").write_bytes((sa1b / "sa_1.jpg").read_bytes())
    bad = CliRunner().invoke(app, [*base, "--data", str(plain), "--out", str(tmp_path / "q")])
    assert bad.exit_code == 2 and "no image with masks found" in bad.output
    vit = CliRunner().invoke(app, ["train", "--stage", "2", "--data", str(sa1b), "--out", str(tmp_path / "v")])
    assert vit.exit_code == 2 and "unknown setting 'stage' for --method vitup" in vit.output
