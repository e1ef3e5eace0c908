"""LoftUp: published layout and counts, equivalence with the reference, banding, weights, commands."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_backbone
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from vitup_cli.cli import app
from vitup_cli.errors import VitupError
from vitup_cli.hub.loftup import load_loftup, read_published_weights
from vitup_cli.models import UPSAMPLERS, build_upsampler, grid_xy, sample_map
from vitup_cli.models.loftup import (
    LoftUp,
    LoftUpConfig,
    LoftUpNet,
    config_from_state,
    count_parameters,
    load_state,
)

FIXTURE = Path(__file__).parent / "data" / "loftup_ref" / "loftup_ref.safetensors"
runner = CliRunner()
TINY_ARGS = ["--backbone", "dinov2_s", "--pretrained", "none", "--backbone-args", "depth=2,embed_dim=64,num_heads=1"]


def _fixture():
    tensors = load_file(str(FIXTURE))
    state = {k[len("weights.") :]: v for k, v in tensors.items() if k.startswith("weights.")}
    return tensors, state


def _random_state(net: LoftUpNet, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affines, so eval-mode banding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean") or name.endswith(".bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def test_parameter_counts_match_the_paper():
    counts = {dim: count_parameters(dim) for dim in (384, 768)}
    print(f"LoftUp parameters: 384-d {counts[384]:,}, 768-d {counts[768]:,}")
    assert counts[384] == 4_303_894  # 4.30M
    assert counts[768] == 15_051_286  # 15.05M


def test_state_dict_layout_is_the_published_one():
    _, state = _fixture()
    assert set(LoftUpNet(32).state_dict()) == set(state)
    assert state["upsampler.fourier_feat.1.biases"].shape == (2, 5, 20)
    assert state["upsampler.lr_pe.biases"].shape == (2, 2, 5)


@pytest.mark.parametrize("chunk", [None, 56, 1, 10**9])
def test_matches_the_reference_with_batch_scaling(chunk):
    tensors, state = _fixture()
    dim, config = config_from_state(state, minmax="batch")
    net = LoftUpNet(dim, config)
    load_state(net, state, "fixture")
    with torch.no_grad():
        out = net.eval()(tensors["lowres"], tensors["image_normalized"], chunk)
    assert (out - tensors["out_batch"]).abs().max() < 1e-4


def test_per_image_scaling_equals_the_reference_one_image_at_a_time():
    tensors, state = _fixture()
    dim, config = config_from_state(state)  # minmax="image", the default
    net = LoftUpNet(dim, config)
    load_state(net, state, "fixture")
    with torch.no_grad():
        out = net.eval()(tensors["lowres"], tensors["image_normalized"], 200)
    assert (out - tensors["out_single"]).abs().max() < 1e-4
    assert (tensors["out_batch"] - tensors["out_single"]).abs().max() > 0.1  # the modes really differ


def test_published_bin_loads_through_the_real_path(tmp_path):
    tensors, state = _fixture()
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)  # how the official files are written
    backbone = tiny_backbone("dinov2_s", embed_dim=32, num_heads=1)
    model = load_loftup(path, backbone=backbone, minmax="batch")
    with torch.no_grad():
        out = model.net(tensors["lowres"], tensors["image_normalized"])
    assert (out - tensors["out_batch"]).abs().max() < 1e-4
    assert model.source == str(path) and len(model.weights_sha256) == 64


def test_banded_equals_unbanded_and_is_independent_of_the_band():
    torch.manual_seed(0)
    net = LoftUpNet(24, LoftUpConfig(minmax="image")).eval()
    _random_state(net)
    tokens, guidance = torch.randn(2, 24, 3, 5), torch.randn(2, 3, 29, 37)
    with torch.no_grad():
        whole = net(tokens, guidance, 10**9)
        for chunk in (1, 2 * 37, 2 * 37 * 5, 2 * 37 * 28):
            assert (net(tokens, guidance, chunk) - whole).abs().max() < 1e-5


def test_training_mode_is_one_band_with_batch_statistics():
    torch.manual_seed(0)
    net = LoftUpNet(16).train()
    tokens, guidance = torch.randn(2, 16, 3, 3), torch.randn(2, 3, 20, 20)
    assert len(list(net.bands(tokens, guidance, chunk_pixels=1))) == 1
    out = net(tokens, guidance, 1)
    out.mean().backward()
    assert net.upsampler.first_conv[1].weight.grad is not None
    assert net.upsampler.first_conv[2].num_batches_tracked.item() == 2  # two forwards, batch statistics each


def test_upsampler_interface_features_and_query():
    backbone = tiny_backbone("dinov2_s")
    torch.manual_seed(1)
    up = build_upsampler("loftup", backbone, input_size=56).eval()
    _random_state(up.net)
    up.config.chunk_pixels = 2 * 32 * 3  # several bands
    images = torch.rand(2, 3, 40, 44)
    with torch.no_grad():
        dense = up.features(images, (40, 44))
        assert dense.shape == (2, 64, 40, 44)
        xy = torch.rand(2, 300, 2)
        xy[:, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # the corners clamp
        assert (up.query(images, xy) - sample_map(dense, xy)).abs().max() < 1e-4
        grid = up.query(images, grid_xy(40, 44).expand(2, -1, -1))
        assert (grid.transpose(1, 2).reshape(2, 64, 40, 44) - dense).abs().max() < 1e-4
        up.config.chunk_pixels = 112 * 112
        assert up.features(images, 96).shape == (2, 64, 96, 96)  # any size: the guidance is resized
    with pytest.raises(VitupError, match="last layer only"):
        up.features(images, 16, tap=1)
    assert "loftup" in UPSAMPLERS


def test_per_image_scaling_does_not_depend_on_the_batch():
    backbone = tiny_backbone("dinov2_s")
    up = LoftUp(backbone, input_size=28).eval()
    images = torch.rand(3, 3, 28, 28)
    with torch.no_grad():
        together = up.features(images, 28)
        alone = torch.cat([up.features(images[i : i + 1], 28) for i in range(3)])
        assert (together - alone).abs().max() < 1e-4
        up.net.set_minmax("batch")
        assert (up.features(images, 28) - alone).abs().max() > 1e-3
    with pytest.raises(VitupError, match="--minmax"):
        up.net.set_minmax("channel")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_files_needing_more_than_weights_only_are_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"channelnorm.norm.weight": torch.ones(2), "x": _Evil()}, path)
    with pytest.raises(VitupError, match=r"refused, it cannot be read with torch.load\(weights_only=True\)") as err:
        read_published_weights(path)
    assert "\n" not in str(err.value)
    other = tmp_path / "other.bin"
    torch.save({"conv.weight": torch.ones(2)}, other)
    with pytest.raises(VitupError, match="not LoftUp weights"):
        read_published_weights(other)
    raw = tmp_path / "list.bin"
    raw.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(VitupError):
        read_published_weights(raw)


def test_width_mismatch_and_missing_release_are_one_line(tmp_path):
    path = tmp_path / "w.bin"
    torch.save(LoftUpNet(32).state_dict(), path)
    with pytest.raises(VitupError, match="32-d features, but backbone"):
        load_loftup(path, backbone=tiny_backbone("dinov2_s"))
    with pytest.raises(VitupError, match="no published LoftUp weights for backbone 'dinov3_s'"):
        load_loftup(None, backbone=tiny_backbone("dinov3_s"))
    with pytest.raises(VitupError, match="that is a uplift release"):
        load_loftup("uplift:dinov2_s", backbone=tiny_backbone("dinov2_s"))


def test_release_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(VitupError, match="haiwen/loftup-dinov2s/pytorch_model.bin is not in the Hugging Face cache"):
        load_loftup("loftup:dinov2_s", backbone=tiny_backbone("dinov2_s"))


def _weights_file(tmp_path: Path, dim: int = 64) -> Path:
    torch.manual_seed(3)
    net = LoftUpNet(dim)
    _random_state(net)
    path = tmp_path / "pytorch_model.bin"
    torch.save(net.state_dict(), path)
    return path


def _images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_extract_with_loftup_records_weights_and_scaling(tmp_path):
    from vitup_cli.stores import open_store

    weights = _weights_file(tmp_path)
    args = ["extract", str(_images(tmp_path / "imgs")), "--out", str(tmp_path / "f.zarr"), "--res", "24",
            "--upsampler", "loftup", "--checkpoint", str(weights), *TINY_ARGS, "--input-size", "28",
            "--workers", "0", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with open_store(tmp_path / "f.zarr") as store:
        feats = store[0:3]
        settings = store.attrs["settings"]
    assert feats.shape == (3, 64, 24, 24) and np.isfinite(feats).all()
    assert settings["upsampler"] == "loftup"
    assert settings["upsampler_settings"]["loftup"]["minmax"] == "image"
    assert "per-image" in settings["upsampler_settings"]["minmax_note"]
    assert settings["checkpoint_sha256"] and settings["model_sha256"]
    batch = runner.invoke(app, [*args[:3], str(tmp_path / "b.zarr"), *args[4:], "--minmax", "batch"])
    assert batch.exit_code == 0, batch.output
    with open_store(tmp_path / "b.zarr") as store:
        assert store.attrs["settings"]["upsampler_settings"]["loftup"]["minmax"] == "batch"
    bad = runner.invoke(app, [*args[:3], str(tmp_path / "c.zarr"), *args[4:], "--minmax", "nope"])
    assert bad.exit_code == 2 and "--minmax nope" in bad.output


def test_visualize_draws_loftup(tmp_path):
    weights = _weights_file(tmp_path)
    img = _images(tmp_path / "imgs", 1) / "im0.png"
    out = tmp_path / "v.png"
    result = runner.invoke(
        app,
        ["visualize", str(img), "--compare", "loftup,bilinear", "--checkpoint", str(weights), *TINY_ARGS,
         "--res", "20", "--input-size", "28", "--device", "cpu", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.is_file() and Image.open(out).size[0] > 100


def test_probe_loftup_beside_bilinear(tmp_path):
    from probe_fixtures import make_folder

    weights = _weights_file(tmp_path)
    make_folder(tmp_path / "ds", n_train=4, n_val=2)
    args = ["probe", "folder", "--root", str(tmp_path / "ds"), *TINY_ARGS, "--input-size", "28", "--res", "16",
            "--crop", "32", "--workers", "0", "--device", "cpu", "--epochs", "1", "--upsampler", "loftup,bilinear",
            "--checkpoint", str(weights), "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "rep")]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["name"] for r in data["results"]] == ["loftup", "bilinear"]
    assert all(np.isfinite(r["metrics"]["miou"]) for r in data["results"])
