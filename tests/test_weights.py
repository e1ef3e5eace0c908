"""The published-weights resolver: short names, hf: references, local files, cache first, offline errors."""

from __future__ import annotations

import time

import pytest
from conftest import _place_in_cache

from vitup_cli.errors import VitupError
from vitup_cli.hub.releases import RELEASES, licence_notice, resolve_weights


def test_offline_without_cache_fails_fast_with_one_line(offline_cache, one_line_error):
    start = time.perf_counter()
    with pytest.raises(VitupError) as err:
        resolve_weights("vit-up:dinov3_splus")
    assert time.perf_counter() - start < 1.0
    one_line_error(err.value, "Krispin/vit-up/vit_up_dinov3_splus.safetensors", "--checkpoint")


def test_short_name_and_hf_ref_resolve_from_cache(offline_cache):
    release = RELEASES["uplift:dinov3_splus"]
    placed = _place_in_cache(offline_cache, release.repo_id, release.filename)
    got = resolve_weights("uplift:dinov3_splus")
    assert got.path.resolve() == placed.resolve() and got.release is release
    got = resolve_weights(release.hub_ref)
    assert got.path.resolve() == placed.resolve() and got.release is release


def test_local_copy_is_recognised_by_its_published_name(tmp_path):
    f = tmp_path / "vit_up_dinov3_base.safetensors"
    f.write_bytes(b"x")
    got = resolve_weights(f)
    assert got.release is RELEASES["vit-up:dinov3_b"] and got.path == f


def test_unknown_release_and_bad_hf_ref_are_one_line_errors():
    with pytest.raises(VitupError, match="unknown release 'vit-up:nope'"):
        resolve_weights("vit-up:nope")
    with pytest.raises(VitupError, match="hf:ORG/REPO/FILE"):
        resolve_weights("hf:onlyorg")


def test_licence_is_shown_once_per_process():
    release = RELEASES["vit-up:dinov3_b"]
    from vitup_cli.hub import releases as weights

    weights._printed_licences.discard(release.name)
    assert "cc-by-nc-sa-4.0" in licence_notice(release)
    assert licence_notice(release) is None
