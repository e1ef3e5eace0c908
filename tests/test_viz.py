"""`vitup visualize`: joint PCA colours, similarity maps, figure layout, the CLI and its bad inputs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vitup_cli import viz
from vitup_cli.cli import app
from vitup_cli.errors import VitupError

TINY = dict(depth=2, embed_dim=64, num_heads=1)
TINY_ARGS = ["--backbone", "dinov3_s", "--pretrained", "none", "--backbone-args", "depth=2,embed_dim=64,num_heads=1"]
TINY_ARGS += ["--input-size", "64", "--res", "24", "--dpi", "40", "--panel-size", "1.5", "--device", "cpu"]
PAIR = ["--compare", "bilinear,nearest"]  # without --checkpoint or --compare, visualize wants the published ViT-Up


def _photo(path, h=48, w=64, seed=0):
    """A smooth synthetic picture (gradients + a disc), saved as PNG."""
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([xx / w, yy / h, ((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (h / 4) ** 2) * 1.0], -1)
    img = (img * 200 + rng.integers(0, 40, img.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture
def photo(tmp_path):
    return _photo(tmp_path / "photo.png")


@pytest.fixture
def wide(tmp_path):
    return _photo(tmp_path / "wide.jpg", h=30, w=90, seed=1)


def _run(*args):
    return CliRunner().invoke(app, ["visualize", *map(str, args)])


# -- joint PCA ---------------------------------------------------------------------------------------
def test_joint_pca_gives_identical_colours_for_identical_features_across_panels():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(16, 6, 6, generator=g)
    up = low.repeat_interleave(3, 1).repeat_interleave(3, 2)  # every vector of `low`, 3x3 times
    other = torch.randn(16, 18, 18, generator=g) * 2 + 1
    pca = viz.fit_joint_pca([low, up, other])
    c_low, c_up = pca.colorize(low), pca.colorize(up)
    assert c_low.shape == (6, 6, 3) and c_up.shape == (18, 18, 3)
    np.testing.assert_array_equal(c_up[::3, ::3], c_low)
    np.testing.assert_array_equal(c_up[2::3, 1::3], c_low)
    assert c_up.min() >= 0.0 and c_up.max() <= 1.0
    assert c_low.std() > 0.1  # not a flat colour


def test_joint_pca_is_one_fit_not_one_per_panel():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 10, 10, generator=g)
    shifted = a + 5 * torch.nn.functional.one_hot(torch.tensor(0), 8).float()[:, None, None]
    pca = viz.fit_joint_pca([a, shifted])
    # one panel per side of PC1: per-panel PCAs (each centred on its own mean) would colour them alike
    assert abs(pca.colorize(a)[..., 0].mean() - pca.colorize(shifted)[..., 0].mean()) > 0.5
    assert pca.explained[0] > 0.4  # the shift (6.25 of ~14 units of variance) leads the joint fit
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(3), atol=1e-9)


def test_joint_pca_is_deterministic_and_weights_panels_equally():
    g = torch.Generator().manual_seed(2)
    maps = [torch.randn(12, 4, 4, generator=g), torch.randn(12, 200, 200, generator=g)]
    p1, p2 = viz.fit_joint_pca(maps), viz.fit_joint_pca(maps)
    assert torch.equal(p1.components, p2.components) and torch.equal(p1.low, p2.low)
    # the mean is the average of the two panel means, not dominated by the 2500x larger panel
    expected = (maps[0].double().mean((1, 2)) + maps[1].double().mean((1, 2))) / 2
    torch.testing.assert_close(p1.mean, expected, atol=0.02, rtol=0)


def test_joint_pca_rejects_mixed_dims_and_nan():
    with pytest.raises(VitupError, match="different feature dims"):
        viz.fit_joint_pca([torch.zeros(4, 2, 2), torch.zeros(5, 2, 2)])
    bad = torch.randn(4, 3, 3)
    bad[0, 1, 1] = float("nan")
    with pytest.raises(VitupError, match="NaN"):
        viz.fit_joint_pca([bad])


# -- similarity --------------------------------------------------------------------------------------
@pytest.mark.parametrize("point", [(0, 0), (10.2, 23.7), (89, 29), (89.9, 29.9), (45, 0), (44.99, 14.5)])
def test_similarity_is_maximal_at_the_query_point(point):
    size = (30, 90)
    fmap = torch.randn(32, *viz.grid_shape(40, size), generator=torch.Generator().manual_seed(3))
    xy = viz.point_to_xy(point, size, "img")
    sim = viz.cosine_similarity_map(fmap, xy)
    row, col = viz.point_cell(xy, *sim.shape)
    assert sim[row, col] == sim.max() == 1.0
    assert (sim < 1).sum() == sim.numel() - 1  # random features: no other cell is identical
    # the cell really contains the point: its pixel extent covers the point
    H, W = size
    h, w = sim.shape
    assert col * W / w <= int(point[0]) + 0.5 <= (col + 1) * W / w
    assert row * H / h <= int(point[1]) + 0.5 <= (row + 1) * H / h


def test_similarity_map_values_are_cosines():
    fmap = torch.tensor([[[1.0, 0.0, -2.0]], [[0.0, 3.0, 0.0]]])  # (C=2, H=1, W=3)
    sim = viz.cosine_similarity_map(fmap, (0.1, 0.5))
    torch.testing.assert_close(sim, torch.tensor([[1.0, 0.0, -1.0]]))


def test_points_outside_the_image_and_bad_points_are_refused():
    with pytest.raises(VitupError, match="outside"):
        viz.point_to_xy((90, 5), (30, 90), "wide.jpg")
    with pytest.raises(VitupError, match="outside"):
        viz.point_to_xy((-1, 5), (30, 90), "wide.jpg")
    for text in ("1", "a,b", "1,2,3", "nan,2"):
        with pytest.raises(VitupError, match="X,Y"):
            viz.parse_point(text)
    assert viz.parse_point(" 12.5, 3") == (12.5, 3.0)


def test_grid_keeps_the_aspect_ratio():
    assert viz.grid_shape(224, (30, 90)) == (75, 224)
    assert viz.grid_shape(224, (90, 30)) == (224, 75)
    assert viz.grid_shape(16, (10, 10)) == (16, 16)


# -- figure ------------------------------------------------------------------------------------------
def _rows(size=(20, 20), points=()):
    g = torch.Generator().manual_seed(4)
    low = torch.randn(8, 4, 4, generator=g)
    return [
        viz.VizRow(
            label="x.png",
            size=size,
            image=np.zeros((*size, 3), np.uint8),
            panels=[
                viz.FeaturePanel("low-res tokens", low, nearest=True),
                viz.FeaturePanel("copy", low.clone(), nearest=True),
                viz.FeaturePanel("bilinear", torch.randn(8, 16, 16, generator=g)),
            ],
            points=list(points),
        )
    ]


def test_figure_has_the_expected_panel_grid_and_pixel_size(tmp_path):
    opts = viz.FigureOptions(panel_size=2.0, dpi=50)
    res = viz.render_rows(_rows(points=[(3, 4), (19, 19)]), tmp_path / "f.png", opts, title="t")
    assert res.grid == (3, 4)  # PCA row + 2 point rows; input + 3 panels
    width, height = Image.open(res.path).size
    assert width == 4 * 2.0 * 50
    assert height == round((viz.HEADER_H + 3 * (viz.TITLE_H + 2.0 + viz.FOOTER_H)) * 50)
    assert (width, height) == res.size_px
    # a wide image gets shorter rows, not letterboxed panels
    wide = viz.render_rows(_rows(size=(10, 20)), tmp_path / "w.png", opts)
    assert Image.open(wide.path).size[1] == round((viz.HEADER_H + viz.TITLE_H + 1.0 + viz.FOOTER_H) * 50)


def test_identical_panels_are_drawn_in_identical_colours(tmp_path):
    opts = viz.FigureOptions(panel_size=2.0, dpi=50)
    res = viz.render_rows(_rows(), tmp_path / "f.png", opts)
    png = np.asarray(Image.open(res.path).convert("RGB")).astype(int)
    step = int(opts.panel_size * opts.dpi)
    top = round((viz.HEADER_H + viz.TITLE_H) * opts.dpi) + 6
    box = slice(top, top + step - 12)
    low, copy, bilinear = (png[box, c * step + 6 : (c + 1) * step - 6] for c in (1, 2, 3))
    assert low.std() > 10  # coloured, not blank
    np.testing.assert_array_equal(low, copy)
    assert np.abs(low - bilinear).mean() > 5


# -- from a model ------------------------------------------------------------------------------------
def test_visualize_images_draws_input_tokens_and_each_method(photo, wide, tmp_path):
    opts = viz.FigureOptions(panel_size=1.5, dpi=40)
    model = viz.ModelOptions(backbone="dinov3_s", pretrained="none", overrides=TINY, input_size=64)
    res = viz.visualize_images(
        [photo, wide],
        tmp_path / "o.png",
        model=model,
        compare=["bilinear", "lowres", "nearest", "bilinear"],
        res=24,
        points=[(5, 7)],
        options=opts,
    )
    assert res.grid == (4, 4)  # 2 images x (PCA + 1 point); input | tokens | bilinear | nearest
    assert Image.open(res.path).size == res.size_px
    assert len(res.explained) == 2 and all(0 < sum(e) <= 1 for e in res.explained)


def test_random_init_pictures_are_reproducible_with_a_seed(photo, tmp_path):
    def explained(seed, name):
        model = viz.ModelOptions(backbone="dinov3_s", pretrained="none", overrides=TINY, input_size=64, seed=seed)
        opts = viz.FigureOptions(panel_size=1.0, dpi=30)
        return viz.visualize_images([photo], tmp_path / name, model=model, res=8, options=opts).explained

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = explained(0, "a.png")
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG is left alone
    assert explained(0, "b.png") == first
    assert explained(1, "c.png") != first


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from vitup_cli.backbones import load_backbone
    from vitup_cli.hub import save_checkpoint
    from vitup_cli.models import ViTUp, ViTUpConfig

    torch.manual_seed(0)
    bb = load_backbone("dinov3_s", pretrained="none", overrides=TINY)
    bb.add_lora(r=2, alpha=4, dropout=0.0)
    with torch.no_grad():  # a "trained" adapter, so student and teacher differ
        for _, p in bb.lora_parameters():
            p.normal_(0, 0.5)
    model = ViTUp(bb, ViTUpConfig(input_tokens=4, query_grid=16))
    save_checkpoint(tmp_path / "ck" / "last", model)
    return tmp_path / "ck" / "last"


def test_checkpoint_draws_vitup_beside_teacher_baselines(photo, tmp_path, tiny_checkpoint, pca_spy):
    out = tmp_path / "ck.png"
    result = _run(photo, "--checkpoint", tiny_checkpoint, "--compare", "vitup,bilinear", "--out", out, *TINY_ARGS[6:])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "1x4 panels" in result.output
    tokens, vitup, bilinear = pca_spy[-1]
    assert tokens.shape == (64, 4, 4) and vitup.shape == bilinear.shape == (64, 18, 24)
    # the baselines use the frozen teacher (adapters off): bilinear is exactly the tokens, interpolated
    torch.testing.assert_close(
        bilinear, torch.nn.functional.interpolate(tokens[None], size=(18, 24), mode="bilinear")[0]
    )
    from vitup_cli.hub import load_checkpoint

    student = load_checkpoint(tiny_checkpoint)
    img = torch.from_numpy(np.asarray(Image.open(photo), np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        assert not torch.allclose(student.tokens(img)[0], tokens, atol=1e-3)  # LoRA does change them
        with student.backbone.adapters_disabled():
            torch.testing.assert_close(student.tokens(img)[0], tokens, atol=1e-5, rtol=1e-5)


# -- the CLI -----------------------------------------------------------------------------------------
def test_cli_default_name_and_no_silent_overwrite(photo, one_line_error):
    result = _run(photo, "--point", "10,12", *PAIR, *TINY_ARGS)
    assert result.exit_code == 0, result.output
    out = photo.with_name("photo.vitup.png")
    assert out.is_file() and "2x4 panels" in result.output
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not the temp file's 0600
    before = out.read_bytes()
    one_line_error(_run(photo, *PAIR, *TINY_ARGS), "already exists", "--overwrite")
    assert out.read_bytes() == before
    assert _run(photo, "--overwrite", "--compare", "nearest", *TINY_ARGS).exit_code == 0
    assert Image.open(out).size == (3 * 60, round((viz.HEADER_H + viz.TITLE_H + 1.5 * 0.75 + viz.FOOTER_H) * 40))


def test_cli_bad_inputs_give_one_line_and_exit_2(photo, tmp_path, one_line_error):
    (tmp_path / "junk.jpg").write_text("not an image")
    cases = {
        "no such image": [tmp_path / "missing.jpg", *PAIR, *TINY_ARGS],
        "outside photo.png": [photo, "--point", "64,10", *PAIR, *TINY_ARGS],
        "X,Y": [photo, "--point", "3;4", *PAIR, *TINY_ARGS],
        "needs --checkpoint": [photo, "--compare", "vitup", *TINY_ARGS],
        "unknown method 'bicubic'": [photo, "--compare", "bicubic", *TINY_ARGS],
        "--index selects rows": [photo, "--index", "0", *TINY_ARGS],
        "cannot read this image": [tmp_path / "junk.jpg", *PAIR, *TINY_ARGS],
        "ending in .png": [photo, "--out", tmp_path / "x.jpg", *PAIR, *TINY_ARGS],
        "--res 0": [photo, *PAIR, *TINY_ARGS, "--res", "0"],
        "no published ViT-Up weights for backbone 'dinov3_s'": [photo, *TINY_ARGS],
        "with --pretrained none": [photo, *TINY_ARGS, "--backbone", "dinov3_s+"],
    }
    for needle, args in cases.items():
        one_line_error(_run(*args), needle)
    assert not list(tmp_path.glob("*.vitup.png"))


def test_cli_help_shows_options_and_examples():
    result = CliRunner().invoke(app, ["visualize", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--checkpoint", "--compare", "--res", "--point", "--index", "--out", "--dpi", "--panel-size"):
        assert flag in result.output
    assert "vitup visualize feats.zarr --index 0" in result.output


# -- from a store ------------------------------------------------------------------------------------
C_STORE, GRID, PAD_VALUE = 24, 16, 1e4


def _make_store(folder, suffix=".zarr", pca_k=None, lowres=True, statuses=(1, 1, 1)):
    """Three photos (30x60, 40x40, 60x30) -> a store as `extract --fit pad --res 16` lays it out: the
    image fills the valid box of the 16x16 grid, the padding holds huge values."""
    from vitup_cli.stores import StoreLayout, create_writer

    sizes = [(30, 60), (40, 40), (60, 30)]
    valid = [(4, 0, 12, 16), (0, 0, 16, 16), (0, 4, 16, 12)]
    names = []
    for k, (h, w) in enumerate(sizes):
        names.append(f"img{k}.png")
        _photo(folder / names[-1], h=h, w=w, seed=k)
    g = torch.Generator().manual_seed(5)
    n = len(sizes)
    feats = torch.full((n, C_STORE, GRID, GRID), PAD_VALUE)
    for k, (y0, x0, y1, x1) in enumerate(valid):
        feats[k, :, y0:y1, x0:x1] = torch.randn(C_STORE, y1 - y0, x1 - x0, generator=g)
    tokens = torch.randn(n, C_STORE, 4, 4, generator=g)
    pca = None
    stored = feats.numpy()
    if pca_k:
        comps = torch.linalg.qr(torch.randn(C_STORE, pca_k, generator=g))[0].T.contiguous().numpy()  # (K, C)
        mean = torch.randn(C_STORE, generator=g).numpy()
        pca = (comps, mean)
        stored = np.einsum("kc,nchw->nkhw", comps, stored - mean[None, :, None, None])
    layout = StoreLayout.for_images(
        n,
        pca_k or C_STORE,
        GRID,
        GRID,
        shard_size=n,
        dtype="float32",
        lowres=(C_STORE, 4, 4) if lowres else None,
        pca=pca_k,
        backbone_channels=C_STORE,
    )
    path = folder / f"feats{suffix}"
    attrs = {"upsampler": "bilinear", "fit": "pad", "backbone": "dinov3_s", "weights_id": "none (random init)"}
    writer = create_writer(path, layout, names, attrs, pca=pca)
    status = np.array(statuses, dtype=np.uint8)
    writer.write_rows(
        0,
        stored,
        np.where(status == 0, 2, status),
        np.array(sizes),
        np.array(valid),
        ["" if s else "broken file" for s in status],
        tokens.numpy() if lowres else None,
    )
    writer.finalize()
    return path, feats, tokens, valid


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model is an error: store rows must be drawn from the store alone."""

    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded")

    import vitup_cli.backbones
    import vitup_cli.hub
    import vitup_cli.models
    import vitup_cli.viz

    for module, name in [
        (vitup_cli.backbones, "load_backbone"),
        (vitup_cli.hub, "open_upsampler"),
        (vitup_cli.hub, "load_checkpoint"),
        (vitup_cli.models, "build_upsampler"),
        (vitup_cli.viz, "open_upsampler"),
        (vitup_cli.viz, "build_upsampler"),
    ]:
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_store_rows_render_without_a_model_and_crop_the_padding(tmp_path, suffix, no_model, pca_spy):
    path, feats, tokens, valid = _make_store(tmp_path, suffix)
    result = _run(path, "--index", "0", "--index", "2", "--point", "5,5", "--dpi", "40", "--panel-size", "1.5")
    assert result.exit_code == 0, result.output
    out = tmp_path / "feats.row0-2.png"
    assert out.is_file() and "4x3 panels" in result.output  # 2 rows x (PCA + point); input | tokens | stored
    assert "not found" not in result.output  # the input images were found next to the store
    for call, k in zip(pca_spy, (0, 2), strict=True):
        stored_tokens, stored = call
        y0, x0, y1, x1 = valid[k]
        torch.testing.assert_close(stored, feats[k, :, y0:y1, x0:x1])  # the valid box, no padding
        assert stored.abs().max() < PAD_VALUE
        # tokens: only those over the image (a 16-grid box of 4..12 is token rows 1..3)
        ty0, tx0, ty1, tx1 = (v // 4 for v in (y0, x0, y1 + 3, x1 + 3))
        torch.testing.assert_close(stored_tokens, tokens[k, :, ty0:ty1, tx0:tx1])


def test_pca_compressed_store_rows_are_unprojected(tmp_path, no_model, pca_spy):
    path, feats, *_ = _make_store(tmp_path, pca_k=8, lowres=False)
    res = viz.visualize_store(path, [1], options=viz.FigureOptions(panel_size=1.5, dpi=40))
    assert res.grid == (1, 2) and res.path == tmp_path / "feats.row1.png"
    (stored,) = pca_spy[0]
    assert stored.shape == (C_STORE, GRID, GRID)  # back in the backbone's 24-d space, not the 8 stored
    # an 8-d projection keeps the part of each feature in its span: unprojecting is that projection
    from vitup_cli.stores import open_store

    with open_store(path) as store:
        comps, mean = store.pca
    x = feats[1].reshape(C_STORE, -1).T.numpy() - mean
    expected = (x @ comps.T @ comps + mean).T.reshape(C_STORE, GRID, GRID)
    np.testing.assert_allclose(stored.numpy(), expected, atol=1e-4)


def test_store_similarity_marks_the_same_image_point(tmp_path, no_model):
    """The cell picked for a point is where that point lies in the padded grid."""
    path, *_ = _make_store(tmp_path)
    from vitup_cli.stores import open_store

    with open_store(path) as store:
        row = viz._store_row(store, 0, [tmp_path], [(59, 29)], print)
    tokens, stored = row.panels
    xy = viz.point_to_xy(row.local((59, 29)), row.size, row.label)
    assert viz.point_cell(xy, *stored.features.shape[1:], stored.box) == (7, 15)  # last cell of the 8x16 crop
    assert viz.point_cell(xy, *tokens.features.shape[1:], tokens.box) == (2, 3)  # grid row 11 -> token row 2
    assert viz.cosine_similarity_map(tokens.features, xy, tokens.box)[2, 3] == 1.0


def test_store_bad_inputs_give_one_line_and_exit_2(tmp_path, no_model, one_line_error):
    import zarr

    path, *_ = _make_store(tmp_path, statuses=(1, 0, 1))
    foreign = zarr.open_group(tmp_path / "other.zarr", mode="w")
    foreign.create_array("something", shape=(2,), dtype="float32")
    cases = {
        "out of range: feats.zarr has 3 rows (0..2)": [path, "--index", "3"],
        "--index -1 is out of range": [path, "--index", "-1"],
        "choose rows with --index": [path],
        "is failed (broken file)": [path, "--index", "1"],
        "no 'features' array": [tmp_path / "other.zarr", "--index", "0"],
        "no such store": [tmp_path / "missing.zarr", "--index", "0"],
        "outside row 0: img0.png (60x30 pixels)": [path, "--index", "0", "--point", "60,3"],
        "do not apply to a store": [path, "--index", "0", "--compare", "bilinear"],
    }
    for needle, args in cases.items():
        one_line_error(_run(*args), needle)
    assert not list(tmp_path.glob("*.row*.png"))
    # the image may live elsewhere: --images finds it, and a missing one is a blank panel, not an error
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "img0.png").rename(moved / "img0.png")
    result = _run(path, "--index", "0", "--out", tmp_path / "a.png")
    assert result.exit_code == 0 and "img0.png not found" in result.output
    result = _run(path, "--index", "0", "--out", tmp_path / "b.png", "--images", moved)
    assert result.exit_code == 0 and "not found" not in result.output


def test_crop_fit_region_is_the_centre_square_extract_uses():
    assert viz._crop_region((30, 60)) == (0, 15, 30, 45)
    assert viz._crop_region((61, 30)) == (15, 0, 45, 30)
    assert viz._crop_region((40, 40), 64) == (0, 0, 40, 40)
    assert viz._crop_region((300, 451), 448) == (0, 75, 300, 375)
    from vitup_cli.extract import fit_image

    for size in [(300, 451), (451, 300), (333, 500)]:
        yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
        waves = [np.sin(2 * np.pi * xx / 60), np.sin(2 * np.pi * yy / 60), np.cos(2 * np.pi * (xx + yy) / 80)]
        img = Image.fromarray((128 + 100 * np.stack(waves, -1)).astype(np.uint8))
        fitted = fit_image(img, 448, "crop")[0].permute(1, 2, 0).numpy() * 255
        y0, x0, y1, x1 = viz._crop_region(size, 448)
        diffs = []
        for d in (-1, 0, 1):  # the region, and the region shifted by one pixel along the cropped axis
            dx, dy = (d, 0) if size[1] > size[0] else (0, d)
            same = img.crop((x0 + dx, y0 + dy, x1 + dx, y1 + dy)).resize((448, 448), Image.Resampling.BICUBIC)
            diffs.append(np.abs(fitted - np.asarray(same, np.float32)).mean())
        assert diffs[1] < 1.5 < min(diffs[0], diffs[2]), diffs  # measured: 0.64 vs 3.2 and 4.5


@pytest.mark.integration
@pytest.mark.parametrize("fit", ["pad", "crop"])
def test_rows_of_a_store_made_by_vitup_extract(tmp_path, fit, monkeypatch, pca_spy):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _photo(folder / "wide.png", h=30, w=80, seed=1)
    _photo(folder / "tall.png", h=70, w=40, seed=2)
    store = tmp_path / "feats.zarr"
    flags = f"--res 16 --fit {fit} --tokens --pca 8 --dtype float32 --workers 0 --device cpu -u bilinear".split()
    made = CliRunner().invoke(app, ["extract", str(folder), "--out", str(store), *flags, *TINY_ARGS[:8]])
    assert made.exit_code == 0, made.output
    # from here on, loading a model is an error
    for module, name in [("vitup_cli.backbones", "load_backbone"), ("vitup_cli.viz", "open_upsampler")]:
        monkeypatch.setattr(f"{module}.{name}", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model")))
    result = _run(store, "--index", "0", "--index", "1", "--point", "30,15", "--dpi", "40", "--panel-size", "1.5")
    assert result.exit_code == 0, result.output
    assert "4x3 panels" in result.output and "not found" not in result.output
    from vitup_cli.stores import open_store

    with open_store(store) as s:
        order = s.paths
        for k, (tokens, feats) in enumerate(pca_spy):
            y0, x0, y1, x1 = s.valid[k]
            assert feats.shape == (64, y1 - y0, x1 - x0)  # unprojected to 64-d, cropped to the image
            assert tokens.shape[0] == 64
            if fit == "pad":  # the long side fills the grid, the short side is cropped to the image
                h, w = s.sizes[k]
                assert (y1 - y0, x1 - x0) == ((16, round(16 * w / h)) if h > w else (round(16 * h / w), 16))
            else:
                assert (y0, x0, y1, x1) == (0, 0, 16, 16)
    assert sorted(order) == ["tall.png", "wide.png"]
