"""The Python face: ``vitup_cli.load``, ``vitup_cli.list_upsamplers`` and the torch.hub entry points."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_vitup

import vitup_cli
from vitup_cli.errors import VitupError
from vitup_cli.hub import load_checkpoint, save_checkpoint
from vitup_cli.models import BilinearUpsampler, ViTUp

ROOT = Path(__file__).resolve().parents[1]
TINY_KW = {"backbone": "dinov3_s", "pretrained": "none", "backbone_args": TINY, "input_size": 64}


def test_load_a_baseline_by_name():
    torch.manual_seed(0)
    up = vitup_cli.load("bilinear", **TINY_KW)
    assert isinstance(up, BilinearUpsampler) and not up.training and up.input_size == 64
    feats = up.features(torch.rand(1, 3, 64, 64), (20, 24))
    assert feats.shape == (1, 64, 20, 24)


def test_load_a_checkpoint_equals_load_checkpoint(tmp_path):
    model = tiny_vitup()
    save_checkpoint(tmp_path / "last", model)
    for ref in (tmp_path / "last", str(tmp_path / "last.safetensors")):
        loaded = vitup_cli.load(ref)
        assert isinstance(loaded, ViTUp)
        want = load_checkpoint(tmp_path / "last")
        x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(loaded.features(x, 8), want.features(x, 8))


def test_unknown_names_are_one_line():
    with pytest.raises(VitupError, match="unknown release 'vit-up:nope'"):
        vitup_cli.load("vit-up:nope")
    with pytest.raises(VitupError, match="needs --checkpoint"):
        vitup_cli.load("uplift", **TINY_KW)


def test_list_upsamplers_says_what_each_needs():
    rows = {u.name: u for u in vitup_cli.list_upsamplers()}
    assert list(rows)[:4] == ["vitup", "uplift", "loftup", "featsharp"]
    assert {"bilinear", "nearest", "lowres"} <= set(rows)
    assert rows["vitup"].trained and rows["vitup"].trainable and "vit-up:dinov3_splus" in rows["vitup"].releases
    assert any("cc-by-nc-sa-4.0" in lic for lic in rows["vitup"].licences)
    assert not rows["bilinear"].trained and rows["bilinear"].any_backbone and not rows["bilinear"].trainable
    assert rows["lowres"].native_resolution_only and rows["featsharp"].releases == ()


def test_torch_hub_loads_from_a_clone():
    torch.manual_seed(0)
    up = torch.hub.load(str(ROOT), "upsampler", "bilinear", source="local", trust_repo=True, **TINY_KW)
    torch.manual_seed(0)
    want = vitup_cli.load("bilinear", **TINY_KW)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(up.features(x, 16), want.features(x, 16))
    names = [u.name for u in torch.hub.load(str(ROOT), "upsamplers", source="local", trust_repo=True)]
    assert "vitup" in names


def test_the_upsamplers_command_lists_the_registry():
    import json

    from typer.testing import CliRunner

    from vitup_cli.cli import app

    runner = CliRunner()
    listed = json.loads(runner.invoke(app, ["upsamplers", "--json"]).stdout)
    assert [r["name"] for r in listed] == [u.name for u in vitup_cli.list_upsamplers()]
    vitup = next(r for r in listed if r["name"] == "vitup")
    assert vitup["releases"] == ["vit-up:dinov3_splus", "vit-up:dinov3_b"] and vitup["trainable"]
    assert next(r for r in listed if r["name"] == "loftup")["resize_filter"] == "bilinear"
    table = runner.invoke(app, ["upsamplers"], env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "training-free" in table.stdout and "loftup:dinov2_s" in table.stdout
