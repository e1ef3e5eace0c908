import re

from typer.testing import CliRunner

from vitup_cli import __version__
from vitup_cli.cli import app

runner = CliRunner()


def test_help_lists_the_four_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "extract", "probe", "visualize"):
        assert re.search(rf"\b{command}\b", result.output)
    assert runner.invoke(app, ["-h"]).exit_code == 0


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_backbones_table():
    result = runner.invoke(app, ["backbones"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "vit_small_plus_patch16_dinov3" in result.output


def test_unknown_command_is_a_usage_error():
    assert runner.invoke(app, ["nope"]).exit_code == 2
