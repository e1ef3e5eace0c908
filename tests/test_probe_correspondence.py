"""`vitup probe spair` / `keypoints`: geometry, matching, PCK, and end-to-end runs on a tiny SPair layout."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from spair_fixtures import make_keypoints, make_spair
from typer.testing import CliRunner

from vitup_cli.cli import app
from vitup_cli.errors import VitupError
from vitup_cli.extract import SilentReporter
from vitup_cli.probe import correspondence as corr
from vitup_cli.probe.correspondence import (
    CorrespondenceConfig,
    Geometry,
    MatchSettings,
    argmax_cosine,
    pck_scores,
    predict_pair,
    run_correspondence,
    source_vectors,
)

runner = CliRunner()
# a per-token backbone (no blocks): its token grid is exactly equivariant to shifts by whole patches
TOY = ["--backbone", "dinov3_s", "--pretrained", "none", "--backbone-args", "depth=0,embed_dim=32,num_heads=2",
       "--input-size", "96", "--res", "24", "--workers", "0", "--device", "cpu"]  # fmt: skip
TOY_CFG = {"backbone": "dinov3_s", "pretrained": "none", "backbone_args": {"depth": 0, "embed_dim": 32, "num_heads": 2},
           "input_size": 96, "res": 24, "workers": 0, "device": "cpu"}  # fmt: skip


# -- geometry -------------------------------------------------------------------------------------
def test_padding_follows_the_reference_including_the_odd_canvas():
    assert Geometry(64, 48).pad == (0, 8) and Geometry(64, 48).canvas == (64, 64)
    assert Geometry(30, 50).pad == (10, 0) and Geometry(30, 50).side == 50
    odd = Geometry(5, 2)  # (5 - 2) // 2 = 1: a 5x4 canvas, one short of square, as the reference makes it
    assert odd.pad == (0, 1) and odd.canvas == (5, 4)
    img = Image.fromarray(np.full((2, 5, 3), 200, np.uint8))
    canvas = np.asarray(corr.square_canvas(img))
    assert canvas.shape == (4, 5, 3) and (canvas[1:3] == 200).all() and (canvas[[0, 3]] == 0).all()


def test_cells_and_map_back():
    g = Geometry(64, 48)  # side 64, py 8; a 16x16 grid has 4-pixel cells
    xy = np.array([[0, 0], [3.99, 39.9], [63, 47], [70, -20]])
    assert g.cells(xy, (16, 16)).tolist() == [[0, 2], [0, 11], [15, 13], [15, 0]]  # floor, clamped
    cols, rows = np.array([0, 3]), np.array([2, 5])
    assert g.from_cells(cols, rows, (16, 16), "center").tolist() == [[2, 2], [14, 14]]
    assert g.from_cells(cols, rows, (16, 16), "corner").tolist() == [[0, 0], [12, 12]]
    valid = g.valid_cells((16, 16)).reshape(16, 16)
    assert valid[2:14].all() and not valid[:2].any() and not valid[14:].any()


# -- matching -------------------------------------------------------------------------------------
def test_argmax_is_independent_of_the_block_size_and_keeps_the_first_tie():
    gen = torch.Generator().manual_seed(0)
    fmap = torch.randn(8, 12, 10, generator=gen)
    q = torch.randn(37, 8, generator=gen)
    full, sims = argmax_cosine(q, fmap)
    small, _ = argmax_cosine(q, fmap, budget=4 * 7)  # blocks of one query
    assert torch.equal(full, small)
    flat = torch.nn.functional.normalize(fmap.reshape(8, -1), dim=0)
    ref = (torch.nn.functional.normalize(q, dim=1) @ flat).max(1)
    assert torch.equal(full, ref.indices) and torch.allclose(sims, ref.values)
    tie = torch.zeros(4, 3, 3)
    tie[0, 0, 2] = tie[0, 2, 1] = 5.0  # the same direction twice: the first in row-major order wins
    assert argmax_cosine(torch.tensor([[1.0, 0, 0, 0]]), tie)[0].item() == 2
    valid = torch.ones(9, dtype=torch.bool)
    valid[2] = False
    assert argmax_cosine(torch.tensor([[1.0, 0, 0, 0]]), tie, valid)[0].item() == 7


def test_bilinear_source_sampling_interpolates_between_cell_centres():
    fmap = torch.arange(16.0).reshape(1, 4, 4)  # value = 4 * row + col
    g = Geometry(8, 8)  # 2-pixel cells
    near = source_vectors(fmap, g, np.array([[3.0, 1.0]]), "nearest")
    bil = source_vectors(fmap, g, np.array([[2.0, 1.0]]), "bilinear")  # between col 0 and 1 centres, row 0
    centre = source_vectors(fmap, g, np.array([[5.0, 7.0]]), "bilinear")
    assert near.item() == 1.0 and bil.item() == pytest.approx(0.5) and centre.item() == pytest.approx(14.0)


def _unique_map(c, h, w, seed=0):
    return torch.randn(c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [(64, 48), (48, 64)])
def test_whole_cell_shift_of_identical_features_scores_one(size):
    """Target = source features rolled by whole cells; keypoints at cell centres: every prediction is exact,
    which holds only if padding, cell lookup and the map back are consistent (landscape and portrait)."""
    g = Geometry(*size)  # 4-pixel cells on a 16x16 grid, 2 cells of padding on two sides
    px, py = g.pad
    src = _unique_map(16, 16, 16)
    dy, dx = (1, 3) if px == 0 else (3, 1)
    trg = torch.roll(src, shifts=(dy, dx), dims=(1, 2))
    lo_y, lo_x = (2, 0) if px == 0 else (0, 2)
    rows, cols = np.meshgrid(np.arange(lo_y, lo_y + 11), np.arange(lo_x, lo_x + 11), indexing="ij")
    kps = np.stack([4 * cols.ravel() + 2 - px, 4 * rows.ravel() + 2 - py], 1).astype(np.float64)
    shift = np.array([4 * dx, 4 * dy], dtype=np.float64)
    truth = kps + shift
    assert kps.min() >= 0 and (truth.max(0) < size).all()
    pred = predict_pair(src, trg, g, g, kps)
    assert np.array_equal(pred, truth)
    scores = pck_scores([np.linalg.norm(pred - truth, axis=1)], [48.0], ["x"])
    assert scores.mean == {"0.10": 1.0, "0.05": 1.0, "0.01": 1.0}
    corner = predict_pair(src, trg, g, g, kps, MatchSettings(map_back="corner"))
    assert np.allclose(np.linalg.norm(corner - truth, axis=1), 2 * math.sqrt(2))
    same = predict_pair(src, trg, g, g, kps, MatchSettings(padding="exclude", source_sampling="nearest"))
    assert np.array_equal(same, truth)


def test_padding_in_or_out_of_the_argmax():
    g = Geometry(64, 48)
    src = _unique_map(16, 16, 16)
    trg = _unique_map(16, 16, 16, seed=1)
    trg[:, 0, 5] = src[:, 6, 7]  # the query's feature sits in the target's top padding row
    trg[:, 8, 9] = 0.9 * src[:, 6, 7] + 0.1 * trg[:, 8, 9]  # and nearly in the image
    kp = np.array([[7 * 4 + 1.0, 6 * 4 + 1.0 - 8]])
    inc = predict_pair(src, trg, g, g, kp)
    exc = predict_pair(src, trg, g, g, kp, MatchSettings(padding="exclude"))
    assert inc.tolist() == [[22.0, -6.0]]  # a cell centre in the padding, mapped back above the image
    assert exc.tolist() == [[38.0, 26.0]]


# -- scoring --------------------------------------------------------------------------------------
def test_pck_by_hand():
    errors = [np.array([0.0, 5.0, 10.0, 10.0001]), np.array([1.0, 20.0]), np.array([3.0])]
    s = pck_scores(errors, [100.0, 50.0, 10.0], ["a", "a", "b"], alphas=(0.10, 0.05))
    # alpha 0.10: pair 1 within 10 px: 0, 5, 10 (inclusive) = 3 of 4; pair 2 within 5: 1 of 2; b within 1: none
    assert s.per_category["a"]["0.10"] == pytest.approx(4 / 6)  # per point, not (3/4 + 1/2) / 2
    assert s.per_category["b"]["0.10"] == 0.0
    assert s.mean["0.10"] == pytest.approx((4 / 6 + 0) / 2)  # unweighted mean of categories
    assert s.per_point["0.10"] == pytest.approx(4 / 7)
    assert s.per_pair["0.10"] == pytest.approx((3 / 4 + 1 / 2 + 0) / 3)
    # alpha 0.05: within 5 px: 0, 5 = 2 of 4; within 2.5: 1 of 2
    assert s.per_category["a"]["0.05"] == pytest.approx(3 / 6) and s.mean["0.05"] == pytest.approx(0.25)
    assert s.points == {"a": 6, "b": 1} and s.pairs == {"a": 2, "b": 1}


# -- end to end -----------------------------------------------------------------------------------
def _recompute(report_dir, name, alphas=(0.10, 0.05, 0.01)):
    """PCK from the saved predictions, by hand."""
    with np.load(report_dir / "predictions" / f"{name}.npz") as d:
        counts, pred, truth, thr, cat = d["counts"], d["pred"], d["target"], d["threshold"], d["category"]
    out = {}
    for a in alphas:
        ok = np.linalg.norm(pred - truth, axis=1) <= a * np.repeat(thr, counts)
        cats = np.repeat(cat, counts)
        out[f"pck@{a:.2f}"] = float(np.mean([ok[cats == c].mean() for c in np.unique(cat)]))
    return out


@pytest.mark.slow
def test_spair_end_to_end_through_the_cli(tmp_path, monkeypatch):
    make_spair(tmp_path)
    out, cache = tmp_path / "rep", tmp_path / "cache"
    args = ["probe", "spair", "--root", str(tmp_path / "SPair-71k"), *TOY, "--cache", str(cache), "--out", str(out)]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "PCK@0.10" in result.output and "bilinear (Δ vs lowres)" in result.output and "cat @0.10" in result.output
    data = json.loads((out / "report.json").read_text())
    assert data["format"] == "vitup-correspondence-report/1" and data["reference"] == "lowres"
    assert data["dataset"]["categories"] == ["bird", "cat", "dog"] and data["dataset"]["pairs"]["dog"] == 2
    assert data["dataset"]["points"] == {"bird": 12, "cat": 20 + 18, "dog": 12}
    proto = data["protocol"]
    assert (proto["padding"], proto["map_back"], proto["source_sampling"]) == ("include", "center", "nearest")
    lowres, bilinear = data["results"]
    assert lowres["grid"] == [6, 6] and bilinear["grid"] == [24, 24]
    for cat in ("cat", "bird"):  # whole-cell shifts and identical images: exact for the token grid
        assert lowres["per_category"][cat] == {"0.10": 1.0, "0.05": 1.0, "0.01": 1.0}
    for res in (lowres, bilinear):
        assert res["metrics"] == pytest.approx(_recompute(out, res["name"]))
    assert (out / "pairs.png").is_file() and Image.open(out / "pairs.png").size[0] > 4 * 224
    # the second run extracts and matches nothing
    import vitup_cli.extract

    def no_extraction(*a, **k):
        raise AssertionError("extraction ran on a cached run")

    monkeypatch.setattr(vitup_cli.extract, "run_extract", no_extraction)
    monkeypatch.setattr(corr, "match_category", lambda *a, **k: pytest.fail("matching ran on a cached run"))
    again = runner.invoke(app, [*args, "--overwrite"], env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    assert "reusing" in again.output and "caching features" not in again.output
    data2 = json.loads((out / "report.json").read_text())
    for res in data2["results"]:
        assert all(res["cached"].values()) and all(res["matches_cached"].values())
    assert [r["metrics"] for r in data2["results"]] == [r["metrics"] for r in data["results"]]


def test_a_stopped_run_resumes_with_the_categories_it_finished(tmp_path, monkeypatch):
    make_spair(tmp_path)
    cfg = CorrespondenceConfig("spair", tmp_path, upsamplers=["lowres"], cache=tmp_path / "c", **TOY_CFG)
    real = corr.match_category
    calls = []

    def stop_at_second(pairs, *a, **k):
        calls.append(pairs[0].category)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(pairs, *a, **k)

    monkeypatch.setattr(corr, "match_category", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        run_correspondence(cfg, reporter=SilentReporter())
    monkeypatch.setattr(corr, "match_category", real)
    report = run_correspondence(cfg, reporter=SilentReporter())
    res = report.results[0]
    assert res.matches_cached == {"bird": True, "cat": False, "dog": False}
    assert res.cached == {"bird": True, "cat": True, "dog": False}  # cat's store was done before the stop
    assert res.per_category["cat"]["0.01"] == 1.0


def test_stored_features_are_the_padded_square_resized(tmp_path):
    """The store row equals the upsampler run on the reference's padded canvas, resized to the input."""
    from vitup_cli.data.images import load_image
    from vitup_cli.extract import fit_image
    from vitup_cli.probe.upsamplers import build_upsamplers
    from vitup_cli.stores import open_store

    make_spair(tmp_path)
    small = {**TOY_CFG, "backbone_args": {"depth": 2, "embed_dim": 64, "num_heads": 2}}
    cfg = CorrespondenceConfig("spair", tmp_path, upsamplers=["bilinear"], categories=["bird"], cache=tmp_path / "c",
                               **small)  # fmt: skip
    report = run_correspondence(cfg, reporter=SilentReporter())
    (upsampler, _), *_ = build_upsamplers(cfg, ["bilinear"])
    img = load_image(tmp_path / "SPair-71k" / "JPEGImages" / "bird" / "2009_000001.jpg")  # 80 x 112
    canvas = Image.new("RGB", (112, 112))
    canvas.paste(img, (16, 0))
    x = fit_image(canvas, 96, "squash", resample="bilinear")[0][None]
    with torch.no_grad():
        want = upsampler.eval().features(x, (24, 24))[0].numpy()
    with open_store(report.results[0].stores["bird"]) as store:
        got = store[0].astype(np.float32)
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()


def test_keypoints_layout_end_to_end(tmp_path):
    make_keypoints(tmp_path / "mine")
    out = tmp_path / "rep"
    args = ["probe", "keypoints", "--root", str(tmp_path / "mine"), *TOY, "--upsampler", "lowres",
            "--cache", str(tmp_path / "c"), "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    assert data["dataset"]["categories"] == ["shift", "same"] and data["dataset"]["points"] == {"shift": 20, "same": 20}
    assert data["results"][0]["metrics"] == {"pck@0.10": 1.0, "pck@0.05": 1.0, "pck@0.01": 1.0}
    assert any("whole target image" in n for n in data["dataset"]["notes"])


def test_bad_input_is_one_clear_line(tmp_path, one_line_error):
    make_spair(tmp_path)
    base = ["probe", "spair", "--root", str(tmp_path), *TOY, "--cache", str(tmp_path / "c")]
    one_line_error(runner.invoke(app, ["probe", "spair", "--root", str(tmp_path / "no"), *TOY]), "SPair-71k layout")
    one_line_error(runner.invoke(app, [*base, "--map-back", "middle"]), "--map-back")
    one_line_error(runner.invoke(app, [*base, "--source-sampling", "cubic"]), "--source-sampling")
    one_line_error(runner.invoke(app, [*base, "--alpha", "ten"]), "--alpha")
    one_line_error(runner.invoke(app, [*base, "--alpha", "2"]), "--alpha")
    one_line_error(runner.invoke(app, [*base, "--categories", "horse"]), "--categories horse")
    one_line_error(runner.invoke(app, [*base, "--split", "holdout"]), "--split")
    one_line_error(runner.invoke(app, ["probe", "keypoints", "--root", str(tmp_path), *TOY]), "pairs.json")
    one_line_error(runner.invoke(app, [*base, "--no-cache"]), "--no-cache: not for")
    one_line_error(runner.invoke(app, [*base, "--task", "depth"]), "--task depth: not for")


def test_config_errors_are_user_errors(tmp_path):
    with pytest.raises(VitupError, match="not a correspondence dataset"):
        run_correspondence(CorrespondenceConfig("voc", tmp_path))
    with pytest.raises(VitupError, match="--padding"):
        run_correspondence(CorrespondenceConfig("spair", tmp_path, padding="sometimes"))


def test_unreadable_images_leave_their_pairs_out_and_are_reported(tmp_path):
    base = make_spair(tmp_path)
    (base / "JPEGImages" / "dog" / "2010_000009.jpg").write_bytes(b"not a jpeg")
    (base / "ImageAnnotation" / "dog" / "2010_000009.json").write_text(
        json.dumps({"kps": {"0": [1, 1]}, "bndbox": [0, 0, 5, 5]})
    )
    (base / "PairAnnotation" / "test" / "000098-2010_000001-2010_000009:dog.json").write_text(
        json.dumps({"src_imname": "2010_000001.jpg", "trg_imname": "2010_000009.jpg", "category": "dog"})
    )
    cfg = CorrespondenceConfig("spair", tmp_path, upsamplers=["lowres"], categories=["dog"], cache=tmp_path / "c",
                               out=tmp_path / "rep", **TOY_CFG)  # fmt: skip
    report = run_correspondence(cfg, reporter=SilentReporter())
    assert report.pairs == {"dog": 2}
    assert len(report.skipped) == 1 and "2010_000009.jpg" in report.skipped[0]["reason"]
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["skipped"] == report.skipped


@pytest.mark.slow
def test_a_vitup_checkpoint_is_compared_with_its_original_backbone(tmp_path):
    """With a checkpoint, `vitup` comes from it and the baselines run on its backbone with the LoRA off."""
    from conftest import tiny_vitup

    from vitup_cli.hub import save_checkpoint

    model = tiny_vitup()
    save_checkpoint(tmp_path / "ck" / "last", model)
    make_spair(tmp_path)
    cfg = CorrespondenceConfig("spair", tmp_path, checkpoint=tmp_path / "ck" / "last", categories=["cat"],
                               pretrained="none", res=16, workers=0, device="cpu", cache=tmp_path / "c")  # fmt: skip
    report = run_correspondence(cfg, reporter=SilentReporter())
    assert [r.name for r in report.results] == ["lowres", "bilinear", "vitup"]
    assert report.protocol["input_size"] == model.input_size and report.results[2].grid == [16, 16]
    keys = [
        json.loads(next((tmp_path / "c" / "stores").glob(f"*-{n}-*.json")).read_text()) for n in ("lowres", "vitup")
    ]
    assert keys[0]["teacher"] is True and keys[1]["teacher"] is False
    assert all(0.0 <= v <= 1.0 for r in report.results for v in r.metrics.values())


def test_matching_equals_the_reference_oracle():
    """Same predictions as the ViT-Up reference's ``build_oracle_fun`` (tests/data/spair_oracle/README.md)."""
    from pathlib import Path

    from safetensors.torch import load_file

    data = load_file(Path(__file__).parent / "data" / "spair_oracle" / "oracle.safetensors")
    cases = sorted({k.split(".")[0] for k in data}, key=int)
    assert len(cases) == 12
    for c in cases:
        w1, h1, w2, h2 = data[f"{c}.sizes"].tolist()
        pred = predict_pair(data[f"{c}.source"], data[f"{c}.target"], Geometry(w1, h1), Geometry(w2, h2),
                            data[f"{c}.source_kps"].numpy())  # fmt: skip
        assert np.array_equal(pred, data[f"{c}.reference_pred"].numpy()), c
