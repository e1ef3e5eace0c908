"""AnyUp: published layout, equivalence with the reference, banding, weights, releases, commands."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_backbone
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vitup_cli.cli import app
from vitup_cli.errors import VitupError
from vitup_cli.hub import open_upsampler
from vitup_cli.hub.anyup import read_published_weights
from vitup_cli.hub.releases import RELEASES, release_for_backbone, resolve_weights
from vitup_cli.models import UPSAMPLERS, build_upsampler, grid_xy, sample_map, spec_of
from vitup_cli.models.anyup import AnyUp, AnyUpConfig, AnyUpNet, config_from_state, count_parameters, load_state

FIXTURE = Path(__file__).parent / "data" / "anyup_ref" / "anyup_ref.safetensors"
runner = CliRunner()
TINY_ARGS = ["--backbone", "dinov2_s", "--pretrained", "none", "--backbone-args", "depth=2,embed_dim=64,num_heads=1"]


def _fixture():
    tensors = load_file(str(FIXTURE))
    state = {k[len("weights.") :]: v for k, v in tensors.items() if k.startswith("weights.")}
    return tensors, state


def _net(state) -> AnyUpNet:
    net = AnyUpNet(config_from_state(state))
    load_state(net, state, "fixture")
    return net.eval()


def test_state_dict_layout_is_the_published_one():
    _, state = _fixture()
    assert set(AnyUpNet(AnyUpConfig(qk_dim=32)).state_dict()) == set(state)
    assert config_from_state(state).qk_dim == 32
    released = AnyUpNet().state_dict()  # the released files: qk_dim 128, 5x5 basis
    assert released["key_features_encoder.0.basis"].shape == (128, 1, 5, 5)
    assert released["cross_decode.cross_attn.attention.in_proj_weight"].shape == (384, 128)
    assert released["aggregation.0.weight"].shape == (128, 256, 3, 3)
    assert count_parameters() == count_parameters(AnyUpConfig())  # independent of the backbone


@pytest.mark.parametrize("chunk", [None, 1, 24, 10**9])
def test_matches_the_reference(chunk):
    tensors, state = _fixture()
    net = _net(state)
    with torch.no_grad():
        out = net(tensors["image"], tensors["feats"], chunk_pixels=chunk)
        small = net(tensors["image"], tensors["feats"], (13, 17), chunk)
        large = net(tensors["image"], tensors["feats"], (27, 31), chunk)
    assert (out - tensors["out"]).abs().max() < 1e-4
    assert (small - tensors["out_small"]).abs().max() < 1e-4  # output smaller than the guidance: pooled queries
    assert (large - tensors["out_large"]).abs().max() < 1e-4  # larger: adaptive pooling upsamples


@pytest.mark.parametrize("channel_chunk", [256, 7, 1])
def test_any_channel_count_matches_the_reference(channel_chunk):
    tensors, state = _fixture()
    net = _net(state)
    net.config.channel_chunk = channel_chunk
    assert tensors["feats2"].shape[1] == 40 and tensors["feats"].shape[1] == 16  # one model, two widths
    with torch.no_grad():
        out = net(tensors["image2"], tensors["feats2"], chunk_pixels=5)
    assert (out - tensors["out2"]).abs().max() < 1e-4


def test_broken_conventions_are_caught():
    tensors, state = _fixture()
    net = _net(state)
    image, feats = tensors["image"], tensors["feats"]
    with torch.no_grad():
        # a mirrored token grid, an image unnormalised, no window, no RoPE: each changes the output
        assert (net(image, feats.flip(-1)) - tensors["out"]).abs().max() > 1e-2
        assert (net(image.flip(-2), feats) - tensors["out"]).abs().max() > 1e-2
        assert (net(image * 0.229 + 0.45, feats) - tensors["out"]).abs().max() > 1e-2
        net.config.window_ratio = 0.0
        assert (net(image, feats) - tensors["out"]).abs().max() > 1e-2
        net.config.window_ratio = 0.1
        net.rope.freqs.zero_()
        assert (net(image, feats) - tensors["out"]).abs().max() > 1e-2
        # the reference's grouping of the unification's responses (dim, C), not per channel (C, dim)
        net = _net(state)
        lfu = net.key_features_encoder[0]
        f = torch.nn.functional.normalize(feats, dim=1)
        resp = torch.nn.functional.conv2d(
            torch.nn.functional.pad(f, (2, 2, 2, 2)), lfu.basis.repeat(16, 1, 1, 1), groups=16
        )
        per_channel = resp.view(2, 16, 32, 5, 6).softmax(dim=2).mean(dim=1)  # (interior taps: no border division)
        assert (lfu(f)[..., 2:-2, 2:-2] - per_channel[..., 2:-2, 2:-2]).abs().max() > 1e-3
        assert (lfu(f) - lfu(f, channel_chunk=5)).abs().max() < 1e-5


def test_banded_equals_unbanded_at_any_band():
    torch.manual_seed(0)
    net = AnyUpNet(AnyUpConfig(qk_dim=16)).eval()
    tokens, guidance = torch.randn(2, 24, 3, 5), torch.randn(2, 3, 29, 37)
    with torch.no_grad():
        whole = net(guidance, tokens, chunk_pixels=10**9)
        bands = list(net.bands(guidance, tokens, chunk_pixels=2 * 37 * 3))
        assert len(bands) == 10 and bands[0][:2] == (0, 3) and bands[-1][1] == 29
        for chunk in (1, 2 * 37, 2 * 37 * 5):
            assert (net(guidance, tokens, chunk_pixels=chunk) - whole).abs().max() < 1e-5


def test_upsampler_interface_any_backbone_any_tap():
    torch.manual_seed(1)
    for name in ("dinov2_s", "dinov3_s"):
        backbone = tiny_backbone(name)
        up = build_upsampler("anyup", backbone, input_size=2 * 28 if name == "dinov2_s" else 64).eval()
        up.config.chunk_pixels = 2 * 32 * 3
        images = torch.rand(2, 3, 40, 44)
        with torch.no_grad():
            dense = up.features(images, (40, 44))
            assert dense.shape == (2, 64, 40, 44)
            xy = torch.rand(2, 200, 2)
            assert (up.query(images, xy) - sample_map(dense, xy)).abs().max() < 1e-4
            grid = up.query(images, grid_xy(40, 44).expand(2, -1, -1))
            assert (grid.transpose(1, 2).reshape(2, 64, 40, 44) - dense).abs().max() < 1e-4
            assert up.features(images, 24, tap=1).shape == (2, 64, 24, 24)  # any tap
    spec = spec_of("anyup")
    assert spec.capabilities.any_backbone and not spec.capabilities.input_size_from_weights
    assert spec.capabilities.banded and spec.capabilities.default_release and spec.capabilities.any_tap
    assert "CC-BY-4.0" in spec.licence and "anyup" in UPSAMPLERS


def test_output_is_a_convex_mix_of_the_tokens():
    torch.manual_seed(2)
    net = AnyUpNet(AnyUpConfig(qk_dim=16)).eval()
    tokens = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        out = net(torch.randn(1, 3, 20, 20), tokens)
    lo, hi = tokens.amin(dim=(2, 3)), tokens.amax(dim=(2, 3))
    assert (out.amin(dim=(2, 3)) >= lo - 1e-5).all() and (out.amax(dim=(2, 3)) <= hi + 1e-5).all()


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_files_needing_unpickling_are_refused(tmp_path):
    path = tmp_path / "anyup_paper.pth"
    torch.save({"rope.freqs": torch.ones(2), "x": _Evil()}, path)
    with pytest.raises(VitupError, match=r"refused, it cannot be read with torch.load\(weights_only=True\)") as err:
        read_published_weights(path)
    assert "\n" not in str(err.value)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.ones(2)}, other)
    with pytest.raises(VitupError, match="not AnyUp weights"):
        read_published_weights(other)


def test_releases_fit_any_backbone():
    for name, file in (("anyup:default", "anyup_paper.pth"), ("anyup:multi_backbone", "anyup_multi_backbone.pth")):
        release = RELEASES[name]
        assert release.method == "anyup" and release.filename == file and release.any_backbone
        assert release.url.startswith("https://github.com/wimmerth/anyup/releases/download/")
        assert release.hub_ref == release.url and "CC-BY-4.0" in release.licence
    for backbone in ("dinov2_s", "dinov3_b", "dinov3_s+"):
        assert release_for_backbone("anyup", backbone).name == "anyup:default"
    assert release_for_backbone("loftup", "dinov3_b") is None  # only any-backbone releases fall back


def test_release_offline_is_one_clear_line(tmp_path, monkeypatch, offline_cache, one_line_error):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torchhub"))
    with pytest.raises(VitupError) as err:
        resolve_weights("anyup:default")
    one_line_error(err.value, "anyup_paper.pth", "https://github.com/wimmerth/anyup/releases/download/checkpoint/")
    img = _images(tmp_path / "imgs", 1) / "im0.png"
    result = runner.invoke(
        app, ["extract", str(img), "--out", str(tmp_path / "f.zarr"), "--upsampler", "anyup", *TINY_ARGS,
              "--device", "cpu", "--workers", "0"],
    )  # fmt: skip
    one_line_error(result, "anyup_paper.pth", "torch.hub")


def test_release_from_torch_hub_cache_over_another_backbone(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torchhub"))
    (tmp_path / "torchhub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(4)
    torch.save(AnyUpNet().state_dict(), tmp_path / "torchhub" / "checkpoints" / "anyup_paper.pth")
    model = open_upsampler("anyup", backbone=tiny_backbone("dinov3_s"), notify=lambda _: None)
    assert isinstance(model, AnyUp) and model.source == "anyup:default" and model.config.qk_dim == 128
    with torch.no_grad():
        assert model.features(torch.rand(1, 3, 32, 32), 20).shape == (1, 64, 20, 20)


def _images(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_safetensors_copy_reads_as_the_published_file(tmp_path):
    torch.manual_seed(5)
    state = AnyUpNet().state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "a.safetensors"))
    read = read_published_weights(tmp_path / "a.safetensors")
    assert all(torch.equal(read[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", ["my_anyup.pth", "anyup_multi_backbone.pth"])
def test_extract_loads_a_published_layout_file(tmp_path, name):
    from vitup_cli.stores import open_store

    torch.manual_seed(5)
    path = tmp_path / name  # any .pth with --upsampler anyup; a release's file name is recognised as such
    torch.save(AnyUpNet().state_dict(), path)
    args = ["extract", str(_images(tmp_path / "imgs")), "--out", str(tmp_path / "f.zarr"), "--res", "24",
            "--upsampler", "anyup", "--checkpoint", str(path), *TINY_ARGS, "--input-size", "28",
            "--workers", "0", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with open_store(tmp_path / "f.zarr") as store:
        feats = store[0:2]
        settings = store.attrs["settings"]
    assert feats.shape == (2, 64, 24, 24) and np.isfinite(feats).all()
    assert settings["upsampler"] == "anyup" and settings["upsampler_settings"]["anyup"]["qk_dim"] == 128
