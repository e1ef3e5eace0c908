"""How every command talks to its user: messages, warnings and one progress bar at a time.

One interface, four implementations, picked by where the output goes (``default_reporter``):

- ``RichReporter``: a rich progress bar on stderr (count, %, rate, elapsed, ETA, extra fields): a terminal.
- ``TqdmReporter``: a ``tqdm.auto`` bar: notebooks (and scripts that ask for it).
- ``Reporter`` (the base): plain lines on stderr, one every ``interval`` seconds while work streams, and one at
  the end: logs of CI and batch schedulers (SLURM), where a bar would be thousands of carriage returns.
- ``SilentReporter``: nothing (ranks other than 0, tests).

The interface: ``info(text)`` / ``warning(text)``; ``start(total, label, done=0, unit="img")`` opens the bar;
``advance(n, **fields)`` moves it by ``n`` (thread-safe: extract's writer thread calls it) and ``update(position,
fields)`` sets it; ``fields`` (e.g. losses) are shown next to the rate; ``finish()`` closes it. ``message`` and
``close`` are the same as ``info`` and ``finish``.
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any


def human_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} PB"


def format_eta(seconds: float) -> str:
    """Seconds -> ``H:MM:SS`` (``?`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(_dt.timedelta(seconds=round(seconds)))


def format_fields(fields: Mapping[str, Any] | None) -> str:
    """``{"loss": 0.51234, "lr": 2e-4}`` -> ``"loss 0.5123  lr 2.00e-04"``; strings are kept as they are."""
    if not fields:
        return ""
    parts = []
    for key, value in fields.items():
        if not isinstance(value, float):
            parts.append(f"{key} {value}")
        elif value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            parts.append(f"{key} {value:.2e}")
        else:
            parts.append(f"{key} {value:.4f}")
    return "  ".join(parts)


class Reporter:
    """Plain lines on stderr (or ``stream``): messages as they come, progress every ``interval`` seconds and at
    the end of a bar. What logs see."""

    def __init__(self, interval: float = 10.0, stream: Any = None) -> None:
        self.interval = interval
        self.stream = stream
        self._lock = threading.Lock()
        self._total = self._count = self._initial = 0
        self._t0 = self._last = 0.0
        self._label, self._unit = "", "img"
        self._fields: dict[str, Any] = {}

    # messages ---------------------------------------------------------------------------------
    def _write(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def info(self, message: str) -> None:
        self._write(message)

    def warning(self, message: str) -> None:
        self._write(f"warning: {message}")

    def message(self, text: str) -> None:
        self.info(text)

    # progress ---------------------------------------------------------------------------------
    def start(self, total: int, label: str = "", *, done: int = 0, unit: str = "img") -> None:
        with self._lock:
            self._total, self._count, self._initial = int(total), int(done), int(done)
            self._label, self._unit, self._fields = label, unit, {}
            self._t0 = self._last = time.perf_counter()

    def advance(self, n: int = 1, **fields: Any) -> None:
        with self._lock:
            self._move(self._count + int(n), fields)

    def update(self, position: int, fields: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            self._move(int(position), dict(fields or {}))

    def _move(self, position: int, fields: dict[str, Any]) -> None:
        self._count = position
        if fields:
            self._fields = fields
        now = time.perf_counter()
        if now - self._last >= self.interval or self._count >= self._total:
            self._last = now
            self._write(self._line(now))

    def rate(self, now: float | None = None) -> float:
        """Units per second since ``start`` (work done before ``start`` does not count)."""
        now = time.perf_counter() if now is None else now
        return (self._count - self._initial) / max(now - self._t0, 1e-9)

    def _line(self, now: float) -> str:
        rate = self.rate(now)
        eta = (self._total - self._count) / rate if rate > 0 else float("inf")
        pct = 100 * self._count / max(self._total, 1)
        extra = format_fields(self._fields)
        label = f"{self._label}: " if self._label else ""
        return (
            f"{label}{self._count}/{self._total} {self._unit} ({pct:.0f}%), {rate:.2f} {self._unit}/s, "
            f"ETA {format_eta(eta)}" + (f"  {extra}" if extra else "")
        )

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.finish()


class SilentReporter(Reporter):
    """Says nothing (ranks other than 0, tests)."""

    def _write(self, text: str) -> None:
        pass


NullReporter = SilentReporter


class TqdmReporter(Reporter):
    """A ``tqdm.auto`` bar (a widget in notebooks); messages go through ``tqdm.write`` so they do not break it."""

    def __init__(self) -> None:
        super().__init__()
        self._bar: Any = None

    def _write(self, text: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)

    def start(self, total: int, label: str = "", *, done: int = 0, unit: str = "img") -> None:
        from tqdm.auto import tqdm

        super().start(total, label, done=done, unit=unit)
        self._bar = tqdm(total=total, initial=done, desc=label or None, unit=unit, file=sys.stderr)

    def _move(self, position: int, fields: dict[str, Any]) -> None:
        self._count = position
        if self._bar is None:
            return
        self._bar.update(position - self._bar.n)
        if fields:
            self._bar.set_postfix_str(format_fields(fields), refresh=False)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class RichReporter(Reporter):
    """A rich progress bar on stderr: what a terminal shows."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console

        self.console = Console(stderr=True)
        self._progress: Any = None
        self._task: Any = None

    def _write(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    def warning(self, message: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)

    def start(self, total: int, label: str = "", *, done: int = 0, unit: str = "img") -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        super().start(total, label, done=done, unit=unit)
        self.finish()
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[extra]}"),
            console=self.console,
        )
        self._progress.start()
        self._task = self._progress.add_task(label, total=total, completed=done, rate="-", extra="")

    def _move(self, position: int, fields: dict[str, Any]) -> None:
        self._count = position
        if self._progress is None:
            return
        extra = {"extra": format_fields(fields)} if fields else {}
        self._progress.update(
            self._task, completed=position, rate=f"{self.rate():.2f} {self._unit}/s", **extra
        )  # fmt: skip

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where ``tqdm.auto`` draws a widget)."""
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    try:
        ip = shell.get_ipython()  # type: ignore[attr-defined]
    except Exception:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def default_reporter() -> Reporter:
    """tqdm.auto in a notebook, a rich bar on a terminal, plain periodic lines otherwise (logs)."""
    if in_notebook():
        return TqdmReporter()
    if sys.stderr.isatty():
        return RichReporter()
    return Reporter()
