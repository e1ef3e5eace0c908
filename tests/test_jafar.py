"""JAFAR: published layout, equivalence with the reference, conventions, banding, weights, the CLI."""

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
from vitup_cli.hub.jafar import load_jafar, read_published_weights
from vitup_cli.hub.releases import RELEASES, resolve_weights
from vitup_cli.models import UPSAMPLERS, build_upsampler, grid_xy, sample_map, spec_of
from vitup_cli.models.jafar import JAFARConfig, JAFARNet, config_from_state, count_parameters, load_state

FIXTURE = Path(__file__).parent / "data" / "jafar_ref" / "jafar_ref.safetensors"
SIZES = {"out_same": (24, 30), "out_up": (37, 41), "out_down": (13, 17)}
runner = CliRunner()
TINY_ARGS = ["--backbone", "dinov2_s", "--pretrained", "none", "--backbone-args", "depth=2,embed_dim=64,num_heads=1"]


def _fixture():
    tensors = load_file(str(FIXTURE))
    state = {k[len("weights.") :]: v for k, v in tensors.items() if k.startswith("weights.")}
    return tensors, state


def _net(state=None) -> JAFARNet:
    if state is None:
        state = _fixture()[1]
    dim, config = config_from_state(state)
    net = JAFARNet(dim, config)
    load_state(net, state, "fixture")
    return net.eval()


def test_parameter_count_and_layout_are_the_published_ones():
    _, state = _fixture()
    assert set(JAFARNet(40, JAFARConfig(qk_dim=32)).state_dict()) == set(state)
    assert state["cross_decode.cross_attn.attention.v_proj_weight"].shape == (32, 40)
    # the released DINOv2-S file: 65 tensors, qk_dim 128, 384-d values
    own = JAFARNet(384).state_dict()
    assert len(own) == 65 and own["key_features_encoder.0.weight"].shape == (128, 384, 1, 1)
    assert own["rope.freqs"].shape == (2, 128)
    print(f"JAFAR parameters: 384-d {count_parameters(384):,}, 768-d {count_parameters(768):,}")


@pytest.mark.parametrize("chunk", [None, 1, 60, 10**9])
@pytest.mark.parametrize("name", sorted(SIZES))
def test_matches_the_reference(name, chunk):
    tensors, _ = _fixture()
    with torch.no_grad():
        out = _net()(tensors["image_normalized"], tensors["lowres"], SIZES[name], chunk)
    assert out.shape == tensors[name].shape
    assert (out - tensors[name]).abs().max() < 1e-4


def test_broken_conventions_are_caught():
    """Each of these is a plausible porting mistake; every one must move the output far from the reference."""
    tensors, state = _fixture()
    net = _net(state)
    ref = tensors["out_same"]
    with torch.no_grad():

        def err(image=tensors["image_normalized"], lowres=tensors["lowres"], model=net):
            return (model(image, lowres, SIZES["out_same"]) - ref).abs().max().item()

        assert err() < 1e-4
        assert err(image=tensors["image"]) > 1e-3  # the guidance image not normalised
        assert err(image=tensors["image_normalized"].flip(1)) > 1e-3  # BGR instead of RGB
        lowres_t = tensors["lowres"].transpose(2, 3).reshape(tensors["lowres"].shape)
        assert err(lowres=lowres_t) > 1e-3  # the token grid read transposed
        swapped = dict(state, **{"rope.freqs": state["rope.freqs"].flip(0)})  # rows and columns swapped
        assert err(model=_net(swapped)) > 1e-3


def test_output_is_a_convex_mix_of_the_raw_tokens():
    tensors, _ = _fixture()
    with torch.no_grad():
        out = _net()(tensors["image_normalized"], tensors["lowres"], (24, 30))
    lo, hi = tensors["lowres"].amin(dim=(2, 3)), tensors["lowres"].amax(dim=(2, 3))
    assert (out >= lo[..., None, None] - 1e-5).all() and (out <= hi[..., None, None] + 1e-5).all()
    assert spec_of("jafar").capabilities.channel_space == "raw"


def test_banded_equals_unbanded_at_a_small_size():
    torch.manual_seed(0)
    net = JAFARNet(24, JAFARConfig(qk_dim=16)).eval()
    image, tokens = torch.randn(2, 3, 29, 37), torch.randn(2, 24, 3, 5)
    with torch.no_grad():
        whole = net(image, tokens, (29, 37), 10**9)
        parts = list(net.bands(image, tokens, (29, 37), 2 * 37 * 3))
        assert len(parts) == 10 and parts[0][:2] == (0, 3) and parts[-1][:2] == (27, 29)  # 3 rows a band
        for chunk in (1, 2 * 37, 2 * 37 * 5, 2 * 37 * 28):
            assert (net(image, tokens, (29, 37), chunk) - whole).abs().max() < 1e-5
        rows = torch.cat([band for _, _, band in net.bands(image, tokens, (29, 37), 2 * 37 * 4)], dim=2)
        assert (rows - whole).abs().max() < 1e-5


def test_published_pth_loads_and_matches(tmp_path):
    tensors, state = _fixture()
    path = tmp_path / "vit_small_patch14_dinov2.lvd142m-copy.pth"
    torch.save({"jafar": state, "optimizer_jafar": {"state": {}, "param_groups": []}}, path)  # as train.py saves
    backbone = tiny_backbone("dinov2_s", embed_dim=40, num_heads=1)
    model = load_jafar(path, backbone=backbone)
    with torch.no_grad():
        out = model.net(tensors["image_normalized"], tensors["lowres"], (37, 41))
    assert (out - tensors["out_up"]).abs().max() < 1e-4
    assert model.source == str(path) and len(model.weights_sha256) == 64


def test_upsampler_interface_features_and_query():
    backbone = tiny_backbone("dinov2_s")
    torch.manual_seed(1)
    up = build_upsampler("jafar", backbone, input_size=56).eval()
    up.config.chunk_pixels = 2 * 44 * 3  # several bands
    images = torch.rand(2, 3, 40, 44)
    with torch.no_grad():
        dense = up.features(images, (40, 44))
        assert dense.shape == (2, 64, 40, 44)
        xy = torch.rand(2, 200, 2)
        assert (up.query(images, xy) - sample_map(dense, xy)).abs().max() < 1e-4
        grid = up.query(images, grid_xy(40, 44).expand(2, -1, -1))
        assert (grid.transpose(1, 2).reshape(2, 64, 40, 44) - dense).abs().max() < 1e-4
        assert up.features(images, 72).shape == (2, 64, 72, 72)
    with pytest.raises(VitupError, match="last layer only"):
        up.features(images, 16, tap=1)
    assert "jafar" in UPSAMPLERS
    assert build_upsampler("jafar", tiny_backbone("dinov2_s")).input_size == 448  # the reference's evaluation


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_files_needing_more_than_weights_only_are_refused(tmp_path, one_line_error):
    path = tmp_path / "w.pth"
    torch.save({"jafar": {"rope.freqs": torch.ones(2)}, "x": _Evil()}, path)
    with pytest.raises(VitupError, match=r"refused, it cannot be read with torch.load\(weights_only=True\)") as err:
        read_published_weights(path)
    one_line_error(err.value, "refused")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.ones(2)}, other)
    with pytest.raises(VitupError, match="not JAFAR weights"):
        read_published_weights(other)
    raw = tmp_path / "list.pth"
    raw.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(VitupError):
        read_published_weights(raw)


def test_width_mismatch_and_missing_release_are_one_line(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"jafar": JAFARNet(32).state_dict()}, path)
    with pytest.raises(VitupError, match="32-d features, but backbone"):
        load_jafar(path, backbone=tiny_backbone("dinov2_s"))
    with pytest.raises(VitupError, match="no published JAFAR weights for backbone 'dinov3_s'"):
        load_jafar(None, backbone=tiny_backbone("dinov3_s"))
    with pytest.raises(VitupError, match="that is a uplift release"):
        load_jafar("uplift:dinov2_s", backbone=tiny_backbone("dinov2_s"))


def test_releases_are_github_assets_per_backbone():
    names = sorted(n for n, r in RELEASES.items() if r.method == "jafar")
    assert names == ["jafar:dinov2_b", "jafar:dinov2_s", "jafar:dinov2_s_reg"]
    rel = RELEASES["jafar:dinov2_s"]
    assert rel.url == (
        "https://github.com/PaulCouairon/JAFAR/releases/download/Weights/vit_small_patch14_dinov2.lvd142m.pth"
    )
    assert "Apache-2.0" in rel.licence and rel.hub_ref == rel.url


def test_release_offline_is_one_clear_line(tmp_path, monkeypatch, offline_cache, one_line_error):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torchhub"))
    with pytest.raises(VitupError) as err:
        load_jafar("jafar:dinov2_s", backbone=tiny_backbone("dinov2_s"))
    one_line_error(err.value, "vit_small_patch14_dinov2.lvd142m.pth", "github.com/PaulCouairon/JAFAR/releases")
    args = ["extract", str(_images(tmp_path / "i", 1)), "--out", str(tmp_path / "o.zarr"), "--upsampler", "jafar",
            "--checkpoint", "jafar:dinov2_s", "--device", "cpu"]  # fmt: skip
    result = runner.invoke(app, args)
    one_line_error(result, "vit_small_patch14_dinov2.lvd142m.pth is not in the torch.hub cache")
    # a file placed in the torch hub cache is taken without the network
    cached = tmp_path / "torchhub" / "checkpoints" / "vit_small_patch14_dinov2.lvd142m.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_weights("jafar:dinov2_s").path == cached


def _weights_file(tmp_path: Path, dim: int = 64) -> Path:
    torch.manual_seed(3)
    path = tmp_path / "jafar_tiny.pth"
    torch.save({"jafar": JAFARNet(dim).state_dict()}, path)
    return path


def _images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_extract_with_jafar_from_a_published_layout_file(tmp_path):
    from vitup_cli.stores import open_store

    weights = _weights_file(tmp_path)
    args = ["extract", str(_images(tmp_path / "imgs")), "--out", str(tmp_path / "f.zarr"), "--res", "24",
            "--upsampler", "jafar", "--checkpoint", str(weights), *TINY_ARGS, "--input-size", "28",
            "--workers", "0", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with open_store(tmp_path / "f.zarr") as store:
        feats = store[0:3]
        settings = store.attrs["settings"]
    assert feats.shape == (3, 64, 24, 24) and np.isfinite(feats).all()
    assert settings["upsampler"] == "jafar"
    assert settings["upsampler_settings"]["jafar"]["qk_dim"] == 128
    assert settings["checkpoint_sha256"]
