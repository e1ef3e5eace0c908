"""features: precision (bf16 autocast vs fp32) and the float32 coordinates every upsampler samples with."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitup_cli.backbones import load_backbone
from vitup_cli.errors import VitupError
from vitup_cli.features import dense_features, resolve_precision
from vitup_cli.models import BilinearUpsampler, ViTUp, ViTUpConfig, grid_xy, sample_map

#: bf16 autocast keeps each output vector within this cosine of fp32 (stated in the README).
BF16_MIN_COSINE = 0.999


def _backbone():
    torch.manual_seed(0)
    return load_backbone(
        "dinov3_s", pretrained="none", overrides={"depth": 2, "embed_dim": 64, "num_heads": 2}, taps=[0, 1, 2]
    )


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=1).flatten()


def test_resolve_precision():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(VitupError, match="--precision fp8"):
        resolve_precision("fp8", "cpu")


@pytest.mark.parametrize("kind", ["vitup", "bilinear"])
def test_bf16_matches_fp32_within_tolerance(kind):
    backbone = _backbone()
    if kind == "vitup":
        backbone.add_lora()
        model = ViTUp(backbone, ViTUpConfig(num_blocks=2, input_tokens=7, query_grid=28, chunk_queries=500))
        for p in model.parameters():  # random, non-trivial FiLM and decoders (zero-init layers made active)
            if p.dim() > 1 and not p.abs().sum():
                torch.nn.init.normal_(p, std=0.02)
    else:
        model = BilinearUpsampler(backbone, input_size=112)
    model.eval()
    torch.manual_seed(1)
    images = torch.rand(2, 3, model.input_size, model.input_size)
    ref, _ = dense_features(model, images, (40, 40), dtype=torch.float32, precision="fp32")
    low, _ = dense_features(model, images, (40, 40), dtype=torch.float32, precision="bf16")
    assert not torch.equal(ref, low), "bf16 autocast did not change anything: it did not run"
    cos = _cosines(ref, low)
    assert cos.min().item() >= BF16_MIN_COSINE, f"min cosine {cos.min().item():.5f}"


def test_coordinates_stay_float32_under_bf16():
    """A map whose value is its own x coordinate, sampled at a 448-px grid: every column stays distinct."""
    w = 448
    ramp = torch.linspace(0, 1, 1024).expand(1, 1, 8, 1024).contiguous()
    xy = grid_xy(1, w)[None]
    assert torch.unique(xy[..., 0].to(torch.bfloat16)).numel() < w  # what a bf16 cast of xy would lose
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sample_map(ramp, xy)
    assert out.dtype == ramp.dtype
    assert torch.unique(out.flatten()).numel() == w


def _tiny_extract_args(tmp_path, images: int) -> list[str]:
    """``vitup extract`` of ``images`` random 40x60 PNGs (written to ``tmp_path/in``) with a tiny random-init
    backbone and bilinear upsampling, float32; ``--out`` left to the caller."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return [
        "extract", str(folder), "--backbone", "dinov3_s", "--pretrained", "none", "--backbone-args",
        "depth=2,embed_dim=64,num_heads=1", "--upsampler", "bilinear", "--input-size", "64", "--workers", "0",
        "--res", "16", "--dtype", "float32",
    ]  # fmt: skip


def test_extract_records_precision_and_bf16_stays_within_tolerance(tmp_path):
    import numpy as np
    from typer.testing import CliRunner

    from vitup_cli.cli import app
    from vitup_cli.stores import open_store

    runner = CliRunner()
    base = _tiny_extract_args(tmp_path, 2)
    stores = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.zarr"
        result = runner.invoke(app, [*base, "--out", str(out), "--precision", precision])
        assert result.exit_code == 0, result.output
        stores[precision] = out
    with open_store(stores["fp32"]) as a, open_store(stores["bf16"]) as b:
        assert a.attrs["precision"] == "fp32" and b.attrs["precision"] == "bf16"
        assert b.attrs["settings"]["precision"] == "bf16" and "precision" not in a.attrs["settings"]
        ref, low = torch.from_numpy(np.asarray(a[0])), torch.from_numpy(np.asarray(b[0]))
    assert not torch.equal(ref, low)
    assert _cosines(ref[None], low[None]).min().item() >= BF16_MIN_COSINE
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "x.zarr"), "--precision", "fp8"])
    assert bad.exit_code == 2 and "--precision fp8" in bad.output


# -- --compile ------------------------------------------------------------------------------------------
def _registry_model(name: str):
    from vitup_cli.models import build_upsampler

    backbone = _backbone()
    if name == "vitup":
        return ViTUp(backbone, ViTUpConfig(num_blocks=2, input_tokens=7, query_grid=28, chunk_queries=500))
    return build_upsampler(name, backbone)


#: own compiled parts per registered upsampler (ViT-Up: 2 blocks, 3 decoders); every registered one is listed
OWN_COMPILED = {"vitup": 5, "uplift": 2, "loftup": 3, "featsharp": 2, "anyup": 6, "jafar": 6, "naf": 2, "featup": 0,
                "bilinear": 0, "nearest": 0, "lowres": 0}  # fmt: skip


@pytest.mark.parametrize("name", list(OWN_COMPILED))
def test_compile_targets_are_the_backbone_blocks_and_the_upsamplers_own_parts(name, monkeypatch):
    from vitup_cli.features import compile_upsampler
    from vitup_cli.models import UPSAMPLERS

    assert set(UPSAMPLERS) == set(OWN_COMPILED)  # a new method says here what --compile compiles of it
    model = _registry_model(name)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    assert compile_upsampler(model) == len(compiled) == len(model.compile_targets())
    blocks = list(model.backbone.model.blocks)
    assert compiled[: len(blocks)] == blocks
    own = compiled[len(blocks) :]
    assert all(not any(m is p for p in model.backbone.modules()) for m in own)
    expected = OWN_COMPILED[name]
    assert len(own) == expected and len({id(m) for m in own}) == expected


def test_probe_compile_flag_compiles_each_upsampler(tmp_path, monkeypatch):
    from probe_fixtures import make_voc
    from typer.testing import CliRunner

    import vitup_cli.probe.run as probe_run
    from vitup_cli.cli import app

    seen = []
    monkeypatch.setattr(probe_run, "compile_upsampler", lambda u: seen.append(u.name) or 0)
    make_voc(tmp_path / "voc")
    args = ["probe", "voc", "--root", str(tmp_path / "voc"), "--backbone", "dinov3_s", "--pretrained", "none",
            "--backbone-args", "depth=2,embed_dim=64,num_heads=1", "--input-size", "64", "--res", "16",
            "--crop", "32", "--workers", "0", "--device", "cpu", "--epochs", "1", "--limit", "2",
            "--upsampler", "bilinear,nearest", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "rep")]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--compile"])
    assert result.exit_code == 0, result.output
    assert seen == ["bilinear", "nearest"]


@pytest.mark.slow
def test_compiled_vitup_matches_eager():
    """A real torch.compile (inductor, C++ on CPU) of a small ViT-Up: the same features up to float
    reassociation, at a full chunk size and at a smaller one (the recompile with dynamic shapes)."""
    from vitup_cli.features import compile_upsampler

    model = _registry_model("vitup")
    model.backbone.add_lora()
    for p in model.parameters():
        if p.dim() > 1 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    model.eval()
    torch.manual_seed(1)
    images = torch.rand(2, 3, model.input_size, model.input_size)
    with torch.no_grad():
        eager = [dense_features(model, images, size, dtype=torch.float32)[0] for size in ((40, 40), (17, 23))]
        assert compile_upsampler(model) == len(model.backbone.model.blocks) + 5
        compiled = [dense_features(model, images, size, dtype=torch.float32)[0] for size in ((40, 40), (17, 23))]
    for a, b in zip(eager, compiled, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-4


@pytest.mark.slow
def test_extract_compile_matches_eager(tmp_path):
    import numpy as np
    from typer.testing import CliRunner

    from vitup_cli.cli import app
    from vitup_cli.stores import open_store

    base = [*_tiny_extract_args(tmp_path, 3), "--batch-size", "2"]
    runner = CliRunner()
    eager = runner.invoke(app, [*base, "--out", str(tmp_path / "eager.zarr")])
    compiled = runner.invoke(app, [*base, "--out", str(tmp_path / "compiled.zarr"), "--compile"])
    assert eager.exit_code == 0, eager.output
    assert compiled.exit_code == 0 and "--compile: 2 modules compiled" in compiled.output, compiled.output
    with open_store(tmp_path / "eager.zarr") as a, open_store(tmp_path / "compiled.zarr") as b:
        for i in range(3):
            assert np.abs(np.asarray(a[i]) - np.asarray(b[i])).max() < 1e-4
