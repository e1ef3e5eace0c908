import json

import pytest
import torch
from _helpers import PicklePayload
from conftest import _randomise, tiny_vitup

from vitup_cli.errors import VitupError
from vitup_cli.hub import load_checkpoint, open_upsampler, read_checkpoint_meta, save_checkpoint


@pytest.fixture
def saved(tmp_path):
    model = _randomise(tiny_vitup(seed=5))
    path = save_checkpoint(tmp_path / "run" / "last", model, extra={"step": 7})
    return model, path


def test_round_trip_is_bit_identical(saved, images):
    model, path = saved
    assert path.name == "last.safetensors" and path.with_suffix(".json").is_file()
    loaded = load_checkpoint(path).eval()
    xy = torch.rand(2, 40, 2)
    with torch.no_grad():
        assert torch.equal(model.query(images, xy), loaded.query(images, xy))
        assert torch.equal(model.features(images, (6, 7)), loaded.features(images, (6, 7)))
    meta = read_checkpoint_meta(path)
    assert meta["step"] == 7 and meta["backbone_included"] and meta["backbone"]["lora"]["r"] == 16


def test_any_spelling_of_the_path_loads(saved):
    _, path = saved
    for spelling in (path, path.with_suffix(""), path.with_suffix(".json")):
        assert read_checkpoint_meta(spelling)["upsampler"] == "vitup"


def test_other_backbone_is_refused(saved):
    _, path = saved
    other = tiny_vitup("dinov2_s").backbone
    with pytest.raises(VitupError, match="another backbone.*timm_name"):
        load_checkpoint(path, backbone=other)


def test_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state": PicklePayload()}, tmp_path / "model.pt")
    with pytest.raises(VitupError, match="never unpickles"):
        load_checkpoint(tmp_path / "model.pt")
    # the same bytes under a safetensors name are sniffed and refused too
    (tmp_path / "ck.safetensors").write_bytes((tmp_path / "model.pt").read_bytes())
    (tmp_path / "ck.json").write_text(json.dumps({"format": "vitup-checkpoint/1"}))
    with pytest.raises(VitupError, match="not a vitup checkpoint"):
        load_checkpoint(tmp_path / "ck.safetensors")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_broken_and_partial_checkpoints(tmp_path, saved):
    _, path = saved
    with pytest.raises(VitupError, match="missing"):
        load_checkpoint(tmp_path / "nothing")
    meta = path.with_suffix(".json")
    meta.write_text("{not json")
    with pytest.raises(VitupError, match="not valid JSON"):
        load_checkpoint(path)


def test_open_upsampler():
    with pytest.raises(VitupError, match="needs --checkpoint"):
        open_upsampler("vitup")
    up = open_upsampler(
        "bilinear", backbone="dinov3_s", pretrained="none", overrides={"depth": 1, "embed_dim": 64, "num_heads": 1}
    )
    assert up.name == "bilinear" and not up.training


def test_atomic_write_uses_normal_permissions(tmp_path):
    import os

    from vitup_cli.fileio import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "x.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left behind


@pytest.mark.parametrize("name_length", range(1, 80))
def test_no_real_safetensors_file_is_mistaken_for_a_pickle(tmp_path, name_length):
    """A safetensors header length can start with byte 0x80, like a pickle; it must still load."""
    from safetensors.torch import save

    from vitup_cli.hub.format import refuse_pickle as _refuse_pickle

    path = tmp_path / "w.safetensors"
    path.write_bytes(save({"x" * name_length: torch.zeros(1)}))
    _refuse_pickle(path)  # raises VitupError on a false positive


def test_malformed_json_is_one_clear_error(saved):
    _, path = saved
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["model"]["mlp_ratio"] = 3  # shapes no longer match the weights
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(VitupError, match="do not belong together"):
        load_checkpoint(path)
    meta["model"]["bogus"] = 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(VitupError, match="malformed JSON"):
        load_checkpoint(path)
    del meta["backbone"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(VitupError, match="malformed JSON"):
        load_checkpoint(path)


def test_checkpoint_on_file_weights_needs_that_file(tmp_path):
    from safetensors.torch import save_file

    from vitup_cli.backbones import load_backbone
    from vitup_cli.models import ViTUp, ViTUpConfig

    src = tiny_vitup(lora=False).backbone
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, tmp_path / "base.safetensors")
    tiny = {"depth": 2, "embed_dim": 64, "num_heads": 1}
    backbone = load_backbone("dinov3_s", weights=tmp_path / "base.safetensors", overrides=tiny)
    model = ViTUp(backbone, ViTUpConfig(input_tokens=4, query_grid=16))
    path = save_checkpoint(tmp_path / "ck", model)
    with pytest.raises(VitupError, match="pass --weights PATH"):
        load_checkpoint(path)
    assert load_checkpoint(path, weights=tmp_path / "base.safetensors").backbone.weights_id == backbone.weights_id
    torch.manual_seed(9)
    other = tiny_vitup(seed=9, lora=False).backbone
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, tmp_path / "other.safetensors")
    with pytest.raises(VitupError, match="weights_id"):
        load_checkpoint(path, weights=tmp_path / "other.safetensors")


def test_old_format_checkpoints_are_refused_saying_what_to_do(saved):
    _, path = saved
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["format"] = "vitup-checkpoint/1"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(VitupError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and "vitup-checkpoint/1" in message
    assert "retrain it with `vitup train`" in message and "vit-up:dinov3_splus" in message


def test_checkpoints_record_the_resize_setting(tmp_path, images):
    model = _randomise(tiny_vitup(seed=2, antialias=True))
    path = save_checkpoint(tmp_path / "aa", model)
    assert read_checkpoint_meta(path)["model"]["antialias"] is True
    loaded = load_checkpoint(path).eval()
    assert loaded.config.antialias is True
    with torch.no_grad():
        xy = torch.rand(2, 9, 2)
        assert torch.equal(model.query(images, xy), loaded.query(images, xy))
