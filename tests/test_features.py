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


def test_extract_records_precision_and_bf16_stays_within_tolerance(tmp_path):
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from vitup_cli.cli import app
    from vitup_cli.stores import open_store

    runner = CliRunner()
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    base = [
        "extract", str(folder), "--backbone", "dinov3_s", "--pretrained", "none", "--backbone-args",
        "depth=2,embed_dim=64,num_heads=1", "--upsampler", "bilinear", "--input-size", "64", "--workers", "0",
        "--res", "16", "--dtype", "float32",
    ]  # fmt: skip
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
