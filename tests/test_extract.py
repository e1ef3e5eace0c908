import hashlib
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _extract_helpers import (
    BACKBONE,
    TINY_ARGS,
    _assert_same_store,
    _folder,
    _kill_extract_after,
    _rgb,
    _torchrun_extract,
)
from conftest import TINY, _randomise, single_thread, tiny_vitup
from PIL import Image
from typer.testing import CliRunner

from vitup_cli.cli import app
from vitup_cli.data.images import load_image
from vitup_cli.errors import VitupError
from vitup_cli.extract import (
    ExtractConfig,
    RichReporter,
    SilentReporter,
    box_to_grid,
    dense_features,
    fit_image,
    parse_res,
    run_extract,
)
from vitup_cli.hub import open_upsampler, save_checkpoint
from vitup_cli.models import grid_xy
from vitup_cli.stores import open_store, store_status

runner = CliRunner()
GOOD = [
    "a.jpg",
    "anim.gif",
    "cmyk.tif",
    "gray.png",
    "gray16.png",
    "link.jpg",
    "palette.png",
    "rgba.png",
    "rotated.jpg",
    "sub dir ü/ünïcode name.png",
    "with space.png",
]
BAD = {
    "bomb.png": "pixel limit",
    "broken.png": "broken symbolic link",
    "empty.png": "empty",
    "text.jpg": "not an image",
    "truncated.jpg": "truncated",
}


def _cli(*args, **kw):
    return runner.invoke(app, ["extract", *[str(a) for a in args]], **kw)


def _reference_model(input_size=64, upsampler="bilinear"):
    torch.manual_seed(0)  # what `extract --seed 0 --pretrained none` does before building
    return open_upsampler(upsampler, backbone="dinov3_s", pretrained="none", overrides=TINY, input_size=input_size)


def _fill(model):
    return tuple(round(m * 255) for m in model.backbone.mean.flatten().tolist())


def _store_digest(path):
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(autouse=True)
def one_thread():
    """Runs compared bit for bit use the same number of threads (and small jobs run fastest on one)."""
    with single_thread():
        yield


@pytest.fixture
def mixed(tmp_path, monkeypatch):
    """Every input case of the issue: modes, EXIF, animation, unicode and spaces, symlinks, bad files."""
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(_rgb()).save(root / "a.jpg")
    (root / "sub dir ü").mkdir()
    Image.fromarray(_rgb(seed=1)).save(root / "sub dir ü" / "ünïcode name.png")
    Image.fromarray(_rgb(seed=2)).save(root / "with space.png")
    Image.fromarray((np.random.default_rng(3).random((40, 60)) * 60000).astype(np.uint16)).save(root / "gray16.png")
    Image.fromarray(_rgb(seed=4)).convert("L").save(root / "gray.png")
    Image.fromarray(_rgb(seed=5)).convert("P").save(root / "palette.png")
    Image.fromarray(_rgb(seed=6)).convert("CMYK").save(root / "cmyk.tif")
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (40, 60, 4), np.uint8)).save(root / "rgba.png")
    frames = [Image.fromarray(_rgb(seed=10 + i)).convert("P") for i in range(3)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    rotated = Image.fromarray(_rgb(seed=8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 60 high, 40 wide
    rotated.save(root / "rotated.jpg", exif=exif)
    os.symlink(root / "a.jpg", root / "link.jpg")
    Image.fromarray(_rgb(80, 80)).save(root / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 80 x 80 is over it, 40 x 60 is not
    os.symlink(root / "missing.png", root / "broken.png")
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    data = (root / "a.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


# -- geometry -------------------------------------------------------------------------------------
def test_fit_pad_keeps_aspect_and_records_the_box():
    img = Image.fromarray(_rgb(40, 60))
    x, box = fit_image(img, 64, "pad", fill=(10, 20, 30))
    assert x.shape == (3, 64, 64) and box == (10, 0, 53, 64)
    assert torch.allclose(x[:, 0, 0], torch.tensor([10, 20, 30]) / 255)
    assert torch.allclose(x[:, 63, 32], torch.tensor([10, 20, 30]) / 255)
    inside = x[:, 10:53]
    assert not torch.allclose(inside.mean((1, 2)), torch.tensor([10, 20, 30]) / 255, atol=0.05)
    _tall, box = fit_image(Image.fromarray(_rgb(60, 30)), 64, "pad")
    assert box == (0, 16, 64, 48)


def test_fit_crop_and_squash_fill_the_square():
    img = Image.fromarray(_rgb(40, 60))
    for fit in ("crop", "squash"):
        x, box = fit_image(img, 32, fit)
        assert x.shape == (3, 32, 32) and box == (0, 0, 32, 32)
        assert x.min() >= 0 and x.max() <= 1
    crop, _ = fit_image(Image.fromarray(_rgb(40, 40)), 40, "crop")
    assert torch.equal(crop, torch.from_numpy(_rgb(40, 40)).permute(2, 0, 1).float() / 255)  # no-op crop
    with pytest.raises(VitupError, match="--fit"):
        fit_image(img, 32, "stretch")


def test_box_to_grid_takes_the_cells_whose_centres_are_inside():
    rng = np.random.default_rng(0)
    for _ in range(200):
        size = int(rng.integers(16, 100))
        y0, y1 = sorted(rng.integers(0, size + 1, 2))
        x0, x1 = sorted(rng.integers(0, size + 1, 2))
        gh, gw = (int(v) for v in rng.integers(1, 80, 2))
        got = box_to_grid((y0, x0, y1, x1), size, (gh, gw))
        ys = [i for i in range(gh) if y0 <= (i + 0.5) * size / gh < y1]
        xs = [j for j in range(gw) if x0 <= (j + 0.5) * size / gw < x1]
        if ys:
            assert (got[0], got[2]) == (ys[0], ys[-1] + 1)
        else:
            assert got[0] == got[2]
        if xs:
            assert (got[1], got[3]) == (xs[0], xs[-1] + 1)
        else:
            assert got[1] == got[3]


def test_parse_res():
    assert parse_res("224") == (224, 224) and parse_res("224,160") == (224, 160)
    assert parse_res("96x64") == (96, 64) and parse_res(32) == (32, 32)
    for bad in ("", "a", "1,2,3", "0", "-4"):
        with pytest.raises(VitupError, match="--res"):
            parse_res(bad)


# -- dense features ---------------------------------------------------------------------------------
def test_dense_features_bounds_chunks_without_changing_results():
    model = _randomise(tiny_vitup(seed=3))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.features(x, (6, 8))
    for chunk in (8, 17, 1000):  # one row, two rows, everything per decode call
        got, _ = dense_features(model, x, (6, 8), chunk_queries=chunk, dtype=torch.float32)
        assert torch.allclose(got, ref, atol=1e-5)
    half, _ = dense_features(model, x, (6, 8), chunk_queries=17)
    assert half.dtype == torch.float16 and torch.equal(half, ref.half())
    bil = _reference_model()
    got, tokens = dense_features(bil, x, (20, 24), dtype=torch.float32, with_tokens=True)
    with torch.no_grad():
        assert torch.allclose(got, bil.features(x, (20, 24)), atol=1e-6)
        assert torch.allclose(tokens, bil.tokens(x), atol=1e-6)


# -- the command on every input case ------------------------------------------------------------------
def test_every_input_case_good_ones_extracted_bad_ones_reported(mixed, tmp_path):
    out = tmp_path / "feats.zarr"
    result = _cli(mixed, "--out", out, "--res", "32", "--batch-size", "4", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    for name, reason in BAD.items():
        assert name in result.stderr and reason in result.stderr
    assert "warning" in result.stderr and "5 image(s) could not be read" in result.stderr
    assert "per image" in result.stderr  # the size estimate, before starting
    assert "11 done, 5 failed" in result.stdout
    model = _reference_model()
    with open_store(out) as store:
        assert store.paths == sorted(GOOD + list(BAD), key=lambda p: p)
        assert "notes.txt" not in store.paths
        status = dict(zip(store.paths, store.status.tolist(), strict=True))
        assert all(status[n] == 1 for n in GOOD) and all(status[n] == 2 for n in BAD)
        errors = dict(zip(store.paths, store.errors, strict=True))
        assert all(reason in errors[name] for name, reason in BAD.items())
        assert {f["path"] for f in store.attrs["failed"]} == set(BAD)
        sizes = dict(zip(store.paths, store.sizes.tolist(), strict=True))
        assert sizes["a.jpg"] == [40, 60] and sizes["rotated.jpg"] == [60, 40]  # EXIF applied
        valid = dict(zip(store.paths, store.valid.tolist(), strict=True))
        assert valid["a.jpg"] == [5, 0, 26, 32] and valid["rotated.jpg"] == [0, 5, 32, 26]
        attrs = store.attrs
        assert attrs["random_init"] is True and "random init" in attrs["weights_id"] and attrs["seed"] == 0
        assert attrs["upsampler"] == "bilinear" and attrs["res"] == [32, 32] and attrs["fit"] == "pad"
        assert attrs["tap"] == 2 and attrs["input_size"] == 64 and attrs["dtype"] == "float16"
        assert attrs["backbone"]["timm_name"] == "vit_small_patch16_dinov3" and attrs["complete"] is True
        assert "extract" in attrs["command"] and attrs["normalization"]["mean"][0] == pytest.approx(0.485)
        for name in ("a.jpg", "sub dir ü/ünïcode name.png", "cmyk.tif", "gray16.png"):
            x, _ = fit_image(load_image(mixed / name), 64, "pad", _fill(model))
            with torch.no_grad():
                ref = model.features(x[None], (32, 32))[0].half().float().numpy()
            got = store[store.paths.index(name)]
            assert got.shape == (64, 32, 32) and np.allclose(got, ref, atol=2e-3), name
        assert np.array_equal(store[store.paths.index("link.jpg")], store[store.paths.index("a.jpg")])
        assert np.isnan(store[store.paths.index("empty.png")]).all()


def test_strict_stops_at_the_first_bad_file(mixed, tmp_path, one_line_error):
    result = _cli(mixed, "--out", tmp_path / "s.zarr", "--res", "16", "--strict", *TINY_ARGS)
    one_line_error(result, "bomb.png", "pixel limit", "--strict", alone=False)
    assert "empty.png" not in result.stderr


def test_missing_and_empty_inputs_are_one_clear_error(tmp_path, one_line_error):
    (tmp_path / "empty").mkdir()
    for source, message in ((tmp_path / "nope", "no such file"), (tmp_path / "empty", "no images found")):
        one_line_error(_cli(source, "--out", tmp_path / "x.zarr", *TINY_ARGS), message)
        assert not (tmp_path / "x.zarr").exists()
    one_line_error(_cli(tmp_path, "--out", tmp_path / "x.npy", *TINY_ARGS), "NAME.zarr")


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_existing_store_is_untouched_without_flags(tmp_path, suffix):
    images = _folder(tmp_path / "in")
    out = tmp_path / f"f{suffix}"
    assert _cli(images, "--out", out, "--res", "16", *TINY_ARGS).exit_code == 0
    before = _store_digest(out)
    result = _cli(images, "--out", out, "--res", "16", *TINY_ARGS)
    assert result.exit_code == 2 and "already exists" in result.stderr and "--resume" in result.stderr
    result = _cli(images, "--out", out, "--res", "16", "--overwrite", "--resume", *TINY_ARGS)
    assert result.exit_code == 2 and "contradict" in result.stderr
    assert _store_digest(out) == before
    result = _cli(images, "--out", out, "--res", "8", "--overwrite", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    with open_store(out) as store:
        assert store.shape == (6, 64, 8, 8)


def test_resume_with_other_settings_or_inputs_is_refused(tmp_path):
    images = _folder(tmp_path / "in")
    out = tmp_path / "f.zarr"
    assert _cli(images, "--out", out, "--res", "16", *TINY_ARGS).exit_code == 0
    before = _store_digest(out)
    for extra, word in (
        (["--res", "8"], "res"),
        (["--res", "16", "--fit", "crop"], "fit"),
        (["--res", "16", "--dtype", "float32"], "dtype"),
        (["--res", "16", "--seed", "1"], "model_sha256"),
        (["--res", "16", "--batch-size", "3"], "batch_size"),
    ):
        result = _cli(images, "--out", out, "--resume", *extra, *TINY_ARGS)
        assert result.exit_code == 2 and "settings differ" in result.stderr and word in result.stderr, extra
    Image.fromarray(_rgb(seed=99)).save(images / "new.png")
    result = _cli(images, "--out", out, "--resume", "--res", "16", *TINY_ARGS)
    assert result.exit_code == 2 and "inputs" in result.stderr
    assert _store_digest(out) == before
    (images / "new.png").unlink()
    result = _cli(images, "--out", out, "--resume", "--res", "16", *TINY_ARGS)  # same settings: nothing to do
    assert result.exit_code == 0 and "0 images in" in result.stdout and "6 skipped" in result.stdout


def test_disk_space_preflight(tmp_path, monkeypatch):
    images = _folder(tmp_path / "in")
    monkeypatch.setattr(
        "vitup_cli.extract.shutil.disk_usage", lambda path: SimpleNamespace(total=10, used=9, free=1000)
    )
    result = _cli(images, "--out", tmp_path / "f.zarr", "--res", "16", *TINY_ARGS)
    assert result.exit_code == 2 and "needs about" in result.stderr and "--force" in result.stderr
    assert not (tmp_path / "f.zarr").exists()
    result = _cli(images, "--out", tmp_path / "f.zarr", "--res", "16", "--force", *TINY_ARGS)
    assert result.exit_code == 0 and "continuing: --force" in result.stderr


def test_workers_hdf5_and_zarr_give_the_same_features(tmp_path):
    images = _folder(tmp_path / "in", n=7)
    base = ["--res", "24,20", "--batch-size", "3", *BACKBONE, "--upsampler", "bilinear", "--input-size", "64"]
    assert _cli(images, "--out", tmp_path / "a.zarr", *base, "--workers", "0").exit_code == 0
    assert _cli(images, "--out", tmp_path / "b.zarr", *base, "--workers", "2").exit_code == 0
    assert _cli(images, "--out", tmp_path / "c.h5", *base, "--workers", "0").exit_code == 0
    _assert_same_store(tmp_path / "a.zarr", tmp_path / "b.zarr")
    with open_store(tmp_path / "a.zarr") as a, open_store(tmp_path / "c.h5") as c:
        assert a.shape == c.shape == (7, 64, 24, 20)
        assert np.array_equal(a[0:7], c[0:7]) and a.paths == c.paths and np.array_equal(a.valid, c.valid)


def test_vitup_checkpoint_tap_and_tokens(tmp_path):
    images = _folder(tmp_path / "in", n=3)
    model = _randomise(tiny_vitup(seed=4))
    ckpt = save_checkpoint(tmp_path / "run" / "last", model)
    out = tmp_path / "v.zarr"
    args = ["--checkpoint", ckpt, "--res", "20", "--chunk-queries", "45", "--tokens", "--workers", "0", "--dtype"]
    result = _cli(images, "--out", out, *args, "float32")
    assert result.exit_code == 0, result.output
    x = torch.stack([fit_image(load_image(p), 64, "pad", _fill(model))[0] for p in sorted(images.iterdir())])
    with torch.no_grad(), open_store(out) as store:
        assert np.allclose(store[0:3], model.features(x, 20).numpy(), atol=1e-5)
        with model.backbone.adapters_disabled():
            teacher_tokens = model.tokens(x)
        assert np.allclose(store.lowres(1), teacher_tokens[1].numpy(), atol=1e-5)
        assert not np.allclose(store.lowres(1), model.encode(x).states[-1][1].numpy(), atol=1e-4)
        assert store.attrs["upsampler"] == "vitup" and len(store.attrs["checkpoint_sha256"]) == 64
    assert model.backbone.taps == [0, 0, 1, 1, 1, 2, 2]  # 2 blocks: decoders 0-1 map into tap 0's space
    result = _cli(images, "--out", tmp_path / "t.zarr", *args, "float32", "--tap", "3")
    assert result.exit_code == 2 and "--tap 3" in result.stderr
    assert _cli(images, "--out", tmp_path / "t.zarr", *args, "float32", "--tap", "0").exit_code == 0
    with torch.no_grad(), open_store(tmp_path / "t.zarr") as store:
        ref = model.decode(model.encode(x), grid_xy(20, 20).expand(3, -1, -1), [model.level_of(0)])[0]
        assert np.allclose(store[0:3], ref.transpose(1, 2).reshape(3, 64, 20, 20).numpy(), atol=1e-5)
        assert store.attrs["tap"] == 0


def test_failed_overwrite_keeps_the_old_store(tmp_path, monkeypatch):
    images = _folder(tmp_path / "in")
    out = tmp_path / "f.zarr"
    assert _cli(images, "--out", out, "--res", "16", *TINY_ARGS).exit_code == 0
    before = _store_digest(out)
    monkeypatch.setattr(
        "vitup_cli.extract.shutil.disk_usage", lambda path: SimpleNamespace(total=10, used=9, free=1000)
    )
    result = _cli(images, "--out", out, "--res", "64", "--overwrite", *TINY_ARGS)
    assert result.exit_code == 2 and "needs about" in result.stderr
    assert _store_digest(out) == before


def test_explicit_upsampler_with_a_checkpoint_is_refused(tmp_path):
    images = _folder(tmp_path / "in", n=2)
    ckpt = save_checkpoint(tmp_path / "run" / "last", tiny_vitup())
    result = _cli(images, "--out", tmp_path / "x.zarr", "--checkpoint", ckpt, "--upsampler", "bilinear")
    assert result.exit_code == 2 and "--upsampler bilinear cannot be combined" in result.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_lowres_upsampler_stores_the_token_grid(tmp_path):
    images = _folder(tmp_path / "in", n=2)
    out = tmp_path / "l.h5"
    assert _cli(images, "--out", out, "--res", "99", *TINY_ARGS, "--upsampler", "lowres").exit_code == 0
    with open_store(out) as store:
        assert store.shape == (2, 64, 4, 4) and store.attrs["res"] == [4, 4]


def test_pca_stores_round_trip_through_their_projection(tmp_path):
    images = _folder(tmp_path / "in", n=5)
    common = ["--res", "12", "--dtype", "float32", *TINY_ARGS]
    assert _cli(images, "--out", tmp_path / "full.zarr", *common).exit_code == 0
    assert _cli(images, "--out", tmp_path / "k64.zarr", *common, "--pca", "64").exit_code == 0
    result = _cli(images, "--out", tmp_path / "k8.h5", *common, "--pca", "8", "--pca-images", "3")
    assert result.exit_code == 0, result.output
    with open_store(tmp_path / "full.zarr") as full, open_store(tmp_path / "k64.zarr") as k64:
        comps, mean = k64.pca
        assert comps.shape == (64, 64) and np.allclose(comps @ comps.T, np.eye(64), atol=1e-4)
        assert np.allclose(k64.unproject(k64[2]), full[2], atol=1e-4)  # all components: lossless
        assert np.allclose(k64.unproject(k64[0:5]), full[0:5], atol=1e-4)
    with open_store(tmp_path / "full.zarr") as full, open_store(tmp_path / "k8.h5") as k8:
        comps, mean = k8.pca
        assert k8.shape == (5, 8, 12, 12) and k8.attrs["pca"] == {"components": 8, "images": 3}
        projected = np.einsum("kc,nchw->nkhw", comps, full[0:5] - mean[:, None, None])
        assert np.allclose(k8[0:5], projected, atol=1e-4)
        # the stored components span the top principal subspace of the sampled images' real pixels
        sample = []
        for i in (0, 2, 4):  # --pca-images 3 of 5: evenly spaced
            y0, x0, y1, x1 = full.valid[i]
            sample.append(full[i][:, y0:y1, x0:x1].reshape(64, -1))
        vectors = np.concatenate(sample, 1).astype(np.float64)
        assert np.allclose(mean, vectors.mean(1), atol=1e-4)
        eigvals, eigvecs = np.linalg.eigh(np.cov(vectors, bias=True))
        top = eigvecs[:, ::-1][:, :8]
        assert eigvals[-8] > 1.01 * eigvals[-9]  # a gap, so the subspace is well defined
        assert np.allclose(comps.T @ comps, top @ top.T, atol=1e-3)
    result = _cli(images, "--out", tmp_path / "bad.zarr", *common, "--pca", "65")
    assert result.exit_code == 2 and "only 64 channels" in result.stderr


def test_rich_progress_and_resume_of_a_finished_hdf5_store(tmp_path):
    images = _folder(tmp_path / "in", n=3)
    config = ExtractConfig(
        images, tmp_path / "r.h5", res=(8, 8), backbone="dinov3_s", pretrained="none", backbone_args=TINY,
        upsampler="bilinear", input_size=64, workers=0,
    )  # fmt: skip
    assert run_extract(config, reporter=RichReporter()).done == 3
    before = _store_digest(tmp_path / "r.h5")
    config.resume = True
    summary = run_extract(config, reporter=RichReporter())
    assert (summary.skipped, summary.processed, summary.done) == (3, 0, 3)
    assert _store_digest(tmp_path / "r.h5") == before  # a finished HDF5 file is not reopened for writing


def test_api_returns_a_summary(tmp_path):
    images = _folder(tmp_path / "in", n=5)
    config = ExtractConfig(
        images, tmp_path / "api.h5", res=(8, 8), backbone="dinov3_s", pretrained="none", backbone_args=TINY,
        upsampler="bilinear", input_size=64, workers=0, batch_size=2,
    )  # fmt: skip
    summary = run_extract(config, reporter=SilentReporter())
    assert (summary.total, summary.done, summary.failed, summary.skipped, summary.processed) == (5, 5, 0, 0, 5)
    assert summary.format == "hdf5" and summary.bytes_on_disk > 0 and summary.images_per_s > 0
    assert summary.estimate_bytes == 5 * 64 * 8 * 8 * 2


# -- crash and resume, torchrun: whole processes -----------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(("suffix", "writer_threads"), [(".zarr", "4"), (".zarr", "0"), (".h5", "4")])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, suffix, writer_threads):
    """Killed at any moment and resumed, a store equals an uninterrupted run; the reference is written by
    zarr's own codec pipeline (``--writer-threads 0``), so the threaded writer is checked against it too."""
    images = _folder(tmp_path / "in", n=24)
    (images / "zz broken.jpg").write_text("not an image")  # a failed row must survive the crash too
    model = _randomise(tiny_vitup(seed=2))
    ckpt = save_checkpoint(tmp_path / "run" / "last", model)
    base = ["--checkpoint", ckpt, "--res", "32", "--batch-size", "2", "--workers", "1"]
    args = [*base, "--writer-threads", writer_threads]
    reference, killed = tmp_path / f"ref{suffix}", tmp_path / f"killed{suffix}"
    assert _cli(images, "--out", reference, *base, "--writer-threads", "0").exit_code == 0
    left = _kill_extract_after(images, killed, args, 4, poll_s=0.01)
    assert 0 < left < 25, "the kill should leave some rows pending"
    status = store_status(killed)
    result = _cli(images, "--out", killed, *args)  # no flag: refused, store untouched
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert np.array_equal(store_status(killed), status)
    result = _cli(images, "--out", killed, *args, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.stderr and f"{25 - left} skipped" in result.stdout
    _assert_same_store(reference, killed)
    with open_store(killed) as store:
        assert store.attrs["failed"] == [{"path": "zz broken.jpg", "reason": "not an image Pillow can read"}]
        assert len(store.attrs["resumed"]) == 1


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_torchrun_two_processes_equal_one(tmp_path, suffix):
    images = _folder(tmp_path / "in", n=11)
    (images / "bad.png").write_bytes(b"")
    args = ["--res", "24", "--batch-size", "2", "--tokens", *TINY_ARGS]
    single, double = tmp_path / f"one{suffix}", tmp_path / f"two{suffix}"
    assert _cli(images, "--out", single, *args).exit_code == 0
    result = _torchrun_extract(images, double, args)
    assert "11 done, 1 failed" in result.stdout and result.stdout.count("done,") == 1  # rank 0 reports
    _assert_same_store(single, double)


def test_retry_failed_reruns_only_the_failed_shards(tmp_path):
    images = _folder(tmp_path / "in", n=6)
    good = (images / "img03.png").read_bytes()
    (images / "img03.png").write_bytes(b"")  # fails in the first run
    args = ["--res", "8", "--batch-size", "2", *TINY_ARGS]
    store, reference = tmp_path / "s.zarr", tmp_path / "ref.zarr"
    assert "5 done, 1 failed" in _cli(images, "--out", store, *args).stdout
    assert _cli(images, "--out", store, *args, "--retry-failed", "--overwrite").exit_code == 2
    (images / "img03.png").write_bytes(good)  # the user fixed it
    result = _cli(images, "--out", store, *args, "--retry-failed")
    assert result.exit_code == 0, result.output
    assert "6 done, 0 failed, 4 skipped" in result.stdout  # only the failed row's shard (2 rows) ran again
    assert _cli(images, "--out", reference, *args).exit_code == 0
    _assert_same_store(reference, store)
    missing = _cli(images, "--out", tmp_path / "none.zarr", *args, "--retry-failed")
    assert missing.exit_code == 2 and "no failed rows" in missing.stderr


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_global_vectors_come_from_the_same_pass(tmp_path, suffix):
    images = _folder(tmp_path / "in", n=3)
    (images / "img09.png").write_bytes(b"")
    for kind in ("cls", "mean"):
        out = tmp_path / f"{kind}{suffix}"
        result = _cli(images, "--out", out, "--res", "8", "--global", kind, *TINY_ARGS)
        assert result.exit_code == 0, result.output
        model = _reference_model()
        with open_store(out) as store:
            vectors = store.global_vectors
            assert vectors.shape == (4, 64) and np.isnan(vectors[3]).all()  # the failed row
            for i, rel in enumerate(store.paths[:3]):
                x, _ = fit_image(load_image(images / rel), 64, "pad", fill=_fill(model))
                with torch.no_grad():
                    model.backbone.hidden_states(model.prepare(x[None]), [model.backbone.taps[-1]])
                expected = model.backbone.last_pooled[model.backbone.taps[-1]][kind][0].numpy()
                np.testing.assert_allclose(vectors[i], expected, rtol=1e-4, atol=1e-5)
    import xarray as xr

    if suffix == ".zarr":
        ds = xr.open_zarr(tmp_path / "cls.zarr")
        assert ds["global"].dims == ("image", "channel") and ds["global"].attrs["kind"] == "cls"
    bad = _cli(images, "--out", tmp_path / "x.zarr", "--res", "8", "--global", "max", *TINY_ARGS)
    assert bad.exit_code == 2 and "--global max" in bad.stderr


@pytest.mark.parametrize(("workers", "depth"), [(1, 2), (2, 1), (3, 2)])
def test_background_writer_is_bounded_by_backpressure(workers, depth):
    """With a store slower than the model, ``submit`` blocks once ``depth`` shards wait and ``workers`` are
    being written: outstanding shards (and their memory) never exceed ``depth + workers``."""
    import threading

    from vitup_cli.extract import BackgroundWriter
    from vitup_cli.progress import NullReporter

    gate = threading.Event()
    lock = threading.Lock()
    state = {"writing": 0, "most_writing": 0, "written": []}

    class SlowStore:
        def write_shard(self, shard, **rows):
            with lock:
                state["writing"] += 1
                state["most_writing"] = max(state["most_writing"], state["writing"])
            gate.wait(timeout=30)
            with lock:
                state["writing"] -= 1
                state["written"].append(shard)

    background = BackgroundWriter(SlowStore(), NullReporter(), depth=depth, workers=workers)
    submitted = []
    rows = {"status": np.ones(2, np.uint8)}

    def produce():
        for k in range(10):
            background.submit(k, rows)
            submitted.append(k)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    deadline = time.time() + 10
    while len(submitted) < depth + workers and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # room for a submit that should have blocked to go through
    assert len(submitted) == depth + workers and producer.is_alive()  # blocked: backpressure
    assert state["writing"] == workers and background._queue.qsize() == depth
    gate.set()
    producer.join(timeout=30)
    background.close()
    assert sorted(state["written"]) == list(range(10)) and background.rows == 20
    assert state["most_writing"] == workers
