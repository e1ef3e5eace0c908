"""FeatUp's JBU stack: reference equivalence, conventions, published files, the commands."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_backbone
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from vitup_cli.cli import app
from vitup_cli.errors import VitupError
from vitup_cli.hub import load_trained
from vitup_cli.hub.featup import read_published_weights
from vitup_cli.hub.releases import RELEASES, resolve_weights
from vitup_cli.models import FeatUp, spec_of
from vitup_cli.models.featup import FeatUpConfig, FeatUpNet, config_from_state, load_published_state

FIXTURE = Path(__file__).parent / "data" / "featup_ref" / "featup_ref.safetensors"
runner = CliRunner()


def _reference() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE))


def _weights(ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("weights/"): v for k, v in ref.items() if k.startswith("weights/")}


def _net(ref: dict[str, torch.Tensor], channel_norm: bool = True) -> FeatUpNet:
    weights = _weights(ref)
    if not channel_norm:
        weights = {k: v for k, v in weights.items() if not k.startswith("model.1.")}
    channels, config = config_from_state(weights, str(FIXTURE))
    net = FeatUpNet(channels, config)
    load_published_state(net, weights, str(FIXTURE))
    return net.eval()


def _close(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.shape == expected.shape
    err = (out - expected).abs().max().item()
    assert err < 1e-4, err


@pytest.mark.parametrize("case", ["p16", "p14", "p16_nonorm"])
def test_reproduces_the_reference_implementation(case):
    """Published-layout weights run by the reference code (tests/data/featup_ref/README.md)."""
    ref = _reference()
    net = _net(ref, channel_norm=not case.endswith("nonorm"))
    feats = ref["input/features"]
    image = ref["input/image_p14" if case == "p14" else "input/image_p16"]
    feats = feats[: image.shape[0]]
    with torch.no_grad():
        if not case.endswith("nonorm"):
            _close(net.normalise(feats), ref["output/normed"][: image.shape[0]])
        _close(net(feats, image), ref[f"output/{case}"])


def test_one_step_and_the_config_read_from_the_weights():
    ref = _reference()
    net = _net(ref)
    assert net.config == FeatUpConfig(key_dim=32, radius=3, steps=4, channel_norm=True)
    with torch.no_grad():
        step = net.upsampler.step(0, ref["output/normed"], ref["input/image_p16"])
    _close(step, ref["output/p16_step1"])
    assert set(net.published_state()) == set(_weights(ref))


def test_broken_conventions_do_not_match():
    """A transposed guidance, a missing ChannelNorm or a non-reflect border each break the match."""
    ref = _reference()
    net = _net(ref)
    feats, image, expected = ref["input/features"], ref["input/image_p16"], ref["output/p16"]
    with torch.no_grad():
        flipped = net(feats.flip(-1), image.flip(-1)).flip(-1)  # mirrored in x: the kernels are not symmetric
        assert (flipped - expected).abs().max() > 1e-2
        unnormed = net.upsampler(feats.clone(), image)
        assert (unnormed - expected).abs().max() > 1e-2
        wrong_guidance = net(feats, image * 0.5)
        assert (wrong_guidance - expected).abs().max() > 1e-2
        sigma = net.upsampler.up1.sigma_spatial
        sigma.add_(0.5)
        assert (net(feats, image) - expected).abs().max() > 1e-3
        sigma.sub_(0.5)
        _close(net(feats, image), expected)


def test_row_chunks_give_the_unchunked_result():
    ref = _reference()
    net = _net(ref)
    feats, image = ref["input/features"], ref["input/image_p16"]
    with torch.no_grad():
        whole = net(feats, image)
        for rows in (1, 5, 17):
            assert torch.allclose(net(feats, image, chunk_rows=rows), whole, atol=1e-6, rtol=0), rows


def test_loader_refuses_unknown_missing_and_misshaped_weights():
    weights = _weights(_reference())
    extra = {"model.0.model.blocks.0.norm1.weight": torch.ones(8), "scale_net.net.weight": torch.ones(1)}
    load_published_state(FeatUpNet(8), {**weights, **extra}, "x.ckpt")  # backbone and training parts skipped
    with pytest.raises(VitupError, match="unknown FeatUp weight 'upsampler.up5.range_temp'"):
        load_published_state(FeatUpNet(8), {**weights, "upsampler.up5.range_temp": torch.zeros(())}, "x.ckpt")
    partial = {k: v for k, v in weights.items() if not k.startswith("upsampler.up4.")}
    with pytest.raises(VitupError, match="FeatUp weight 'upsampler.up4.fixup_proj.0.bias' is missing"):
        load_published_state(FeatUpNet(8), partial, "x.ckpt")
    with pytest.raises(VitupError, match=r"has shape .* 384-channel backbone"):
        load_published_state(FeatUpNet(384), weights, "x.ckpt")
    with pytest.raises(VitupError, match="not FeatUp JBU weights"):
        config_from_state({"conv.weight": torch.ones(1)}, "x.ckpt")


def _published_ckpt(path: Path, channels: int, seed: int = 3) -> FeatUpNet:
    """A file like the published ones: a Lightning checkpoint whose ``state_dict`` also holds the
    backbone (``model.0.*``) and the training-only ``scale_net`` / ``downsampler``."""
    torch.manual_seed(seed)
    net = FeatUpNet(channels)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = dict(net.published_state())
    state["model.0.model.cls_token"] = torch.zeros(1, 1, channels)
    state["scale_net.net.weight"] = torch.zeros(1, channels, 1, 1)
    state["downsampler.kernel_size"] = torch.tensor(16)
    torch.save({"epoch": 0, "global_step": 10, "state_dict": state, "pytorch-lightning_version": "1.9.5"}, path)
    return net.eval()


def test_model_runs_at_16x_and_resizes_elsewhere(tmp_path):
    path = tmp_path / "dino_jbu_stack_cocostuff.ckpt"
    expected = _published_ckpt(path, 64)
    model = load_trained(path, backbone=tiny_backbone("dinov3_s"), input_size=64)
    assert isinstance(model, FeatUp) and model.input_size == 64 and model.token_grid == (4, 4)
    for name, value in expected.state_dict().items():
        assert torch.equal(model.net.state_dict()[name], value), name
    x = torch.rand(1, 3, 50, 70)
    with torch.no_grad():
        native = model.features(x, 64)
        assert native.shape == (1, 64, 64, 64)
        assert model.output_notes(64) == {"native_size": [64, 64], "resized": False}
        assert model.output_notes(40) == {"native_size": [64, 64], "resized": True}
        assert model.features(x, (40, 24)).shape == (1, 64, 40, 24)
        xy = torch.tensor([[[(3 + 0.5) / 64, (10 + 0.5) / 64]]])
        assert torch.allclose(model.query(x, xy)[0, 0], native[0, :, 10, 3], atol=1e-5)
        model.chunk_rows = None
        assert torch.allclose(model.features(x, 64), native, atol=1e-5)
    with pytest.raises(VitupError, match="FeatUp upsamples the last layer only"):
        model.check_tap(1)
    caps = spec_of("featup").capabilities
    assert caps.final_tap_only and caps.default_release and not caps.input_size_from_weights


def test_extract_loads_a_published_layout_file(tmp_path):
    path = tmp_path / "vit_jbu_stack_cocostuff.ckpt"
    _published_ckpt(path, 64)
    photo = tmp_path / "p.png"
    Image.new("RGB", (40, 30), (120, 30, 200)).save(photo)
    args = [
        "extract", str(photo), "--out", str(tmp_path / "f.zarr"), "--upsampler", "featup", "--checkpoint", str(path),
        "--backbone", "dinov3_s", "--pretrained", "none", "--backbone-args", "depth=2,embed_dim=64,num_heads=1",
        "--input-size", "32", "--res", "24",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    from vitup_cli.stores import open_store

    with open_store(tmp_path / "f.zarr") as s:
        assert s.attrs["upsampler"] == "featup"
        assert s.attrs["upsampler_notes"] == {"native_size": [32, 32], "resized": True}
        assert s[0].shape == (64, 24, 24)


def test_release_offline_is_one_line(tmp_path, monkeypatch, offline_cache, one_line_error):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    release = RELEASES["featup:dinov2_s"]
    assert release.backbone == "dinov2_s" and release.url.endswith("/dinov2_jbu_stack_cocostuff.ckpt")
    with pytest.raises(VitupError) as err:
        resolve_weights("featup:dinov2_s")
    line = one_line_error(err.value, "featup:dinov2_s", "dinov2_jbu_stack_cocostuff.ckpt", "torch.hub cache")
    assert release.url in line
    cached = tmp_path / "torch" / "hub" / "checkpoints" / release.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_weights("featup:dinov2_s").path == cached  # the torch.hub cache first


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_files_needing_unpickling_are_refused(tmp_path, one_line_error):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"upsampler.fixup_proj.1.weight": torch.ones(1)}, "x": _Evil()}, path)
    with pytest.raises(VitupError, match=r"refused, it cannot be read with torch.load\(weights_only=True\)") as err:
        read_published_weights(path)
    assert "\n" not in str(err.value)
    photo = tmp_path / "p.png"
    Image.new("RGB", (20, 20)).save(photo)
    result = runner.invoke(app, ["extract", str(photo), "--out", str(tmp_path / "e.zarr"), "--checkpoint", str(path)])
    one_line_error(result, "refused")
