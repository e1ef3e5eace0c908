import pytest
import torch
from conftest import tiny_backbone

from vitup_cli.errors import VitupError
from vitup_cli.models import build_upsampler


@pytest.fixture
def up():
    return build_upsampler("bilinear", tiny_backbone(), input_size=64)


def test_query_at_token_centre_returns_that_token(up, images):
    tokens = up.tokens(images)  # (2, 64, 4, 4)
    i, j = 1, 2
    xy = torch.tensor([[(j + 0.5) / 4, (i + 0.5) / 4]]).expand(2, 1, 2)
    got = up.query(images, xy)[:, 0]
    assert torch.allclose(got, tokens[:, :, i, j], atol=1e-6)


@pytest.mark.parametrize("name", ["bilinear", "nearest", "lowres"])
def test_features_at_token_grid_are_the_tokens(name, images):
    model = build_upsampler(name, tiny_backbone(), input_size=64)
    assert torch.allclose(model.features(images, (4, 4)), model.tokens(images), atol=1e-6)


def test_bilinear_midpoint_is_the_mean(up, images):
    tokens = up.tokens(images)
    xy = torch.tensor([[2 / 4, 1.5 / 4]]).expand(2, 1, 2)  # halfway between tokens (1,1) and (1,2)
    got = up.query(images, xy)[:, 0]
    assert torch.allclose(got, (tokens[:, :, 1, 1] + tokens[:, :, 1, 2]) / 2, atol=1e-6)


def test_nearest_upsampling_repeats_tokens(images):
    model = build_upsampler("nearest", tiny_backbone(), input_size=64)
    tokens = model.tokens(images)
    dense = model.features(images, (8, 12))
    assert torch.equal(dense[:, :, ::2, ::3], tokens)


def test_lowres_ignores_size_and_says_so(images):
    model = build_upsampler("lowres", tiny_backbone(), input_size=64)
    assert model.native_resolution_only
    assert model.features(images, 100).shape == (2, 64, 4, 4)


def test_unknown_upsampler():
    with pytest.raises(VitupError, match="unknown upsampler 'bicubic'"):
        build_upsampler("bicubic", tiny_backbone())
