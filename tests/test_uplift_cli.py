"""UPLiFT through the commands: checkpoints and published weights in extract, probe and visualize."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_backbone, tiny_vitup
from PIL import Image
from probe_fixtures import make_folder
from safetensors.torch import save_file
from typer.testing import CliRunner

from vitup_cli.cli import app
from vitup_cli.errors import VitupError
from vitup_cli.hub import load_trained, save_checkpoint
from vitup_cli.hub.uplift import save_uplift_checkpoint
from vitup_cli.models import UPLiFT
from vitup_cli.models.uplift import UPLiFTNet

runner = CliRunner()


def _randomise_bn(net: torch.nn.Module) -> None:
    """Trained-looking BatchNorm statistics, so eval mode differs from a fresh init."""
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith("running_mean"):
                t.normal_(0, 0.1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A ViT-Up and an UPLiFT checkpoint over the same random-init tiny backbone (64 px input)."""
    root = tmp_path_factory.mktemp("ck")
    vit = tiny_vitup()
    save_checkpoint(root / "vitup" / "last", vit)
    torch.manual_seed(4)
    up = UPLiFT(tiny_backbone(), input_size=64)
    _randomise_bn(up.net)
    save_uplift_checkpoint(root / "uplift" / "last", up, {"step": 3})
    return {"vitup": root / "vitup" / "last", "uplift": root / "uplift" / "last"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 60, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_checkpoint_round_trip_is_exact(checkpoints):
    torch.manual_seed(4)
    original = UPLiFT(tiny_backbone(), input_size=64)
    _randomise_bn(original.net)
    loaded = load_trained(checkpoints["uplift"]).eval()
    assert isinstance(loaded, UPLiFT) and loaded.input_size == 64
    x = torch.rand(1, 3, 40, 52)
    with torch.no_grad():
        assert torch.equal(original.eval().features(x, 32), loaded.features(x, 32))


def test_extract_stores_uplift_and_records_the_resize(checkpoints, photos, tmp_path):
    store = tmp_path / "u.zarr"
    args = ["extract", str(photos), "--out", str(store), "--res", "40", "--checkpoint", str(checkpoints["uplift"])]
    result = runner.invoke(app, [*args, "--upsampler", "uplift"])
    assert result.exit_code == 0, result.output
    from vitup_cli.stores import open_store

    with open_store(store) as s:
        assert s.attrs["upsampler"] == "uplift"
        assert s.attrs["upsampler_notes"] == {"iterations": 4, "native_size": [64, 64], "resized": True}
        assert s.attrs["settings"]["model_sha256"]  # the UPLiFT weights are part of the store's identity
        assert s[0].shape == (64, 40, 40)
    wrong = runner.invoke(app, [*args[:-2], "--out", str(tmp_path / "w.zarr"), *args[-2:], "--upsampler", "vitup"])
    assert wrong.exit_code == 2 and "holds a uplift" in wrong.output
    untrained = runner.invoke(app, ["extract", str(photos), "--out", str(tmp_path / "n.zarr"), "--upsampler", "uplift"])
    assert untrained.exit_code == 2 and "--upsampler uplift needs --checkpoint" in untrained.output


def test_probe_runs_vitup_uplift_and_bilinear_side_by_side(checkpoints, tmp_path):
    make_folder(tmp_path / "data", n_train=4, n_val=2)
    args = [
        "probe", "folder", "--root", str(tmp_path / "data"),
        "--checkpoint", str(checkpoints["vitup"]), "--checkpoint", str(checkpoints["uplift"]),
        "--upsampler", "vitup,uplift,bilinear", "--res", "16", "--crop", "32", "--workers", "0", "--device", "cpu",
        "--epochs", "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "rep"),
    ]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["name"] for r in report["results"]] == ["vitup", "uplift", "bilinear"]
    assert len(report["protocol"]["checkpoint"]) == 2
    assert all(r["metrics"] for r in report["results"])
    only_vitup = ["probe", "folder", "--root", str(tmp_path / "data"), "--checkpoint", str(checkpoints["vitup"])]
    missing = runner.invoke(app, [*only_vitup, "--upsampler", "uplift,bilinear", "--out", str(tmp_path / "r2")])
    assert missing.exit_code == 2 and "--upsampler uplift needs --checkpoint" in missing.output


def test_visualize_draws_the_uplift_checkpoint(checkpoints, photos, tmp_path):
    out = tmp_path / "v.png"
    photo = str(photos / "p0.png")
    result = runner.invoke(app, ["visualize", photo, "--checkpoint", str(checkpoints["uplift"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] > 100
    wrong = runner.invoke(
        app,
        [
            "visualize",
            photo,
            "--checkpoint",
            str(checkpoints["uplift"]),
            "--compare",
            "vitup",
            "--out",
            str(tmp_path / "w.png"),
        ],
    )
    assert wrong.exit_code == 2 and "holds a uplift" in wrong.output


def _published_copy(folder: Path, channels: int = 384) -> Path:
    """A file in the published layout under the published name of uplift:dinov3_splus."""
    torch.manual_seed(9)
    net = UPLiFTNet(channels, 16)
    path = folder / "uplift_dinov3-splus16.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
def test_local_copy_of_published_weights_loads_with_its_release_backbone(tmp_path):
    path = _published_copy(tmp_path)
    up = load_trained(path, pretrained="none")  # the release's backbone, randomly initialised (offline CI)
    assert isinstance(up, UPLiFT) and up.backbone.name == "dinov3_s+" and up.input_size == 448
    torch.manual_seed(9)
    expected = UPLiFTNet(384, 16)
    for name, value in expected.state_dict().items():
        assert torch.equal(up.net.state_dict()[name], value), name


def test_published_weights_errors_are_one_line(photos, tmp_path, monkeypatch, one_line_error):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(VitupError, match="uplift:dinov3_splus: .* not in the Hugging Face cache"):
        load_trained("uplift:dinov3_splus")
    bad = tmp_path / "bad"
    bad.mkdir()
    path = _published_copy(bad, channels=32)  # the wrong width for DINOv3-S+
    with pytest.raises(VitupError, match=r"has shape .* this UPLiFT needs .*384-channel"):
        load_trained(path, pretrained="none")
    result = runner.invoke(app, ["extract", str(photos), "--out", str(tmp_path / "x.zarr"), "-c", "uplift:nope"])
    one_line_error(result, "unknown release 'uplift:nope'")
