"""`vitup probe` through the command line: a run, its report, the cache, and one-line errors."""

import json

from probe_fixtures import make_folder, make_nyu, make_voc
from typer.testing import CliRunner

from vitup_cli.cli import app

runner = CliRunner()
TINY = [
    "--backbone", "dinov3_s", "--pretrained", "none", "--backbone-args", "depth=2,embed_dim=64,num_heads=1",
    "--input-size", "64", "--res", "16", "--crop", "32", "--workers", "0", "--device", "cpu",
]  # fmt: skip


def test_probe_command_runs_and_reports(tmp_path):
    make_voc(tmp_path / "voc")
    args = ["probe", "voc", "--root", str(tmp_path / "voc"), *TINY, "--epochs", "2", "--limit", "4",
            "--upsampler", "bilinear,nearest", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "rep")]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.output and "nearest (Δ vs bilinear)" in result.output
    assert "IoU aeroplane" in result.output  # per-class rows with the dataset's class names
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["dataset"]["train_images"] == 4 and data["protocol"]["epochs"] == 2
    assert [r["name"] for r in data["results"]] == ["bilinear", "nearest"]
    assert (tmp_path / "rep" / "predictions.png").is_file()
    assert (tmp_path / "rep" / "heads" / "nearest.safetensors").is_file()
    before = (tmp_path / "rep" / "report.json").read_bytes()
    refused = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert refused.exit_code == 2 and "already holds a probe report" in refused.stderr
    assert (tmp_path / "rep" / "report.json").read_bytes() == before
    again = runner.invoke(app, [*args, "--overwrite"], env={"COLUMNS": "200"})
    assert again.exit_code == 0 and "reusing" in again.output and "caching features" not in again.output


def test_depth_through_the_cli(tmp_path):
    make_folder(tmp_path / "d", task="depth", n_train=4, n_val=2, depth_format="npy")
    args = ["probe", "folder", "--root", str(tmp_path / "d"), "--task", "depth", *TINY, "--epochs", "1",
            "--no-cache", "--out", str(tmp_path / "rep"), "--cache", str(tmp_path / "cache")]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "δ1" in result.output and "RMSE" in result.output
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["protocol"]["no_cache"] is True


def test_wrong_root_is_one_clear_line(tmp_path, one_line_error):
    one_line_error(
        runner.invoke(app, ["probe", "cityscapes", "--root", str(tmp_path), *TINY]), "leftImg8bit", str(tmp_path)
    )


def test_bad_flags_are_one_clear_line(tmp_path, one_line_error):
    make_folder(tmp_path / "f")
    base = ["probe", "folder", "--root", str(tmp_path / "f"), *TINY, "--cache", str(tmp_path / "c")]
    one_line_error(runner.invoke(app, [*base, "--upsampler", "vitup"]), "needs --checkpoint")
    one_line_error(runner.invoke(app, [*base, "--schedule", "linear"]), "--schedule")
    one_line_error(runner.invoke(app, ["probe", "kitti", "--root", str(tmp_path), *TINY]), "unknown dataset")
    one_line_error(runner.invoke(app, ["probe", "voc", "--root", str(tmp_path), "--task", "depth"]), "--task depth")


def test_nyu_probes_depth_without_being_told(tmp_path, one_line_error):
    """`vitup probe nyu` is a depth probe by default (NYU has nothing else); `--task seg` is refused in one line."""
    make_nyu(tmp_path)
    args = ["probe", "nyu", "--root", str(tmp_path), *TINY, "--epochs", "1", "--no-cache",
            "--out", str(tmp_path / "rep"), "--cache", str(tmp_path / "cache")]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["dataset"]["task"] == "depth" and report["dataset"]["train_images"] == 5
    one_line_error(runner.invoke(app, [*args[:4], "--task", "seg", *TINY]), "nyu is a depth dataset")
