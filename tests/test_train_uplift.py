"""vitup train --method uplift: the recipe, the losses, checkpoints, exact resume, DDP."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from _train_helpers import (
    _textures,
    _tiny_train_args,
    assert_killed_run_resumes_bit_exact,
    assert_stopped_run_resumes_bit_exact,
    assert_torchrun_two_match_one,
    poison_loss,
)
from conftest import TINY
from typer.testing import CliRunner

from vitup_cli.cli import app
from vitup_cli.errors import VitupError
from vitup_cli.train import build_config, resume_config
from vitup_cli.train import loop as train_loop
from vitup_cli.train.methods.uplift import UpliftTrainConfig, pyramid, uplift_loss
from vitup_cli.train.state import load_state


def tiny_uplift_config(data: Path, out: Path, **kw) -> UpliftTrainConfig:
    """A few seconds per run on a CPU: 64 px images, 16/32/64 px pyramid, a 2-block 64-d backbone."""
    base = dict(
        method="uplift",
        data=str(data),
        out=str(out),
        backbone="dinov3_s",
        pretrained="none",
        backbone_args=dict(TINY),
        image_size=64,
        steps=6,
        batch_size=2,
        workers=0,
        save_every=3,
        log_every=1,
    )
    base.update(kw)
    return build_config(None, base)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = _textures(tmp_path_factory.mktemp("images"), 5, seed=7)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def _cli_args(image_dir: Path, out: Path, *extra: str, size: int = 64) -> list[str]:
    return _tiny_train_args(image_dir, out, "--method", "uplift", "--image-size", str(size), *extra)


# -- the recipe -----------------------------------------------------------------------------------------
def test_defaults_are_the_papers():
    cfg = UpliftTrainConfig()
    assert (cfg.method, cfg.batch_size, cfg.lr, cfg.schedule, cfg.warmup, cfg.weight_decay, cfg.grad_clip) == (
        "uplift",
        32,
        1e-3,
        "constant",
        0.0,
        0.0,
        0.0,
    )
    assert cfg.steps == -(-1_281_167 // 32)  # one ImageNet-1K epoch
    assert (cfg.image_size, cfg.fit, cfg.depths) == (448, "squash", None)
    assert build_config(None, {"method": "uplift"}).lr == 1e-3  # the method's own defaults, not ViT-Up's


def test_depths_default_per_backbone_and_pyramid_sizes(tmp_path):
    v3 = train_loop.make_method(tiny_uplift_config(tmp_path, tmp_path / "a"))
    assert v3.cfg.depths == [1, 2]  # DINOv3's published config
    v2 = train_loop.make_method(tiny_uplift_config(tmp_path, tmp_path / "b", backbone="dinov2_s", image_size=112))
    assert v2.cfg.depths == [1, 2, 3]
    assert [x.shape[-1] for x in pyramid(torch.zeros(1, 3, 448, 448), 3)] == [448, 224, 112, 56]
    with pytest.raises(VitupError, match=r"--image-size 64 with --depths up to 3: .*\[8\] px.*divisible by 128"):
        train_loop.make_method(tiny_uplift_config(tmp_path, tmp_path / "c", depths=[1, 2, 3]))


def test_flags_of_another_method_are_refused_in_one_line(image_dir, tmp_path, one_line_error):
    with pytest.raises(VitupError, match="unknown setting 'lora_r' for --method uplift"):
        build_config(None, {"method": "uplift", "lora_r": 4})
    result = CliRunner().invoke(app, [*_cli_args(image_dir, tmp_path / "x"), "--lora-r", "4"])
    one_line_error(result, "unknown setting 'lora_r' for --method uplift")
    result = CliRunner().invoke(app, ["train", "--data", str(image_dir), "--out", "y", "--image-size", "64"])
    one_line_error(result, "unknown setting 'image_size' for --method vitup")


def test_six_summed_mse_terms_against_the_matching_scales():
    torch.manual_seed(0)
    targets = [torch.randn(2, 8, 32 // 2**k, 32 // 2**k) for k in range(4)]  # pyramid levels 0..3
    depths = [1, 2, 3]
    outputs = [[torch.randn_like(targets[d - j]) for j in range(1, d + 1)] for d in depths]
    total, terms = uplift_loss(outputs, targets, depths)
    mse = {k: v.item() for k, v in terms.items() if k.startswith("mse_")}
    assert sorted(mse) == ["mse_d1_s1", "mse_d2_s1", "mse_d2_s2", "mse_d3_s1", "mse_d3_s2", "mse_d3_s3"]
    assert total.item() == pytest.approx(sum(mse.values()), rel=1e-6)
    # depth 3: step 1 is compared at level 2 (2x of level 3), step 3 at level 0 (the full image)
    assert mse["mse_d3_s1"] == pytest.approx(torch.mean((outputs[2][0] - targets[2]) ** 2).item(), rel=1e-6)
    assert mse["mse_d3_s3"] == pytest.approx(torch.mean((outputs[2][2] - targets[0]) ** 2).item(), rel=1e-6)
    with pytest.raises(ValueError, match="depth 1 step 1"):
        uplift_loss([[torch.zeros(2, 8, 5, 5)]], targets, [1])


def test_steps_lower_the_loss_and_train_only_uplift(image_dir, tmp_path):
    method = train_loop.make_method(tiny_uplift_config(image_dir, tmp_path / "x", image_size=128))
    method.set_train_mode()
    names = [n for n, _ in method.trainable_parameters()]
    assert names and all(n.startswith("net.") for n in names)
    assert sum(p.numel() for _, p in method.trainable_parameters()) == sum(
        p.numel() for p in method.model.net.parameters()
    )
    assert not any(p.requires_grad for p in method.backbone.model.parameters())
    ds = method.dataset(sorted(image_dir.glob("img*.png")), 0)
    batch = method.collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 128, 128)
    student = method.student()
    opt = torch.optim.Adam([p for _, p in method.trainable_parameters()], lr=1e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss, terms = method.loss(student, batch, torch.device("cpu"), train_loop.contextlib.nullcontext())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(terms) == set(method.term_keys())
    assert losses[-1] < 0.8 * losses[0], losses


# -- the run --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "u"
    cfg = tiny_uplift_config(image_dir, out, val_data=str(image_dir), val_images=2)
    return cfg, train_loop.train(cfg, reporter=train_loop.NullReporter())


def test_a_run_writes_its_directory_and_a_loadable_checkpoint(finished, tmp_path):
    from vitup_cli.hub import open_upsampler

    cfg, result = finished
    run = Path(cfg.out)
    assert result.finished and result.best_checkpoint is not None
    record = json.loads((run / "config.json").read_text())
    assert record["method"] == "uplift" and record["config"]["depths"] == [1, 2]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "depth1", "depth2", "mse_d2_s2", "grad_norm"} <= set(lines[0])
    assert any("val_mse_d2_s1" in x for x in lines)
    meta = json.loads((run / "last.json").read_text())
    assert meta["upsampler"] == "uplift" and meta["train"]["config"]["method"] == "uplift"
    up = open_upsampler(checkpoint=result.last_checkpoint)
    assert up.name == "uplift" and not up.training
    state = load_state(run / "state.safetensors")
    loaded = dict(up.net.state_dict())
    for name in ("attender.conv1.weight", "encoder.block_0.blocks.0.conv.1.running_mean"):
        assert torch.equal(loaded[name], state.model[f"net.{name}"])
    with torch.no_grad():
        feats = up.features(torch.rand(1, 3, 50, 70), 32)
    assert feats.shape == (1, 64, 32, 32) and torch.isfinite(feats).all()
    # the weights file alone is in the published layout (plus the random-init backbone here)
    from safetensors.torch import load_file

    keys = set(load_file(str(result.last_checkpoint)))
    assert "attender.conv1.weight" in keys and not any(k.startswith("net.") for k in keys)


def test_resume_is_bit_exact(image_dir, tmp_path):
    """3 steps, stop, resume for 3 more == 6 uninterrupted steps (weights, BN statistics, optimiser, metrics)."""
    config = partial(tiny_uplift_config, image_dir, steps=6, save_every=100)
    resume = partial(resume_config, overrides={"workers": 1})
    straight, resumed = assert_stopped_run_resumes_bit_exact(config, resume, tmp_path, stop_after=3)
    cfg = resume(resumed)
    assert cfg.method == "uplift" and cfg.depths == [1, 2]
    assert any(k.endswith("running_var") for k in load_state(straight / "state.safetensors").model)
    with pytest.raises(VitupError, match="--image-size differs"):
        resume_config(resumed, {"image_size": 128})


def test_nan_loss_stops_the_run(image_dir, tmp_path, monkeypatch):
    from vitup_cli.train.methods import uplift as uplift_method

    poison_loss(monkeypatch, uplift_method, "uplift_loss", at_call=2)
    with pytest.raises(train_loop.TrainingDiverged, match="diverged at step 2: loss term loss is nan"):
        train_loop.train(
            tiny_uplift_config(image_dir, tmp_path / "nan", save_every=1), reporter=train_loop.NullReporter()
        )
    assert json.loads((tmp_path / "nan" / "last.json").read_text())["step"] == 1


# -- processes ------------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(image_dir, tmp_path):
    steps = ["--steps", "8", "--save-every", "1"]
    assert_killed_run_resumes_bit_exact(partial(_cli_args, image_dir), tmp_path, steps, deadline_s=180)


@pytest.mark.integration
@pytest.mark.slow
def test_torchrun_two_processes_match_one(image_dir, tmp_path):
    """2 gloo processes x 1 image == 1 process with 2 accumulation steps of 1 image: the same BatchNorm
    batches (128 px, so that one image still has 2 x 2 tokens at depth 2), gradients averaged. BatchNorm
    running statistics follow rank 0 under DDP (on CPU there is no SyncBatchNorm), so those buffers are
    not compared."""
    common = ["--steps", "3", "--save-every", "3", "--log-every", "1"]
    assert_torchrun_two_match_one(
        partial(_cli_args, image_dir, size=128),
        tmp_path,
        common,
        timeout=400,
        single_extra=["--accum", "2"],
        skip=("running_mean", "running_var", "num_batches_tracked"),
        compared_includes="attender",
        atol=1e-5,
        rtol=1e-4,
    )
