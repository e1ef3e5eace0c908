"""The probe's report: a rich table, ``report.json``, a PNG grid of predictions, and the heads' weights."""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from vitup_cli._version import __version__
from vitup_cli.fileio import atomic_write_bytes, jsonable

if TYPE_CHECKING:
    from rich.table import Table

REPORT_FORMAT = "vitup-probe-report/1"
SEG_METRICS = (("miou", "mIoU"), ("accuracy", "pixel acc"))
DEPTH_METRICS = (("d1", "δ1 ↑"), ("d2", "δ2 ↑"), ("d3", "δ3 ↑"), ("abs_rel", "abs rel ↓"), ("rmse", "RMSE ↓"))
_LOWER_IS_BETTER = {"abs_rel", "rmse"}


@dataclass
class UpsamplerResult:
    """One upsampler's probe: scores, where its features came from, and timings."""

    name: str
    metrics: dict[str, float]
    per_class_iou: dict[str, float | None] = field(default_factory=dict)
    confusion: list[list[int]] | None = None
    epoch_loss: list[float] = field(default_factory=list)
    stores: dict[str, str | None] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    streamed: dict[str, bool] = field(default_factory=dict)
    input_size: int = 0
    channels: int = 0
    extract_seconds: float = 0.0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    head: str | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass
class ProbeReport:
    """What a probe run found (``to_json`` is ``report.json``)."""

    dataset: str
    task: str
    root: str
    class_names: list[str]
    train_images: int
    val_images: int
    notes: list[str]
    protocol: dict[str, Any]
    results: list[UpsamplerResult]
    baseline: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def result(self, name: str) -> UpsamplerResult:
        return next(r for r in self.results if r.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "vitup_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "dataset": {
                "name": self.dataset,
                "task": self.task,
                "root": self.root,
                "train_images": self.train_images,
                "val_images": self.val_images,
                "num_classes": len(self.class_names),
                "class_names": self.class_names,
                "notes": self.notes,
            },
            "protocol": self.protocol,
            "baseline": self.baseline,
            "reference": self.results[0].name if self.results else None,
            "results": [asdict(r) for r in self.results],
            "files": self.files,
            "seconds": self.seconds,
        }


# -- pictures -------------------------------------------------------------------------------------
def label_palette() -> np.ndarray:
    """``(256, 3)`` uint8: the PASCAL VOC colour map (class ``k``'s colour from the bits of ``k``);
    255 (ignored) is VOC's cream boundary colour."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for k in range(256):
        c, r, g, b = k, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[k] = (r, g, b)
    return pal


def colour_labels(labels: np.ndarray) -> np.ndarray:
    """``(H, W)`` class ids -> ``(H, W, 3)`` uint8 (VOC palette)."""
    return label_palette()[np.asarray(labels, dtype=np.uint8)]


def colour_depth(depth: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """``(H, W)`` metres -> ``(H, W, 3)`` uint8 (magma, near = bright); invalid (0) pixels grey."""
    from matplotlib import colormaps

    d = np.asarray(depth, dtype=np.float32)
    t = 1 - np.clip((d - vmin) / max(vmax - vmin, 1e-6), 0, 1)
    rgb = (colormaps["magma"](t)[..., :3] * 255).astype(np.uint8)
    rgb[~(d > 0)] = 128
    return rgb


def save_grid(
    path: Path,
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    predictions: dict[str, Sequence[np.ndarray]],
    task: str,
    tile: int = 224,
) -> Path:
    """One row per image: image | ground truth | one prediction per upsampler, titled, as a PNG."""
    columns = ["image", "ground truth", *predictions]
    title_h, pad = 18, 4
    width = len(columns) * (tile + pad) + pad
    height = title_h + len(images) * (tile + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((pad + c * (tile + pad) + 2, 3), name, fill=(0, 0, 0))
    vmin = vmax = 0.0
    if task == "depth":
        valid = np.concatenate([t[t > 0].ravel() for t in truths] + [np.zeros(0, np.float32)])
        vmin, vmax = (float(np.percentile(valid, 2)), float(np.percentile(valid, 98))) if valid.size else (0, 1)
    for r, (img, truth) in enumerate(zip(images, truths, strict=True)):
        panels = [img]
        for arr in [truth, *[p[r] for p in predictions.values()]]:
            panels.append(colour_depth(arr, vmin, vmax) if task == "depth" else colour_labels(arr))
        for c, panel in enumerate(panels):
            tile_img = Image.fromarray(np.asarray(panel, dtype=np.uint8)).resize((tile, tile), Image.Resampling.NEAREST)
            canvas.paste(tile_img, (pad + c * (tile + pad), title_h + pad + r * (tile + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# -- numbers --------------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _num(key: str, v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if key in _LOWER_IS_BETTER else f"{100 * v:.2f}"


def _delta(key: str, v: float | None, ref: float | None, scale: float = 100) -> str:
    if v is None or ref is None or any(isinstance(x, float) and math.isnan(x) for x in (v, ref)):
        return ""
    d = (v - ref) * (1 if key in _LOWER_IS_BETTER else scale)
    better = d < 0 if key in _LOWER_IS_BETTER else d > 0
    colour = "green" if better else ("red" if d != 0 else "dim")
    text = f"{d:+.4f}" if key in _LOWER_IS_BETTER else f"{d:+.2f}"
    return f" [{colour}]({text})[/{colour}]"


def results_table(report: ProbeReport, per_class: bool = True) -> Table:
    """Metrics side by side, one column per upsampler, with the difference to the first in brackets."""
    from rich.table import Table

    results = report.results
    task = report.task
    title = f"{report.dataset} {task} probe ({report.val_images} val images; scores in %)"
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for i, res in enumerate(results):
        table.add_column(res.name + ("" if i == 0 else f" (Δ vs {results[0].name})"), justify="right")
    rows = SEG_METRICS if task == "seg" else DEPTH_METRICS
    for key, label in rows:
        ref = results[0].metrics.get(key)
        cells = [_num(key, res.metrics.get(key)) + ("" if i == 0 else _delta(key, res.metrics.get(key), ref))
                 for i, res in enumerate(results)]  # fmt: skip
        table.add_row(label, *cells)
    if task == "seg" and report.baseline is not None:
        base = report.baseline
        table.add_row(
            f"[dim]majority class ({base['class']}): mIoU / acc[/dim]",
            *[f"[dim]{_pct(base['miou'])} / {_pct(base['accuracy'])}[/dim]"] * len(results),
        )
    if task == "seg" and per_class and results and results[0].per_class_iou:
        table.add_section()
        for name in report.class_names:
            values = [res.per_class_iou.get(name) for res in results]
            cells = [_pct(v) + ("" if i == 0 else _delta("iou", v, values[0])) for i, v in enumerate(values)]
            table.add_row(f"IoU {name}", *cells)
    return table


def write_json(report: ProbeReport, path: Path) -> Path:

    data = jsonable(report.to_json())
    atomic_write_bytes(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())
    return path
