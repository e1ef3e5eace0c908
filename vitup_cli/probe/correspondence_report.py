"""The correspondence probe's report: the PCK table (rich) and a PNG of pairs with true and predicted
keypoints. ``report.json`` is ``CorrespondenceReport.to_json`` written by ``vitup_cli.probe.report.write_json``."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitup_cli._version import __version__
from vitup_cli.probe.report import _delta, _pct

if TYPE_CHECKING:
    from rich.table import Table


ALPHAS = (0.10, 0.05, 0.01)
REPORT_FORMAT = "vitup-correspondence-report/1"


# =================================================================================================
# geometry
# =================================================================================================
@dataclass(frozen=True)
class Geometry:
    """Where an original ``w x h`` image sits on its padded square: ``px``/``py`` pixels of padding on
    the left/top, ``side = max(w, h)`` (the scale the reference maps coordinates with)."""

    width: int
    height: int

    @property
    def pad(self) -> tuple[int, int]:
        """``(px, py)``: the reference's ``get_square_paddings``: floor halves of the side difference."""
        w, h = self.width, self.height
        return ((h - w) // 2, 0) if h > w else (0, (w - h) // 2)

    @property
    def side(self) -> int:
        return max(self.width, self.height)

    @property
    def canvas(self) -> tuple[int, int]:
        """``(W, H)`` of the padded canvas (one short of ``side`` when the difference is odd)."""
        px, py = self.pad
        return self.width + 2 * px, self.height + 2 * py

    def to_grid(self, xy: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """``(K, 2)`` image pixels -> continuous grid coordinates ``(u, v)`` (cell ``j`` spans ``[j, j+1)``)."""
        px, py = self.pad
        gh, gw = grid
        return np.stack([(xy[:, 0] + px) * gw / self.side, (xy[:, 1] + py) * gh / self.side], axis=1)

    def cells(self, xy: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """``(K, 2)`` integer ``(col, row)``: the cell holding each point (floor), clamped to the grid."""
        uv = np.floor(self.to_grid(xy, grid)).astype(np.int64)
        return np.stack([uv[:, 0].clip(0, grid[1] - 1), uv[:, 1].clip(0, grid[0] - 1)], axis=1)

    def from_cells(self, cols: np.ndarray, rows: np.ndarray, grid: tuple[int, int], map_back: str) -> np.ndarray:
        """Cells -> ``(K, 2)`` image pixels: the cell's centre (``center``) or top-left corner (``corner``),
        scaled by ``side / res``, floored, minus the padding (the reference's ``int(...) - pad``)."""
        off = 0.5 if map_back == "center" else 0.0
        px, py = self.pad
        gh, gw = grid
        x = np.floor((cols + off) * self.side / gw) - px
        y = np.floor((rows + off) * self.side / gh) - py
        return np.stack([x, y], axis=1).astype(np.float64)

    def valid_cells(self, grid: tuple[int, int]) -> np.ndarray:
        """``(H * W,)`` bool: cells whose centre lies on the real image (not the padding)."""
        px, py = self.pad
        gh, gw = grid
        cx = (np.arange(gw) + 0.5) * self.side / gw - px
        cy = (np.arange(gh) + 0.5) * self.side / gh - py
        return ((cy >= 0) & (cy < self.height))[:, None].repeat(gw, 1).reshape(-1) & np.tile(
            (cx >= 0) & (cx < self.width), gh
        )


@dataclass
class CorrespondenceResult:
    """One upsampler's scores, where its features came from, and timings."""

    name: str
    metrics: dict[str, float]  # "pck@0.10": mean over categories, ...
    per_category: dict[str, dict[str, float]]
    per_point: dict[str, float]
    per_pair: dict[str, float]
    input_size: int = 0
    channels: int = 0
    grid: list[int] = field(default_factory=list)
    stores: dict[str, str] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    matches_cached: dict[str, bool] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    extract_seconds: float = 0.0
    match_seconds: float = 0.0
    predictions: str | None = None


@dataclass
class CorrespondenceReport:
    """What a correspondence run found (``to_json`` is ``report.json``)."""

    dataset: str
    split: str
    root: str
    categories: list[str]
    pairs: dict[str, int]
    points: dict[str, int]
    notes: list[str]
    protocol: dict[str, Any]
    results: list[CorrespondenceResult]
    skipped: list[dict[str, str]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def result(self, name: str) -> CorrespondenceResult:
        return next(r for r in self.results if r.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "vitup_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "dataset": {
                "name": self.dataset,
                "split": self.split,
                "root": self.root,
                "categories": self.categories,
                "pairs": self.pairs,
                "points": self.points,
                "notes": self.notes,
            },
            "protocol": self.protocol,
            "reference": self.results[0].name if self.results else None,
            "results": [asdict(r) for r in self.results],
            "skipped": self.skipped,
            "files": self.files,
            "seconds": self.seconds,
        }


def results_table(report: CorrespondenceReport, per_category: bool = True) -> Table:
    """PCK side by side, one column per upsampler, the difference to the first in brackets; then the
    per-category PCK at the first alpha."""
    from rich.table import Table

    results = report.results
    n_pairs, n_points = sum(report.pairs.values()), sum(report.points.values())
    title = (f"{report.dataset} {report.split} correspondence ({n_pairs} pairs, {n_points} keypoints, "
             f"{len(report.categories)} categories; PCK in %, mean over categories)")  # fmt: skip
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for i, res in enumerate(results):
        table.add_column(res.name + ("" if i == 0 else f" (Δ vs {results[0].name})"), justify="right")
    keys = list(results[0].metrics) if results else []
    for key in keys:
        ref = results[0].metrics.get(key)
        cells = [_pct(r.metrics.get(key)) + ("" if i == 0 else _delta(key, r.metrics.get(key), ref))
                 for i, r in enumerate(results)]  # fmt: skip
        table.add_row(key.replace("pck", "PCK"), *cells)
    if results:
        first = keys[0].split("@")[1]
        table.add_row(
            f"[dim]pooled / per pair @{first}[/dim]",
            *[f"[dim]{_pct(r.per_point.get(first))} / {_pct(r.per_pair.get(first))}[/dim]" for r in results],
        )
    if per_category and results and len(report.categories) > 1:
        table.add_section()
        first = keys[0].split("@")[1]
        for cat in report.categories:
            values = [r.per_category.get(cat, {}).get(first) for r in results]
            cells = [_pct(v) + ("" if i == 0 else _delta("pck", v, values[0])) for i, v in enumerate(values)]
            table.add_row(f"{cat} @{first} ({report.pairs.get(cat, 0)} pairs)", *cells)
    return table


_COLOURS = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
]  # fmt: skip


def save_pairs_png(
    path: Path,
    rows: Sequence[tuple[Path, Geometry, np.ndarray, Path, Geometry, np.ndarray, float]],
    predictions: dict[str, Sequence[np.ndarray | None]],
    alpha: float = ALPHAS[0],
    tile: int = 224,
) -> Path:
    """One row per pair: source with its keypoints | target with the true ones | the target with each
    upsampler's predictions (filled: correct at ``alpha``, hollow: wrong) joined to the truth by a line.

    ``rows``: ``(source canvas, source geometry, source kps, target canvas, target geometry, target kps,
    threshold)`` per pair; ``predictions[name][i]`` ``(K, 2)`` for row ``i`` (None: not matched).
    """
    from PIL import Image, ImageDraw

    columns = ["source", "target (truth)", *predictions]
    title_h, pad = 18, 4
    canvas = Image.new("RGB", (len(columns) * (tile + pad) + pad, title_h + len(rows) * (tile + pad) + pad),
                       (255, 255, 255))  # fmt: skip
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((pad + c * (tile + pad) + 2, 3), f"{name} @{alpha:g}" if c >= 2 else name, fill=(0, 0, 0))

    def place(img_path: Path, geom: Geometry, col: int, row: int) -> tuple[Any, Any]:
        with Image.open(img_path) as im:
            panel = im.convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR)
        x0, y0 = pad + col * (tile + pad), title_h + pad + row * (tile + pad)
        canvas.paste(panel, (x0, y0))
        px, py = geom.pad
        sx, sy = tile / geom.canvas[0], tile / geom.canvas[1]
        return lambda xy: (x0 + (xy[0] + px) * sx, y0 + (xy[1] + py) * sy), None

    r = 3
    for i, (src, sg, skps, trg, tg, tkps, thr) in enumerate(rows):
        to_s, _ = place(src, sg, 0, i)
        for k, xy in enumerate(skps):
            x, y = to_s(xy)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=_COLOURS[k % len(_COLOURS)], outline=(0, 0, 0))
        for c in range(1, len(columns)):
            to_t, _ = place(trg, tg, c, i)
            preds = None if c == 1 else predictions[columns[c]][i]
            for k, xy in enumerate(tkps):
                colour = _COLOURS[k % len(_COLOURS)]
                x, y = to_t(xy)
                if preds is None:
                    draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(0, 0, 0))
                    continue
                qx, qy = to_t(preds[k])
                ok = float(np.linalg.norm(preds[k] - xy)) <= alpha * thr
                draw.line((x, y, qx, qy), fill=colour, width=1)
                draw.ellipse((qx - r, qy - r, qx + r, qy + r), fill=colour if ok else None, outline=colour, width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
