"""UPLiFT: reference equivalence, the Local Attender's invariants, the Upsampler interface."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_backbone
from safetensors.torch import load_file

from vitup_cli.errors import VitupError
from vitup_cli.models import build_upsampler
from vitup_cli.models.base import grid_xy, sample_map
from vitup_cli.models.uplift import (
    OFFSETS_17,
    UPLiFT,
    UPLiFTNet,
    iterations_for,
    load_published_state,
    parameter_counts,
)

FIXTURE = Path(__file__).parent / "data" / "uplift_ref" / "uplift_ref.safetensors"


def _reference() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE))


def _net(patch: int, fixture: dict[str, torch.Tensor]) -> UPLiFTNet:
    net = UPLiFTNet(32, patch)
    weights = {k.removeprefix("weights/"): v for k, v in fixture.items() if k.startswith("weights/")}
    load_published_state(net, weights, str(FIXTURE))
    return net.eval()


@pytest.mark.parametrize(("patch", "iterations"), [(16, (1, 2, 4)), (14, (1, 2))])
def test_reproduces_the_reference_implementation(patch, iterations):
    """Weights in the published layout, run by the reference code (tests/data/uplift_ref/README.md)."""
    ref = _reference()
    net = _net(patch, ref)
    image, feats = ref[f"input/image_p{patch}"], ref["input/features"]
    with torch.no_grad():
        outs = net(image, feats, iterations=max(iterations))
    for k in iterations:
        expected = ref[f"output/p{patch}_iter{k}"]
        assert outs[k - 1].shape == expected.shape
        assert torch.allclose(outs[k - 1], expected, atol=1e-4, rtol=0), (k, (outs[k - 1] - expected).abs().max())


def test_published_parameter_counts():
    assert parameter_counts(UPLiFTNet(384, 14)) == {
        "encoder": 283_904,
        "decoder": 504_512,
        "attender": 1_105,
        "total": 789_521,
    }
    assert parameter_counts(UPLiFTNet(384, 16))["total"] == 789_521  # DINOv3-S+/16: 0.790 M
    assert parameter_counts(UPLiFTNet(768, 16))["total"] == 1_010_705  # a 768-d backbone: 1.011 M


def test_loader_refuses_unknown_missing_and_misshaped_weights():
    ref = _reference()
    weights = {k.removeprefix("weights/"): v for k, v in ref.items() if k.startswith("weights/")}
    with pytest.raises(VitupError, match="unknown UPLiFT weight 'refiner.w'"):
        load_published_state(UPLiFTNet(32, 16), {**weights, "refiner.w": torch.zeros(1)}, "x.safetensors")
    partial = {k: v for k, v in weights.items() if not k.startswith("attender.")}
    with pytest.raises(VitupError, match="UPLiFT weight 'attender.conv1.bias' is missing"):
        load_published_state(UPLiFTNet(32, 16), partial, "x.safetensors")
    with pytest.raises(VitupError, match=r"decoder.block_0.blocks.0.conv.0.weight has shape .* 384-channel"):
        load_published_state(UPLiFTNet(384, 16), weights, "x.safetensors")
    prefixed = {f"module.{k}": v for k, v in weights.items()}
    load_published_state(UPLiFTNet(32, 16), prefixed, "x.safetensors")  # DataParallel names load too


def test_low_memory_attender_equals_the_default():
    torch.manual_seed(0)
    net = UPLiFTNet(24, 16).eval()
    image, feats = torch.randn(2, 3, 48, 32), torch.randn(2, 24, 3, 2)
    with torch.no_grad():
        fast = net(image, feats, iterations=3)
        low = net(image, feats, iterations=3, low_memory=True)
    for a, b in zip(fast, low, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_local_attender_output_is_a_convex_combination_of_its_neighbours():
    torch.manual_seed(1)
    net = UPLiFTNet(8, 16).eval()
    value = torch.randn(1, 8, 5, 6)
    guide = torch.randn(1, 64, 10, 12) * 3
    att = net.attender
    weights = att.weights(guide)
    assert (weights >= 0).all() and torch.allclose(weights.sum(1), torch.ones(1, 10, 12), atol=1e-6)
    out = att(guide, value)
    # by hand at a corner pixel (replicated border) and an interior one
    for y, x in ((0, 0), (7, 5)):
        cy, cx = y // 2, x // 2
        expected = sum(
            weights[0, d, y, x] * value[0, :, min(max(cy + dy, 0), 4), min(max(cx + dx, 0), 5)]
            for d, (dy, dx) in enumerate(OFFSETS_17)
        )
        assert torch.allclose(out[0, :, y, x], expected, atol=1e-6)
    # so every output channel lies within the range of the input tokens
    assert (out.amin(dim=(2, 3)) >= value.amin(dim=(2, 3)) - 1e-6).all()
    assert (out.amax(dim=(2, 3)) <= value.amax(dim=(2, 3)) + 1e-6).all()
    assert len(OFFSETS_17) == len(set(OFFSETS_17)) == 17


def _tiny_uplift(name: str = "dinov3_s") -> UPLiFT:
    backbone = tiny_backbone(name)
    torch.manual_seed(3)
    up = build_upsampler("uplift", backbone, input_size=4 * backbone.patch_size)
    assert isinstance(up, UPLiFT)
    return up.eval()


def test_features_at_token_grid_times_two_to_the_k_are_k_iterations(images):
    up = _tiny_uplift()
    with torch.no_grad():
        x = up.prepare(images)
        tokens = up.backbone.hidden_states(x, [up.backbone.depth])[0]
        steps = up.net(x, tokens, iterations=3)
        for k in (1, 2, 3):
            size = 4 * 2**k
            assert iterations_for((4, 4), (size, size)) == k
            assert torch.allclose(up.features(images, size), steps[k - 1], atol=1e-6)
            assert up.output_notes(size) == {"iterations": k, "native_size": [size, size], "resized": False}
        # other sizes: the next power of two, then a bilinear resize (recorded)
        odd = up.features(images, (20, 12))
        assert odd.shape == (2, 64, 20, 12)
        assert up.output_notes((20, 12)) == {"iterations": 3, "native_size": [32, 32], "resized": True}


def test_query_samples_the_pixel_dense_map(images):
    """query == bilinear samples of features() at the input size, computed only where needed, in chunks."""
    up = _tiny_uplift()
    up.chunk_queries = 7  # many chunks
    xy = torch.rand(2, 50, 2, generator=torch.Generator().manual_seed(0))
    xy[:, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.999, 0.001], [0.5, 0.5]])  # corners and borders
    with torch.no_grad():
        dense = up.features(images, up.input_size)  # 64 x 64 for 4 tokens at patch 16
        assert dense.shape[-1] == up.input_size
        expected = sample_map(dense, xy)
        got = up.query(images, xy)
        grid = up.query(images, grid_xy(64, 64).expand(2, -1, -1))
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(grid.transpose(1, 2).reshape(2, -1, 64, 64), dense, atol=1e-5)


def test_patch14_uplift_prescales_the_encoder_image(images):
    up = _tiny_uplift("dinov2_s")
    with torch.no_grad():
        x = up.prepare(images)
        assert x.shape[-1] == 56
        encoded = up.net.encode(x)
        assert encoded[-1].shape[-1] == 64  # 16/14 of the input
        assert up.features(images, 64).shape == (2, 64, 64, 64)
