"""A method is a plug-in: one model class and one registered spec make a new upsampler work in `vitup
extract`, `vitup probe` and `vitup visualize` (and in vitup checkpoints) without touching any other module."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_backbone
from PIL import Image
from probe_fixtures import make_folder
from torch import nn
from typer.testing import CliRunner

import vitup_cli
from vitup_cli.cli import app
from vitup_cli.features import fit_image
from vitup_cli.hub import save_checkpoint
from vitup_cli.models import (
    TRAINED,
    UPSAMPLERS,
    Capabilities,
    Preprocessing,
    Upsampler,
    UpsamplerSpec,
    register_upsampler,
    sample_map,
    unregister_upsampler,
)
from vitup_cli.stores import open_store

runner = CliRunner()


@dataclass
class ToyConfig:
    gain: float = 2.0


class Toy(Upsampler):
    """The smallest trained method: bilinear tokens times a learned per-channel gain."""

    name = "toy"

    def __init__(self, backbone, config: ToyConfig | None = None, input_size: int | None = None) -> None:
        super().__init__(backbone, input_size)
        self.config = config or ToyConfig()
        self.gain = nn.Parameter(torch.full((backbone.embed_dim,), float(self.config.gain)))

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return {"gain": self.gain}

    def query(self, images, xy, tap=None):
        return sample_map(self.tokens(images, tap), xy) * self.gain

    def features(self, images, size, tap=None):
        size = (size, size) if isinstance(size, int) else tuple(size)
        up = F.interpolate(self.tokens(images, tap), size=size, mode="bilinear", align_corners=False)
        return up * self.gain[:, None, None]


SPEC = UpsamplerSpec(
    name="toy",
    model_class=Toy,
    build=lambda backbone, config=None, input_size=None: Toy(backbone, config, input_size),
    config_class=ToyConfig,
    capabilities=Capabilities(trained=True),
    preprocessing=Preprocessing(resize_filter="nearest"),
    summary="bilinear tokens times a learned gain (a test's plug-in)",
)


@pytest.fixture
def toy(tmp_path):
    """The toy registered for one test, and a checkpoint of it (64 px input over the tiny random backbone)."""
    register_upsampler(SPEC)
    torch.manual_seed(0)
    model = Toy(tiny_backbone(), ToyConfig(gain=3.0), input_size=64).eval()
    with torch.no_grad():
        model.gain.normal_(1.0, 0.5)
    save_checkpoint(tmp_path / "toy" / "last", model)
    yield model, tmp_path / "toy" / "last"
    unregister_upsampler("toy")


def _photos(folder, n=2, size=(40, 52)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_the_registry_lists_it_while_registered(toy):
    assert "toy" in UPSAMPLERS and "toy" in TRAINED
    assert "toy" in [u.name for u in vitup_cli.list_upsamplers()]
    unregister_upsampler("toy")
    assert "toy" not in UPSAMPLERS
    register_upsampler(SPEC)


def test_extract_stores_it_with_its_own_resize_filter(toy, tmp_path):
    model, ck = toy
    images = _photos(tmp_path / "imgs")
    out = tmp_path / "s.zarr"
    args = ["extract", str(images), "--out", str(out), "--checkpoint", str(ck), "--res", "16", "--fit", "squash",
            "--workers", "0", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with open_store(out) as store:
        feats = store[0 : len(store)]
        assert store.attrs["upsampler"] == "toy"
        assert store.attrs["resize_filter"] == "nearest" and store.attrs["settings"]["resample"] == "nearest"
        paths = store.paths
    for row, name in enumerate(paths):
        x, _ = fit_image(Image.open(images / name).convert("RGB"), 64, "squash", resample="nearest")
        with torch.no_grad():
            want = model.features(x[None], (16, 16))[0].numpy()
        np.testing.assert_allclose(feats[row], want, atol=1e-5)
    bicubic = runner.invoke(app, [*args[:3], str(tmp_path / "b.zarr"), *args[4:], "--resize-filter", "bicubic"])
    assert bicubic.exit_code == 0, bicubic.output
    with open_store(tmp_path / "b.zarr") as store:
        assert store.attrs["resize_filter"] == "bicubic"
        assert not np.allclose(store[0 : len(store)], feats)


def test_probe_runs_it_beside_bilinear(toy, tmp_path):
    _, ck = toy
    make_folder(tmp_path / "data", n_train=4, n_val=2)
    args = ["probe", "folder", "--root", str(tmp_path / "data"), "--checkpoint", str(ck), "--upsampler", "toy,bilinear",
            "--res", "16", "--crop", "32", "--workers", "0", "--device", "cpu", "--epochs", "1",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "rep")]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["name"] for r in report["results"]] == ["toy", "bilinear"]
    assert all(r["metrics"] for r in report["results"])


def test_visualize_draws_it(toy, tmp_path, pca_spy):
    _, ck = toy
    photo = _photos(tmp_path / "imgs", n=1) / "p0.png"
    out = tmp_path / "v.png"
    result = runner.invoke(app, ["visualize", str(photo), "--checkpoint", str(ck), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] > 100
    assert "1x4 panels" in result.output  # the image, the low-res tokens, the toy and bilinear (the default pair)
    maps = pca_spy[-1]
    assert len(maps) == 3 and not torch.allclose(maps[1], maps[2])  # the toy's gain makes it differ from bilinear


def test_load_rebuilds_it_from_its_checkpoint(toy):
    model, ck = toy
    loaded = vitup_cli.load(ck)
    assert isinstance(loaded, Toy) and loaded.config == ToyConfig(gain=3.0) and loaded.input_size == 64
    torch.testing.assert_close(loaded.gain, model.gain)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x, 8), model.features(x, 8))
