"""Pictures of what the features see: joint PCA colours and cosine-similarity maps, one row per image.

Every feature panel of one image (the low-res tokens and each upsampler) is coloured by **one** PCA with
3 components fitted jointly on all of them (each panel weighted equally), with one joint colour scale,
so the same feature vector gets the same colour in every panel. ``--point`` rows show, per method, the
cosine similarity of every feature to the feature of the grid cell that contains the point.

Geometry (model path): the upsamplers see the image resized to their square input (as ``Upsampler``
does); the output grid keeps the image's aspect ratio (long side ``res``), and every panel is drawn over
the image's own extent, so non-square images keep their shape. Store rows are cropped to their
``valid`` box (the real image inside a padded canvas) before anything is computed.

Rendering uses matplotlib's Agg canvas directly (never pyplot), so it works headless.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitup_cli.choice import ModelChoice
from vitup_cli.data.images import ImageLoadError, load_image, to_tensor
from vitup_cli.errors import VitupError
from vitup_cli.fileio import atomic_write_bytes
from vitup_cli.hub import checkpoint_method, default_checkpoint, open_upsampler, resolve_weights
from vitup_cli.models import CHECKPOINT_ONLY as _TRAINED
from vitup_cli.models import UPSAMPLERS, build_upsampler, spec_of
from vitup_cli.stores import DONE, STATUS_CODES, open_store

#: Figure layout, in inches: a title strip above every row, a legend strip below it, a title on top.
TITLE_H = 0.5
FOOTER_H = 0.5
HEADER_H = 0.4
PANEL_PAD = 0.06
#: rows are ``panel_size * clamp(H / W)`` tall; extreme aspect ratios are letterboxed in the panel.
ASPECT_RANGE = (0.25, 2.0)
#: longest side, in pixels, of the input picture drawn in the figure (the extent stays the original size)
DISPLAY_MAX = 1024
LOWRES = "lowres"
STORE_SUFFIXES = (".zarr", ".h5", ".hdf5")

Log = Callable[[str], None]


# -- PCA --------------------------------------------------------------------------------------------
@dataclass
class JointPCA:
    """A 3-component PCA fitted on several feature maps at once, with one colour scale.

    Attributes:
        mean: ``(C,)``; components: ``(k, C)`` orthonormal rows, sign fixed so the largest loading is
        positive; explained: ``(k,)`` fraction of the total variance each component explains;
        low, high: ``(k,)`` the 1st and 99th percentiles of the projections, mapped to 0 and 1.
    """

    mean: torch.Tensor
    components: torch.Tensor
    explained: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    def project(self, fmap: torch.Tensor) -> torch.Tensor:
        """``(C, H, W)`` -> ``(k, H, W)`` PCA coordinates."""
        C, H, W = fmap.shape
        flat = fmap.reshape(C, -1).T.double() - self.mean
        return (flat @ self.components.T).T.reshape(-1, H, W)

    def colorize(self, fmap: torch.Tensor) -> np.ndarray:
        """``(C, H, W)`` -> ``(H, W, 3)`` float RGB in ``[0, 1]`` (components 1, 2, 3 -> R, G, B)."""
        proj = self.project(fmap)
        span = (self.high - self.low).clamp_min(1e-12)
        rgb = ((proj - self.low[:, None, None]) / span[:, None, None]).clamp(0, 1)
        if rgb.shape[0] < 3:  # fewer than 3 channels: pad with grey
            rgb = torch.cat([rgb, rgb.new_full((3 - rgb.shape[0], *rgb.shape[1:]), 0.5)])
        return rgb.permute(1, 2, 0).float().numpy()


def _flat(fmap: torch.Tensor) -> torch.Tensor:
    if fmap.ndim != 3:
        raise ValueError(f"feature map must be (C, H, W), got {tuple(fmap.shape)}")
    return fmap.reshape(fmap.shape[0], -1).T


def fit_joint_pca(
    maps: Sequence[torch.Tensor], k: int = 3, max_samples_per_map: int = 16384, seed: int = 0
) -> JointPCA:
    """Fit one PCA on all pixels of ``maps`` (each ``(C, H_i, W_i)``), every map weighted equally.

    Maps with more than ``max_samples_per_map`` pixels contribute a fixed random subset (seeded, so the
    result is reproducible). Deterministic: identical inputs give identical components and colours.
    """
    if not maps:
        raise ValueError("fit_joint_pca needs at least one feature map")
    dims = {int(m.shape[0]) for m in maps}
    if len(dims) != 1:
        raise VitupError(f"cannot colour panels with different feature dims {sorted(dims)} by one PCA")
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for fmap in maps:
        flat = _flat(fmap.detach().to("cpu", torch.float64))
        if flat.shape[0] > max_samples_per_map:
            flat = flat[torch.randperm(flat.shape[0], generator=gen)[:max_samples_per_map]]
        if not torch.isfinite(flat).all():
            raise VitupError("feature map contains NaN or infinite values (an unwritten or corrupt row?)")
        samples.append(flat)
    mean = torch.stack([s.mean(0) for s in samples]).mean(0)
    cov = sum((s - mean).T @ (s - mean) / s.shape[0] for s in samples) / len(samples)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    k = min(k, evals.shape[0])
    order = torch.argsort(evals, descending=True)[:k]
    components = evecs[:, order].T.contiguous()  # (k, C)
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True))).squeeze(1)
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    total = evals.clamp_min(0).sum()
    explained = evals[order].clamp_min(0) / total if total > 0 else torch.zeros(k, dtype=torch.float64)
    proj = torch.cat([(s - mean) @ components.T for s in samples])
    low, high = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
    return JointPCA(mean=mean, components=components, explained=explained, low=low, high=high)


# -- similarity -------------------------------------------------------------------------------------
Box = tuple[float, float, float, float]


def point_cell(xy: tuple[float, float], height: int, width: int, box: Box | None = None) -> tuple[int, int]:
    """The ``(row, col)`` of the cell of a ``height x width`` grid that contains ``xy`` in ``[0, 1]^2``.

    ``box`` ``(y0, x0, y1, x1)``, in grid cells, is where the image lies in the grid (default: all of it).
    """
    y0, x0, y1, x1 = box if box is not None else (0.0, 0.0, float(height), float(width))
    col = min(max(math.floor(x0 + xy[0] * (x1 - x0)), 0), width - 1)
    row = min(max(math.floor(y0 + xy[1] * (y1 - y0)), 0), height - 1)
    return row, col


def cosine_similarity_map(fmap: torch.Tensor, xy: tuple[float, float], box: Box | None = None) -> torch.Tensor:
    """Cosine similarity of every feature of ``fmap`` ``(C, H, W)`` to the feature of the cell holding
    ``xy`` (``[0, 1]^2`` of the image, x right, y down; ``box`` as in ``point_cell``) -> ``(H, W)``;
    exactly 1 at that cell, the maximum."""
    C, H, W = fmap.shape
    row, col = point_cell(xy, H, W, box)
    flat = torch.nn.functional.normalize(fmap.detach().to("cpu", torch.float64).reshape(C, -1), dim=0)
    sim = (flat[:, row * W + col] @ flat).reshape(H, W)
    sim[row, col] = 1.0 if flat[:, row * W + col].norm() > 0 else 0.0  # guard rounding (0.9999999...)
    return sim.float()


def parse_point(text: str) -> tuple[float, float]:
    """``"120,45"`` -> ``(120.0, 45.0)`` (pixels of the original image, x right, y down)."""
    parts = text.replace(" ", "").split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError
    except ValueError:
        raise VitupError(
            f"--point {text!r}: expected X,Y in pixels of the original image, e.g. --point 120,45"
        ) from None
    return x, y


def point_to_xy(point: tuple[float, float], size: tuple[int, int], label: str) -> tuple[float, float]:
    """Pixel ``(x, y)`` of an ``(H, W)`` image -> the centre of the pixel holding it, in ``[0, 1]^2``.

    Pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``; ``(10, 4)`` and ``(10.7, 4.2)`` both name the
    pixel in column 10, row 4. Raises ``VitupError`` when the point lies outside the image."""
    x, y = point
    H, W = size
    if not (0 <= x < W and 0 <= y < H):
        raise VitupError(f"--point {x:g},{y:g} is outside {label} ({W}x{H} pixels): use 0 <= x < {W} and 0 <= y < {H}")
    return (math.floor(x) + 0.5) / W, (math.floor(y) + 0.5) / H


def grid_shape(res: int, size: tuple[int, int]) -> tuple[int, int]:
    """Output grid for an ``(H, W)`` image: long side ``res``, the short side following the aspect."""
    if res < 1:
        raise VitupError(f"--res {res}: must be a positive number of feature pixels per side")
    H, W = size
    if H >= W:
        return res, max(1, round(res * W / H))
    return max(1, round(res * H / W)), res


# -- rows and rendering -----------------------------------------------------------------------------
@dataclass
class FeaturePanel:
    """One method's features ``(C, h, w)`` over the image.

    ``box`` ``(y0, x0, y1, x1)``, in grid cells (fractions allowed), is where the image lies in the grid
    when the grid reaches past it (a token grid over a padded canvas); None: the grid is the image.
    """

    method: str
    features: torch.Tensor
    nearest: bool = False  # draw with nearest interpolation (token grids)
    box: Box | None = None

    def extent(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """matplotlib ``extent`` (left, right, bottom, top) that puts the image part on ``(0..W, 0..H)``."""
        H, W = size
        h, w = self.features.shape[-2:]
        y0, x0, y1, x1 = self.box if self.box is not None else (0.0, 0.0, float(h), float(w))
        sy, sx = H / (y1 - y0), W / (x1 - x0)
        return (-x0 * sx, (w - x0) * sx, (h - y0) * sy, -y0 * sy)

    def image_cells(self) -> torch.Tensor:
        """The features of the cells that overlap the image ``(C, h', w')`` (all of them without a box)."""
        if self.box is None:
            return self.features
        y0, x0, y1, x1 = self.box
        return self.features[:, math.floor(y0) : math.ceil(y1), math.floor(x0) : math.ceil(x1)]

    @property
    def grid_label(self) -> str:
        C, h, w = self.features.shape
        if self.box is None:
            return f"{w}x{h} · {C}-d"
        y0, x0, y1, x1 = self.box
        return f"{x1 - x0:.3g}x{y1 - y0:.3g} of {w}x{h} · {C}-d"


@dataclass
class VizRow:
    """One image: its picture (``(H', W', 3)`` uint8, any display size, or None), original ``size``
    ``(H, W)``, feature panels and query points (pixels of the original image)."""

    label: str
    size: tuple[int, int]
    panels: list[FeaturePanel]
    image: np.ndarray | None = None
    points: list[tuple[float, float]] = field(default_factory=list)
    note: str = ""
    #: ``(y, x)`` of the shown region in the original image (non-zero for centre-cropped store rows)
    origin: tuple[int, int] = (0, 0)

    def local(self, point: tuple[float, float]) -> tuple[float, float]:
        """A point in original-image pixels -> pixels of the shown region."""
        return point[0] - self.origin[1], point[1] - self.origin[0]


@dataclass
class FigureOptions:
    """How the PNG looks: inches per panel column, dots per inch, similarity colour map."""

    panel_size: float = 3.0
    dpi: int = 100
    cmap: str = "inferno"


@dataclass
class RenderResult:
    """What was written: the PNG, its grid of panels (rows, columns), its size in pixels (W, H), and the
    explained variance of each image's joint PCA."""

    path: Path
    grid: tuple[int, int]
    size_px: tuple[int, int]
    explained: list[list[float]]


def _aspect(size: tuple[int, int]) -> float:
    return min(max(size[0] / size[1], ASPECT_RANGE[0]), ASPECT_RANGE[1])


def figure_size(rows: Sequence[VizRow], options: FigureOptions) -> tuple[float, float, int, int]:
    """Figure width and height in inches and the panel grid ``(rows, columns)`` of ``rows``."""
    ncols = 1 + max(len(r.panels) for r in rows)
    height = HEADER_H
    nrows = 0
    for row in rows:
        block = TITLE_H + options.panel_size * _aspect(row.size) + FOOTER_H
        height += block * (1 + len(row.points))
        nrows += 1 + len(row.points)
    return ncols * options.panel_size, height, nrows, ncols


def _panel_axes(fig: Any, top_in: float, col: int, row_h: float, options: FigureOptions, fig_w: float, fig_h: float):
    """An axes for column ``col`` whose box starts ``top_in`` inches below the figure top."""
    x0 = col * options.panel_size + PANEL_PAD
    w = options.panel_size - 2 * PANEL_PAD
    y_top = top_in + TITLE_H
    rect = (x0 / fig_w, 1 - (y_top + row_h - PANEL_PAD) / fig_h, w / fig_w, (row_h - 2 * PANEL_PAD) / fig_h)
    ax = fig.add_axes(rect)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_gid("panel")
    return ax


def _footer_axes(fig: Any, top_in: float, row_h: float, ncols: int, fig_w: float, fig_h: float, options) -> Any:
    y = top_in + TITLE_H + row_h
    x0 = options.panel_size * 0.25
    rect = (x0 / fig_w, 1 - (y + 0.16) / fig_h, (fig_w - 2 * x0) / fig_w, 0.09 / fig_h)
    return fig.add_axes(rect)


def _draw_image(ax: Any, row: VizRow) -> None:
    H, W = row.size
    if row.image is not None:
        ax.imshow(row.image, extent=(0, W, H, 0))
    else:
        ax.set_facecolor("0.9")
        ax.text(0.5, 0.5, "image not available", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_aspect("equal")


def _fit_text(text: str, width_in: float, max_size: float = 9.0, max_lines: int = 2) -> tuple[str, float]:
    """Wrap one-line ``text`` to at most ``max_lines`` lines (existing line breaks are kept) and pick a
    font size in points, at most ``max_size``, at which the longest line fits ``width_in`` inches."""
    import textwrap

    char_w = 0.6  # average glyph width in em (DejaVu Sans)
    lines = text.split("\n")
    if len(lines) == 1 and len(text) * max_size * char_w > width_in * 72 and max_lines > 1:
        lines = textwrap.wrap(text, width=math.ceil(len(text) / max_lines) + 8, break_long_words=False)[:max_lines]
    longest = max(len(line) for line in lines)
    return "\n".join(lines), max(4.0, min(max_size, width_in * 72 / (longest * char_w)))


def _title(ax: Any, text: str, options: FigureOptions) -> None:
    text, size = _fit_text(text, options.panel_size - 2 * PANEL_PAD, max_size=8.0)
    ax.set_title(text, fontsize=size)


def _clip(ax: Any, size: tuple[int, int]) -> None:
    ax.set_xlim(0, size[1])
    ax.set_ylim(size[0], 0)


def _mark(ax: Any, point: tuple[float, float]) -> None:
    x, y = math.floor(point[0]) + 0.5, math.floor(point[1]) + 0.5
    ax.plot([x], [y], marker="o", markersize=9, markerfacecolor="none", markeredgecolor="white", markeredgewidth=2)
    ax.plot([x], [y], marker="+", markersize=9, color="cyan", markeredgewidth=1.5)


def render_rows(
    rows: Sequence[VizRow], out: Path, options: FigureOptions | None = None, title: str = ""
) -> RenderResult:
    """Draw ``rows`` into one PNG at ``out`` (written atomically) and describe it.

    Per image: a PCA row (input | each panel, coloured by the image's joint PCA, explained variance
    below) and one similarity row per point (input with the point | each panel's cosine-similarity map,
    one colour scale per row, shown below).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    options = options or FigureOptions()
    if not rows:
        raise VitupError("nothing to draw: no images or rows were given")
    fig_w, fig_h, nrows, ncols = figure_size(rows, options)
    fig = Figure(figsize=(fig_w, fig_h), dpi=options.dpi)
    FigureCanvasAgg(fig)
    if title:
        text, size = _fit_text(title, fig_w)
        fig.text(0.5, 1 - HEADER_H * 0.5 / fig_h, text, ha="center", va="center", fontsize=size)
    top = HEADER_H
    explained: list[list[float]] = []
    for row in rows:
        H, W = row.size
        row_h = options.panel_size * _aspect(row.size)
        pca = fit_joint_pca([p.image_cells() for p in row.panels])
        explained.append([float(v) for v in pca.explained])
        # PCA row
        ax = _panel_axes(fig, top, 0, row_h, options, fig_w, fig_h)
        _draw_image(ax, row)
        _title(ax, f"input: {row.label}\n{W}x{H} px" + (f" · {row.note}" if row.note else ""), options)
        for c, panel in enumerate(row.panels, start=1):
            ax = _panel_axes(fig, top, c, row_h, options, fig_w, fig_h)
            ax.imshow(
                pca.colorize(panel.features),
                extent=panel.extent(row.size),
                interpolation="nearest" if panel.nearest else "antialiased",
            )
            _clip(ax, row.size)
            _title(ax, f"{panel.method}\n{panel.grid_label}", options)
        parts = " · ".join(f"PC{i + 1} ({'RGB'[i]}) {100 * v:.1f}%" for i, v in enumerate(explained[-1]))
        legend, size = _fit_text(
            f"one PCA fitted jointly on the {len(row.panels)} feature panels · explained variance: {parts} "
            f"(total {100 * sum(explained[-1]):.1f}%)",
            fig_w,
            max_size=7.0,
        )
        fig.text(
            0.5, 1 - (top + TITLE_H + row_h + FOOTER_H * 0.35) / fig_h, legend, ha="center", va="center", fontsize=size
        )
        top += TITLE_H + row_h + FOOTER_H
        # similarity rows
        for point in row.points:
            local = row.local(point)
            xy = point_to_xy(local, row.size, row.label)
            sims = [cosine_similarity_map(p.features, xy, p.box) for p in row.panels]
            vmin = min(float(s.min()) for s in sims)
            norm = Normalize(vmin=min(vmin, 0.999), vmax=1.0)
            ax = _panel_axes(fig, top, 0, row_h, options, fig_w, fig_h)
            _draw_image(ax, row)
            _mark(ax, local)
            _title(ax, f"query point ({point[0]:g}, {point[1]:g})\n{row.label}", options)
            image = None
            for c, (panel, sim) in enumerate(zip(row.panels, sims, strict=True), start=1):
                ax = _panel_axes(fig, top, c, row_h, options, fig_w, fig_h)
                image = ax.imshow(
                    sim.numpy(),
                    extent=panel.extent(row.size),
                    cmap=options.cmap,
                    norm=norm,
                    interpolation="nearest" if panel.nearest else "antialiased",
                )
                _clip(ax, row.size)
                _mark(ax, local)
                _title(ax, f"similarity: {panel.method}\n{panel.grid_label}", options)
            cax = _footer_axes(fig, top, row_h, ncols, fig_w, fig_h, options)
            cbar = fig.colorbar(image, cax=cax, orientation="horizontal")
            cbar.ax.tick_params(labelsize=6)
            cbar.set_label("cosine similarity to the feature at the point (one scale for the row)", fontsize=6)
            top += TITLE_H + row_h + FOOTER_H
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=options.dpi)
    atomic_write_bytes(Path(out), buf.getvalue())
    _umask_permissions(Path(out))
    width_px, height_px = (round(fig_w * options.dpi), round(fig_h * options.dpi))
    return RenderResult(path=Path(out), grid=(nrows, ncols), size_px=(width_px, height_px), explained=explained)


def _umask_permissions(path: Path) -> None:
    """Give a picture the usual permissions (the atomic writer's temporary file is private, 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


# -- output names -----------------------------------------------------------------------------------
def default_output(source: Path, suffix: str) -> Path:
    """``photo.jpg`` + ``vitup`` -> ``photo.vitup.png`` next to the input."""
    source = Path(source)
    return source.with_name(f"{source.stem}.{suffix}.png")


def _check_output(out: Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise VitupError(f"--out {out}: the picture is a PNG; give a name ending in .png")
    if out.exists() and not overwrite:
        raise VitupError(f"{out} already exists: pass --overwrite to replace it, or --out another.png")
    if out.exists() and out.is_dir():
        raise VitupError(f"--out {out} is a folder: give a file name ending in .png")
    return out


def is_store(path: Path) -> bool:
    """True for a path that names a feature store (``.zarr`` folder or ``.h5``/``.hdf5`` file)."""
    return Path(path).suffix.lower() in STORE_SUFFIXES


def _display_image(pil: Any) -> np.ndarray:
    img = pil.copy()
    img.thumbnail((DISPLAY_MAX, DISPLAY_MAX))
    return np.asarray(img, dtype=np.uint8)


# -- from a model -----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ModelOptions(ModelChoice):
    """Where the features come from: a checkpoint (ViT-Up and its backbone) or a backbone by name
    (``vitup_cli.choice.ModelChoice``). ``device``: ``cpu`` unless given (``vitup visualize`` resolves
    ``auto`` itself). ``seed`` seeds a random-init backbone (``pretrained="none"``), so demo pictures are
    reproducible. ``overrides``: ``backbone_args`` by its former name, taken by the constructor only (reading
    ``model.overrides`` gives None: read ``backbone_args``).
    """

    device: str = "cpu"
    overrides: InitVar[dict[str, Any] | None] = None

    def __post_init__(self, overrides: dict[str, Any] | None) -> None:
        if overrides is not None:
            if self.backbone_args:
                raise TypeError("ModelOptions: give backbone_args or overrides, not both")
            self.backbone_args = overrides


def trained_method(checkpoint: Path | str | None) -> str | None:
    """The trained method a ``--checkpoint`` holds (``vitup``, ``uplift``, ``featsharp``, ...), or None."""
    if checkpoint is None:
        return None

    return checkpoint_method(checkpoint)


def parse_compare(text: str | None, has_checkpoint: bool | str | None) -> list[str]:
    """``"vitup,bilinear"`` -> method names (see ``methods_to_draw``); ``None`` -> the default."""
    if text is None:
        return methods_to_draw(None, has_checkpoint)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise VitupError("--compare is empty: give methods such as vitup,bilinear,nearest,lowres")
    return methods_to_draw(names, has_checkpoint)


def methods_to_draw(names: Sequence[str] | None, has_checkpoint: bool | str | None) -> list[str]:
    """Validated upsampler names, in order, without duplicates and without ``lowres`` (the low-res token
    panel is always drawn once). ``has_checkpoint``: the checkpoint's method name (``True`` = ``vitup``).
    Default: that method and ``bilinear`` with a checkpoint, else ``bilinear,nearest``."""

    trained = "vitup" if has_checkpoint is True else (has_checkpoint or None)
    if names is None:
        return [trained, "bilinear"] if trained else ["bilinear", "nearest"]
    for name in names:
        if name not in UPSAMPLERS:
            raise VitupError(f"--compare: unknown method '{name}': use some of {', '.join(UPSAMPLERS)}")
    for name in names:
        if name in _TRAINED and name != trained:
            if trained is None:
                raise VitupError(f"--compare {name} needs --checkpoint (a {name} trained with `vitup train`)")
            raise VitupError(f"--compare {name}: the checkpoint holds a {trained} upsampler, not {name}")
    seen: list[str] = []
    for name in names:
        if name not in seen and name != LOWRES:
            seen.append(name)
    return seen


def with_default_checkpoint(model: ModelOptions, compare: str | None, log: Log | None = None) -> ModelOptions:
    """With neither --checkpoint nor --compare (or --compare naming vitup without a checkpoint): the
    published ViT-Up weights of the chosen backbone, said in one line; otherwise ``model`` unchanged."""

    wants_vitup = compare is None or "vitup" in [c.strip() for c in compare.split(",")]
    if model.checkpoint is not None or not wants_vitup:
        return model
    release = default_checkpoint(
        model.backbone,
        pretrained=model.pretrained,
        overrides=model.backbone_args,
        alternative="--compare bilinear,nearest",
    )
    if log is not None:
        log(f"no --checkpoint: ViT-Up with the published weights {release} for {model.backbone}")

    try:  # offline without the file: the same one line, with this command's training-free choice
        resolve_weights(release)
    except VitupError as exc:
        raise VitupError(str(exc).replace("--upsampler bilinear", "--compare bilinear,nearest")) from None
    return replace(model, checkpoint=release)


def _describe_source(up: Any, checkpoint: Path | None) -> str:
    bb = up.backbone
    weights = bb.weights_id
    if weights.startswith("file:"):
        weights = weights.split("@", 1)[0]
    what = f"backbone {bb.name} [{weights}] · input {up.input_size} px"
    release = (getattr(up, "weights_info", None) or {}).get("release")
    label = "ViT-Up" if up.name == "vitup" else up.name
    if release is not None:
        what = f"{label} {release} ({up.weights_info['licence'].split(' ')[0]}) · " + what
    elif checkpoint is not None:
        what = f"{label} checkpoint {Path(checkpoint).name} · " + what
    if bb.random_init:
        what += " · RANDOM-INIT BACKBONE: demo only, not meaningful features"
    return what


def _open_primary(model: ModelOptions, device: torch.device, log: Log | None = None) -> Any:
    """The checkpoint's trained upsampler, or (without one) the token upsampler over the named backbone."""

    if model.checkpoint is not None:  # any trained method (a local LoftUp file takes --backbone)
        return open_upsampler(
            checkpoint=model.checkpoint, backbone=model.backbone, weights=model.weights, pretrained=model.pretrained,
            overrides=model.backbone_args, input_size=model.input_size, device=device, notify=log,
        )  # fmt: skip
    return open_upsampler(
        LOWRES,
        backbone=model.backbone,
        weights=model.weights,
        pretrained=model.pretrained,
        overrides=model.backbone_args,
        input_size=model.input_size,
        device=device,
    )


def visualize_images(
    images: Sequence[Path],
    out: Path | None = None,
    *,
    model: ModelOptions | None = None,
    compare: Sequence[str] | None = None,
    res: int = 224,
    points: Sequence[tuple[float, float]] = (),
    options: FigureOptions | None = None,
    overwrite: bool = False,
    log: Log | None = None,
) -> RenderResult:
    """One PNG for ``images``: per image, input | low-res tokens | each method in ``compare`` (joint PCA),
    plus one cosine-similarity row per point.

    Args:
        images: image files (any Pillow format; EXIF orientation applied).
        out: the PNG; default ``<first image stem>.vitup.png`` next to the first image.
        compare: upsampler names (see ``parse_compare``); ``vitup`` needs ``model.checkpoint``.
        res: output grid long side in feature pixels (the short side follows the image aspect).
        points: query pixels ``(x, y)`` of the original images (each must lie inside every image).
    """

    model = model or ModelOptions()
    log = log or (lambda _msg: None)
    if not images:
        raise VitupError("give at least one image (or one feature store with --index)")
    paths = [Path(p) for p in images]
    for p in paths:
        if is_store(p):
            raise VitupError(f"{p} is a feature store: visualize one store at a time, with --index I")
        if not p.exists() and not p.is_symlink():
            raise VitupError(f"{p}: no such image file")
        if p.is_dir():
            raise VitupError(f"{p} is a folder: pass image files (e.g. {p}/*.jpg)")
    out = _check_output(Path(out) if out is not None else default_output(paths[0], "vitup"), overwrite)
    methods = methods_to_draw(compare, trained_method(model.checkpoint))
    grid = res
    if grid < 1:
        raise VitupError(f"--res {res}: must be a positive number of feature pixels per side")
    decoded = []
    for p in paths:
        try:
            decoded.append(load_image(p))
        except ImageLoadError as exc:
            raise VitupError(f"{exc.path}: cannot read this image ({exc.reason})") from None
    for pil, p in zip(decoded, paths, strict=True):
        for point in points:
            point_to_xy(point, (pil.height, pil.width), p.name)

    log("loading the model")
    device = torch.device(model.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model.seed)
        primary = _open_primary(model, device, log)
    backbone = primary.backbone
    trained = primary.name if model.checkpoint is not None else None
    if compare is None and trained is not None:
        methods = [trained if n == "vitup" else n for n in methods]  # the default pair: the checkpoint's + bilinear
    for name in methods:
        if name in _TRAINED and name != trained:
            raise VitupError(f"--compare {name}: --checkpoint {model.checkpoint} holds a {trained}; draw {trained}")
    upsamplers: dict[str, Any] = {}
    side = primary.backbone_size  # the backbone's own resolution (FeatSharp's global view)
    for name in methods:
        if name == trained:
            upsamplers[name] = primary
        elif spec_of(name).capabilities.trained:  # a method with published weights for this backbone (LoftUp)
            upsamplers[name] = open_upsampler(name, backbone=backbone, input_size=primary.input_size, device=device)
        else:
            upsamplers[name] = build_upsampler(name, backbone, input_size=side).to(device).eval()
    tokens_from = build_upsampler(LOWRES, backbone, input_size=side).to(device).eval()

    rows: list[VizRow] = []
    for i, (pil, p) in enumerate(zip(decoded, paths, strict=True)):
        size = (pil.height, pil.width)
        shape = grid_shape(grid, size)
        x = to_tensor(pil)[None].to(device)
        log(f"[{i + 1}/{len(paths)}] {p.name}: {pil.width}x{pil.height} px -> features {shape[1]}x{shape[0]}")
        panels = []
        with torch.no_grad():
            with backbone.adapters_disabled() if backbone.lora is not None else contextlib.nullcontext():
                # the low-res tokens and training-free baselines come from the frozen teacher
                panels.append(FeaturePanel("low-res tokens", tokens_from.features(x)[0].float().cpu(), nearest=True))
                for name, up in upsamplers.items():
                    if name != trained:
                        panels.append(FeaturePanel(name, up.features(x, shape)[0].float().cpu(), name == "nearest"))
            if trained in upsamplers:
                vit = FeaturePanel(trained, upsamplers[trained].features(x, shape)[0].float().cpu())
                panels.insert(1 + methods.index(trained), vit)
        rows.append(VizRow(label=p.name, size=size, panels=panels, image=_display_image(pil), points=list(points)))
    title = _describe_source(primary, model.checkpoint)
    log(f"drawing {out}")
    return render_rows(rows, out, options, title=title)


# -- from a store -----------------------------------------------------------------------------------
_ROOT_KEYS = ("images", "images_root", "image_root", "input", "inputs", "root", "source")


def _store_image_root(store_path: Path, attrs: dict[str, Any], image_root: Path | None) -> list[Path]:
    """Folders where a store's relative image paths may live, most specific first."""
    roots = [Path(image_root)] if image_root is not None else []
    for key in _ROOT_KEYS:
        value = attrs.get(key)
        if isinstance(value, str) and value:
            value = value[1:] if value.startswith("@") else value
            p = Path(value)
            roots.append(p.parent if p.is_file() else p)
    roots.append(store_path.parent)
    return roots


def _store_title(store_path: Path, attrs: dict[str, Any]) -> str:
    backbone = attrs.get("backbone")
    weights = attrs.get("weights_id") or attrs.get("weights")
    if isinstance(backbone, dict):
        weights = weights or backbone.get("weights_id")
        backbone = backbone.get("name") or backbone.get("timm_name")
    parts = [f"store {store_path.name}"]
    if backbone:
        parts.append(f"backbone {backbone}" + (f" [{weights}]" if weights else ""))
    for key in ("upsampler", "tap", "fit"):
        if attrs.get(key) is not None:
            parts.append(f"{key} {attrs[key]}")
    text = " · ".join(parts)
    if attrs.get("random_init") or (isinstance(weights, str) and weights.startswith("none")):
        text += " · RANDOM-INIT BACKBONE: demo only, not meaningful features"
    return text


def _crop_region(size: tuple[int, int], input_size: int | None = None) -> tuple[int, int, int, int]:
    """``--fit crop`` (as ``vitup extract`` does it: short side to the input size ``S``, centre square):
    the part of the original image the features cover, ``(y0, x0, y1, x1)`` in original pixels."""
    H, W = size
    side = min(H, W)
    if input_size:
        scale = input_size / side
        nw, nh = max(input_size, round(W * scale)), max(input_size, round(H * scale))
        x0, y0 = round((nw - input_size) // 2 / scale), round((nh - input_size) // 2 / scale)
    else:
        x0, y0 = (W - side) // 2, (H - side) // 2
    x0, y0 = min(x0, W - side), min(y0, H - side)
    return y0, x0, y0 + side, x0 + side


def _store_row(store: Any, index: int, roots: list[Path], points: Sequence[tuple[float, float]], log: Log) -> VizRow:

    name = store.path.name
    status = int(store.status[index])
    rel = store.paths[index]
    if status != DONE:
        reason = store.errors[index] if status != 0 else ""
        raise VitupError(
            f"--index {index}: row {index} of {name} ({rel}) is {STATUS_CODES.get(status, status)}"
            + (f" ({reason})" if reason else "")
            + "; pick a done row (or finish the store with `vitup extract ... --resume`)"
        )
    attrs = store.attrs
    feats = store[index]  # (C or K, Hg, Wg)
    pca = store.pca
    note = ""
    if pca is not None:
        note = f"PCA {pca[0].shape[0]}->{pca[0].shape[1]}-d"
        feats = store.unproject(feats)
    Hg, Wg = feats.shape[-2:]
    y0, x0, y1, x1 = (int(v) for v in store.valid[index])
    if not (0 <= y0 < y1 <= Hg and 0 <= x0 < x1 <= Wg):
        y0, x0, y1, x1 = 0, 0, Hg, Wg  # no box recorded: the grid is the image
    size = tuple(int(v) for v in store.sizes[index])
    if min(size) < 1:
        size = (y1 - y0, x1 - x0)
    fit = str(attrs.get("fit", "pad"))
    input_size = attrs.get("input_size")
    region = _crop_region(size, input_size if isinstance(input_size, int) else None)
    region = region if fit == "crop" else (0, 0, size[0], size[1])
    shown = (region[2] - region[0], region[3] - region[1])
    method = str(attrs.get("upsampler", "stored features"))
    panels = []
    tokens = store.lowres(index)
    if tokens is not None:
        h, w = tokens.shape[-2:]
        box = (y0 * h / Hg, x0 * w / Wg, y1 * h / Hg, x1 * w / Wg)
        panels.append(FeaturePanel("low-res tokens (stored)", torch.from_numpy(tokens), nearest=True, box=box))
    crop = torch.from_numpy(np.ascontiguousarray(feats[:, y0:y1, x0:x1]))
    panels.append(FeaturePanel(f"{method} (stored)", crop, nearest=method in ("nearest", LOWRES)))
    image = None
    for root in roots:
        candidate = Path(rel) if Path(rel).is_absolute() else root / rel
        if candidate.exists():
            try:
                pil = load_image(candidate)
            except ImageLoadError as exc:
                log(f"row {index}: cannot show the input image ({exc.reason})")
                break
            if (pil.height, pil.width) != size:
                log(f"row {index}: {candidate} is {pil.width}x{pil.height}, the store says {size[1]}x{size[0]}")
                break
            if fit == "crop":
                pil = pil.crop((region[1], region[0], region[3], region[2]))
            image = _display_image(pil)
            break
    else:
        log(f"row {index}: input image {rel} not found (pass --images FOLDER to show it)")
    label = f"row {index}: {rel}"
    for point in points:
        local = (point[0] - region[1], point[1] - region[0])
        if not (0 <= local[0] < shown[1] and 0 <= local[1] < shown[0]):
            where = (
                f"the stored region x {region[1]}..{region[3]}, y {region[0]}..{region[2]} of " if fit == "crop" else ""
            )
            raise VitupError(
                f"--point {point[0]:g},{point[1]:g} is outside {where}{label} ({size[1]}x{size[0]} pixels)"
            )
    return VizRow(
        label=label,
        size=shown,
        panels=panels,
        image=image,
        points=list(points),
        note=note,
        origin=(region[0], region[1]),
    )


def visualize_store(
    store_path: Path,
    indices: Sequence[int],
    out: Path | None = None,
    *,
    points: Sequence[tuple[float, float]] = (),
    image_root: Path | None = None,
    options: FigureOptions | None = None,
    overwrite: bool = False,
    log: Log | None = None,
) -> RenderResult:
    """One PNG for stored rows of a feature store, without loading any model.

    Each row: the input image (when found under ``image_root``, the store's recorded input folder, or
    next to the store) | the stored low-res tokens (if any) | the stored features, cropped to the row's
    ``valid`` box and mapped back through the store's PCA when it has one; joint PCA colours and one
    similarity row per point, as for images. ``points`` are pixels of the original images.
    """

    log = log or (lambda _msg: None)
    store_path = Path(store_path)
    if not indices:
        raise VitupError(f"{store_path} is a feature store: choose rows with --index I (repeatable)")
    with open_store(store_path) as store:
        n = len(store)
        for i in indices:
            if not 0 <= i < n:
                raise VitupError(f"--index {i} is out of range: {store_path.name} has {n} rows (0..{n - 1})")
        stem = store_path.name.rsplit(".", 1)[0]
        rows_tag = "-".join(str(i) for i in indices)
        out = _check_output(
            Path(out) if out is not None else store_path.with_name(f"{stem}.row{rows_tag}.png"), overwrite
        )
        roots = _store_image_root(store_path, store.attrs, image_root)
        rows = [_store_row(store, i, roots, points, log) for i in indices]
        title = _store_title(store_path, store.attrs)
    log(f"drawing {out}")
    return render_rows(rows, out, options, title=title)
