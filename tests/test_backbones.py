import time

import pytest
import torch
from _helpers import PicklePayload
from conftest import tiny_backbone
from safetensors.torch import save_file

from vitup_cli.backbones import default_taps, load_backbone, parse_overrides, resolve_name
from vitup_cli.errors import VitupError


def test_names_resolve():
    assert resolve_name("dinov3_b") == ("vit_base_patch16_dinov3", "lvd1689m")
    assert resolve_name("dinov3_splus") == resolve_name("dinov3_s+")
    assert resolve_name("vit_small_patch14_dinov2.lvd142m") == ("vit_small_patch14_dinov2", "lvd142m")
    with pytest.raises(VitupError, match="unknown backbone 'resnet_nope'"):
        resolve_name("resnet_nope")


def test_default_taps_follow_the_paper():
    assert default_taps(12) == [0, 2, 4, 6, 8, 10, 12]
    assert default_taps(24) == [0, 4, 8, 12, 16, 20, 24]


@pytest.mark.parametrize("name", ["dinov3_s", "dinov2_s_reg"])
def test_taps_match_timm(name):
    """Tap i<depth is block i+1's norm1 of the stream; the last tap is forward_features' final norm."""
    bb = tiny_backbone(name, depth=3)
    p = bb.patch_size
    x = bb.normalize(torch.rand(1, 3, 4 * p, 5 * p))
    taps = bb.hidden_states(x, [0, 2, 3])
    assert [t.shape for t in taps] == [(1, 64, 4, 5)] * 3
    n = bb.num_prefix_tokens
    final = bb.model.forward_features(x)[:, n:].transpose(1, 2).reshape(1, 64, 4, 5)
    assert torch.allclose(taps[2], final, atol=1e-6)
    after_block2 = bb.model.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC")[0]
    expected = bb.model.blocks[2].norm1(after_block2).transpose(1, 2).reshape(1, 64, 4, 5)
    assert torch.allclose(taps[1], expected, atol=1e-6)


def test_lora_starts_as_the_teacher_and_teacher_ignores_it():
    bb = tiny_backbone()
    x = bb.normalize(torch.rand(1, 3, 64, 64))
    before = bb.hidden_states(x)
    bb.add_lora()
    names = [n for n, _ in bb.lora_parameters()]
    assert any("patch_embed.proj" in n for n in names)
    for proj in ("q_proj", "k_proj", "v_proj", "proj"):  # the reference's placement: separate q, k, v, o
        assert sum(f"attn.{proj}.lora_A" in n for n in names) == bb.depth
    assert not any("attn.qkv" in n for n in names)
    assert all(p.requires_grad for _, p in bb.lora_parameters())
    assert not any(p.requires_grad for n, p in bb.named_parameters() if "lora_" not in n)
    for a, b in zip(bb.hidden_states(x), before):
        assert torch.equal(a, b)
    with torch.no_grad():
        for n, p in bb.lora_parameters():
            if "lora_B" in n:
                p.normal_()
    student = bb.hidden_states(x)
    assert not torch.allclose(student[-1], before[-1])
    with bb.adapters_disabled():
        teacher = bb.hidden_states(x)
    for a, b in zip(teacher, before):
        assert torch.allclose(a, b, atol=1e-6)
    assert all(p.requires_grad for _, p in bb.lora_parameters())  # restored after the teacher pass


def test_lora_reaches_fused_qkv_bias_models():
    """`*_qkvb` models would bypass a LoRA on qkv; vitup reroutes the bias so the adapter acts."""
    torch.manual_seed(0)
    bb = load_backbone(
        "vit_small_patch16_dinov3_qkvb", pretrained="none", overrides={"depth": 1, "embed_dim": 64, "num_heads": 1}
    )
    x = bb.normalize(torch.rand(1, 3, 32, 32))
    with torch.no_grad():
        for blk in bb.model.blocks:
            blk.attn.q_bias.normal_()
            blk.gamma_1.fill_(1.0)  # random init scales attention by 1e-5 (layer scale): make it visible
    before = bb.hidden_states(x)[-1]
    bb.add_lora()
    assert torch.allclose(bb.hidden_states(x)[-1], before, atol=1e-5)
    with torch.no_grad():
        for n, p in bb.lora_parameters():
            if "attn.q_proj.lora_B" in n:
                p.normal_()
    assert not torch.allclose(bb.hidden_states(x)[-1], before, atol=1e-3)


@pytest.mark.parametrize("name", ["dinov3_s+", "dinov2_s"])
def test_split_qkv_is_the_same_function(name):
    """Splitting timm's fused qkv into q/k/v modules copies the weights: the teacher is unchanged."""
    bb = tiny_backbone(name, num_heads=2)
    with torch.no_grad():
        for n, p in bb.model.named_parameters():
            if "gamma" in n or "bias" in n:
                p.normal_()
    p = bb.patch_size
    x = bb.normalize(torch.rand(1, 3, 4 * p, 3 * p))
    before = bb.hidden_states(x)
    bb.split_qkv()
    assert not any(n.endswith("attn.qkv.weight") for n, _ in bb.model.named_parameters())
    for a, b in zip(bb.hidden_states(x), before):
        assert torch.allclose(a, b, atol=1e-5)


def test_offline_without_weights_fails_fast_naming_the_options(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(VitupError) as info:
        load_backbone("dinov3_b")
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "--weights" in message and "--pretrained none" in message and "timm/vit_base_patch16_dinov3" in message


def test_weights_file_round_trips(tmp_path):
    src = tiny_backbone(seed=3)
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, tmp_path / "w.safetensors")
    loaded = load_backbone(
        "dinov3_s", weights=tmp_path / "w.safetensors", overrides={"depth": 2, "embed_dim": 64, "num_heads": 1}
    )
    assert loaded.weights_id.startswith("file:w.safetensors@sha256:")
    x = src.normalize(torch.rand(1, 3, 32, 32))
    assert torch.equal(src.hidden_states(x)[-1], loaded.hidden_states(x)[-1])


def test_pickled_weights_are_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"x": PicklePayload()}, tmp_path / "evil.pth")
    with pytest.raises(VitupError, match="evil.pth"):
        load_backbone(
            "dinov3_s", weights=tmp_path / "evil.pth", overrides={"depth": 1, "embed_dim": 64, "num_heads": 1}
        )
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_missing_weights_file_and_bad_taps():
    with pytest.raises(VitupError, match="no such file"):
        load_backbone("dinov3_s", weights="/nonexistent/w.safetensors")
    with pytest.raises(VitupError, match="out of range"):
        tiny_backbone().__class__(tiny_backbone().model, name="x", timm_name="x", weights_id="none", taps=[0, 9])


def test_parse_overrides():
    assert parse_overrides("depth=4,embed_dim=192,drop_rate=0.1,qkv_bias=false") == {
        "depth": 4,
        "embed_dim": 192,
        "drop_rate": 0.1,
        "qkv_bias": False,
    }
    with pytest.raises(VitupError, match="KEY=VALUE"):
        parse_overrides("depth")


def test_bad_backbone_overrides_are_one_line_exit_2(tmp_path, one_line_error):
    from PIL import Image
    from typer.testing import CliRunner

    from vitup_cli.cli import app

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    for bad, says in (
        ("depth=x", "depth must be a non-negative integer"),
        ("depth=2.5", "depth must be a non-negative integer"),
        ("depth=-1", "depth must be a non-negative integer"),
        ("num_heads=0", "num_heads must be a positive integer"),
        ("embed_dim=64,num_heads=5", "multiple of num_heads"),
        ("bogus=1", "timm cannot build"),
    ):
        result = CliRunner().invoke(
            app, ["extract", str(tmp_path / "a.png"), "--out", str(tmp_path / "o.zarr"), "--backbone", "dinov3_s",
                  "--pretrained", "none", "--backbone-args", bad, "--res", "8", "--upsampler", "bilinear"],
        )  # fmt: skip
        one_line_error(result, says)
