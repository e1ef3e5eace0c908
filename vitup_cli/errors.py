"""User-facing errors: one clear line, exit code 2, never a traceback."""

from __future__ import annotations


class VitupError(Exception):
    """An error caused by user input (a file, a flag, a setting), with the fix in its message."""

    exit_code = 2
