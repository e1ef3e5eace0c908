"""Every ``vitup ...`` command shown in README.md and the quickstart exists, with only real flags."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from vitup_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _shell_blocks(text: str) -> list[str]:
    """The bodies of fenced code blocks tagged bash/sh/console or untagged."""
    blocks, body, lang = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if body is None:
                body, lang = [], line[3:].strip()
            else:
                if lang in {"", "bash", "sh", "shell", "console"}:
                    blocks.append("\n".join(body))
                body = None
        elif body is not None:
            body.append(line)
    return blocks


def _commands(text: str) -> list[list[str]]:
    """Argument lists of the ``vitup`` invocations in fenced code blocks (also ``... && vitup ...``,
    ``torchrun ... -m vitup_cli ...`` and continued lines)."""
    found = []
    for block in _shell_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|", line.split("  #")[0]):
                words = shlex.split(part, comments=True)
                if "vitup" in words:
                    found.append(words[words.index("vitup") + 1 :])
                elif "vitup_cli" in words and "-m" in words:
                    found.append(words[words.index("vitup_cli") + 1 :])
    return found


def _script_commands(path: Path) -> list[list[str]]:
    text = path.read_text().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("vitup "):
            # shell variables stand for values; "${backbone[@]}" stands for the backbone flags
            line = line.replace('"${backbone[@]}"', "--backbone x --pretrained none --backbone-args x")
            calls.append(shlex.split(re.sub(r'"?\$\{?\w+\}?[^ "]*"?', "VALUE", line))[1:])
    return calls


def _check(args: list[str]) -> None:
    group = typer.main.get_command(app)
    assert args, "a bare `vitup`"
    if args[0].startswith("-"):
        assert args[0] in {"--help", "-h", "--version", "-V"}
        return
    command = group.commands.get(args[0])
    assert command is not None, f"`vitup {args[0]}` is not a command"
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for word in args[1:]:
        if word.startswith("-") and not re.fullmatch(r"-?\d+(\.\d+)?", word):
            flag = word.split("=")[0]
            assert flag in known, f"`vitup {args[0]}` has no option {flag}"


README = ROOT / "README.md"
QUICKSTART = ROOT / "examples" / "quickstart.sh"
README_CALLS = _commands(README.read_text())
SCRIPT_CALLS = _script_commands(QUICKSTART)


def test_the_readme_shows_every_command():
    shown = {args[0] for args in README_CALLS}
    assert {"train", "extract", "probe", "visualize"} <= shown


@pytest.mark.parametrize("args", README_CALLS, ids=[" ".join(a)[:60] for a in README_CALLS])
def test_readme_command_is_real(args):
    _check(args)


@pytest.mark.parametrize("args", SCRIPT_CALLS, ids=[" ".join(a)[:60] for a in SCRIPT_CALLS])
def test_quickstart_command_is_real(args):
    _check(args)


SBATCH_CALLS = [
    shlex.split(re.sub(r'"?\$\{?\w+\}?[^ "]*"?', "VALUE", line.strip().removeprefix("exec ")))[1:]
    for line in (ROOT / "examples" / "extract_array.sbatch").read_text().splitlines()
    if line.strip().removeprefix("exec ").startswith("vitup ")
]


@pytest.mark.parametrize("args", SBATCH_CALLS, ids=[" ".join(a)[:60] for a in SBATCH_CALLS])
def test_sbatch_example_command_is_real(args):
    _check(args)


def test_sbatch_example_uses_parts():
    assert any("--part" in args for args in SBATCH_CALLS) and any("--create-only" in args for args in SBATCH_CALLS)


def test_the_checker_catches_a_made_up_flag():
    with pytest.raises(AssertionError, match="no option --frobnicate"):
        _check(["extract", "imgs", "--frobnicate", "3"])
    with pytest.raises(AssertionError, match="not a command"):
        _check(["explode"])
