"""What a run reports: ``metrics.jsonl`` (+ TensorBoard when installed), the loss-curve PNG, progress.

Progress goes through a small ``Reporter`` interface so the training core knows nothing of terminals:
the CLI passes a rich progress bar (TTY) or plain periodic lines (logs); scripts get ``tqdm.auto``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from vitup_cli.checkpoints import atomic_write_bytes

log = logging.getLogger("vitup.train")


class Reporter(Protocol):
    def start(self, total: int, done: int) -> None: ...
    def update(self, step: int, metrics: dict[str, float]) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


def _fmt(metrics: dict[str, float]) -> str:
    keys = [("loss", "loss"), ("l2", "l2"), ("cos", "cos"), ("kl", "kl")]
    parts = [f"{label} {metrics[k]:.4f}" for k, label in keys if k in metrics]
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    return "  ".join(parts)


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


class NullReporter:
    def start(self, total: int, done: int) -> None:
        pass

    def update(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class LogReporter:
    """Plain lines (step, losses, lr, it/s, ETA) every ``interval`` seconds: CI and SLURM logs."""

    def __init__(self, stream: Any = None, interval: float = 30.0) -> None:
        self.stream = stream
        self.interval = interval
        self._last = -math.inf
        self.total = self.done = 0
        self._t0 = time.monotonic()

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        print(text, file=stream, flush=True)

    def start(self, total: int, done: int) -> None:
        self.total, self.done, self._t0 = total, done, time.monotonic()
        self._write(f"training steps {done}..{total}")

    def update(self, step: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        if now - self._last < self.interval and step < self.total:
            return
        self._last = now
        rate = (step - self.done) / max(now - self._t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else math.inf
        self._write(f"step {step}/{self.total}  {_fmt(metrics)}  {rate:.2f} it/s  ETA {_eta(eta)}")

    def message(self, text: str) -> None:
        self._write(text)

    def close(self) -> None:
        pass


class RichReporter:
    """A rich progress bar on stderr: step, losses, lr, it/s, ETA."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[losses]}"),
            console=self.console,
            transient=False,
        )
        self.task: Any = None
        self._t0 = time.monotonic()
        self.done = 0

    def start(self, total: int, done: int) -> None:
        self.progress.start()
        self.done, self._t0 = done, time.monotonic()
        self.task = self.progress.add_task("train", total=total, completed=done, rate="", losses="")

    def update(self, step: int, metrics: dict[str, float]) -> None:
        rate = (step - self.done) / max(time.monotonic() - self._t0, 1e-9)
        self.progress.update(self.task, completed=step, rate=f"{rate:.2f} it/s", losses=_fmt(metrics))

    def message(self, text: str) -> None:
        self.progress.console.print(text)

    def close(self) -> None:
        self.progress.stop()


class TqdmReporter:
    """``tqdm.auto`` (notebooks and scripts)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def start(self, total: int, done: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, desc="train", unit="step", file=sys.stderr)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(_fmt(metrics), refresh=False)

    def message(self, text: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def default_reporter() -> Reporter:
    """tqdm in a terminal or notebook, plain lines otherwise."""
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    return TqdmReporter() if interactive else LogReporter()


class MetricsLog:
    """Append-only ``metrics.jsonl`` (one JSON object per line, flushed) and TensorBoard if installed."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self.tb: Any = None
        self.tensorboard_note = ""
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)
            except ImportError:
                self.tensorboard_note = "tensorboard is not installed: metrics go to metrics.jsonl only"

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites what came after its checkpoint, so the log has each step once."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_bytes(self.path, ("\n".join(kept) + "\n" if kept else "").encode())

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, allow_nan=True) + "\n")
        self._fh.flush()
        if self.tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    prefix = "val/" if key.startswith("val_") else "train/"
                    self.tb.add_scalar(prefix + key.removeprefix("val_"), value, step)

    def close(self) -> None:
        self._fh.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_loss_curve(metrics_path: Path, png_path: Path) -> Path | None:
    """Loss terms (log scale), held-out loss and learning rate against step -> PNG (atomic)."""
    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = [r["step"] for r in train]
    for key, style in (("loss", "-"), ("l2", "--"), ("cos", "--"), ("kl", "--")):
        values = [r.get(key, math.nan) for r in train]
        if any(math.isfinite(v) and v > 0 for v in values):
            ax.plot(steps, values, style, label=key, linewidth=1.2 if key == "loss" else 0.9)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="held-out loss", color="black")
    ax.set_yscale("log")
    ax.set_ylabel("loss (sum over taps and scales)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    if train:
        ax_lr.plot(steps, [r.get("lr", math.nan) for r in train], color="tab:gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())
    return png_path
