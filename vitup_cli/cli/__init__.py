"""The ``vitup`` command line: a thin Typer layer that parses, calls the importable core, and reports.

``_app.py`` holds the shared ``app`` (with the one-line handling of user errors), the progress reporter and the
options several commands take; each command is a module that registers itself on ``app``: ``backbones``,
``upsamplers``, ``train``, ``extract``, ``probe``, ``leaderboard``, ``visualize`` (imported below in the order
``vitup --help`` lists them).
"""

from __future__ import annotations

from vitup_cli import allocator
from vitup_cli.cli._app import app

# isort: off
from vitup_cli.cli import backbones, upsamplers, train, extract, probe, leaderboard, visualize  # noqa: F401 - each registers its command
# isort: on


def main() -> None:
    allocator.tune_malloc()  # large per-chunk buffers reused, not page-faulted in again (vitup_cli/allocator.py)
    app()


__all__ = ["app", "main"]
