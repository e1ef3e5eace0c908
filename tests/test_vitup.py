import pytest
import torch
from conftest import _randomise, tiny_backbone, tiny_vitup

from vitup_cli.backbones import load_backbone
from vitup_cli.errors import VitupError
from vitup_cli.models import ViTUp, ViTUpConfig
from vitup_cli.models.vitup import (
    CrossAttention,
    apply_rope,
    fourier_code,
    fourier_freqs,
    nearest_token,
    parameter_summary,
    rope_angles,
    window_index,
)


def test_paper_parameter_count_for_dinov3_splus():
    bb = load_backbone("dinov3_s+", pretrained="none")
    bb.add_lora()
    model = ViTUp(bb)
    upsampler = sum(p.numel() for _, p in model.upsampler_parameters())
    lora = sum(p.numel() for _, p in bb.lora_parameters())
    # the reference's counts exactly: separate q, k, v, o LoRAs (rank 16) and the patch-embedding LoRA
    assert upsampler == 24_273_792 and lora == 608_256
    summary = parameter_summary(model)
    print(summary)
    assert summary == "24.27M upsampler + 0.61M LoRA = 24.88M parameters"
    assert len(model.blocks) == 6 and len(model.decoders) == 7
    assert model.blocks[0].attn.num_heads == 6


@pytest.mark.parametrize(("name", "dim"), [("dinov3_s+", 384), ("dinov2_s", 384)])
def test_full_size_shapes(name, dim):
    bb = load_backbone(name, pretrained="none")
    model = ViTUp(bb, ViTUpConfig(query_grid=32)).eval()
    xy = torch.rand(1, 50, 2)
    with torch.no_grad():
        cache = model.encode(torch.rand(1, 3, 200, 300))
        out = model.decode(cache, xy, levels=range(7))
    side = 28
    assert [s.shape for s in cache.states] == [(1, dim, side, side)] * 7
    assert cache.query_grid.shape == (1, dim, 32, 32)
    assert [o.shape for o in out] == [(1, 50, dim)] * 7
    assert model.input_size == 28 * bb.patch_size


@pytest.mark.parametrize("window", [None, 3])
def test_chunked_equals_unchunked(images, window):
    model = _randomise(tiny_vitup(window=window))
    xy = torch.rand(2, 97, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model.encode(images)
        whole = model.decode(cache, xy, levels=range(7), chunk=10_000)
        for chunk in (1, 7, 64, 96):
            parts = model.decode(cache, xy, levels=range(7), chunk=chunk)
            for a, b in zip(whole, parts):
                assert (a - b).abs().max() < 1e-5


def test_dense_features_any_grid_and_non_square(images):
    """Output pixel (i, j) of an H x W grid is the query at its centre ((j + 0.5) / W, (i + 0.5) / H)."""
    model = _randomise(tiny_vitup())
    with torch.no_grad():
        dense = model.features(images, (9, 13))
        corners = torch.tensor([[0.5 / 13, 0.5 / 9], [12.5 / 13, 0.5 / 9], [6.5 / 13, 4.5 / 9], [12.5 / 13, 8.5 / 9]])
        points = model.query(images, corners.expand(2, -1, -1))
    assert dense.shape == (2, 64, 9, 13)
    for n, (i, j) in enumerate([(0, 0), (0, 12), (4, 6), (8, 12)]):
        assert torch.allclose(dense[:, :, i, j], points[:, n], atol=1e-5)
    assert not torch.allclose(dense[:, :, 0, 0], dense[:, :, 8, 12], atol=1e-3)


def test_rope_logits_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 7, 16)
    pq, pk = torch.rand(5, 2) * 10, torch.rand(7, 2) * 10
    shift = torch.tensor([3.7, -1.3])

    def logits(offset):
        rq = apply_rope(q, rope_angles(pq + offset, 16)[None, None])
        rk = apply_rope(k, rope_angles(pk + offset, 16)[None, None])
        return rq @ rk.transpose(-1, -2)

    assert torch.allclose(logits(0), logits(shift), atol=1e-4)
    assert not torch.allclose(logits(0), q @ k.transpose(-1, -2), atol=1e-2)  # RoPE does act


def test_rope_uses_both_axes():
    a = rope_angles(torch.tensor([[1.0, 0.0]]), 16)
    b = rope_angles(torch.tensor([[0.0, 1.0]]), 16)
    assert torch.count_nonzero(a[0, :4]) == 4 and torch.count_nonzero(a[0, 4:]) == 0
    assert torch.count_nonzero(b[0, 4:]) == 4 and torch.count_nonzero(b[0, :4]) == 0


def test_rope_rotates_adjacent_pairs_x_in_the_first_half_of_each_head():
    """The reference's layout: pair i is channels (2i, 2i+1); a shift in x moves only the first half."""
    t = torch.randn(1, 1, 1, 16)
    moved_x = apply_rope(t, rope_angles(torch.tensor([[[0.3, 0.0]]]), 16)[:, None])
    moved_y = apply_rope(t, rope_angles(torch.tensor([[[0.0, 0.3]]]), 16)[:, None])
    assert not torch.allclose(moved_x[..., :8], t[..., :8]) and torch.equal(moved_x[..., 8:], t[..., 8:])
    assert not torch.allclose(moved_y[..., 8:], t[..., 8:]) and torch.equal(moved_y[..., :8], t[..., :8])
    # pair (0, 1) at angle 2 pi * 0.3 (period 1 token): a plain 2D rotation of those two channels
    ang = torch.tensor(2 * torch.pi * 0.3)
    x0, x1 = t[..., 0], t[..., 1]
    assert torch.allclose(moved_x[..., 0], x0 * ang.cos() - x1 * ang.sin(), atol=1e-6)
    assert torch.allclose(moved_x[..., 1], x0 * ang.sin() + x1 * ang.cos(), atol=1e-6)
    assert torch.allclose(moved_x.norm(), t.norm(), atol=1e-5)


def test_fourier_code_layout_follows_the_reference():
    freqs = fourier_freqs(16, 10.0)
    assert torch.allclose(freqs, torch.logspace(0, 1, 16), atol=1e-5)  # 1 .. 10, log-spaced
    offset = torch.tensor([[0.25, -0.4]])
    code = fourier_code(offset, freqs)
    assert code.shape == (1, 66)
    assert torch.equal(code[0, :2], offset[0])  # raw offset first
    assert torch.allclose(code[0, 2:18], torch.sin(torch.pi * 0.25 * freqs))  # sin, x bands
    assert torch.allclose(code[0, 18:34], torch.sin(torch.pi * -0.4 * freqs))  # sin, y bands
    assert torch.allclose(code[0, 34:50], torch.cos(torch.pi * 0.25 * freqs))  # cos, x bands
    assert torch.allclose(code[0, 50:66], torch.cos(torch.pi * -0.4 * freqs))


def test_nearest_token_rounds_half_to_even_at_exact_boundaries():
    """A 14-wide grid over 28 tokens puts every query on a token boundary (x * 28 - 0.5 = 2j + 0.5)."""
    xs = (torch.arange(14, dtype=torch.float32) + 0.5) / 14
    xy = torch.stack([xs, torch.full_like(xs, 0.5 / 28)], dim=-1)[None]
    ids, offset = nearest_token(xy, 28, 28)
    cols = ids[0] % 28
    expected = torch.tensor([round(2 * j + 0.5) for j in range(14)])  # Python rounds half to even too
    assert torch.equal(cols, expected)
    assert torch.allclose(offset[0, :, 0].abs(), torch.full((14,), 0.5), atol=1e-5)
    inside, off = nearest_token(torch.tensor([[[0.999, 0.001]]]), 28, 28)
    assert int(inside) == 27 and torch.all(off.abs() <= 0.5 + 1e-5)


def test_tap_zero_is_the_raw_patch_embedding():
    bb = tiny_backbone()
    x = bb.normalize(torch.rand(1, 3, 64, 64))
    with torch.no_grad():
        tap0 = bb.hidden_states(x, [0])[0]
        assert torch.allclose(tap0, bb.patch_embed_grid(x), atol=1e-6)


def test_resize_antialias_is_a_recorded_setting(images):
    plain = _randomise(tiny_vitup())
    smooth = tiny_vitup(antialias=True)
    smooth.load_state_dict(plain.state_dict())
    big = torch.rand(1, 3, 300, 260, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = torch.nn.functional.interpolate(plain.backbone.normalize(big), size=(64, 64), mode="bilinear")
        assert torch.allclose(plain.prepare(big), ref, atol=1e-5)  # normalise, then resize without antialias
        assert not torch.allclose(smooth.prepare(big), ref, atol=1e-3)
        xy = torch.rand(1, 20, 2)
        assert not torch.allclose(plain.query(big, xy), smooth.query(big, xy), atol=1e-4)


def test_normalising_before_the_resize_equals_after():
    bb = tiny_backbone()
    img = torch.rand(1, 3, 97, 131, generator=torch.Generator().manual_seed(2))
    for antialias in (False, True):
        kw = {"size": (256, 256), "mode": "bilinear", "align_corners": False, "antialias": antialias}
        before = torch.nn.functional.interpolate(bb.normalize(img), **kw)
        after = bb.normalize(torch.nn.functional.interpolate(img, **kw))
        assert (before - after).abs().max() < 1e-5


def test_film_is_identity_at_init():
    model = tiny_vitup()
    token, code = torch.randn(4, 64), fourier_code(torch.rand(4, 2) - 0.5, fourier_freqs())
    for block in model.blocks:
        assert torch.equal(block.featx.modulate(token, code), token)


def _naive_window_attention(q, k, v, nearest, windows):
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for n in range(q.shape[2]):
            idx = windows[nearest[b, n]]
            att = torch.softmax(q[b, :, n : n + 1] @ k[b, :, idx].transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
            out[b, :, n] = (att @ v[b, :, idx])[:, 0]
    return out


def test_windowed_attention_matches_per_query_reference():
    torch.manual_seed(0)
    h, w, win = 5, 6, 3
    q, k, v = torch.randn(2, 2, 40, 8), torch.randn(2, 2, h * w, 8), torch.randn(2, 2, h * w, 8)
    nearest = torch.randint(0, h * w, (2, 40))
    windows = window_index(h, w, win)
    fast = CrossAttention._windowed(q, k, v, nearest, windows)
    assert torch.allclose(fast, _naive_window_attention(q, k, v, nearest, windows), atol=1e-5)


def test_windows_stay_inside_the_grid():
    idx = window_index(4, 5, 3)
    assert idx.shape == (20, 9)
    assert set(idx[0].tolist()) == {0, 1, 2, 5, 6, 7, 10, 11, 12}  # corner window shifted inside
    assert int(idx.max()) < 20


def test_windowed_path_with_a_window_covering_the_grid_equals_global_attention():
    """The grouped-window code itself (not the global shortcut) must reduce to global attention."""
    torch.manual_seed(0)
    h, w = 4, 5
    q, k, v = torch.randn(2, 2, 33, 8), torch.randn(2, 2, h * w, 8), torch.randn(2, 2, h * w, 8)
    nearest = torch.randint(0, h * w, (2, 33))
    windowed = CrossAttention._windowed(q, k, v, nearest, window_index(h, w, max(h, w)))
    assert torch.allclose(windowed, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_small_window_changes_the_result(images):
    g = _randomise(tiny_vitup(window=None))
    local = tiny_vitup(window=2)
    local.load_state_dict(g.state_dict())
    xy = torch.rand(2, 50, 2)
    with torch.no_grad():
        assert not torch.allclose(g.query(images, xy), local.query(images, xy), atol=1e-4)


def test_taps_must_match_blocks():
    with pytest.raises(VitupError, match="needs 4 taps"):
        ViTUp(tiny_backbone(), ViTUpConfig(num_blocks=3))


def test_tap_selection(images):
    model = _randomise(tiny_vitup())
    xy = torch.rand(2, 5, 2)
    with torch.no_grad():
        levels = model.decode(model.encode(images), xy, levels=range(7))
        # a depth-2 backbone has taps [0, 0, 1, 1, 1, 2, 2]: a tap is decoded by its deepest level
        assert model.backbone.taps == [0, 0, 1, 1, 1, 2, 2]
        assert torch.allclose(model.query(images, xy, tap=0), levels[1], atol=1e-6)
        assert torch.allclose(model.query(images, xy), levels[6], atol=1e-6)
    with pytest.raises(VitupError, match="--tap 5"):
        model.level_of(5)
