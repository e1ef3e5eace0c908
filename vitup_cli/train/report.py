"""What a run records: ``metrics.jsonl`` (+ TensorBoard when installed) and the loss-curve PNG.

Progress goes through ``vitup_cli.progress`` (one reporting module for every command).
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from vitup_cli.fileio import atomic_write_bytes

log = logging.getLogger("vitup.train")


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
