"""vitup train: config, data pipeline, losses, the loop, exact resume, DDP, checkpoints, the CLI."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
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
from PIL import Image
from typer.testing import CliRunner

from vitup_cli.cli import app
from vitup_cli.errors import VitupError
from vitup_cli.train import TrainConfig, build_config, lr_at, read_config_file, resolve, resume_config
from vitup_cli.train import loop as train_loop
from vitup_cli.train.data import (
    CanvasDataset,
    CanvasSpec,
    StepBatches,
    box_queries,
    make_sample,
    sample_rng,
)
from vitup_cli.train.losses import (
    _off_diagonal,
    cosine_distance,
    distillation_loss,
    kl_window_size,
    normalized_l2,
    pool_to,
    relational_kl,
)
from vitup_cli.train.methods import vitup as vitup_method
from vitup_cli.train.state import load_state


def tiny_config(data: Path, out: Path, **kw) -> TrainConfig:
    """A run that takes about a second per few steps on a CPU: 64 px canvas, teachers at 32/64/128 px."""
    base = dict(
        data=str(data),
        out=str(out),
        backbone="dinov3_s",
        pretrained="none",
        backbone_args=dict(TINY),
        input_tokens=4,
        embed_grid=16,
        teacher_sizes=[32, 64, 128],
        steps=6,
        batch_size=2,
        workers=0,
        save_every=3,
        log_every=1,
        lr=1e-3,
        warmup=0.2,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = _textures(tmp_path_factory.mktemp("images"), 6)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (folder / "notes.txt").write_text("not an image, ignored")
    return folder


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory) -> Path:
    return _textures(tmp_path_factory.mktemp("val"), 2, seed=99)


@pytest.fixture(scope="module")
def finished_run(image_dir, val_dir, tmp_path_factory):
    """One complete tiny run with held-out data, shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("runs") / "full"
    cfg = tiny_config(image_dir, out, val_data=str(val_dir), val_images=2)
    result = train_loop.train(cfg, reporter=train_loop.NullReporter())
    return cfg, result


# -- losses -------------------------------------------------------------------------------------------
def test_off_diagonal_drops_exactly_the_diagonal():
    m = torch.arange(16.0).reshape(4, 4)
    off = _off_diagonal(m)
    assert off.shape == (4, 3)
    for i in range(4):
        assert off[i].tolist() == [m[i, j].item() for j in range(4) if j != i]


def test_loss_terms_vanish_on_the_target_and_not_elsewhere():
    torch.manual_seed(0)
    target = torch.randn(2, 16, 8, 8)
    other = torch.randn(2, 16, 8, 8)
    for fn in (normalized_l2, cosine_distance, relational_kl):
        assert fn(target, target).abs().item() < 1e-5
        assert fn(other, target).item() > 0.05
    # target-normalised: the error is measured in units of the target vector's own spread
    assert normalized_l2(target * 10 + 0.1 * other, target * 10).item() == pytest.approx(
        normalized_l2(target + 0.01 * other, target).item(), rel=1e-4
    )
    # cosine ignores scale; the relational KL only sees directions too
    assert cosine_distance(3 * target, target).item() < 1e-6
    assert relational_kl(3 * target, target).item() < 1e-6


def test_relational_kl_is_local_per_window():
    """With an 8-wide window on a 16 grid the loss is the mean over the 4 windows computed alone."""
    torch.manual_seed(1)
    pred, target = torch.randn(1, 8, 16, 16), torch.randn(1, 8, 16, 16)
    whole = relational_kl(pred, target, tau=0.5, window=8)
    parts = [
        relational_kl(pred[..., y : y + 8, x : x + 8], target[..., y : y + 8, x : x + 8], tau=0.5, window=8)
        for y in (0, 8)
        for x in (0, 8)
    ]
    assert whole.item() == pytest.approx(sum(p.item() for p in parts) / 4, rel=1e-5)

    # a direct computation on one window: KL between softmax(cos / tau) rows without the diagonal
    p = torch.nn.functional.normalize(pred[0, :, :8, :8].reshape(8, -1).T, dim=-1)
    t = torch.nn.functional.normalize(target[0, :, :8, :8].reshape(8, -1).T, dim=-1)
    mask = ~torch.eye(64, dtype=torch.bool)
    sp = (p @ p.T / 0.5)[mask].reshape(64, 63)
    st = (t @ t.T / 0.5)[mask].reshape(64, 63)
    direct = torch.nn.functional.kl_div(sp.log_softmax(-1), st.log_softmax(-1), log_target=True, reduction="batchmean")
    assert parts[0].item() == pytest.approx(direct.item(), rel=1e-5)
    assert kl_window_size(56, 28) == 28 and kl_window_size(16, 28) == 16 and kl_window_size(64, 28) == 16


def test_pooled_predictions_have_the_target_shapes_at_every_scale():
    pred = torch.randn(2, 4, 56, 56)
    for grid in (14, 28, 56):
        pooled = pool_to(pred, grid)
        assert pooled.shape == (2, 4, grid, grid)
        k = 56 // grid
        assert torch.allclose(pooled[0, :, 0, 0], pred[0, :, :k, :k].mean(dim=(1, 2)), atol=1e-6)
    targets = [[torch.randn(1, 4, g, g) for _ in range(2)] for g in (14, 28, 56)]
    total, terms = distillation_loss([pred[:1]] * 2, targets)
    terms = {k: float(v) for k, v in terms.items()}
    assert set(terms) >= {"loss", "l2", "cos", "kl", "level0", "level1", "grid14", "grid28", "grid56"}
    assert total.item() == pytest.approx(terms["l2"] + terms["cos"] + terms["kl"], rel=1e-5)
    assert total.item() == pytest.approx(sum(terms[f"grid{g}"] for g in (14, 28, 56)), rel=1e-5)
    assert total.item() == pytest.approx(terms["level0"] + terms["level1"], rel=1e-5)


# -- data ---------------------------------------------------------------------------------------------
def test_sample_geometry_and_determinism():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    spec = CanvasSpec(canvas=64, crop_size=128, scale_min=0.25, scale_max=0.75, seed=3)
    a = make_sample(img, spec, sample_rng(3, 0, 7))
    b = make_sample(img, spec, sample_rng(3, 0, 7))
    c = make_sample(img, spec, sample_rng(3, 0, 8))
    assert a["crop"].shape == (3, 128, 128) and a["crop"].dtype == torch.uint8
    assert a["canvas"].shape == (3, 64, 64)
    assert all(torch.equal(a[k], b[k]) for k in ("crop", "canvas", "box"))
    assert not torch.equal(a["canvas"], c["canvas"])
    x0, y0, side = (a["box"] * 64).round().long().tolist()
    assert 16 <= side <= 48 and 0 <= x0 <= 64 - side and 0 <= y0 <= 64 - side
    # the pasted region is the crop, downscaled; outside it is noise
    pasted = a["canvas"][:, y0 : y0 + side, x0 : x0 + side].float()
    crop_small = torch.nn.functional.interpolate(a["crop"][None].float(), size=(side, side), mode="area")[0]
    assert (pasted - crop_small).abs().mean() < 12
    outside = a["canvas"][:, :, :x0].float() if x0 > 4 else a["canvas"][:, :, x0 + side :].float()
    assert 100 < outside.mean() < 155 and outside.std() > 60


def test_queries_are_cell_centres_over_the_box():
    box = torch.tensor([[0.25, 0.5, 0.5]], dtype=torch.float64)
    xy = box_queries(box, 4)
    assert xy.shape == (1, 16, 2)
    assert torch.allclose(xy[0, 0], torch.tensor([0.25 + 0.0625, 0.5 + 0.0625]))
    assert torch.allclose(xy[0, -1], torch.tensor([0.75 - 0.0625, 1.0 - 0.0625]))
    assert torch.allclose(xy[0, 1, 1], xy[0, 0, 1]) and xy[0, 1, 0] > xy[0, 0, 0]  # row-major, x first


def test_step_batches_partition_every_global_batch():
    """Ranks x micro-batches cover each step's global positions exactly once, in order; resuming at a step
    yields the same batches as the uninterrupted sequence from that step on."""
    for world, accum in ((1, 1), (2, 1), (2, 3), (3, 2)):
        bs = 12
        seen = []
        for rank in range(world):
            seen += [p for batch in StepBatches(bs, 4, 0, rank, world, accum) for p in batch]
        assert sorted(seen) == list(range(4 * bs))
        full = list(StepBatches(bs, 4, 0, 1 % world, world, accum))
        assert list(StepBatches(bs, 4, 2, 1 % world, world, accum)) == full[2 * accum :]


def test_unreadable_images_are_skipped_and_reported(image_dir):
    files = sorted(p for p in image_dir.iterdir() if p.suffix in {".png", ".jpg"})
    ds = CanvasDataset(files, CanvasSpec(canvas=32, crop_size=32, seed=0))
    failures = [f for pos in range(2 * len(files)) for f in ds[pos]["failed"]]
    assert failures and all(path.endswith("broken.jpg") for path, _ in failures)
    assert "not an image" in failures[0][1] or "truncated" in failures[0][1]
    bad_only = CanvasDataset([image_dir / "broken.jpg"], CanvasSpec(canvas=32, crop_size=32))
    with pytest.raises(VitupError, match="none of the 1 images could be read"):
        bad_only[0]


# -- config -------------------------------------------------------------------------------------------
def test_defaults_are_the_papers():
    cfg = TrainConfig(data="d", out="o")
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.warmup, cfg.min_lr, cfg.weight_decay) == (
        53381,
        24,
        2e-4,
        0.05,
        1e-6,
        0.0,
    )
    assert (cfg.scale_min, cfg.scale_max, cfg.tau, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (
        0.1,
        1.0,
        0.5,
        16,
        32,
        0.05,
    )
    resolved, sizes = resolve(cfg, patch=16)
    assert (sizes.canvas, sizes.queries, sizes.teacher_sizes, sizes.teacher_grids) == (
        448,
        56,
        (224, 448, 896),
        (14, 28, 56),
    )
    assert resolved.val_every == cfg.save_every
    _, sizes14 = resolve(cfg, patch=14)  # DINOv2: 16/32/64 token teachers, 64 queries, 392 px canvas
    assert (sizes14.canvas, sizes14.queries, sizes14.teacher_grids) == (392, 64, (16, 32, 64))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(batch_size=10, accum=4), "--batch-size 10 must be a multiple"),
        (dict(teacher_sizes=[224, 450]), "--teacher-sizes"),
        (dict(queries=50), "--queries 50"),
        (dict(scale_min=0.0), "--scale-min"),
        (dict(precision="fp8"), "--precision fp8"),
        (dict(data=""), "--data is required"),
    ],
)
def test_bad_settings_name_the_flag(change, message):
    with pytest.raises(VitupError, match=message):
        resolve(replace(TrainConfig(data="d", out="o"), **change), patch=16)


def test_config_files_and_flag_precedence(tmp_path):
    yaml_file = tmp_path / "t.yaml"
    yaml_file.write_text("steps: 100\nlr: 1.0e-3\nteacher-sizes: [64, 128]\nbackbone_args: depth=2\n")
    toml_file = tmp_path / "t.toml"
    toml_file.write_text('[train]\nsteps = 100\nlr = 1e-3\nteacher_sizes = "64,128"\nprecision = "fp32"\n')
    for path in (yaml_file, toml_file):
        values = read_config_file(path)
        assert values["steps"] == 100 and values["lr"] == 1e-3 and values["teacher_sizes"] == [64, 128]
    cfg = build_config(yaml_file, {"lr": 5e-4, "taps": "0,1,2"})
    assert (cfg.steps, cfg.lr, cfg.taps, cfg.backbone_args, cfg.batch_size) == (100, 5e-4, [0, 1, 2], {"depth": 2}, 24)
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(VitupError, match="unknown setting 'stepz'"):
        read_config_file(bad)
    bad.write_text("steps: many\n")
    with pytest.raises(VitupError, match="steps = 'many' is not a valid int"):
        read_config_file(bad)
    bad.write_text("steps: [1\n")
    with pytest.raises(VitupError, match="cannot parse it"):
        read_config_file(bad)


def test_schedule_warms_up_then_cosine_to_the_floor():
    cfg = TrainConfig(steps=100, lr=2e-4, warmup=0.05, min_lr=1e-6)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(2e-4 / 5) and lrs[4] == pytest.approx(2e-4)
    assert all(a < b for a, b in itertools.pairwise(lrs[:5]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[-1] == pytest.approx(1e-6)
    assert lrs[5 + 47] == pytest.approx((2e-4 + 1e-6) / 2, rel=0.05)


# -- one training step ----------------------------------------------------------------------------
def _fixed_batch(image_dir: Path, cfg: TrainConfig, model):
    _, sizes = resolve(cfg, model.backbone.patch_size)
    spec = CanvasSpec(sizes.canvas, sizes.crop, cfg.scale_min, cfg.scale_max, cfg.crop_min, cfg.seed)
    ds = CanvasDataset(sorted(image_dir.glob("*.png")), spec)
    samples = [ds[i] for i in range(2)]
    canvas = torch.stack([s["canvas"] for s in samples]).float() / 255
    crop = torch.stack([s["crop"] for s in samples]).float() / 255
    box = torch.stack([s["box"] for s in samples])
    return sizes, canvas, crop, box


def test_training_steps_give_gradients_to_lora_and_upsampler_only_and_every_term_decreases(image_dir, tmp_path):
    cfg = tiny_config(image_dir, tmp_path / "x", lora_dropout=0.0)
    model = vitup_method.build_model(cfg)
    vitup_method.set_train_mode(model)
    sizes, canvas, crop, box = _fixed_batch(image_dir, cfg, model)
    student = vitup_method._Student(model)
    params = [p for _, p in vitup_method.trainable_parameters(model)]
    assert all(p.requires_grad for p in params)
    names = {n for n, _ in vitup_method.trainable_parameters(model)}
    assert any("lora_" in n for n in names) and any(n.startswith("blocks.") for n in names)
    assert not any(n.startswith("backbone.") and "lora_" not in n for n in names)
    opt = torch.optim.AdamW(params, lr=1e-3)
    history = []
    for step in range(8):
        targets = vitup_method.teacher_targets(model.backbone, crop, sizes, contextlib.nullcontext())
        preds = vitup_method.student_maps(student, canvas, box, sizes.queries)
        assert [p.shape for p in preds] == [(2, 64, 8, 8)] * 7
        assert [[t.shape[-1] for t in scale] for scale in targets] == [[2] * 7, [4] * 7, [8] * 7]
        opt.zero_grad()
        loss, terms = distillation_loss(preds, targets)
        loss.backward()
        if step == 0:
            for name, param in model.named_parameters():
                is_base = name.startswith("backbone.") and "lora_" not in name
                if is_base:
                    assert param.grad is None, f"frozen {name} got a gradient"
                elif param.requires_grad:
                    assert param.grad is not None and torch.isfinite(param.grad).all(), name
            lora_b = [p for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad]
            assert any(p.grad.abs().sum() > 0 for p in lora_b), "LoRA B gets no signal"
        history.append({k: float(terms[k]) for k in ("l2", "cos", "kl", "loss")})
        assert all(math.isfinite(v) for v in history[-1].values())
        opt.step()
    for key in ("l2", "cos", "kl", "loss"):
        assert history[-1][key] < 0.9 * history[0][key], (key, [h[key] for h in history])


def test_teacher_is_the_backbone_without_adapters(image_dir, tmp_path):
    """Once LoRA moved, the student backbone differs from the teacher, and the teacher equals the
    unadapted network."""
    cfg = tiny_config(image_dir, tmp_path / "x")
    model = vitup_method.build_model(cfg)
    sizes, _, crop, _ = _fixed_batch(image_dir, cfg, model)
    before = vitup_method.teacher_targets(model.backbone, crop, sizes, contextlib.nullcontext())
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    after = vitup_method.teacher_targets(model.backbone, crop, sizes, contextlib.nullcontext())
    assert all(torch.equal(a, b) for sa, sb in zip(before, after, strict=True) for a, b in zip(sa, sb, strict=True))
    with torch.no_grad():
        student_view = model.backbone.hidden_states(model.backbone.normalize(crop))
    assert not torch.allclose(student_view[-1], after[-1][-1])


# -- the run: files, checkpoints, resume ------------------------------------------------------------------
def test_a_run_writes_its_directory(finished_run):
    cfg, result = finished_run
    run = Path(cfg.out)
    assert result.finished and result.step == 6
    for name in ("config.json", "metrics.jsonl", "loss_curve.png", "last.safetensors", "last.json", "best.json"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["queries"] == 8 and config["random_init_backbone"] is True
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert {"l2", "cos", "kl", "lr", "grad_norm", "it_s", "level0", "grid8"} <= set(train_records[0])
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [3, 6]
    meta = json.loads((run / "best.json").read_text())
    assert meta["step"] in (3, 6) and meta["train"]["val_loss"] == pytest.approx(result.best_val)
    assert json.loads((run / "last.json").read_text())["step"] == 6
    assert result.bad_files and all(p.endswith("broken.jpg") for p in result.bad_files)
    assert "broken.jpg" in (run / "skipped_images.tsv").read_text()
    assert Image.open(run / "loss_curve.png").size[0] > 400


def test_train_checkpoint_loads_in_the_upsampler_interface(finished_run, image_dir):
    from vitup_cli.hub import open_upsampler

    cfg, result = finished_run
    up = open_upsampler(checkpoint=result.last_checkpoint)
    img = torch.rand(1, 3, 50, 70)
    feats = up.features(img, (12, 20))
    assert feats.shape == (1, 64, 12, 20) and torch.isfinite(feats).all()
    # the weights are the trained ones (the resumable state holds the same tensors)
    state = load_state(Path(cfg.out) / "state.safetensors")
    loaded = dict(up.named_parameters())
    for name in ("blocks.0.attn.q.weight", "decoders.6.1.weight"):
        assert torch.equal(loaded[name].detach(), state.model[name])
    lora = next(n for n in state.model if "lora_B" in n and "patch_embed" in n)
    assert torch.equal(loaded[lora].detach(), state.model[lora]) and state.model[lora].abs().sum() > 0


def test_init_from_a_checkpoint_or_an_official_file(finished_run, image_dir, tmp_path):
    """`--init-from` starts a run from existing ViT-Up weights (upsampler + LoRA) of the same shape."""
    from safetensors.torch import save_file

    from vitup_cli.hub import init_from, load_checkpoint
    from vitup_cli.hub.official import official_state

    _, result = finished_run
    source = load_checkpoint(result.last_checkpoint)
    fresh = train_loop.build_model(tiny_config(image_dir, tmp_path / "a", seed=5))
    assert not torch.equal(fresh.decoders[2][1].weight, source.decoders[2][1].weight)
    init_from(fresh, result.last_checkpoint)
    for (name, a), (_, b) in zip(fresh.state_dict().items(), source.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    release = tmp_path / "release.safetensors"
    save_file(official_state(source), release)
    # a fine-tuning run from the official layout: after two steps at lr 1e-12 the weights are the source's
    run = train_loop.train(
        tiny_config(image_dir, tmp_path / "ft", steps=2, lr=1e-12, min_lr=0.0, seed=7, init_from=str(release)),
        reporter=train_loop.NullReporter(),
    )
    tuned = load_checkpoint(run.last_checkpoint)
    for (name, a), b in zip(tuned.upsampler_parameters(), dict(source.upsampler_parameters()).values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    lora = dict(source.backbone.lora_parameters())
    for name, a in tuned.backbone.lora_parameters():
        assert torch.allclose(a, lora[name], atol=1e-6), name
    assert json.loads((Path(run.run_dir) / "config.json").read_text())["config"]["init_from"] == str(release)
    other = train_loop.build_model(tiny_config(image_dir, tmp_path / "b", num_blocks=3, taps=[0, 1, 1, 2]))
    with pytest.raises(VitupError, match="unknown key|does not fit|has shape"):
        init_from(other, release)


def test_extract_accepts_a_train_checkpoint(finished_run, image_dir, tmp_path):
    _, result = finished_run
    store = tmp_path / "f.zarr"
    args = ["extract", str(image_dir), "--out", str(store), "--res", "16", "--checkpoint", str(result.last_checkpoint)]

    outcome = CliRunner().invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    assert store.exists()


def test_resume_is_bit_exact(image_dir, tmp_path):
    """3 steps, stop, resume for 3 more == 6 uninterrupted steps (weights, optimiser, metrics)."""
    config = partial(tiny_config, image_dir, steps=6, save_every=100, lora_dropout=0.05)
    resume = partial(resume_config, overrides={"workers": 1})  # a changed worker count must not matter
    straight, resumed = assert_stopped_run_resumes_bit_exact(config, resume, tmp_path, stop_after=3)
    a, b = load_state(straight / "state.safetensors"), load_state(resumed / "state.safetensors")
    assert a.scheduler["last_epoch"] == b.scheduler["last_epoch"] == 6


def test_resume_refuses_changed_settings_and_fresh_runs_refuse_existing_dirs(finished_run):
    cfg, _ = finished_run
    with pytest.raises(VitupError, match="--lr differs"):
        resume_config(cfg.out, {"lr": 0.1})
    assert resume_config(cfg.out, {"save_every": 7}).save_every == 7
    with pytest.raises(VitupError, match="already holds a run"):
        train_loop.train(replace(cfg, val_data=None), reporter=train_loop.NullReporter())
    with pytest.raises(VitupError, match=r"no config\.json"):
        resume_config(Path(cfg.out) / "nope")


def test_resume_refuses_other_base_weights(image_dir, tmp_path):
    """`--weights` may change on resume (a moved file), but not to different weights."""
    from safetensors.torch import save_file

    from vitup_cli.backbones import load_backbone

    torch.manual_seed(0)
    other = load_backbone("dinov3_s", pretrained="none", overrides=dict(TINY))
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, tmp_path / "other.safetensors")
    first = train_loop.train(
        tiny_config(image_dir, tmp_path / "run", steps=4, save_every=2),
        reporter=train_loop.NullReporter(),
        stop_after=2,
    )
    assert not first.finished
    cfg = resume_config(tmp_path / "run", {"weights": str(tmp_path / "other.safetensors")})
    with pytest.raises(VitupError, match="trained on backbone weights none"):
        train_loop.train(cfg, resume=True, reporter=train_loop.NullReporter())


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(image_dir, tmp_path, monkeypatch):
    poison_loss(monkeypatch, vitup_method, "distillation_loss", at_call=3, terms=("kl", "loss"))
    cfg = tiny_config(image_dir, tmp_path / "nan", save_every=2)
    with pytest.raises(train_loop.TrainingDiverged) as info:
        train_loop.train(cfg, reporter=train_loop.NullReporter())
    message = str(info.value)
    assert "diverged at step 3" in message and "kl" in message
    assert "last.safetensors (step 2)" in message
    assert json.loads((tmp_path / "nan" / "last.json").read_text())["step"] == 2
    last = json.loads((tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "diverged" and last["step"] == 3


# -- the command line -------------------------------------------------------------------------------------
def _cli_args(image_dir: Path, out: Path, *extra: str) -> list[str]:
    return _tiny_train_args(
        image_dir, out, "--input-tokens", "4", "--embed-grid", "16", "--teacher-sizes", "32,64,128", *extra
    )


def test_cli_trains_with_a_config_file_and_flag_overrides(image_dir, tmp_path, one_line_error):
    config = tmp_path / "c.toml"
    config.write_text("steps = 50\nlr = 5e-4\nsave_every = 2\n")
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, [*_cli_args(image_dir, out, "--steps", "2"), "--config", str(config)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())["config"]
    assert (saved["steps"], saved["lr"], saved["save_every"], saved["backbone_args"]) == (
        2,
        5e-4,
        2,
        {"depth": 2, "embed_dim": 64, "num_heads": 1},
    )
    assert "finished at step 2" in result.output and "broken.jpg" in result.output
    one_line_error(CliRunner().invoke(app, _cli_args(image_dir, out, "--steps", "2")), "already holds a run")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--out", "x"], "--data is required"),
        (["train", "--data", "/no/such/folder", "--out", "x", "--pretrained", "none"], "no such file or folder"),
        (["train", "--resume", "/no/such/run"], "no config.json"),
        (["train", "--config", "/no/such.yaml"], "--config /no/such.yaml: no such file"),
    ],
)
def test_cli_bad_input_is_one_line(args, message, tmp_path, monkeypatch, one_line_error):
    monkeypatch.chdir(tmp_path)
    one_line_error(CliRunner().invoke(app, args), message)


# -- processes: kill/resume, torchrun ---------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(image_dir, tmp_path):
    """SIGKILL a CLI run at an arbitrary moment after its first save; --resume ends where an
    uninterrupted run ends, bit for bit."""
    steps = ["--steps", "8", "--save-every", "1", "--lr", "1e-3"]
    assert_killed_run_resumes_bit_exact(partial(_cli_args, image_dir), tmp_path, steps, deadline_s=120)


@pytest.mark.integration
@pytest.mark.slow
def test_torchrun_two_processes_match_one(image_dir, tmp_path):
    """2 gloo processes (1 image each per step) reach the weights of 1 process with the same global batch:
    per-rank shards of the same global batches, gradients averaged, rank 0 writes."""
    common = ["--steps", "3", "--save-every", "3", "--lora-dropout", "0", "--log-every", "1"]
    assert_torchrun_two_match_one(partial(_cli_args, image_dir), tmp_path, common, timeout=300, atol=1e-5, rtol=1e-4)


# -- methods ----------------------------------------------------------------------------------------------
def test_methods_registry_and_unknown_method():
    from vitup_cli.train.methods import METHODS, TrainMethod

    assert METHODS["vitup"].config_class is TrainConfig and issubclass(METHODS["vitup"], TrainMethod)
    assert build_config(None, {"method": "vitup"}).method == "vitup"
    with pytest.raises(VitupError, match="--method nope: unknown training method; use one of vitup"):
        build_config(None, {"method": "nope"})
    result = CliRunner().invoke(app, ["train", "--method", "nope", "--data", "x", "--out", "y"])
    assert result.exit_code == 2 and "unknown training method" in result.output


def test_constant_schedule_keeps_the_rate_after_warmup():
    cfg = TrainConfig(steps=10, lr=1e-3, warmup=0.2, schedule="constant")
    assert [lr_at(s, cfg) for s in range(10)] == pytest.approx([5e-4] + [1e-3] * 9)
    with pytest.raises(VitupError, match="--schedule linear"):
        resolve(replace(TrainConfig(data="d", out="o"), schedule="linear"), patch=16)


def test_run_config_records_the_method(finished_run):
    cfg, _ = finished_run
    record = json.loads((Path(cfg.out) / "config.json").read_text())
    assert record["method"] == "vitup" == record["config"]["method"]
    assert resume_config(cfg.out).method == "vitup"
    with pytest.raises(VitupError, match="trained with --method vitup"):
        resume_config(cfg.out, {"method": "uplift"})
