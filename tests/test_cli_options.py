"""The command line declares each flag once (``vitup_cli/cli/_app.py`` holds the shared ones), and ``vitup train``
takes every setting of every training method as a flag, derived from the method's configuration dataclass."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from collections import Counter
from dataclasses import fields
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import vitup_cli.cli.train as train_cli
from vitup_cli.cli import app
from vitup_cli.errors import VitupError
from vitup_cli.train.config import CommonConfig
from vitup_cli.train.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "vitup_cli" / "cli"
COMMON = {f.name for f in fields(CommonConfig)}


def _declared_flags() -> list[str]:
    """Every ``--flag`` literal passed to ``typer.Option(...)`` in ``vitup_cli/cli/*.py``."""
    flags = []
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            is_option = (isinstance(func, ast.Attribute) and func.attr == "Option") or (
                isinstance(func, ast.Name) and func.id == "Option"
            )
            if not is_option:
                continue
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    flags += [f for f in arg.value.split("/") if f.startswith("--")]
    return flags


def test_no_flag_is_declared_twice():
    flags = _declared_flags()
    assert {"--checkpoint", "--device", "--seed", "--out", "--method", "--version"} <= set(flags)  # it sees them
    twice = sorted(flag for flag, n in Counter(flags).items() if n > 1)
    assert not twice, f"declared more than once (declare it once in vitup_cli/cli/_app.py): {twice}"


def _settings() -> list[tuple[str, str, str]]:
    """(method, field, flag) of every method setting (a config field that ``CommonConfig`` lacks)."""
    return [
        (name, f.name, f.metadata.get("flag", "--" + f.name.replace("_", "-")))
        for name, method in METHODS.items()
        for f in fields(method.config_class)
        if f.name not in COMMON
    ]


def test_train_help_lists_every_method_setting_with_a_help_line():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    options = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    for method, name, flag in _settings():
        assert flag in result.output, f"--method {method}: {name} ({flag}) is not in `vitup train --help`"
        assert options[name].help, f"--method {method}: {flag} has no help line"
    for flag in ("--blocks", "--factor", "--stage", "--sync-bn", "--no-sync-bn", "--teacher-sizes"):
        assert flag in result.output  # flags of today, spelt as before


def test_every_common_setting_has_an_explicit_train_option():
    explicit = set(inspect.signature(train_cli.train_cmd).parameters)
    missing = sorted(COMMON - explicit)
    assert not missing, f"CommonConfig fields without a `vitup train` option of their own: {missing}"


def test_only_given_settings_are_passed_and_refused_ones_are_one_line(monkeypatch):
    seen = {}

    def stop(file, given):
        seen.update(given)
        raise VitupError("stop here")

    monkeypatch.setattr("vitup_cli.train.settings.build_config", stop)
    args = ["train", "--method", "featsharp", "--factor", "4", "--no-debias", "--jitters", "3", "--lr", "1e-3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen == {"method": "featsharp", "factor": 4, "debias": False, "jitters": 3, "lr": 1e-3}

    monkeypatch.undo()
    refused = CliRunner().invoke(app, ["train", "--method", "uplift", "--blocks", "3", "--data", "x", "--out", "y"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "unknown setting 'num_blocks' for --method uplift" in refused.output
    typed = CliRunner().invoke(app, ["train", "--factor", "two"], env={"COLUMNS": "200"})
    assert typed.exit_code == 2 and "Invalid value for '--factor'" in typed.output


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["extract", "--help"], ["probe", "--help"]])
def test_the_command_line_starts_without_torch(args):
    """The method settings are built when `vitup train` needs them: importing the methods imports torch."""
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from vitup_cli.cli import app\n"
        f"assert CliRunner().invoke(app, {args!r}).exit_code == 0\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.split() == ["False"]


def test_no_command_gives_one_flag_to_two_options():
    """A short flag shared by two options of one command (``-c`` for --config and --checkpoint) would silently
    go to one of them."""
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        opts = Counter(o for p in command.params for o in (*p.opts, *p.secondary_opts))
        assert not [o for o, n in opts.items() if n > 1], name
