"""The official ViT-Up release layout and the reference-equivalence fixture (tests/data/vitup_ref)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import _place_in_cache
from safetensors import safe_open
from safetensors.torch import save_file

from vitup_cli.backbones import load_backbone
from vitup_cli.errors import VitupError
from vitup_cli.hub import open_vitup
from vitup_cli.hub.official import load_official
from vitup_cli.models import ViTUpConfig

FIXTURE = Path(__file__).parent / "data" / "vitup_ref" / "vitup_ref.safetensors"
KEYS = Path("/work/shared/reference/vit_up_official_keys_splus.txt")


def _fixture():
    with safe_open(str(FIXTURE), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return meta, tensors


def _part(tensors, prefix):
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def test_reference_fixture_matches_at_every_level(tmp_path):
    """A shrunk random-init DINOv3 + LoRA + ViT-Up run through the reference; vitup loads the same
    weights through its official-weights path and must give the same features (float32, 1e-4)."""
    meta, tensors = _fixture()
    release_file, base_file = tmp_path / "release.safetensors", tmp_path / "base.safetensors"
    save_file(_part(tensors, "release/"), release_file)
    save_file(_part(tensors, "timm_base/"), base_file)
    overrides = json.loads(meta["backbone_overrides"])
    backbone = load_backbone("dinov3_s+", weights=base_file, overrides=overrides, taps=json.loads(meta["layers"]))
    config = ViTUpConfig(
        input_tokens=int(meta["hidden_img_size"]) // 16,
        query_grid=int(meta["query_img_size"]) // 16,
        num_heads=int(meta["vit_up_heads"]),
    )
    model = load_official(release_file, backbone=backbone, config=config).eval()
    assert not model.config.antialias  # the reference's resize
    image, xy = tensors["input/image"], tensors["input/xy"]
    with torch.no_grad():
        levels = model.decode(model.encode(image), xy, levels=range(len(model.decoders)))
    errors = []
    for i, got in enumerate(levels):
        want = tensors[f"output/level{i}"]
        errors.append(float((got - want).abs().max()))
    print("max abs error per level:", errors)
    assert max(errors) < 1e-4
    # the fixture is not trivially passable: the LoRA and the tie-breaking both matter
    with torch.no_grad(), model.backbone.adapters_disabled():
        teacher = model.decode(model.encode(image), xy, levels=[len(model.decoders) - 1])[0]
    assert float((teacher - tensors[f"output/level{len(levels) - 1}"]).abs().max()) > 1e-2


def _zero_splus(tmp_path, edit=None, name="vit_up_dinov3_splus.safetensors"):
    rows = [line.rstrip("\n").split("\t") for line in KEYS.read_text().splitlines() if line and line[0] != "#"]
    tensors = {key: torch.zeros(json.loads(shape)) for key, shape, _ in rows}
    if edit:
        edit(tensors)
    path = tmp_path / name
    save_file(tensors, path)
    return path, len(rows)


needs_keys = pytest.mark.skipif(not KEYS.is_file(), reason="the reference key list is not on this machine")


@pytest.fixture(scope="module")
def splus_backbone():
    torch.manual_seed(0)
    return load_backbone("dinov3_s+", pretrained="none")


def _fresh(bb):
    import copy

    return copy.deepcopy(bb)


@needs_keys
@pytest.mark.slow
def test_official_splus_layout_loads_every_key(tmp_path, splus_backbone):
    path, n = _zero_splus(tmp_path)
    assert n == 355
    model = load_official(path, backbone=_fresh(splus_backbone))
    assert len(model.blocks) == 6 and len(model.decoders) == 7
    assert model.backbone.taps == [0, 2, 4, 6, 8, 10, 12]
    upsampler = sum(p.numel() for _, p in model.upsampler_parameters())
    lora = sum(p.numel() for _, p in model.backbone.lora_parameters())
    assert upsampler + lora + 16 == 24_882_064  # the file's values: every one landed in a vitup tensor
    assert all(float(p.detach().abs().max()) == 0 for _, p in model.upsampler_parameters())  # the zeros were copied


@needs_keys
@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.update({"vit_up_blocks.0.extra.weight": torch.zeros(3)}), "unknown key 'vit_up_blocks.0.extra"),
        (lambda t: t.update({"decoder_mlp.0.mlp.1.bias": torch.zeros(383)}), "'decoder_mlp.0.mlp.1.bias' has shape"),
        (
            lambda t: t.pop("backbone.base_model.model.layer.3.attention.v_proj.lora_B.default.weight"),
            "layer.3.attention.v_proj.lora_B",
        ),
    ],
)
def test_bad_official_files_are_refused_naming_the_key(tmp_path, splus_backbone, edit, match):
    path, _ = _zero_splus(tmp_path, edit)
    with pytest.raises(VitupError, match=match):
        load_official(path, backbone=_fresh(splus_backbone))


def test_older_reference_module_names_load_the_same(tmp_path):
    """Files from before the reference's renames (``q_proj.N.``, ``local_feature_decoder.N.``,
    ``global_local_cross_attention.N.``) map onto the same tensors."""
    from vitup_cli.hub.official import current_key, vitup_name

    assert current_key("q_proj.2.mlp.1.weight") == "vit_up_blocks.2.transition_mlp.mlp.1.weight"
    assert current_key("local_feature_decoder.0.post_mlp.mlp.3.bias") == "vit_up_blocks.0.featx.post_mlp.mlp.3.bias"
    old = "global_local_cross_attention.1.global_cross_attention.q_proj.weight"
    assert vitup_name(old) == vitup_name("vit_up_blocks.1.cross_attention.q_proj.weight") == "blocks.1.attn.q.weight"
    assert vitup_name("global_local_cross_attention.3.norm_post.weight") == "blocks.3.norm_fusion.weight"
    assert vitup_name("vit_up.decoder_mlp.6.mlp.1.bias") == "decoders.6.1.bias"


def test_open_vitup_refuses_a_file_that_is_neither_layout(tmp_path):
    save_file({"weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(VitupError, match="is neither a vitup checkpoint"):
        open_vitup(tmp_path / "x.safetensors")
    with pytest.raises(VitupError, match="no such file"):
        open_vitup(tmp_path / "missing.safetensors")


# -- the CLI: release names, the HF cache, offline ---------------------------------------------------
@pytest.fixture
def photo(tmp_path):
    from PIL import Image

    path = tmp_path / "img.jpg"
    Image.fromarray((torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy()).save(path)
    return path


def _cli(*args):
    from typer.testing import CliRunner

    from vitup_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_offline_release_fails_in_under_a_second_with_one_line(offline_cache, photo, tmp_path, one_line_error):
    import time

    import vitup_cli.extract  # noqa: F401  (imports are not what is timed: torch, timm, zarr take seconds cold)

    _cli("extract", photo, "--out", tmp_path / "warm.zarr", "--upsampler", "nope")  # cold-start the CLI
    start = time.perf_counter()
    result = _cli("extract", photo, "--out", tmp_path / "f.zarr", "--checkpoint", "vit-up:dinov3_splus")
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, (elapsed, result.output)
    one_line_error(result, "Krispin/vit-up/vit_up_dinov3_splus.safetensors", "--upsampler bilinear")
    assert not (tmp_path / "f.zarr").exists()


def test_no_flags_means_the_published_vitup_of_the_backbone(offline_cache, photo, tmp_path, one_line_error):
    result = _cli("extract", photo, "--out", tmp_path / "f.zarr")  # dinov3_s+, nothing cached, offline
    assert "published weights vit-up:dinov3_splus" in result.output  # said in one line
    one_line_error(result, "vit_up_dinov3_splus.safetensors is not in the Hugging Face cache", alone=False)
    other = _cli("extract", photo, "--out", tmp_path / "g.zarr", "--backbone", "dinov2_s")
    one_line_error(other, "no published ViT-Up weights for backbone 'dinov2_s'", "--upsampler bilinear", "--checkpoint")
    viz = _cli("visualize", photo, "--backbone", "dinov3_b")
    assert "published weights vit-up:dinov3_b" in viz.output
    line = one_line_error(viz, "vit_up_dinov3_base.safetensors", alone=False)
    assert "--compare bilinear,nearest" in line  # visualize's training-free choice


@needs_keys
@pytest.mark.slow
def test_release_from_the_hf_cache_runs_and_is_recorded(offline_cache, photo, tmp_path):
    """A file with the official S+ keys in the Hugging Face cache layout: `--checkpoint vit-up:dinov3_splus`
    finds it offline. Its base backbone weights are not cached here, so the backbone is random-init."""
    from vitup_cli.hub import releases as weights
    from vitup_cli.stores import open_store

    path, _ = _zero_splus(tmp_path)
    _place_in_cache(offline_cache, "Krispin/vit-up", "vit_up_dinov3_splus.safetensors", path.read_bytes())
    weights._printed_licences.discard("vit-up:dinov3_splus")
    out = tmp_path / "f.zarr"
    args = ["--res", "8", "--pretrained", "none", "--workers", "0", "--device", "cpu", "--dtype", "float32"]
    result = _cli("extract", photo, "--out", out, "--checkpoint", "vit-up:dinov3_splus", *args)
    assert result.exit_code == 0, result.output
    assert result.output.count("cc-by-nc-sa-4.0") == 1  # the licence, once
    with open_store(out) as store:
        attrs = store.attrs
        assert store.shape == (1, 384, 8, 8)
    assert attrs["weights_release"] == "vit-up:dinov3_splus" and "cc-by-nc-sa-4.0" in attrs["weights_licence"]
    assert attrs["resize_antialias"] is False and attrs["upsampler"] == "vitup"
    assert attrs["checkpoint"] == "vit-up:dinov3_splus" and len(attrs["checkpoint_sha256"]) == 64
