"""Semantic correspondence by nearest neighbours in feature space, scored as PCK (``vitup probe spair``).

The default protocol is the ViT-Up reference's (``vit_up/eval_kits/correspondence_2d_toolkit``):

1. each image is padded to a centred black square: ``px = (h - w) // 2`` left and right (or ``py`` top and
   bottom), so the canvas is ``w + 2px`` by ``h + 2py`` (one pixel short of square when the difference is
   odd, as in the reference), then resized (bilinear, antialiased) to the backbone input (448) and its
   features computed on a ``res x res`` grid (448) over the canvas;
2. a source keypoint ``(x, y)`` takes the feature of the cell ``floor((x + px) / max(h, w) * res)``;
3. its match is the argmax of the cosine similarity over the whole target map, padding included;
4. the prediction is that cell's centre mapped back to the target: ``floor((j + 0.5) * max(h, w) / res) - px``;
5. a keypoint is correct when ``|pred - truth| <= alpha * max(box w, box h)`` of the target box, in original
   target pixels; PCK is per point within a category, then the unweighted mean over the categories.

Each choice that moves PCK is a setting (``--exclude-padding``, ``--map-back corner``, ``--source-sampling
bilinear``, ``--res``), recorded in the report. Features come from ``vitup_cli.extract`` stores (float16,
one per category and upsampler, cached and resumable); matching holds one target map and a bounded block of
similarities at a time, and its predictions are cached per category, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import KW_ONLY, asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from vitup_cli.choice import ModelChoice
from vitup_cli.data.images import ImageLoadError, load_image
from vitup_cli.errors import VitupError
from vitup_cli.features import compile_upsampler, resolve_precision
from vitup_cli.fileio import atomic_write_bytes
from vitup_cli.probe import cache as _cache
from vitup_cli.probe.cache import default_cache_dir
from vitup_cli.probe.correspondence_report import (
    ALPHAS,
    CorrespondenceReport,
    CorrespondenceResult,
    Geometry,
    save_pairs_png,
)
from vitup_cli.probe.datasets import ProbeDataset
from vitup_cli.probe.report import write_json
from vitup_cli.probe.spair import PAIR_READERS, KeypointPair, PairSet
from vitup_cli.probe.upsamplers import build_upsamplers, checkpoint_refs, resolve_device
from vitup_cli.progress import default_reporter
from vitup_cli.stores import DONE, open_store

if TYPE_CHECKING:
    from vitup_cli.models import Upsampler

PADDING = ("include", "exclude")
MAP_BACK = ("center", "corner")
SOURCE_SAMPLING = ("nearest", "bilinear")
_SIM_BUDGET = 256 << 20  # bytes of float32 similarities computed at once


def square_canvas(img: Any) -> Any:
    """The image (PIL, RGB) pasted on a black canvas as the reference pads: ``Geometry(w, h).canvas``."""
    from PIL import Image

    geom = Geometry(img.width, img.height)
    canvas = Image.new("RGB", geom.canvas, (0, 0, 0))
    canvas.paste(img, geom.pad)
    return canvas


# =================================================================================================
# matching
# =================================================================================================
def source_vectors(fmap: torch.Tensor, geom: Geometry, xy: np.ndarray, sampling: str = "nearest") -> torch.Tensor:
    """Features of the source at its keypoints.

    Args:
        fmap: ``(C, H, W)`` features over the padded square.
        xy: ``(K, 2)`` keypoints in source pixels.
        sampling: ``nearest`` (the cell holding the point: the reference) or ``bilinear`` (interpolated at
            the point, cell centres as samples, border clamped: Probe3D's ``grid_sample``).
    Returns:
        ``(K, C)`` float32.
    """
    grid = (fmap.shape[1], fmap.shape[2])
    if sampling == "nearest":
        cells = torch.from_numpy(geom.cells(xy, grid)).to(fmap.device)
        return fmap[:, cells[:, 1], cells[:, 0]].T.float()
    uv = geom.to_grid(xy, grid)
    norm = torch.from_numpy(np.stack([2 * uv[:, 0] / grid[1] - 1, 2 * uv[:, 1] / grid[0] - 1], 1)).float()
    out = F.grid_sample(
        fmap[None].float(), norm.to(fmap.device)[None, None], mode="bilinear", padding_mode="border",
        align_corners=False,
    )  # fmt: skip
    return out[0, :, 0].T


def argmax_cosine(
    queries: torch.Tensor, fmap: torch.Tensor, valid: torch.Tensor | None = None, budget: int = _SIM_BUDGET
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, the target cell of highest cosine similarity (the first one on ties).

    Similarities are computed in blocks of at most ``budget`` bytes, so memory stays bounded at any grid.

    Args:
        queries: ``(Q, C)``. fmap: ``(C, H, W)`` target features. valid: ``(H * W,)`` bool: cells that may
            be chosen (None: all).
    Returns:
        ``(Q,)`` flat cell indices (row-major) and their ``(Q,)`` similarities.
    """
    c, h, w = fmap.shape
    n = h * w
    flat = fmap.reshape(c, n)
    q = F.normalize(queries.float(), dim=1, eps=1e-8)
    best = torch.full((q.shape[0],), -math.inf, device=fmap.device)
    where = torch.zeros(q.shape[0], dtype=torch.long, device=fmap.device)
    n_step = min(n, 1 << 16)
    q_step = max(1, budget // (4 * n_step))
    for a in range(0, n, n_step):
        block = flat[:, a : a + n_step].float()
        block = block / block.norm(dim=0, keepdim=True).clamp_min(1e-8)
        mask = None if valid is None else ~valid[a : a + n_step]
        for b in range(0, q.shape[0], q_step):
            sims = q[b : b + q_step] @ block
            if mask is not None:
                sims[:, mask] = -math.inf
            value, idx = sims.max(dim=1)
            better = value > best[b : b + q_step]  # strict: an earlier block keeps its tie
            best[b : b + q_step] = torch.where(better, value, best[b : b + q_step])
            where[b : b + q_step] = torch.where(better, idx + a, where[b : b + q_step])
    return where, best


@dataclass(frozen=True)
class MatchSettings:
    """The protocol's free choices (defaults: the ViT-Up reference)."""

    padding: str = "include"  # the target's padding cells take part in the argmax
    map_back: str = "center"
    source_sampling: str = "nearest"

    def check(self) -> None:
        for flag, value, allowed in (
            ("--padding", self.padding, PADDING),
            ("--map-back", self.map_back, MAP_BACK),
            ("--source-sampling", self.source_sampling, SOURCE_SAMPLING),
        ):
            if value not in allowed:
                raise VitupError(f"{flag} {value}: use {' or '.join(allowed)}")


def predict_pair(
    src_map: torch.Tensor, trg_map: torch.Tensor, src_geom: Geometry, trg_geom: Geometry, src_kps: np.ndarray,
    settings: MatchSettings = MatchSettings(), budget: int = _SIM_BUDGET,
) -> np.ndarray:  # fmt: skip
    """``(K, 2)`` predicted target pixels for ``src_kps`` (one pair; ``match_images`` batches many)."""
    queries = source_vectors(src_map, src_geom, src_kps, settings.source_sampling)
    return _predict(queries, trg_map, trg_geom, settings, budget)


def _predict(
    queries: torch.Tensor, trg_map: torch.Tensor, geom: Geometry, settings: MatchSettings, budget: int
) -> np.ndarray:
    grid = (trg_map.shape[1], trg_map.shape[2])
    valid = None
    if settings.padding == "exclude":
        valid = torch.from_numpy(geom.valid_cells(grid)).to(trg_map.device)
    idx, _ = argmax_cosine(queries, trg_map, valid, budget)
    idx = idx.cpu().numpy()
    return geom.from_cells(idx % grid[1], idx // grid[1], grid, settings.map_back)


# =================================================================================================
# scoring
# =================================================================================================
def pair_threshold(pair: KeypointPair, target_size: tuple[int, int]) -> float:
    """``max(box w, box h)`` of the target box (the whole ``(w, h)`` target image when it has none)."""
    if pair.target_bbox is None:
        return float(max(target_size))
    x1, y1, x2, y2 = pair.target_bbox
    return float(max(x2 - x1, y2 - y1))


@dataclass
class PCKScores:
    """PCK of one upsampler, as fractions.

    ``mean[alpha]``: the unweighted mean over categories of the per-point PCK within each (the number the
    reference and the paper report); ``per_category[cat][alpha]``; ``per_point[alpha]``: all points pooled;
    ``per_pair[alpha]``: the mean over pairs of each pair's fraction (the "per image" convention).
    """

    mean: dict[str, float]
    per_category: dict[str, dict[str, float]]
    per_point: dict[str, float]
    per_pair: dict[str, float]
    points: dict[str, int]
    pairs: dict[str, int]


def alpha_key(alpha: float) -> str:
    return f"{alpha:.2f}"


def pck_scores(
    errors: Sequence[np.ndarray], thresholds: Sequence[float], categories: Sequence[str],
    alphas: Sequence[float] = ALPHAS,
) -> PCKScores:  # fmt: skip
    """Score predictions: pair ``i`` has ``errors[i]`` ``(K_i,)`` pixel distances, its target's
    ``thresholds[i]`` (``max(box w, h)``) and ``categories[i]``; correct when ``error <= alpha * threshold``."""
    if not (len(errors) == len(thresholds) == len(categories)):
        raise ValueError("errors, thresholds and categories must have one entry per pair")
    cats = list(dict.fromkeys(categories))
    per_cat: dict[str, dict[str, float]] = {c: {} for c in cats}
    points = {c: 0 for c in cats}
    pairs = {c: 0 for c in cats}
    for e, c in zip(errors, categories, strict=True):
        points[c] += len(e)
        pairs[c] += 1
    mean, per_point, per_pair = {}, {}, {}
    for alpha in alphas:
        key = alpha_key(alpha)
        hits = [np.asarray(e, dtype=np.float64) <= alpha * t for e, t in zip(errors, thresholds, strict=True)]
        correct = {c: 0 for c in cats}
        for h, c in zip(hits, categories, strict=True):
            correct[c] += int(h.sum())
        for c in cats:
            per_cat[c][key] = correct[c] / points[c] if points[c] else math.nan
        scored = [per_cat[c][key] for c in cats if points[c]]
        mean[key] = float(np.mean(scored)) if scored else math.nan
        total = sum(points.values())
        per_point[key] = sum(correct.values()) / total if total else math.nan
        fracs = [h.mean() for h in hits if len(h)]
        per_pair[key] = float(np.mean(fracs)) if fracs else math.nan
    return PCKScores(mean, per_cat, per_point, per_pair, points, pairs)


# =================================================================================================
# the run
# =================================================================================================
@dataclass
class CorrespondenceConfig(ModelChoice):
    """Everything ``run_correspondence`` needs; the defaults are the ViT-Up reference protocol's.

    The model fields (``checkpoint``, ``backbone``, ``weights``, ``pretrained``, ``backbone_args``,
    ``input_size``, ``device``, ``seed``) are ``vitup_cli.choice.ModelChoice``'s, keyword-only.
    ``dataset``: ``spair`` or ``keypoints`` (your own ``pairs.json``). ``upsamplers``: names to compare
    (default ``lowres,bilinear`` and the upsampler of each checkpoint); the first is the reference column.
    ``checkpoint``: one reference or a list, one per trained method (as ``vitup probe``'s ``--checkpoint``).
    ``limit``: the first N pairs of each category. ``res``: feature grid over the padded square.
    """

    dataset: str
    root: str | Path
    split: str = "test"
    categories: Sequence[str] | None = None
    limit: int | None = None
    upsamplers: Sequence[str] | None = None
    _: KW_ONLY
    checkpoint: str | Path | Sequence[str | Path] | None = None  # one per trained upsampler
    res: int = 448
    alphas: Sequence[float] = ALPHAS
    padding: str = "include"
    map_back: str = "center"
    source_sampling: str = "nearest"
    dtype: str = "float16"
    cache: str | Path | None = None
    out: str | Path | None = None
    overwrite: bool = False
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = False  # torch.compile the heavy modules (features.compile_upsampler)
    workers: int | None = None
    visualize: int = 4
    sim_budget: int = _SIM_BUDGET

    @property
    def settings(self) -> MatchSettings:
        return MatchSettings(self.padding, self.map_back, self.source_sampling)


def _names(config: CorrespondenceConfig) -> list[str]:
    names = [n.strip() for n in (config.upsamplers or []) if n.strip()]
    if not names:
        names = ["lowres", "bilinear", *checkpoint_refs(config.checkpoint)]
    return names


def _validate(config: CorrespondenceConfig) -> None:
    if config.dataset not in PAIR_READERS:
        raise VitupError(f"{config.dataset}: not a correspondence dataset; use {' or '.join(PAIR_READERS)}")
    if config.out is not None and (Path(config.out) / "report.json").exists() and not config.overwrite:
        raise VitupError(
            f"--out {config.out} already holds a probe report; nothing was changed. Pass --overwrite to "
            "replace it, or choose another --out"
        )
    config.settings.check()
    if config.res < 1:
        raise VitupError(f"--res {config.res}: must be at least 1")
    if not config.alphas or any(not 0 < a <= 1 for a in config.alphas):
        raise VitupError(f"--alpha {','.join(map(str, config.alphas))}: give fractions in (0, 1], e.g. 0.1,0.05")
    if config.dtype not in ("float16", "float32"):
        raise VitupError(f"--dtype {config.dtype}: use float16 or float32")


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def prepare_canvases(
    files: Sequence[Path], cache_dir: Path, *, workers: int = 4, reporter: Any = None
) -> tuple[dict[Path, tuple[Path, Geometry]], dict[Path, str]]:
    """Each image padded to its black square once, as a PNG in ``CACHE/canvases`` (keyed by the file's
    path, size and modification time, so a changed image gets a new one).

    Returns:
        ``{image: (canvas file, geometry)}`` for the readable images, and ``{image: reason}`` for the others.
    """
    from concurrent.futures import ThreadPoolExecutor

    folder = cache_dir / "canvases"
    folder.mkdir(parents=True, exist_ok=True)

    def one(path: Path) -> tuple[Path, tuple[Path, Geometry] | str]:
        try:
            st = path.stat()
        except OSError as exc:
            return path, f"cannot stat: {exc}"
        stem = _digest({"path": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns, "v": 1})[:20]
        out = folder / f"{stem}.png"
        meta = folder / f"{stem}.json"
        if out.is_file() and meta.is_file():
            w, h = json.loads(meta.read_text())["size"]
            return path, (out, Geometry(int(w), int(h)))
        try:
            img = load_image(path)
        except ImageLoadError as exc:
            return path, exc.reason
        import io

        buf = io.BytesIO()
        square_canvas(img).save(buf, format="PNG", compress_level=1)
        atomic_write_bytes(out, buf.getvalue())
        atomic_write_bytes(meta, json.dumps({"source": str(path.resolve()), "size": [img.width, img.height]}).encode())
        return path, (out, Geometry(img.width, img.height))

    good: dict[Path, tuple[Path, Geometry]] = {}
    bad: dict[Path, str] = {}
    if reporter is not None:
        reporter.start(len(files), "pad to square")
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for path, res in pool.map(one, files):
                if isinstance(res, str):
                    bad[path] = res
                else:
                    good[path] = res
                if reporter is not None:
                    reporter.advance(1)
    finally:
        if reporter is not None:
            reporter.finish()
    return good, bad


def _checkpoint_json(checkpoint: Any) -> str | list[str] | None:
    if checkpoint is None or isinstance(checkpoint, (str, Path)):
        return None if checkpoint is None else str(checkpoint)
    return [str(c) for c in checkpoint]


def match_category(
    pairs: Sequence[KeypointPair],
    store_path: Path,
    rows: dict[Path, int],
    geoms: dict[Path, Geometry],
    settings: MatchSettings,
    *,
    device: str = "cpu",
    budget: int = _SIM_BUDGET,
) -> list[np.ndarray | None]:
    """Predictions ``(K, 2)`` for each pair from the features in ``store_path`` (``rows``: image -> row);
    None for a pair whose image has no features (its extraction failed).

    Each source map is read once (for its keypoint features), then each target map once, with all the
    queries aimed at it matched together.
    """

    out: list[np.ndarray | None] = [None] * len(pairs)
    with open_store(store_path) as store:
        status = store.status
        done = {p for p, r in rows.items() if status[r] == DONE}
        todo = [i for i, p in enumerate(pairs) if p.source in done and p.target in done]
        queries: dict[int, torch.Tensor] = {}
        by_source: dict[Path, list[int]] = {}
        by_target: dict[Path, list[int]] = {}
        for i in todo:
            by_source.setdefault(pairs[i].source, []).append(i)
            by_target.setdefault(pairs[i].target, []).append(i)
        for path, idx in by_source.items():
            fmap = torch.from_numpy(np.asarray(store[rows[path]])).to(device)
            for i in idx:
                queries[i] = source_vectors(fmap, geoms[path], pairs[i].source_kps, settings.source_sampling)
        for path, idx in by_target.items():
            fmap = torch.from_numpy(np.asarray(store[rows[path]])).to(device)
            q = torch.cat([queries[i] for i in idx])
            pred = _predict(q, fmap, geoms[path], settings, budget)
            a = 0
            for i in idx:
                k = len(pairs[i].source_kps)
                out[i] = pred[a : a + k]
                a += k
    return out


def _atomic_npz(path: Path, **arrays: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _pack(preds: list[np.ndarray | None], pairs: Sequence[KeypointPair]) -> dict[str, np.ndarray]:
    ks = np.array([len(p.source_kps) for p in pairs], dtype=np.int64)
    ok = np.array([p is not None for p in preds], dtype=bool)
    flat = np.concatenate([p if p is not None else np.full((len(q.source_kps), 2), np.nan) for p, q in
                           zip(preds, pairs, strict=True)] + [np.zeros((0, 2))])  # fmt: skip
    return {"counts": ks, "ok": ok, "pred": flat}


def _unpack(data: Any) -> list[np.ndarray | None]:
    out: list[np.ndarray | None] = []
    a = 0
    for k, ok in zip(data["counts"], data["ok"], strict=True):
        out.append(np.asarray(data["pred"][a : a + k]) if ok else None)
        a += int(k)
    return out


def run_correspondence(config: CorrespondenceConfig, reporter: Any = None) -> CorrespondenceReport:
    """Match and score every upsampler of ``config`` on its pairs (see the module docstring).

    Raises:
        VitupError: a wrong root or pairs file, bad flags, or a failed extraction.
    """

    started = time.perf_counter()
    _validate(config)
    if reporter is None:
        reporter = default_reporter()
    device = resolve_device(config.device)
    pairset: PairSet = PAIR_READERS[config.dataset](
        config.root, split=config.split, categories=config.categories, limit=config.limit
    )
    names = _names(config)
    upsamplers = build_upsamplers(config, names)
    cache_dir = Path(config.cache).expanduser() if config.cache else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    workers = config.workers if config.workers is not None else min(8, os.cpu_count() or 1)
    reporter.info(
        f"{config.dataset} {pairset.split}: {len(pairset)} pairs of {len(pairset.images)} images in "
        f"{len(pairset.categories)} categories from {pairset.root}; cache {cache_dir}"
    )
    canvases, unreadable = prepare_canvases(pairset.images, cache_dir, workers=workers, reporter=reporter)
    skipped = list(pairset.skipped)
    for p in pairset.pairs:
        bad = next((f for f in (p.source, p.target) if f in unreadable), None)
        if bad is not None:
            skipped.append({"pair": p.name, "reason": f"{bad}: {unreadable[bad]}"})
    if unreadable:
        path, reason = next(iter(unreadable.items()))
        reporter.warning(f"{len(unreadable)} unreadable images; their pairs are left out (first: {path}: {reason})")
    by_cat: dict[str, list[KeypointPair]] = {}
    for p in pairset.pairs:
        if p.source in canvases and p.target in canvases:
            by_cat.setdefault(p.category, []).append(p)
    pairs = [p for cat_pairs in by_cat.values() for p in cat_pairs]  # category by category
    if not pairs:
        raise VitupError(f"--root {config.root}: no pair has two readable images")
    geoms = {path: geom for path, (_, geom) in canvases.items()}
    thresholds = [pair_threshold(p, (geoms[p.target].width, geoms[p.target].height)) for p in pairs]
    results: list[CorrespondenceResult] = []
    all_preds: dict[str, list[np.ndarray | None]] = {}
    for (upsampler, teacher), name in zip(upsamplers, names, strict=True):
        upsampler.to(device).eval()
        if config.compile:
            reporter.info(f"{name}: --compile: {compile_upsampler(upsampler)} modules compiled")
        result, preds = _run_one(upsampler, teacher, name, config, pairset, by_cat, canvases, cache_dir, device,
                                 reporter)  # fmt: skip
        upsampler.to("cpu")
        errors, thr, cats = [], [], []
        for pair, pred, t in zip(pairs, preds, thresholds, strict=True):
            if pred is None:
                result.skipped.append({"pair": pair.name, "reason": "no features (the extraction failed)"})
                continue
            errors.append(np.linalg.norm(pred - pair.target_kps, axis=1))
            thr.append(t)
            cats.append(pair.category)
        if not errors:
            raise VitupError(f"{name}: no pair could be matched (the extraction failed for every image)")
        scores = pck_scores(errors, thr, cats, config.alphas)
        result.metrics = {f"pck@{k}": v for k, v in scores.mean.items()}
        result.per_category, result.per_point, result.per_pair = scores.per_category, scores.per_point, scores.per_pair
        results.append(result)
        all_preds[name] = preds
    counts = pck_scores([np.zeros(len(p.source_kps)) for p in pairs], [1.0] * len(pairs),
                        [p.category for p in pairs], config.alphas[:1])  # fmt: skip
    settings = config.settings
    protocol = {
        "reference_protocol": _is_reference(config),
        "square": "centred black padding by floor halves (the reference's pad_image_to_square), then a bilinear "
        "antialiased resize to the input size",
        "input_size": upsamplers[0][0].input_size, "res": config.res, "grids": {r.name: r.grid for r in results},
        "padding": settings.padding, "map_back": settings.map_back, "source_sampling": settings.source_sampling,
        "match": "argmax of cosine similarity over the target map", "alphas": list(config.alphas),
        "threshold": "alpha * max(box w, box h) of the target box, original target pixels",
        "correct_if": "error <= threshold (inclusive)",
        "aggregation": "PCK per point within a category, then the unweighted mean over categories",
        "split": pairset.split, "limit": config.limit, "categories": list(config.categories or []) or None,
        "dtype": config.dtype, "backbone": upsamplers[0][0].backbone.describe(),
        "checkpoint": _checkpoint_json(config.checkpoint), "cache": str(cache_dir),
        "device": device,
    }  # fmt: skip
    report = CorrespondenceReport(
        dataset=config.dataset, split=pairset.split, root=str(pairset.root), categories=list(by_cat),
        pairs=counts.pairs, points=counts.points, notes=pairset.notes, protocol=protocol, results=results,
        skipped=skipped,
    )  # fmt: skip
    report.seconds = time.perf_counter() - started
    if config.out is not None:
        _write_outputs(report, Path(config.out), pairs, thresholds, all_preds, canvases, config)
    return report


def _is_reference(config: CorrespondenceConfig) -> bool:
    return (
        config.settings == MatchSettings()
        and config.res == 448
        and config.input_size in (None, 448)
        and tuple(config.alphas) == ALPHAS
    )


def _run_one(
    upsampler: Upsampler, teacher: bool, name: str, config: CorrespondenceConfig, pairset: PairSet,
    by_cat: dict[str, list[KeypointPair]], canvases: dict[Path, tuple[Path, Geometry]], cache_dir: Path,
    device: str, reporter: Any,
) -> tuple[CorrespondenceResult, list[np.ndarray | None]]:  # fmt: skip
    """One upsampler over every category: its store (made or found), then its matches (made or found).

    Returns the result (scores not filled in yet) and the predictions of every pair, category by category.
    """

    refs = checkpoint_refs(config.checkpoint)

    tap = upsampler.backbone.taps[-1]
    result = CorrespondenceResult(name, {}, {}, {}, {}, input_size=upsampler.input_size, channels=upsampler.dim)
    preds: list[np.ndarray | None] = []
    for cat, cat_pairs in by_cat.items():
        images = sorted({p.source for p in cat_pairs} | {p.target for p in cat_pairs})
        ds = ProbeDataset(
            name=pairset.name, split=f"{pairset.split}-{cat}", task="correspondence", root=pairset.root,
            images=[canvases[i][0] for i in images], targets=[],
        )  # fmt: skip
        t0 = time.perf_counter()
        entry = _cache.reuse_or_make_store(
            f"{name} {cat}", ds, upsampler, cache_dir, res=config.res, dtype=config.dtype, tap=tap,
            teacher=teacher, precision=resolve_precision(config.precision, device), fit="squash",
            checkpoint=refs.get(name), device=device, workers=config.workers, seed=config.seed, reporter=reporter,
        )  # fmt: skip
        result.stores[cat], result.cached[cat] = str(entry.path), entry.cached
        t1 = time.perf_counter()
        result.extract_seconds += t1 - t0
        pair_list = [(str(p.source), str(p.target), p.source_kps.tolist()) for p in cat_pairs]
        key = {"store": _digest(entry.key), "settings": asdict(config.settings), "pairs": _digest(pair_list), "v": 1}
        match_path = cache_dir / "matches" / f"{entry.path.stem}-{_digest(key)[:16]}.npz"
        if match_path.is_file():
            with np.load(match_path, allow_pickle=False) as data:
                cat_preds = _unpack(data)
            result.matches_cached[cat] = True
        else:
            rows = {img: r for r, img in enumerate(images)}
            geoms = {img: canvases[img][1] for img in images}
            cat_preds = match_category(cat_pairs, entry.path, rows, geoms, config.settings, device=device,
                                       budget=config.sim_budget)  # fmt: skip
            match_path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_npz(match_path, **_pack(cat_preds, cat_pairs))
            result.matches_cached[cat] = False
        if not result.grid:
            with open_store(entry.path) as store:
                result.grid = [int(v) for v in store.shape[2:]]
        preds += cat_preds
        result.match_seconds += time.perf_counter() - t1
    return result, preds


# =================================================================================================
# outputs
# =================================================================================================
def _write_outputs(
    report: CorrespondenceReport,
    out: Path,
    pairs: Sequence[KeypointPair],
    thresholds: Sequence[float],
    predictions: dict[str, list[np.ndarray | None]],
    canvases: dict[Path, tuple[Path, Geometry]],
    config: CorrespondenceConfig,
) -> None:

    out.mkdir(parents=True, exist_ok=True)
    for res in report.results:
        preds = predictions[res.name]
        arrays = _pack(preds, pairs)
        arrays.update(
            target=np.concatenate([p.target_kps for p in pairs]), source=np.concatenate([p.source_kps for p in pairs]),
            threshold=np.asarray(thresholds, dtype=np.float64), category=np.array([p.category for p in pairs]),
            pair=np.array([p.name for p in pairs]),
        )  # fmt: skip
        file = out / "predictions" / f"{res.name}.npz"
        file.parent.mkdir(parents=True, exist_ok=True)
        _atomic_npz(file, **arrays)
        res.predictions = str(file)
    if config.visualize > 0:
        picks = sorted({int(v) for v in np.linspace(0, len(pairs) - 1, min(config.visualize, len(pairs))).round()})
        rows = [(canvases[pairs[i].source][0], canvases[pairs[i].source][1], pairs[i].source_kps,
                 canvases[pairs[i].target][0], canvases[pairs[i].target][1], pairs[i].target_kps, thresholds[i])
                for i in picks]  # fmt: skip
        vis = {name: [preds[i] for i in picks] for name, preds in predictions.items()}
        report.files["pairs"] = str(save_pairs_png(out / "pairs.png", rows, vis, alpha=config.alphas[0]))
    report.files["report"] = str(out / "report.json")
    write_json(report, out / "report.json")  # type: ignore[arg-type]
