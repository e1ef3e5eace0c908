"""The field side by side: `vitup probe` runs ViT-Up, UPLiFT, LoftUp, AnyUp, JAFAR, NAF, FeatUp and bilinear
on one backbone (one random-init tiny DINOv3 shape, 144-px input: NAF needs 9 tokens a side), each from a file
in its own published layout (ViT-Up and UPLiFT from `vitup train` checkpoints); AnyUp and NAF, any-backbone
methods, take their default releases from torch.hub's cache over the checkpoints' backbone."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_backbone, tiny_vitup
from probe_fixtures import make_folder
from typer.testing import CliRunner

from vitup_cli.cli import app
from vitup_cli.hub import save_checkpoint
from vitup_cli.hub.uplift import save_uplift_checkpoint
from vitup_cli.models import UPLiFT
from vitup_cli.models.anyup import AnyUpNet
from vitup_cli.models.featup import FeatUpNet
from vitup_cli.models.jafar import JAFARNet
from vitup_cli.models.loftup import LoftUpNet
from vitup_cli.models.naf import NAFConfig, NAFNet

METHODS = ["vitup", "uplift", "loftup", "anyup", "jafar", "naf", "featup", "bilinear"]


@pytest.mark.slow
@pytest.mark.integration
def test_probe_runs_the_whole_field_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ck = tmp_path / "ck"
    save_checkpoint(ck / "vitup" / "last", tiny_vitup(input_tokens=9))
    torch.manual_seed(4)
    save_uplift_checkpoint(ck / "uplift" / "last", UPLiFT(tiny_backbone(), input_size=144))
    torch.manual_seed(5)
    ck.joinpath("loftup").mkdir()
    torch.save(LoftUpNet(64).state_dict(), ck / "loftup" / "pytorch_model.bin")
    torch.save({"jafar": JAFARNet(64).state_dict()}, ck / "jafar_tiny.pth")
    featup = FeatUpNet(64)
    torch.save({"state_dict": dict(featup.published_state())}, ck / "featup_tiny.ckpt")
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(AnyUpNet().state_dict(), hub / "anyup_paper.pth")
    torch.save(NAFNet(NAFConfig()).state_dict(), hub / "naf_release.pth")
    make_folder(tmp_path / "data", n_train=4, n_val=2)
    checkpoints = [ck / "vitup" / "last", ck / "uplift" / "last", ck / "loftup" / "pytorch_model.bin",
                   ck / "jafar_tiny.pth", ck / "featup_tiny.ckpt"]  # fmt: skip
    args = ["probe", "folder", "--root", str(tmp_path / "data"), "--upsampler", ",".join(METHODS),
            *[a for c in checkpoints for a in ("--checkpoint", str(c))],
            "--backbone", "dinov3_s", "--pretrained", "none", "--backbone-args", "depth=2,embed_dim=64,num_heads=1",
            "--input-size", "144", "--res", "16", "--crop", "32", "--workers", "0", "--device", "cpu",
            "--epochs", "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "rep")]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["name"] for r in report["results"]] == METHODS
    assert all(r["metrics"] and r["input_size"] == 144 for r in report["results"])
