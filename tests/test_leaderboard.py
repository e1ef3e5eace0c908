"""`vitup leaderboard`: tasks and published numbers (fast), and whole tables over generated datasets in the standard
layouts (slow): every upsampler x seg, depth and spair, a missing dataset marked, a rerun that recomputes nothing,
and a run killed at a random moment that resumes to the same table."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_backbone, tiny_vitup
from PIL import Image
from probe_fixtures import make_folder, make_voc
from spair_fixtures import make_spair
from typer.testing import CliRunner

from vitup_cli.cli import app
from vitup_cli.errors import VitupError
from vitup_cli.hub import save_checkpoint
from vitup_cli.hub.uplift import save_uplift_checkpoint
from vitup_cli.leaderboard import (
    METRICS,
    TASK_KINDS,
    Aggregate,
    parse_tasks,
    published_for,
    published_numbers,
    t_critical,
    versus_baseline,
)
from vitup_cli.models import UPSAMPLERS, UPLiFT
from vitup_cli.models.featsharp import FeatSharp, FeatSharpConfig
from vitup_cli.models.loftup import LoftUpNet

runner = CliRunner()
BACKBONE = "dinov3_s+"


# -- tasks ---------------------------------------------------------------------------------------------------
def test_bare_task_names_are_found_under_the_data_root(tmp_path):
    (tmp_path / "SPair-71k").mkdir()
    (tmp_path / "cityscapes").mkdir()
    tasks = parse_tasks(["voc", "spair", "cityscapes", "nyu"], tmp_path)
    roots = {t.label: t.root for t in tasks}
    assert roots == {"voc": tmp_path, "spair": tmp_path / "SPair-71k", "cityscapes": tmp_path / "cityscapes",
                     "nyu": tmp_path}  # fmt: skip
    assert [t.kind.kind for t in tasks] == ["seg", "correspondence", "seg", "depth"]


def test_tasks_take_paths_and_labels(tmp_path):
    tasks = parse_tasks(["voc:/data/VOCdevkit", "mine=folder:/my/seg", "folder-depth:/my/depth", "keypoints:/p"], None)
    assert [(t.label, t.kind.name, str(t.root)) for t in tasks] == [
        ("voc", "voc", "/data/VOCdevkit"), ("mine", "folder", "/my/seg"), ("folder-depth", "folder-depth", "/my/depth"),
        ("keypoints", "keypoints", "/p"),
    ]  # fmt: skip
    assert tasks[2].kind.kind == "depth" and tasks[1].metrics[0].key == "miou"


@pytest.mark.parametrize(
    ("specs", "data_root", "needle"),
    [
        (["vocc"], "/d", "unknown task 'vocc'"),
        (["folder"], "/d", "folder needs its folder"),
        (["voc"], None, "give its folder (voc:/path) or --data-root"),
        (["folder:/a", "folder:/b"], None, "'folder' is given twice"),
        ([" "], "/d", "give at least one task"),
        (["..=folder:/x"], None, "unknown task"),  # a label cannot climb out of cells/
    ],
)
def test_bad_tasks_are_one_clear_line(specs, data_root, needle):
    with pytest.raises(VitupError, match=None) as err:
        parse_tasks(specs, data_root)
    assert needle in str(err.value) and "\n" not in str(err.value)


# -- published numbers -------------------------------------------------------------------------------------
def test_published_numbers_are_well_formed():
    data = published_numbers()
    assert data["rows"]
    for row in data["rows"]:
        assert row["source"] in data["sources"]
        assert row["upsampler"] in UPSAMPLERS
        kind = TASK_KINDS[row["task"]].kind
        keys = {m.key for m in METRICS[kind]}
        measured = set(row) - {"source", "backbone", "upsampler", "task"}
        assert measured and measured <= keys, row
        assert all(0 < row[k] < 100 for k in measured)


def test_published_numbers_match_the_backbone_by_any_of_its_names():
    splus = published_for("dinov3_splus")
    assert splus == published_for("dinov3_s+")
    assert splus[("voc", "vitup")][0]["miou"] == 87.47
    assert splus[("cityscapes", "bilinear")][0]["miou"] == 61.36
    # the paper's SPair "Bilinear" is the raw token grid (research/ecosystem.md): it is listed as lowres
    assert splus[("spair", "lowres")][0]["pck@0.10"] == 51.27 and ("spair", "bilinear") not in splus
    small = published_for("dinov2_s")
    assert small[("voc", "loftup")][0]["miou"] == 84.63
    assert [r["source"] for r in small[("voc", "bilinear")]] == ["uplift-t1", "jafar-readme"]  # the file's order
    assert published_for("dinov3_l") == {}


def _agg(values, deterministic=False):
    v = np.asarray(values, dtype=float)
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return Aggregate("t", "u", "done", None, len(v), {"miou": float(v.mean())}, {"miou": std}, {"miou": list(v)},
                     None, None, None, {}, deterministic)  # fmt: skip


def test_t_critical_values():
    assert t_critical(1) == 12.706 and t_critical(2.9) == 4.303 and t_critical(30) == 2.042
    assert t_critical(0.3) == 12.706 and t_critical(1000) == 1.96


def test_a_difference_welchs_t_cannot_tell_from_zero_is_noise():
    base = _agg([0.50, 0.52, 0.48])
    close = versus_baseline(_agg([0.51, 0.53, 0.49]), base, "miou")
    assert close["within_noise"] is True and close["delta"] == pytest.approx(0.01)
    # Welch: SE sqrt(0.01^2/3 + 0.02^2/3) = 0.0129 on 2.9 degrees of freedom, t = 4.303: noise 0.0556
    far = versus_baseline(_agg([0.60, 0.61, 0.59]), base, "miou")
    assert far["within_noise"] is False and far["noise"] == pytest.approx(4.303 * 0.012910, rel=1e-3)
    near = versus_baseline(_agg([0.55, 0.56, 0.54]), base, "miou")  # 0.05: beyond 2 SE, within Welch's t
    assert near["within_noise"] is True
    assert versus_baseline(_agg([0.6]), _agg([0.5]), "miou")["within_noise"] is None  # one seed: unknown
    exact = versus_baseline(_agg([0.6], True), _agg([0.5], True), "miou")
    assert exact["noise"] == 0.0 and exact["within_noise"] is None


# -- the command line: bad input and --config ---------------------------------------------------------------
def test_bad_flags_are_one_line_and_exit_2(tmp_path, one_line_error):
    for args, needle in (
        (["--tasks", "voc", "--data-root", str(tmp_path)], "--upsamplers: give"),
        (["--upsamplers", "bilinear"], "--tasks: give"),
        (["--upsamplers", "bilinar", "--tasks", "voc", "--data-root", str(tmp_path)], "--upsamplers bilinar: unknown"),
        (["--upsamplers", "bilinear", "--tasks", "vocc", "--data-root", str(tmp_path)], "unknown task 'vocc'"),
        (["--upsamplers", "bilinear,bilinear", "--tasks", "voc", "--data-root", str(tmp_path)], "twice"),
        (["--upsamplers", "bilinear", "--tasks", "voc", "--data-root", str(tmp_path), "--seeds", "0"], "--seeds 0"),
    ):
        result = runner.invoke(app, ["leaderboard", *args, "--out", str(tmp_path / "lb")])
        one_line_error(result, needle)
    assert not (tmp_path / "lb").exists()


def test_config_file_gives_settings_and_flags_win(tmp_path, monkeypatch, one_line_error):
    import vitup_cli.leaderboard as lb_module

    seen = {}

    def capture(config, reporter=None):
        seen["config"] = config
        raise VitupError("stop here")

    monkeypatch.setattr(lb_module, "run_leaderboard", capture)
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "tasks: [voc, spair]\nupsamplers: vitup,bilinear\ncheckpoint: [vit-up:dinov3_splus]\nseeds: 3\n"
        "data-root: /data\nlimit: 5\nbackbone_args: {depth: 2}\n"
    )
    result = runner.invoke(app, ["leaderboard", "--config", str(suite), "--limit", "7", "--out", str(tmp_path / "o")])
    one_line_error(result, "stop here")
    c = seen["config"]
    assert (c.tasks, c.upsamplers, c.checkpoint) == (["voc", "spair"], ["vitup", "bilinear"], ["vit-up:dinov3_splus"])
    assert (c.seeds, c.limit, str(c.data_root), c.backbone_args) == (3, 7, "/data", {"depth": 2})
    suite.write_text("tasks: voc\nupsamplers: bilinear\nseeds: three\n")
    one_line_error(runner.invoke(app, ["leaderboard", "--config", str(suite)]), f"--config {suite}: seeds: ")
    suite.write_text("tasks: voc\nupsamplers: bilinear\nlimit: '5'\ncheckpoint: ck/last\n")
    one_line_error(runner.invoke(app, ["leaderboard", "--config", str(suite)]), "stop here")
    assert (seen["config"].limit, seen["config"].checkpoint) == (5, ["ck/last"])
    suite.write_text("tasks: voc\nupsampler: bilinear\n")
    one_line_error(runner.invoke(app, ["leaderboard", "--config", str(suite)]), "unknown setting upsampler")
    suite.write_text("- voc\n")
    one_line_error(runner.invoke(app, ["leaderboard", "--config", str(suite)]), "expected a mapping")


# -- whole tables (slow) -------------------------------------------------------------------------------------
TINY = ["--backbone", BACKBONE, "--pretrained", "none", "--backbone-args", "depth=2,embed_dim=64,num_heads=1",
        "--res", "16", "--crop", "32", "--correspondence-res", "24", "--epochs", "1",
        "--workers", "0", "--device", "cpu"]  # fmt: skip


def _checkpoints(root: Path) -> list[Path]:
    """ViT-Up, UPLiFT and FeatSharp `vitup train` checkpoints and a LoftUp file in its published layout, all over
    one random-init tiny DINOv3-S+ (64 px input, 4x4 tokens)."""
    vit = save_checkpoint(root / "vitup" / "last", tiny_vitup(BACKBONE))
    torch.manual_seed(4)
    up = save_uplift_checkpoint(root / "uplift" / "last", UPLiFT(tiny_backbone(BACKBONE), input_size=64))
    backbone = tiny_backbone(BACKBONE)
    torch.manual_seed(6)
    fs = FeatSharp(backbone, FeatSharpConfig(factor=2, input_tokens=4)).eval()
    gen = torch.Generator().manual_seed(7)
    fs.fit_statistics(torch.rand(8, 3, 96, 96, generator=gen) for _ in range(2))
    fs_path = save_checkpoint(root / "featsharp" / "last", fs)
    torch.manual_seed(5)
    (root / "loftup").mkdir(parents=True)
    torch.save(LoftUpNet(64).state_dict(), root / "loftup" / "pytorch_model.bin")
    return [Path(vit), Path(up), Path(fs_path), root / "loftup" / "pytorch_model.bin"]


def _datasets(root: Path) -> tuple[Path, Path]:
    data = root / "data"
    make_voc(data, n_train=4, n_val=2)
    make_spair(data)
    depth = make_folder(root / "depth", n_train=4, n_val=2, task="depth")
    return data, depth


def _cells(out: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "cells").rglob("cell.json")}


def _means(out: Path) -> dict[tuple[str, str], dict[str, float]]:
    table = json.loads((out / "leaderboard.json").read_text())["table"]
    return {(a["task"], a["upsampler"]): a["mean"] for a in table}


@pytest.mark.slow
@pytest.mark.integration
def test_the_whole_table_over_seg_depth_and_spair(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ck = _checkpoints(tmp_path / "ck")
    data, depth = _datasets(tmp_path)
    names = ["vitup", "uplift", "loftup", "featsharp", "bilinear", "lowres"]
    out = tmp_path / "lb"
    args = ["leaderboard", "--upsamplers", ",".join(names), "--data-root", str(data),
            "--tasks", f"voc,folder-depth:{depth},spair,cityscapes", *[a for c in ck for a in ("--checkpoint", str(c))],
            *TINY, "--cache", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 3, result.output  # the table is written; some cells (cityscapes) failed
    md = (out / "leaderboard.md").read_text()
    doc = json.loads((out / "leaderboard.json").read_text())
    cells = doc["cells"]
    assert len(cells) == 4 * len(names)
    done = [c for c in cells if c["status"] == "done"]
    assert {(c["task"], c["upsampler"]) for c in done} == {
        (t, n) for t in ("voc", "folder-depth", "spair") for n in names
    }
    for c in done:
        assert c["seconds"] > 0 and c["peak_rss"] > 0 and c["metrics"]
        assert c["weights"]["code_licence"] and c["weights"]["random_init"] is True
    assert {c["task"] for c in cells if c["status"] == "failed"} == {"cityscapes"}
    assert all("no Cityscapes layout found" in c["reason"] for c in cells if c["status"] == "failed")
    # the failing task is marked in the table, with its reason once
    main_row = next(line for line in md.splitlines() if line.startswith("| vitup | "))
    assert main_row.endswith("| failed [1] |") and "paper 87.47" in main_row  # voc, depth, spair, cityscapes
    assert md.count("no Cityscapes layout found") == 1 and "failed [1]" in md
    # the published numbers of this backbone sit beside the measured cells, with the difference
    assert "paper 87.47" in md and "paper 51.27" in md and "ViT-Up (2026), Table 2" in md
    assert doc["settings"]["versions"]["torch"] == torch.__version__
    assert any("--pretrained none" in h for h in doc["header"])
    rows = (out / "leaderboard.csv").read_text().splitlines()
    assert rows[0].startswith("task,dataset,kind,upsampler,metric")
    assert len(rows) == 1 + len(names) * (2 + 3 + 3 + 2)  # voc 2, depth 3, spair 3, cityscapes 2 metrics
    voc_vitup = next(r for r in rows[1:] if r.startswith("voc,voc,seg,vitup,miou"))
    assert ",87.47,vitup-t1," in voc_vitup
    with Image.open(out / "leaderboard.png") as png:  # the bar chart (400 px) above a row of PCA panels
        assert png.format == "PNG" and png.height > 600 and png.width >= 800
    # a rerun recomputes nothing and writes the same tables
    before = _cells(out)
    tables = {n: (out / n).read_bytes() for n in ("leaderboard.md", "leaderboard.csv", "leaderboard.json")}
    again = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert again.exit_code == 3, again.output
    assert f"{len(done)} found finished" in again.output
    assert _cells(out) == before
    assert {n: (out / n).read_bytes() for n in tables} == tables


@pytest.mark.slow
@pytest.mark.integration
def test_a_run_killed_at_a_random_moment_resumes_to_the_same_table(tmp_path):
    ck = _checkpoints(tmp_path / "ck")[3:]  # the LoftUp file
    data, depth = _datasets(tmp_path)
    common = ["leaderboard", "--upsamplers", "loftup,bilinear,lowres", "--data-root", str(data),
              "--tasks", f"voc,folder-depth:{depth},spair", "--checkpoint", str(ck[0]), "--seeds", "2", *TINY,
              "--input-size", "64",
              "--cache", str(tmp_path / "cache")]  # fmt: skip
    t0 = time.monotonic()
    whole = runner.invoke(app, [*common, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    total = 3 * (2 + 2 + 1)  # voc and depth: 2 seeds each; spair: once
    window = 0.8 * (time.monotonic() - t0)  # about the time the cells after the first take (features cached)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for attempt in range(4):  # a moment drawn after the run's end is drawn again, in a shorter window
        out = tmp_path / f"killed{attempt}"
        cmd = [sys.executable, "-m", "vitup_cli", *common, "--out", str(out)]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, **quiet)
        deadline = time.monotonic() + 300
        while not list((out / "cells").rglob("cell.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(random.uniform(0.0, window))  # a random moment after the first finished cell
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        finished = _cells(out)
        if len(finished) < total:
            break
        window /= 4
    else:
        pytest.fail("every drawn moment came after the run had finished: nothing to resume")
    assert finished, "the run was killed before any cell finished"
    resumed = runner.invoke(app, [*common, "--out", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert f"{len(finished)} found finished" in resumed.output
    after = _cells(out)
    assert {p: after[p] for p in finished} == finished  # nothing finished was recomputed
    assert len(after) == total
    ours, theirs = _means(out), _means(tmp_path / "whole")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key
    md = (out / "leaderboard.md").read_text()
    assert "±" in md  # two seeds: mean ± std


def test_weights_missing_offline_mark_only_their_cells(tmp_path, offline_cache):
    """A release that is not in the cache offline fails its own cells, with the file and how to get it; the
    others run over the checkpoint that can be opened (the LoftUp file here); the command exits 3. With nothing
    that can run, it exits 1."""
    data = make_folder(tmp_path / "seg", n_train=2, n_val=1)
    torch.manual_seed(5)
    torch.save(LoftUpNet(64).state_dict(), tmp_path / "pytorch_model.bin")
    out = tmp_path / "lb"
    args = ["leaderboard", "--upsamplers", "uplift,loftup,bilinear", "--tasks", f"folder:{data}",
            "--checkpoint", "uplift:dinov3_splus", "--checkpoint", str(tmp_path / "pytorch_model.bin"), *TINY,
            "--input-size", "64", "--cache", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    md = (out / "leaderboard.md").read_text()
    assert md.count("failed [1]") == 2  # the main table and the task's: uplift only
    assert "uplift:dinov3_splus" in md and "hf download" in md
    cells = {c["upsampler"]: c for c in json.loads((out / "leaderboard.json").read_text())["cells"]}
    assert cells["uplift"]["status"] == "failed" and cells["loftup"]["status"] == cells["bilinear"]["status"] == "done"
    assert cells["bilinear"]["checkpoints"] == [str(tmp_path / "pytorch_model.bin")]  # over the file that opens
    assert len(list((out / "cells").rglob("cell.json"))) == 2  # the failed cell is retried by the next run
    alone = runner.invoke(app, ["leaderboard", "--upsamplers", "uplift", "--tasks", f"folder:{data}", "--checkpoint",
                                "uplift:dinov3_splus", *TINY, "--out", str(tmp_path / "lb2")])  # fmt: skip
    assert alone.exit_code == 1, alone.output
