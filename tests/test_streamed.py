"""Streamed guidance encoders (AnyUp, JAFAR): equal to the whole-map evaluation, and never hold a whole map."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vitup_cli.models.anyup import AnyUpConfig, AnyUpNet
from vitup_cli.models.jafar import JAFARConfig, JAFARNet
from vitup_cli.models.streamed import GroupNormStats, conv_rows, group_norm, pool_weights

GUIDANCE = (29, 37)  # neither divides nor is divided by the token grids below


def test_group_norm_statistics_over_chunks_are_groupnorms():
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16)
    nn.init.normal_(norm.weight, 1, 0.2), nn.init.normal_(norm.bias, 0, 0.2)
    x = torch.randn(3, 16, 23, 9) * 2 + 5  # an offset: a naive sum of squares would lose digits
    for step in (1, 4, 23):
        stats = GroupNormStats()
        for r0 in range(0, 23, step):
            stats.collect(norm, x[:, :, r0 : r0 + step])
        assert not stats.knows(norm)
        stats.settle()
        assert stats.knows(norm) and stats.known[norm][0].shape == (3, 4)
        parts = [group_norm(x[:, :, r0 : r0 + step], norm, stats.known[norm]) for r0 in range(0, 23, step)]
        assert (torch.cat(parts, dim=2) - norm(x)).abs().max() < 1e-5


@pytest.mark.parametrize("kernel,mode", [(1, "zeros"), (3, "zeros"), (3, "reflect"), (5, "reflect")])
def test_conv_rows_are_rows_of_the_whole_conv(kernel, mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, kernel, padding=kernel // 2, padding_mode=mode, bias=True)
    x = torch.randn(2, 3, 11, 7)
    whole = conv(x)
    for r0, r1 in ((0, 11), (0, 1), (3, 4), (10, 11), (2, 9), (0, 3), (8, 11)):
        assert (conv_rows(conv, lambda a, b: x[:, :, a:b], 11, r0, r1) - whole[:, :, r0:r1]).abs().max() < 1e-6


@pytest.mark.parametrize("n_in,n_out", [(29, 3), (37, 5), (7, 7), (5, 13), (13, 5), (24, 37), (1, 4)])
def test_pool_weights_are_adaptive_average_pooling(n_in, n_out):
    x = torch.randn(2, 3, n_in, 6)
    pooled = pool_weights(n_in, n_out, x.device) @ x
    assert (pooled - F.adaptive_avg_pool2d(x, (n_out, 6))).abs().max() < 1e-6


# -- the whole-map evaluation (as the models ran before streaming): every encoder over the full guidance --------
def _whole_anyup(net: AnyUpNet, guidance, tokens, size):
    """The query map at ``size``, the pooled key-encoder map and the projected keys, all from whole maps."""
    enc = net.rope(net.image_encoder(guidance))
    q = net.query_encoder(enc)
    if tuple(q.shape[-2:]) != tuple(size):
        q = F.adaptive_avg_pool2d(q, size)
    pooled = F.adaptive_avg_pool2d(net.key_encoder(enc), tokens.shape[-2:])
    lfu, *blocks = net.key_features_encoder
    unified = lfu(F.normalize(tokens, dim=1))
    for block in blocks:
        unified = block(unified)
    k = net.aggregation(torch.cat([pooled, unified], dim=1))
    attn = net.cross_decode.cross_attn
    w_k, b_k = attn.attention.in_proj_weight.chunk(3)[1], attn.attention.in_proj_bias.chunk(3)[1]
    return q, pooled, net._heads(F.linear(attn.norm_k(k.flatten(2).transpose(1, 2)), w_k, b_k))


def _whole_jafar(net: JAFARNet, guidance, tokens, size):
    enc = net.rope(net.image_encoder(guidance))
    q = net.norm(F.adaptive_avg_pool2d(net.query_encoder(enc), output_size=size))
    pooled = F.adaptive_avg_pool2d(net.key_encoder(enc), output_size=tokens.shape[-2:])
    k = net.sft_key(pooled, net.key_features_encoder(F.normalize(tokens, dim=1)))
    attn = net.cross_decode.cross_attn
    return q, pooled, attn.attention.keys(attn.norm_k(k.flatten(2).transpose(1, 2)))


def _nets():
    torch.manual_seed(3)
    anyup = AnyUpNet(AnyUpConfig(qk_dim=16)).eval()
    jafar = JAFARNet(24, JAFARConfig(qk_dim=16, kernel_size=3)).eval()  # a 3x3 reflect-padded first conv: halos
    for net in (anyup, jafar):
        for m in net.modules():  # non-trivial affines, so that every GroupNorm's statistics matter
            if isinstance(m, nn.GroupNorm) and m.affine:
                nn.init.normal_(m.weight, 1, 0.3), nn.init.normal_(m.bias, 0, 0.3)
    return {"anyup": (anyup, _whole_anyup), "jafar": (jafar, _whole_jafar)}


@pytest.mark.parametrize("name", ["anyup", "jafar"])
@pytest.mark.parametrize("size", [GUIDANCE, (13, 17), (41, 43)])  # the guidance's own size, smaller, larger
def test_streamed_equals_whole_map(name, size):
    net, whole = _nets()[name]
    guidance, tokens = torch.randn(2, 3, *GUIDANCE) * 1.5 + 0.2, torch.randn(2, 24, 3, 5)
    values = tokens.flatten(2).transpose(1, 2)
    H, W = size
    with torch.no_grad():
        q_whole, pooled, keys = whole(net, guidance, tokens, size)
        # the whole-map queries and keys through the same attention, all rows at once: the unstreamed output
        queries = SimpleNamespace(size=size, rows=lambda a, b: q_whole[:, :, a:b])
        if name == "anyup":
            ref = net.band(queries, keys, values, (3, 5), 0, H)
        else:
            ref = net.band(queries, keys, values, 0, H)
        for chunk in (1, 2 * 37 * 3 + 5, 10**9):  # one guidance row a chunk (29 chunks), 3 rows, all at once
            streamed = net.prepare(guidance, tokens, size, chunk)[0]
            assert (streamed.keys - pooled).abs().max() < 1e-5
            rows = torch.cat([streamed.rows(a, min(H, a + 4)) for a in range(0, H, 4)], dim=2)
            assert (rows - q_whole).abs().max() < 1e-5
            out = net(guidance, tokens, size, chunk)
            assert out.shape == (2, 24, H, W) and (out - ref).abs().max() < 1e-5


class _Largest(TorchDispatchMode):
    """The largest tensor any operation returns while active (numel)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("name", ["anyup", "jafar"])
def test_no_full_resolution_encoder_map_is_held(name):
    """At 96 x 100 a whole-map encoder tensor is 2 images x 16 channels x 9600 pixels; made in bands and
    chunks of 600 pixels (3 rows of both images), no tensor comes near it (the largest: a band's attention)."""
    net, _ = _nets()[name]
    guidance, tokens = torch.randn(2, 3, 96, 100), torch.randn(2, 24, 3, 5)
    rows = 0
    with torch.no_grad(), _Largest() as seen:
        for r0, r1, band in net.bands(guidance, tokens, (96, 100), 600):
            assert band.shape == (2, 24, r1 - r0, 100)
            rows += r1 - r0
    assert rows == 96 and seen.numel < 2 * 16 * 96 * 100 / 4, seen.numel


@pytest.mark.parametrize("net", ["anyup", "jafar"])
def test_rope_positions_stay_apart_in_bfloat16(net):
    """Under bf16 autocast the rotary positions of a 896-row map are still float32: the last two rows get
    different rotations (bf16 positions would round both to 1.0), and the result is the float32 one, rounded."""
    rope = AnyUpNet().rope if net == "anyup" else JAFARNet(8).rope
    x = torch.ones(1, rope.freqs.shape[1], 896, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = rope(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    assert not torch.equal(low[..., 894, :], low[..., 895, :])
    assert torch.allclose(low.float(), rope(x), atol=1e-2)
