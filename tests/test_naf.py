"""NAF: equivalence with the reference (valeoai/NAF over NATTEN), NATTEN's border semantics, banding,
the published layout through the real paths, the release over any backbone, refusals."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_backbone
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import vitup_cli.models.naf as naf_module
from vitup_cli.cli import app
from vitup_cli.errors import VitupError
from vitup_cli.hub import open_upsampler
from vitup_cli.hub.naf import read_published_weights
from vitup_cli.hub.releases import RELEASES, release_for_backbone
from vitup_cli.models import UPSAMPLERS, spec_of
from vitup_cli.models.naf import NAF, NAFConfig, NAFNet, config_from_state, load_state, neighbourhood

FIXTURE = Path(__file__).parent / "data" / "naf_ref" / "naf_ref.safetensors"
runner = CliRunner()
TINY_ARGS = ["--backbone", "dinov3_s", "--pretrained", "none", "--backbone-args", "depth=2,embed_dim=64,num_heads=1"]


def _fixture():
    tensors = load_file(str(FIXTURE))
    with safe_open(str(FIXTURE), "pt") as fh:
        cases = json.loads(fh.metadata()["cases"])
    state = {k: v for k, v in tensors.items() if not k.startswith("case")}
    return tensors, state, cases


def _net() -> NAFNet:
    _, state, _ = _fixture()
    net = NAFNet(config_from_state(state, heads_attn=2)).eval()
    load_state(net, state, str(FIXTURE))
    return net


def _errors(net: NAFNet, chunk: int | None = None) -> list[float]:
    tensors, _, cases = _fixture()
    errs = []
    with torch.no_grad():
        for case in cases:
            i = case["case"]
            out = net(tensors[f"case{i}.image"], tensors[f"case{i}.features"], tuple(case["output_size"]), chunk)
            errs.append(float((out - tensors[f"case{i}.output"]).abs().max()))
    return errs


def test_registered_with_its_capabilities_and_release():
    spec = spec_of("naf")
    caps = spec.capabilities
    assert "naf" in UPSAMPLERS and caps.any_backbone and not caps.input_size_from_weights
    assert caps.trained and caps.banded and caps.default_release and caps.channel_space == "raw"
    assert spec.preprocessing.resize_filter == "bilinear" and "Apache-2.0" in spec.licence
    release = RELEASES["naf:default"]
    assert release.filename == "naf_release.pth" and release.url.endswith("/naf_release.pth")
    assert "Apache-2.0" in release.licence
    for backbone in ("dinov2_s", "dinov3_b", "dinov3_s+"):  # the one release serves every backbone
        assert release_for_backbone("naf", backbone) is release
    assert release_for_backbone("loftup", "dinov3_s") is None  # other methods unchanged


def test_state_dict_layout_is_the_published_one():
    _, state, _ = _fixture()
    assert set(NAFNet(NAFConfig(dim=32, heads_rope=2)).state_dict()) == set(state)
    published = NAFNet().state_dict()  # the release's shapes: dim 256, 4 RoPE heads (16 periods)
    assert published["image_encoder.encoder.0.weight"].shape == (128, 3, 1, 1)
    assert published["image_encoder.sem_encoder.0.weight"].shape == (128, 3, 3, 3)
    assert published["image_encoder.rope.periods"].shape == (16,)
    assert config_from_state(published) == NAFConfig()


@pytest.mark.parametrize("chunk", [None, 40])
def test_matches_the_reference(chunk):
    errs = _errors(_net(), chunk)
    assert max(errs) < 1e-4, errs


def test_neighbourhood_is_shifted_at_borders_as_natten():
    # no dilation, kernel 3 over 6: the first and last windows shift inside (never clipped)
    assert neighbourhood(6, 1, 3).tolist() == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [3, 4, 5]]
    # dilation 2 over 7: groups {0, 2, 4, 6} and {1, 3, 5}, each a shifted window of its own group
    got = neighbourhood(7, 2, 3).tolist()
    assert got[0] == [0, 2, 4] and got[6] == [2, 4, 6] and got[1] == [1, 3, 5] and got[5] == [1, 3, 5]
    assert got[4] == [2, 4, 6] and got[2] == [0, 2, 4]
    with pytest.raises(VitupError, match="kernel_size 9"):
        neighbourhood(16, 2, 9)  # a group of 8 < 9 positions: NATTEN refuses it too


def test_a_broken_convention_fails_the_fixture(monkeypatch):
    net = _net()

    def clipped(length, dilation, kernel, device=None):  # centred windows clamped at the borders (not NATTEN's)
        centre = torch.arange(length, device=device)[:, None] + dilation * (torch.arange(kernel) - kernel // 2)
        return centre.clamp(0, length - 1)

    with monkeypatch.context() as m:
        m.setattr(naf_module, "neighbourhood", clipped)
        assert max(_errors(net)) > 1e-3

    tensors, _, _ = _fixture()
    with torch.no_grad():  # a transposed grid (rows for columns): the model is not transpose-symmetric
        t = net(tensors["case0.image"].transpose(2, 3), tensors["case0.features"].transpose(2, 3), (25, 23))
    assert (t.transpose(2, 3) - tensors["case0.output"]).abs().max() > 1e-3
    with torch.no_grad():  # the guidance normalised twice (a wrong normalisation)
        bad = net((tensors["case0.image"] - 0.45) / 0.226, tensors["case0.features"], (23, 25))
    assert (bad - tensors["case0.output"]).abs().max() > 1e-3
    assert max(_errors(net)) < 1e-4


def test_bands_equal_unbanded_and_stay_small():
    tensors, _, _ = _fixture()
    net = _net()
    image, feats = tensors["case0.image"], tensors["case0.features"]
    with torch.no_grad():
        whole = net(image, feats, (23, 25), chunk_pixels=10**9)
        bands = list(net.bands(image, feats, (23, 25), chunk_pixels=60))
    assert len(bands) > 5 and all(b.shape[2] == r1 - r0 for r0, r1, b in bands)
    assert max(b.shape[2] for _, _, b in bands) == 1  # 60 pixels over a batch of 2 x 25 columns
    assert torch.allclose(torch.cat([b for _, _, b in bands], dim=2), whole, atol=1e-5)


def test_value_heads_wider_than_key_heads():
    """As the release (64-d key heads, 192-d value heads on ViT-B): each value channel mixes by its head's
    attention, so splitting the values changes nothing."""
    tensors, _, _ = _fixture()
    net = _net()
    image = tensors["case0.image"]
    feats = torch.randn(2, 96, 10, 11, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wide = net(image, feats, (23, 25))
        parts = [net(image, feats.reshape(2, 2, 3, 16, 10, 11)[:, :, j].reshape(2, 32, 10, 11), (23, 25))
                 for j in range(3)]  # fmt: skip
    split = torch.stack([p.reshape(2, 2, 16, 23, 25) for p in parts], dim=2).reshape(2, 96, 23, 25)
    assert torch.allclose(wide, split, atol=1e-5)


def _naf_file(tmp_path: Path) -> Path:
    torch.manual_seed(3)
    net = NAFNet(NAFConfig(dim=32, heads_rope=2))
    path = tmp_path / "naf_release.pth"
    torch.save(net.state_dict(), path)  # how the published file is written
    return path


def test_upsampler_guidance_and_features_over_any_backbone(tmp_path):
    path = _naf_file(tmp_path)
    model = open_upsampler("naf", checkpoint=path, backbone=tiny_backbone("dinov2_s"), input_size=140)
    assert isinstance(model, NAF) and model.backbone.name.startswith("dinov2")
    images = torch.rand(1, 3, 50, 60)
    with torch.no_grad():
        out = model.features(images, (30, 20))
        resized = torch.nn.functional.interpolate(images, size=(140, 140), mode="bilinear", antialias=True)
        guidance = (resized - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]
        ).view(1, 3, 1, 1)
        direct = model.net(guidance, model.tokens(images), (30, 20))
        wrong = model.net(model.backbone.normalize(resized) * 0.5, model.tokens(images), (30, 20))
        q = model.query(images, torch.tensor([[[0.5 / 60, 0.5 / 50]]]))
        dense = model.features(images, (50, 60))
    assert out.shape == (1, 64, 30, 20) and torch.allclose(out, direct, atol=1e-5)
    assert not torch.allclose(out, wrong, atol=1e-3)
    assert torch.allclose(q[0, 0], dense[0, :, 0, 0], atol=1e-5)
    assert model.settings()["weights"] == str(path) and "ImageNet" in model.settings()["guidance"]


def _images(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_extract_loads_the_published_file(tmp_path):
    from vitup_cli.stores import open_store

    path = _naf_file(tmp_path)
    args = ["extract", str(_images(tmp_path / "imgs")), "--out", str(tmp_path / "f.zarr"), "--res", "40",
            "--upsampler", "naf", "--checkpoint", str(path), *TINY_ARGS, "--input-size", "160",
            "--workers", "0", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with open_store(tmp_path / "f.zarr") as store:
        feats = store[0:2]
        settings = store.attrs["settings"]
    assert feats.shape == (2, 64, 40, 40) and np.isfinite(feats).all()
    assert settings["upsampler"] == "naf" and settings["upsampler_settings"]["naf"]["dim"] == 32


def test_release_offline_is_one_line(tmp_path, monkeypatch, offline_cache, one_line_error):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    args = ["extract", str(_images(tmp_path / "imgs", 1)), "--out", str(tmp_path / "f.zarr"), "--res", "40",
            "--upsampler", "naf", *TINY_ARGS, "--input-size", "160", "--workers", "0", "--device", "cpu"]  # fmt: skip
    line = one_line_error(runner.invoke(app, args), "naf:default", "naf_release.pth", RELEASES["naf:default"].url)
    assert str(tmp_path / "torch-hub" / "checkpoints") in line


def test_release_from_the_torch_hub_cache(tmp_path, monkeypatch, offline_cache):
    hub = tmp_path / "torch-hub"
    (hub / "checkpoints").mkdir(parents=True)
    _naf_file(hub / "checkpoints")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    model = open_upsampler("naf", backbone=tiny_backbone("dinov3_s"), input_size=160)
    assert isinstance(model, NAF) and model.source == "naf:default"


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_files_needing_unpickling_are_refused(tmp_path, one_line_error):
    path = tmp_path / "naf_release.pth"
    torch.save({"image_encoder.rope.periods": torch.ones(2), "x": _Evil()}, path)
    with pytest.raises(VitupError, match=r"refused, it cannot be read with torch.load\(weights_only=True\)") as err:
        read_published_weights(path)
    one_line_error(err.value, "weights_only=True")
    raw = tmp_path / "list.pth"
    raw.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(VitupError):
        read_published_weights(raw)
    wrong = tmp_path / "w.safetensors"
    save_file({"conv.weight": torch.ones(2)}, str(wrong))
    with pytest.raises(VitupError, match="not NAF weights"):
        config_from_state(read_published_weights(wrong))
