"""`run_probe` end to end on tiny generated datasets: every layout, learning, streaming, caching, reports."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from probe_fixtures import make_ade20k, make_cityscapes, make_cocostuff, make_folder, make_voc
from safetensors.torch import load_file

import vitup_cli.probe.cache as probe_cache
from vitup_cli.errors import VitupError
from vitup_cli.probe import ProbeConfig, run_probe
from vitup_cli.probe.report import results_table
from vitup_cli.probe.train import StoreFeatures, TrainSettings, fit_head
from vitup_cli.progress import SilentReporter

TINY = {
    "backbone": "dinov3_s",
    "pretrained": "none",
    "backbone_args": {"depth": 2, "embed_dim": 64, "num_heads": 1},
    "input_size": 64,
    "res": 16,
    "crop": 32,
    "workers": 0,
    "device": "cpu",
}


def _config(tmp_path, dataset, root, **kw):
    """Runs share one report folder (these tests rerun on purpose, e.g. to reuse the cache)."""
    defaults = {"cache": tmp_path / "cache", "out": tmp_path / "out", "overwrite": True}
    return ProbeConfig(dataset, root, **{**defaults, **TINY, **kw})


@pytest.fixture
def count_extractions(monkeypatch):
    calls = []
    real = probe_cache.run_extract

    def counting(config, *args, **kwargs):
        calls.append(str(config.out))
        return real(config, *args, **kwargs)

    monkeypatch.setattr(probe_cache, "run_extract", counting)  # the probe's cache runs every extraction
    return calls


@pytest.mark.parametrize(
    ("maker", "name", "k"),
    [(make_voc, "voc", 21), (make_ade20k, "ade20k", 151), (make_cityscapes, "cityscapes", 19),
     (make_cocostuff, "cocostuff", 27), (make_folder, "folder", 3)],
)  # fmt: skip
def test_end_to_end_in_every_layout(tmp_path, maker, name, k):
    maker(tmp_path / "data")
    report = run_probe(_config(tmp_path, name, tmp_path / "data", epochs=2), reporter=SilentReporter())
    (res,) = report.results
    assert res.name == "bilinear" and len(report.class_names) == k
    assert 0 <= res.metrics["accuracy"] <= 1 and 0 <= res.metrics["miou"] <= 1
    assert len(res.epoch_loss) == 2 and all(math.isfinite(v) for v in res.epoch_loss)
    conf = np.array(res.confusion)
    assert conf.shape == (k, k) and conf.sum() > 0
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["dataset"]["name"] == name and data["results"][0]["metrics"]["miou"] == pytest.approx(
        res.metrics["miou"]
    )
    assert data["protocol"]["crop"] == 32 and data["protocol"]["res"] == 16 and data["protocol"]["epochs"] == 2
    assert (tmp_path / "out" / "predictions.png").is_file()
    head = load_file(tmp_path / "out" / "heads" / "bilinear.safetensors")
    assert head["conv.weight"].shape == (k, 64, 1, 1)
    # ignore pixels (255) are never scored: the confusion matrix counts only labelled val pixels
    from vitup_cli.probe.datasets import open_splits

    _, val = open_splits(name, tmp_path / "data", limit=None)
    assert conf.sum() <= 32 * 32 * len(val)


def test_a_probe_learns_colour_classes(tmp_path):
    make_folder(tmp_path / "data", n_train=12, n_val=6, classes=3)
    report = run_probe(_config(tmp_path, "folder", tmp_path / "data", epochs=12), reporter=SilentReporter())
    res = report.results[0]
    base = report.baseline
    assert base["miou"] < 0.3
    assert res.metrics["miou"] > base["miou"] + 0.4, (res.metrics, base)
    assert res.metrics["accuracy"] > 0.8
    assert res.epoch_loss[-1] < res.epoch_loss[0]


def test_second_run_reuses_the_cached_stores(tmp_path, count_extractions):
    make_folder(tmp_path / "data")
    config = _config(tmp_path, "folder", tmp_path / "data", epochs=2)
    first = run_probe(config, reporter=SilentReporter())
    assert len(count_extractions) == 2  # train and val
    assert first.results[0].cached == {"train": False, "val": False}
    stores = list((tmp_path / "cache" / "stores").glob("*.zarr"))
    stamps = {p: sorted((f, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file()) for p in stores}
    second = run_probe(config, reporter=SilentReporter())
    assert len(count_extractions) == 2  # no extraction the second time
    assert second.results[0].cached == {"train": True, "val": True}
    assert {p: sorted((f, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file()) for p in stores} == stamps
    assert second.results[0].metrics == first.results[0].metrics
    # other settings are other stores
    run_probe(_config(tmp_path, "folder", tmp_path / "data", epochs=2, res=8), reporter=SilentReporter())
    assert len(count_extractions) == 4


def test_an_interrupted_store_is_resumed(tmp_path, count_extractions):
    import zarr

    make_folder(tmp_path / "data")
    config = _config(tmp_path, "folder", tmp_path / "data", epochs=1)
    full = run_probe(config, reporter=SilentReporter())
    train_store = full.results[0].stores["train"]
    # as if the run had been killed: rows left pending, the store never finished
    group = zarr.open_group(train_store, mode="r+", use_consolidated=False)
    group["status"][4:] = 0
    group.attrs["complete"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(train_store)
    again = run_probe(config, reporter=SilentReporter())
    assert again.results[0].cached == {"train": False, "val": True}
    assert count_extractions[-1] == train_store
    assert again.results[0].metrics == full.results[0].metrics


def test_streaming_matches_the_in_memory_path(tmp_path):
    make_folder(tmp_path / "data")
    in_memory = run_probe(_config(tmp_path, "folder", tmp_path / "data", epochs=3), reporter=SilentReporter())
    streamed = run_probe(
        _config(tmp_path, "folder", tmp_path / "data", epochs=3, memory_budget=0, out=tmp_path / "out2"),
        reporter=SilentReporter(),
    )
    assert in_memory.results[0].streamed == {"train": False, "val": False}
    assert streamed.results[0].streamed == {"train": True, "val": True}
    assert streamed.results[0].metrics == in_memory.results[0].metrics
    assert streamed.results[0].epoch_loss == in_memory.results[0].epoch_loss
    a = load_file(tmp_path / "out" / "heads" / "bilinear.safetensors")
    b = load_file(tmp_path / "out2" / "heads" / "bilinear.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_streaming_holds_one_batch_at_a_time(tmp_path):
    """A store larger than the memory budget is read row by row: never more than a batch in RAM."""
    make_folder(tmp_path / "data", n_train=10)
    report = run_probe(_config(tmp_path, "folder", tmp_path / "data", epochs=1), reporter=SilentReporter())
    store_path = report.results[0].stores["train"]
    from vitup_cli.probe.cache import Targets

    targets = np.load(next((tmp_path / "cache" / "targets").glob("folder-train-*[0-9a-f].npy")), mmap_mode="r")
    assert isinstance(targets, np.memmap)
    settings = TrainSettings(epochs=2, batch_size=3, lr=2e-3)
    streamed = StoreFeatures(store_path, memory_budget=1024)  # far smaller than the store
    assert not streamed.in_memory and streamed.nbytes > 1024
    fit_s = fit_head(streamed, targets, settings, 3)
    assert streamed.rows_read == 2 * 10 and streamed.max_rows_held == 3
    held = StoreFeatures(store_path, memory_budget=1 << 30)
    assert held.in_memory and held.rows_read == 10
    fit_m = fit_head(held, targets, settings, 3)
    assert held.rows_read == 10  # nothing more read from disk
    for key, value in fit_s.head.state_dict().items():
        torch.testing.assert_close(value, fit_m.head.state_dict()[key], atol=0, rtol=0)
    assert Targets  # the targets of a split stream from a memory-mapped file too


def test_several_upsamplers_side_by_side(tmp_path):
    from rich.console import Console

    make_folder(tmp_path / "data")
    report = run_probe(
        _config(tmp_path, "folder", tmp_path / "data", epochs=2, upsamplers=["bilinear", "nearest", "lowres"]),
        reporter=SilentReporter(),
    )
    assert [r.name for r in report.results] == ["bilinear", "nearest", "lowres"]
    console = Console(width=200, record=True, color_system=None)
    console.print(results_table(report))
    text = console.export_text()
    assert "nearest (Δ vs bilinear)" in text and "lowres (Δ vs bilinear)" in text
    ref, other = report.results[0].metrics["miou"], report.results[1].metrics["miou"]
    assert f"({100 * (other - ref):+.2f})" in text
    assert "majority class" in text and "IoU class 2" in text
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["reference"] == "bilinear" and len(data["results"]) == 3
    assert sorted(p.name for p in (tmp_path / "out" / "heads").iterdir()) == [
        "bilinear.safetensors", "lowres.safetensors", "nearest.safetensors",
    ]  # fmt: skip


def test_no_cache_computes_the_same_features_on_the_fly(tmp_path, count_extractions):
    make_folder(tmp_path / "data")
    cached = run_probe(
        _config(tmp_path, "folder", tmp_path / "data", epochs=2, dtype="float32", flip=False),
        reporter=SilentReporter(),
    )
    live = run_probe(
        _config(tmp_path, "folder", tmp_path / "data", epochs=2, flip=False, no_cache=True, cache=tmp_path / "c2"),
        reporter=SilentReporter(),
    )
    assert len(count_extractions) == 2  # only the cached run extracted
    assert not list((tmp_path / "c2").glob("stores/*.zarr"))
    assert live.results[0].stores == {"train": None, "val": None}
    for key, value in cached.results[0].metrics.items():
        assert live.results[0].metrics[key] == pytest.approx(value, abs=1e-4)


def test_depth_probe_end_to_end(tmp_path):
    make_folder(tmp_path / "data", task="depth", n_train=8, n_val=4)
    report = run_probe(_config(tmp_path, "folder", tmp_path / "data", task="depth"), reporter=SilentReporter())
    res = report.results[0]
    assert report.protocol["epochs"] == 5 and report.protocol["lr"] == 5e-3  # the depth defaults
    assert set(res.metrics) >= {"d1", "d2", "d3", "abs_rel", "rmse"}
    assert 0 <= res.metrics["d1"] <= res.metrics["d2"] <= res.metrics["d3"] <= 1
    assert res.metrics["rmse"] > 0 and res.metrics["images"] == 4
    assert res.epoch_loss[-1] < res.epoch_loss[0]
    head = load_file(tmp_path / "out" / "heads" / "bilinear.safetensors")
    assert head["conv.weight"].shape == (256, 128, 1, 1)  # [features, CLS] -> 256 bins
    assert list((tmp_path / "cache" / "stores").glob("*.cls.npy"))
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["baseline"] is None and data["results"][0]["metrics"]["rmse"] == pytest.approx(res.metrics["rmse"])


@pytest.mark.slow
def test_a_depth_probe_learns(tmp_path):
    """Past the SigLoss warm-up, the binned head beats predicting the median training depth everywhere."""
    from vitup_cli.probe.metrics import DepthMetrics
    from vitup_cli.probe.train import evaluate

    make_folder(tmp_path / "data", task="depth", n_train=8, n_val=4)
    report = run_probe(
        _config(tmp_path, "folder", tmp_path / "data", task="depth", epochs=1), reporter=SilentReporter()
    )
    res = report.results[0]
    targets = {
        split: np.load(next((tmp_path / "cache" / "targets").glob(f"folder-{split}-depth-*[0-9a-f].npy")))
        for split in ("train", "val")
    }
    cls = {s: np.load(res.stores[s].replace(".zarr", ".cls.npy")) for s in ("train", "val")}
    settings = TrainSettings(task="depth", epochs=40, lr=5e-3, warm_up_iters=0)
    fit = fit_head(StoreFeatures(res.stores["train"], 1 << 30), targets["train"], settings, cls=cls["train"])
    got = evaluate(fit.head, StoreFeatures(res.stores["val"], 1 << 30), targets["val"], settings, cls=cls["val"])
    constant = DepthMetrics()
    train = targets["train"]
    constant.update(np.full(targets["val"].shape, np.median(train[train > 0]), np.float32), targets["val"])
    ours, base = got.metrics(), constant.scores()
    assert ours["abs_rel"] < 0.5 * base["abs_rel"] and ours["d1"] > base["d1"] + 0.08, (ours, base)
    assert ours["rmse"] < base["rmse"]


def test_checkpoint_probe_compares_vitup_with_the_original_backbone(tmp_path):
    """With a ViT-Up checkpoint, `bilinear` runs on the checkpoint's backbone with the LoRA adapters off."""
    from conftest import tiny_vitup

    from vitup_cli.hub import save_checkpoint
    from vitup_cli.models import build_upsampler
    from vitup_cli.stores import open_store

    model = tiny_vitup()
    with torch.no_grad():
        for name, p in model.backbone.lora_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapted backbone != teacher
    save_checkpoint(tmp_path / "ck" / "last", model)
    make_folder(tmp_path / "data", n_train=4, n_val=2)
    cfg = {**TINY, "input_size": None}
    report = run_probe(
        ProbeConfig("folder", tmp_path / "data", checkpoint=tmp_path / "ck" / "last", upsamplers=["vitup", "bilinear"],
                    cache=tmp_path / "cache", out=tmp_path / "out", epochs=1, **cfg),
        reporter=SilentReporter(),
    )  # fmt: skip
    assert [r.name for r in report.results] == ["vitup", "bilinear"]
    assert report.results[0].input_size == model.input_size
    from vitup_cli.data.images import load_image
    from vitup_cli.extract import fit_image
    from vitup_cli.probe.datasets import open_splits

    train, _ = open_splits("folder", tmp_path / "data")
    x = fit_image(load_image(train.images[0]), model.input_size, "crop", resample="bilinear")[0][None]
    bil = build_upsampler("bilinear", model.backbone, input_size=model.input_size)
    with torch.no_grad():
        with model.backbone.adapters_disabled():
            teacher = bil.features(x, 16)[0].numpy()
        adapted = bil.features(x, 16)[0].numpy()
    with open_store(report.results[1].stores["train"]) as store:
        stored = store[0]
        assert store.attrs["settings"]["resample"] == "bilinear"  # the probe protocol's image resizing
    assert np.abs(stored - teacher).max() < 2e-2 < np.abs(stored - adapted).max()


def test_bad_settings_are_user_errors(tmp_path):
    make_folder(tmp_path / "data")
    bad = [
        {"upsamplers": ["vitup"]},
        {"upsamplers": ["bilinear", "bilinear"]},
        {"upsamplers": ["bicubic"]},
        {"schedule": "step"},
        {"task": "normals"},
        {"epochs": 0},
        {"input_size": 50},
    ]
    for kw in bad:
        with pytest.raises(VitupError):
            run_probe(_config(tmp_path, "folder", tmp_path / "data", **kw), reporter=SilentReporter())


def test_unreadable_images_are_left_out_and_reported(tmp_path):
    make_folder(tmp_path / "data", n_train=6)
    (tmp_path / "data" / "train" / "images" / "scene_002.png").write_bytes(b"")
    report = run_probe(_config(tmp_path, "folder", tmp_path / "data", epochs=1), reporter=SilentReporter())
    res = report.results[0]
    assert res.skipped == [{"split": "train", "path": str(tmp_path / "data" / "train" / "images" / "scene_002.png")}]
    assert math.isfinite(res.metrics["miou"])
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["results"][0]["skipped"][0]["path"].endswith("scene_002.png")


def test_a_target_of_another_size_is_named(tmp_path):
    from PIL import Image

    make_folder(tmp_path / "data")
    label = tmp_path / "data" / "val" / "labels" / "scene_001.png"
    Image.open(label).resize((20, 20)).save(label)
    with pytest.raises(VitupError, match=r"scene_001.png: target is 20x20 but its image .*scene_001.png is 40x56"):
        run_probe(_config(tmp_path, "folder", tmp_path / "data"), reporter=SilentReporter())
