"""FeatSharp: parameter counts, the init identity, exact local attention, PHI-S, factors, checkpoints, CLI."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_backbone
from PIL import Image
from typer.testing import CliRunner

from vitup_cli.cli import app
from vitup_cli.errors import VitupError
from vitup_cli.hub import load_checkpoint, open_upsampler, read_checkpoint_meta, save_checkpoint
from vitup_cli.models import FeatSharp, FeatSharpConfig, build_upsampler, sample_map
from vitup_cli.models.featsharp import (
    FeatSharpHead,
    LocalAttention,
    MomentAccumulator,
    PhiS,
    equalising_rotation,
    hadamard,
    parameter_counts,
)

runner = CliRunner()


def tiny_featsharp(factor: int = 2, seed: int = 0, fit: bool = True, **config) -> FeatSharp:
    """A FeatSharp over the tiny random backbone (64-d, 4x4 tokens at 64 px), PHI-S fitted on noise images."""
    backbone = tiny_backbone(seed=seed)
    torch.manual_seed(seed + 1)
    model = FeatSharp(backbone, FeatSharpConfig(factor=factor, input_tokens=4, **config)).eval()
    if fit:
        gen = torch.Generator().manual_seed(seed + 2)
        model.fit_statistics(torch.rand(8, 3, 96, 96, generator=gen) for _ in range(2))
    return model


def _perturb(model: FeatSharp, scale: float = 0.05) -> FeatSharp:
    """Move the zero-initialised parts (de-bias, tile positions) and LayerScale off their init."""
    with torch.no_grad():
        model.head.debias.normal_(std=scale)
        model.head.tile_pos.normal_(std=scale)
        model.head.block.ls1.fill_(0.5)
        model.head.block.ls2.fill_(0.5)
    return model


# -- size ---------------------------------------------------------------------------------------------
def test_parameter_counts_match_the_paper():
    """About 7.0M for a 384-d backbone at u = 2 (vitup's 448 px input: 28 x 28 tokens)."""
    counts = parameter_counts(FeatSharpHead(384, 28, FeatSharpConfig(factor=2)))
    print("FeatSharp 384-d, u=2, 28x28 tokens:", counts)
    assert counts["refine_block"] == 6_694_144
    assert counts["debias"] == 384 * 28 * 28 and counts["tile_pos"] == 384 * 4
    assert counts["jbu"] == 1188  # 1,184 weights + 4 scalars per level
    assert abs(counts["total"] - 7.0e6) < 0.05e6
    at_224 = parameter_counts(FeatSharpHead(384, 14, FeatSharpConfig(factor=2)))["total"]
    four = parameter_counts(FeatSharpHead(384, 28, FeatSharpConfig(factor=4)))
    print("FeatSharp 384-d, u=2, 14x14:", at_224, "| u=4, 28x28:", four["total"])
    assert four["jbu"] == 2 * 1188 and four["tile_pos"] == 384 * 16
    b = parameter_counts(FeatSharpHead(768, 28, FeatSharpConfig(factor=2)))["refine_block"]
    assert abs(b - 26.76e6) < 0.01e6


def test_block_dimensions():
    head = FeatSharpHead(384, 28, FeatSharpConfig())
    attn = head.block.attn
    assert attn.num_heads == 16 and attn.v_dim == 48 and attn.qk_dim == 64 and attn.window == 7
    assert head.block.ffn.w12.out_features == 2 * 2048 and head.block.ffn.w3.out_features == 384
    assert torch.all(head.block.ls1 == 1e-6) and torch.all(head.block.ls2 == 1e-6)


# -- local attention ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("h", "w", "window", "block"), [(10, 10, 7, 4), (9, 13, 7, 8), (6, 6, 3, 8), (12, 7, 5, 3)])
def test_local_attention_equals_masked_full_attention(h, w, window, block):
    torch.manual_seed(0)
    attn = LocalAttention(32, 4, window, block).double()
    x = torch.randn(2, h, w, 32, dtype=torch.float64, requires_grad=True)
    fast, slow = attn(x), attn.naive(x)
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=1e-10)
    weights = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * weights).sum(), [x, attn.qkv.weight, attn.proj.weight])
    g_slow = torch.autograd.grad((slow * weights).sum(), [x, attn.qkv.weight, attn.proj.weight])
    for a, b in zip(g_fast, g_slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


def test_local_attention_is_local_and_penalised():
    """A query's output does not depend on tokens outside its window; head 0 penalises rows, head 1 columns."""
    torch.manual_seed(0)
    attn = LocalAttention(16, 2, 3, 4).double()
    x = torch.randn(1, 8, 8, 16, dtype=torch.float64)
    y = x.clone()
    y[0, 5:, :] += 1.0  # rows 5.. are outside the window of row 2 (radius 1)
    assert torch.equal(attn(x)[0, :3], attn(y)[0, :3]) and not torch.allclose(attn(x)[0, 4], attn(y)[0, 4])
    from vitup_cli.models.featsharp import alibi_slopes, local_bias

    bias = local_bias(3, 3, 2, 3)
    assert bias[0, 4, 1] == -0.5 and bias[0, 4, 3] == 0  # centre vs the one above (row) / left (column)
    assert bias[1, 4, 3] == -0.5 and bias[1, 4, 1] == 0
    assert torch.isinf(local_bias(5, 5, 2, 3)[0, 0, 24])
    assert alibi_slopes(6).tolist() == [0.5, 0.5, 0.25, 0.25, 0.125, 0.125]


# -- PHI-S --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [64, 12, 6])  # Sylvester, Paley, no Hadamard (Givens rotation)
def test_phis_round_trip_and_unit_variance(dim):
    gen = torch.Generator().manual_seed(dim)
    mix = torch.randn(dim, dim, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, dim, dtype=torch.float64)
    samples = [(torch.randn(3, dim, 5, 7, generator=gen, dtype=torch.float64).permute(0, 2, 3, 1) @ mix.T) + 4.0
               for _ in range(4)]  # fmt: skip
    feats = [s.permute(0, 3, 1, 2).float() for s in samples]
    stats = MomentAccumulator(dim)
    for f in feats:
        stats.update(f)
    allx = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, dim) for f in feats]).double()
    torch.testing.assert_close(stats.mean, allx.mean(0))
    torch.testing.assert_close(stats.covariance(), torch.cov(allx.T))
    phis = PhiS(dim).double()
    phis.fit(stats)
    assert (hadamard(dim) is None) == (dim == 6)
    x = torch.cat(feats).double()
    y = phis.normalize(x)
    torch.testing.assert_close(phis.denormalize(y), x, atol=1e-9, rtol=1e-9)
    flat = y.permute(0, 2, 3, 1).reshape(-1, dim)
    torch.testing.assert_close(flat.var(0), torch.ones(dim, dtype=torch.float64), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(flat.mean(0), torch.zeros(dim, dtype=torch.float64), atol=1e-9, rtol=1e-9)
    rot = phis.rotation
    torch.testing.assert_close(rot @ rot.T, torch.eye(dim, dtype=torch.float64), atol=1e-9, rtol=1e-9)


def test_equalising_rotation():
    lam = np.array([9.0, 0.1, 0.1, 3.0, 2.0, 0.0, 1.0])
    q = equalising_rotation(lam)
    assert np.allclose(q @ q.T, np.eye(7)) and np.allclose(np.diag(q @ np.diag(lam) @ q.T), lam.mean())


def test_model_statistics_give_unit_variance_on_their_sample():
    model = tiny_featsharp(fit=False)
    batches = [torch.rand(6, 3, 80, 100, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    count = model.fit_statistics(batches)
    assert count == 18 * 16 and int(model.phis.samples) == count
    with torch.no_grad():
        glob = [torch.nn.functional.interpolate(model.prepare(b), size=(64, 64), mode="bilinear", antialias=True)
                for b in batches]  # fmt: skip
        y = model.phis.normalize(torch.cat([model.backbone_features(g) for g in glob]))
    var = y.permute(0, 2, 3, 1).reshape(-1, 64).double().var(0)
    torch.testing.assert_close(var, torch.ones_like(var), atol=1e-3, rtol=1e-3)


def test_untrained_without_statistics_is_a_clear_error():
    model = tiny_featsharp(fit=False)
    with pytest.raises(VitupError, match="no PHI-S statistics"):
        model.features(torch.rand(1, 3, 128, 128), 8)


# -- the model ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [2, 4])
def test_at_init_featsharp_equals_its_base_upsampler(factor):
    model = tiny_featsharp(factor)
    with torch.no_grad():
        model.head.debias.normal_(std=0.3)  # the de-bias and tile positions need not be zero for this
        model.head.tile_pos.normal_(std=0.3)
    x = torch.rand(2, 3, 150, 130, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.features(x, model.native_grid)
        base = model.phis.denormalize(model.base_normalized(x))
        assert out.shape == (2, 64, 4 * factor, 4 * factor)
        torch.testing.assert_close(out, base, atol=1e-4, rtol=0)
        assert (out - base).abs().max() > 0  # the block does run
        _perturb(model)
        assert (model.features(x, model.native_grid) - base).abs().max() > 1e-2  # a trained block would not


@pytest.mark.parametrize("factor", [2, 4])
def test_views_are_one_batch_of_global_view_and_tiles(factor, monkeypatch):
    model = tiny_featsharp(factor)
    calls = []
    real = model.backbone_features

    def spy(views):
        calls.append(tuple(views.shape))
        return real(views)

    monkeypatch.setattr(model, "backbone_features", spy)
    x = torch.rand(3, 3, 64 * factor, 64 * factor)
    with torch.no_grad():
        model.features(x, 8)
    assert calls == [(3 * (1 + factor**2), 3, 64, 64)]
    # the tiles of image 1 are its crops in row-major order; the mosaic puts them back in place
    views = model.views(model.backbone.normalize(x))
    assert torch.equal(views[3 + factor**2 + 1], model.backbone.normalize(x)[1, :, :64, 64:128])
    with torch.no_grad():
        _, mosaic = model.encode(model.backbone.normalize(x))
        tile = model.head.add_bias(model.phis.normalize(real(views[3 + factor**2 + 1 : 3 + factor**2 + 2])))
    torch.testing.assert_close(mosaic[1:2, :, :4, 4:8], tile)


def test_other_sizes_are_a_bilinear_resize_of_the_native_map():
    model = _perturb(tiny_featsharp())
    x = torch.rand(2, 3, 100, 120)
    with torch.no_grad():
        native = model.features(x, (8, 8))
        up = model.features(x, (20, 12))
        torch.testing.assert_close(up, torch.nn.functional.interpolate(native, size=(20, 12), mode="bilinear"))
        xy = torch.rand(2, 30, 2)
        torch.testing.assert_close(model.query(x, xy), sample_map(native, xy))
        assert model.tokens(x).shape == (2, 64, 4, 4) and model.token_grid == (4, 4)
    assert model.input_size == 128 and model.backbone_size == 64 and model.native_grid == (8, 8)


def test_bad_factor_and_tap():
    with pytest.raises(VitupError, match="--factor 3"):
        FeatSharp(tiny_backbone(), FeatSharpConfig(factor=3, input_tokens=4))
    model = tiny_featsharp()
    with pytest.raises(VitupError, match="--tap 0"):
        model.features(torch.rand(1, 3, 128, 128), 8, tap=0)
    assert isinstance(build_upsampler("featsharp", tiny_backbone(), config=FeatSharpConfig(input_tokens=4)), FeatSharp)


def test_backward_reaches_every_trainable_part():
    model = _perturb(tiny_featsharp()).train()
    out = model.upsample_normalized(torch.rand(2, 3, 128, 128))
    out.square().mean().backward()
    for name, p in model.upsampler_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None for p in model.backbone.parameters())


# -- checkpoints and commands ---------------------------------------------------------------------------
@pytest.fixture
def featsharp_checkpoint(tmp_path):
    model = _perturb(tiny_featsharp(seed=5))
    return save_checkpoint(tmp_path / "fs" / "last", model, extra={"step": 3}), model


def test_checkpoint_round_trip(featsharp_checkpoint):
    path, model = featsharp_checkpoint
    meta = read_checkpoint_meta(path)
    assert meta["upsampler"] == "featsharp" and meta["model"]["factor"] == 2 and meta["input_size"] == 128
    loaded = load_checkpoint(path).eval()
    assert isinstance(loaded, FeatSharp) and loaded.phis.fitted
    torch.testing.assert_close(loaded.phis.rotation, model.phis.rotation, atol=0, rtol=0)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x, 8), model.features(x, 8), atol=1e-6, rtol=1e-6)
    assert isinstance(open_upsampler("bilinear", checkpoint=path), FeatSharp)
    with pytest.raises(VitupError, match="--upsampler featsharp needs --checkpoint"):
        open_upsampler("featsharp", backbone="dinov3_s", pretrained="none")


def _photos(folder, n=3):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (50 + 10 * i, 70, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_extract_with_a_featsharp_checkpoint_records_the_native_grid(tmp_path, featsharp_checkpoint):
    from vitup_cli.stores import open_store

    path, model = featsharp_checkpoint
    images = _photos(tmp_path / "in")
    base = ["extract", str(images), "--checkpoint", str(path), "--workers", "0", "--dtype", "float32", "--tokens"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "a.zarr"), "--res", "8", "--upsampler", "featsharp"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "b.zarr"), "--res", "20"])
    assert result.exit_code == 0, result.output
    with open_store(tmp_path / "a.zarr") as a, open_store(tmp_path / "b.zarr") as b:
        assert a.attrs["upsampler"] == "featsharp" and a.attrs["native_res"] == [8, 8]
        assert a.attrs["resized_from_native"] is None and b.attrs["resized_from_native"] == "bilinear from 8x8"
        assert a.shape == (3, 64, 8, 8) and b.shape == (3, 64, 20, 20) and a.lowres(0).shape == (64, 4, 4)
        from vitup_cli.data.images import load_image
        from vitup_cli.extract import fit_image

        fill = tuple(round(m * 255) for m in model.backbone.mean.flatten().tolist())
        x = fit_image(load_image(images / "2.png"), 128, "pad", fill)[0][None]
        with torch.no_grad():
            assert np.allclose(a[2], model.features(x, 8)[0].numpy(), atol=1e-4)
    refused = runner.invoke(app, [*base, "--out", str(tmp_path / "c.zarr"), "--upsampler", "vitup"])
    assert refused.exit_code == 2 and "holds a featsharp upsampler" in refused.stderr
    untrained = runner.invoke(app, ["extract", str(images), "--out", str(tmp_path / "d.zarr"), "--upsampler",
                                    "featsharp", "--backbone", "dinov3_s", "--pretrained", "none"])  # fmt: skip
    assert untrained.exit_code == 2 and "needs --checkpoint" in untrained.stderr
    tap = runner.invoke(app, [*base, "--out", str(tmp_path / "e.zarr"), "--tap", "1"])
    assert tap.exit_code == 2 and "final features only" in tap.stderr


def test_visualize_featsharp_beside_bilinear(tmp_path, featsharp_checkpoint, pca_spy):
    path, _ = featsharp_checkpoint
    photo = _photos(tmp_path / "in", n=1) / "0.png"
    out = tmp_path / "v.png"
    args = ["visualize", str(photo), "--checkpoint", str(path), "--out", str(out), "--res", "16", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    tokens, fs, bil = pca_spy[-1]  # default with a FeatSharp checkpoint: featsharp, bilinear
    assert tokens.shape == (64, 4, 4) and fs.shape == bil.shape
    bad = runner.invoke(app, [*args[:-4], "--compare", "vitup,bilinear", "--out", str(tmp_path / "w.png")])
    assert bad.exit_code == 2 and "holds a featsharp upsampler" in bad.stderr


@pytest.mark.slow
def test_probe_featsharp_beside_bilinear(tmp_path, featsharp_checkpoint):
    from probe_fixtures import make_folder

    path, _ = featsharp_checkpoint
    make_folder(tmp_path / "data", n_train=4, n_val=2)
    args = ["probe", "folder", "--root", str(tmp_path / "data"), "--checkpoint", str(path), "--upsampler",
            "featsharp,bilinear", "--res", "16", "--crop", "32", "--workers", "0", "--device", "cpu", "--epochs", "1",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "rep")]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    results = {r["name"]: r for r in report["results"]}
    assert list(results) == ["featsharp", "bilinear"]
    assert results["featsharp"]["input_size"] == 128 and results["bilinear"]["input_size"] == 64
    assert all(np.isfinite(r["metrics"]["miou"]) for r in report["results"])
    bad = runner.invoke(app, [*args[:7], "vitup,bilinear", *args[8:], "--overwrite"])
    assert bad.exit_code == 2 and "holds a featsharp upsampler" in bad.stderr


@pytest.mark.slow
def test_probe_runs_vitup_featsharp_and_bilinear_side_by_side(tmp_path):
    """One command, two checkpoints (ViT-Up, FeatSharp) over the same random-init backbone, plus bilinear."""
    from conftest import tiny_vitup
    from probe_fixtures import make_folder

    vit = save_checkpoint(tmp_path / "vit" / "last", tiny_vitup(seed=0), extra={"step": 1})
    fs = save_checkpoint(tmp_path / "fs" / "last", _perturb(tiny_featsharp(seed=0)), extra={"step": 1})
    make_folder(tmp_path / "data", n_train=4, n_val=2)
    args = ["probe", "folder", "--root", str(tmp_path / "data"), "--checkpoint", str(vit), "--checkpoint", str(fs),
            "--upsampler", "vitup,featsharp,bilinear", "--res", "16", "--crop", "32", "--workers", "0", "--device",
            "cpu", "--epochs", "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "rep")]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    results = {r["name"]: r for r in report["results"]}
    assert list(results) == ["vitup", "featsharp", "bilinear"]
    assert len(report["protocol"]["checkpoint"]) == 2
    assert results["vitup"]["input_size"] == 64 and results["featsharp"]["input_size"] == 128
    assert results["bilinear"]["input_size"] == 64  # over the shared backbone at FeatSharp's global view
    assert all(np.isfinite(r["metrics"]["miou"]) for r in report["results"])
    other = save_checkpoint(tmp_path / "fs7" / "last", _perturb(tiny_featsharp(seed=7)), extra={"step": 1})
    swapped = [str(other) if a == str(fs) else a for a in args[:-1]]  # FeatSharp over another backbone
    mixed = runner.invoke(app, [*swapped, str(tmp_path / "rep2")])
    assert mixed.exit_code == 2 and "side-by-side probes need the same backbone" in mixed.output
