"""Dense features and model fingerprints: the computation shared by extract, probe and visualize.

Nothing here knows of stores or the CLI: ``fit_image`` turns a PIL image into the square backbone input,
``dense_features`` runs an upsampler on a batch with memory bounded at any output size, and
``model_fingerprint`` names the weights a stored feature depends on when no published name does.

Geometry (``fit_image``): every image becomes a square ``S x S`` input (``S`` = the upsampler's input
size): ``squash`` resizes it, ``crop`` resizes the short side to ``S`` and takes the centre, ``pad``
(default) resizes the long side to ``S`` and centres it on a canvas of the backbone's mean colour
(zero after normalisation). The output grid ``H x W`` spans that square; ``valid`` records the real
image in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from vitup_cli.errors import VitupError
from vitup_cli.models import Upsampler
from vitup_cli.models.registry import capabilities_of

FITS = ("squash", "crop", "pad")
RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
_BUDGET_BYTES = 256 << 20  # float32 features computed at once by the generic path
PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; ``bf16``/``fp32`` as given."""
    if precision not in PRECISIONS:
        raise VitupError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """bf16 autocast for the model's matrix work (``fp32``: nothing changes). Coordinates stay float32:
    every upsampler computes positions from float32 ``xy`` (see ``models.base.sample_map``)."""
    if resolve_precision(precision, device) != "bf16":
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        yield


def compile_upsampler(upsampler: Upsampler) -> int:
    """``--compile``: ``torch.compile`` the upsampler's ``compile_targets`` in place (the backbone's blocks
    and the upsampler's own heavy modules); returns how many modules. Values stay those of eager mode up to
    float reassociation (tested within 1e-4). The first batch pays the compilation (tens of seconds on
    CPU; a C++ compiler is needed there); a smaller last chunk or batch compiles once more, with dynamic
    shapes. ``benchmarks/runtime.py --compile`` measures where it helps (on CPU: UPLiFT and LoftUp at
    224^2, not ViT-Up, whose time is in the matrix products; CUDA not measured yet)."""
    targets = upsampler.compile_targets()
    for module in targets:
        module.compile()
    return len(targets)


# =================================================================================================
# geometry
# =================================================================================================
def _fit_array(
    img: Image.Image, size: int, fit: str, fill: tuple[int, int, int] = (0, 0, 0), resample: str = "bicubic"
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``_fit`` to an ``(S, S, 3)`` uint8 array (what the DataLoader workers hand over)."""
    if fit not in FITS:
        raise VitupError(f"--fit {fit}: use one of {', '.join(FITS)}")
    img = img.convert("RGB") if img.mode != "RGB" else img
    w, h = img.size
    if resample not in RESAMPLING:
        raise VitupError(f"resampling {resample!r}: use one of {', '.join(RESAMPLING)}")
    resample = RESAMPLING[resample]
    if fit == "squash":
        return np.asarray(img.resize((size, size), resample)), (0, 0, size, size)
    if fit == "crop":
        scale = size / min(h, w)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        out = img.resize((nw, nh), resample).crop((left, top, left + size, top + size))
        return np.asarray(out), (0, 0, size, size)
    scale = size / max(h, w)
    nw, nh = min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale)))
    canvas = Image.new("RGB", (size, size), fill)
    left, top = (size - nw) // 2, (size - nh) // 2
    canvas.paste(img.resize((nw, nh), resample), (left, top))
    return np.asarray(canvas), (top, left, top + nh, left + nw)


def fit_image(
    img: Image.Image,
    input_size: int,
    fit: str = "pad",
    fill: tuple[int, int, int] = (0, 0, 0),
    resample: str = "bicubic",
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Fit an RGB image into the square backbone input.

    Args:
        img: a PIL image (converted to RGB if it is not).
        input_size: ``S``, the side of the square input.
        fit: ``squash`` (resize, aspect changes), ``crop`` (short side to ``S``, centre crop) or
            ``pad`` (long side to ``S``, centred on a ``fill``-coloured canvas).
        fill: the padding colour, 0-255 RGB.
        resample: ``bicubic`` (extract's default) or ``bilinear`` (the probe protocol's).
    Returns:
        ``(3, S, S)`` float32 in ``[0, 1]``, and the real image inside it as ``(y0, x0, y1, x1)`` in
        input pixels, end-exclusive (the whole square for ``squash`` and ``crop``).
    """
    arr, box = _fit_array(img, input_size, fit, fill, resample)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255), box


def box_to_grid(box: Sequence[int], input_size: int, grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """An input-pixel box ``(y0, x0, y1, x1)`` -> the output-grid cells whose centres fall inside it."""
    gh, gw = grid
    y0, x0, y1, x1 = box

    def cells(a: int, b: int, n: int) -> tuple[int, int]:
        lo = min(n, max(0, math.ceil(a * n / input_size - 0.5)))
        hi = min(n, max(lo, math.ceil(b * n / input_size - 0.5)))
        return lo, hi

    (gy0, gy1), (gx0, gx1) = cells(y0, y1, gh), cells(x0, x1, gw)
    return gy0, gx0, gy1, gx1


def fill_colour(upsampler: Upsampler) -> tuple[int, int, int]:
    """The backbone's mean colour, 0-255 RGB: what ``pad`` fills with (zero after normalisation)."""
    mean = upsampler.backbone.mean.flatten().tolist()
    return tuple(round(m * 255) for m in mean)  # type: ignore[return-value]


# =================================================================================================
# dense features
# =================================================================================================
GLOBALS = ("cls", "mean")


def _pooled(upsampler: Upsampler, tap: int | None, kind: str | None) -> torch.Tensor | None:
    """The ``(B, C)`` vector the backbone's last pass left for ``kind`` at ``tap`` (see ``hidden_states``)."""
    if kind is None:
        return None
    backbone = upsampler.backbone
    tap = backbone.taps[-1] if tap is None else tap
    pooled = backbone.last_pooled.get(tap)
    if pooled is None or pooled.get(kind) is None:
        raise ValueError(f"the backbone pass left no {kind} vector at tap {tap}")
    return pooled[kind].detach().float().cpu()


def check_global(upsampler: Upsampler, kind: str | None) -> None:
    """``--global`` values this backbone can give; ``VitupError`` otherwise."""
    if kind is None:
        return
    if kind not in GLOBALS:
        raise VitupError(f"--global {kind}: use cls (the class token) or mean (the mean of the patch tokens)")
    if kind == "cls" and not upsampler.backbone.has_class_token:
        raise VitupError("--global cls: this backbone has no class token; use --global mean")


@torch.no_grad()
def dense_features(
    upsampler: Upsampler,
    images: torch.Tensor,
    size: tuple[int, int],
    *,
    tap: int | None = None,
    chunk_queries: int | None = None,
    projection: tuple[torch.Tensor, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float16,
    with_tokens: bool = False,
    pooled: list[torch.Tensor] | None = None,
    global_kind: str | None = None,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features for a batch, with memory bounded at any output size.

    ViT-Up decodes rows of the output grid in chunks of about ``chunk_queries`` queries against one
    cache per batch; other upsamplers run on sub-batches of at most ~256 MB of float32 output. Each piece
    is projected (optional) and cast to ``dtype`` on the device, then copied to the CPU.

    Args:
        images: ``(B, 3, S, S)`` float in ``[0, 1]`` on the upsampler's device.
        size: output grid ``(H, W)`` (ignored by ``lowres``, whose grid is the token grid).
        projection: ``(components (K, C), mean (C,))``: store ``(x - mean) @ components.T`` instead.
        pooled, global_kind: with ``global_kind`` ``cls`` or ``mean``, append the ``(B, C)`` float32 global
            vector of the same backbone pass (the class token, or the mean patch token, at ``tap``) to ``pooled``.
        precision: ``fp32``, ``bf16`` (autocast; the projection and the cast run in float32) or ``auto``.
            On CUDA the host buffer is pinned and copies are asynchronous, synchronised once at the end.
    Returns:
        CPU ``(B, C or K, H, W)`` features in ``dtype``, and the ``(B, C, h, w)`` tokens at ``tap`` of the
        original backbone (LoRA adapters off) when ``with_tokens`` (else None).
    """
    with autocast(precision, images.device):
        out, tokens = _dense_features(
            upsampler, images, size, tap, chunk_queries, projection, dtype, with_tokens, pooled, global_kind
        )
    if images.device.type == "cuda":
        torch.cuda.current_stream(images.device).synchronize()  # the async host copies are complete
    return out, tokens


def _project(x: torch.Tensor, comps: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """PCA projection ``(B, C, H, W)`` -> ``(B, K, H, W)`` in float32 whatever the autocast."""
    B, _, H, W = x.shape
    with torch.autocast(x.device.type, enabled=False):
        flat = x.float().flatten(2).transpose(1, 2)  # (B, H*W, C)
        return ((flat - mean) @ comps.T).transpose(1, 2).reshape(B, -1, H, W)


def _dense_features(
    upsampler: Upsampler,
    images: torch.Tensor,
    size: tuple[int, int],
    tap: int | None,
    chunk_queries: int | None,
    projection: tuple[torch.Tensor, torch.Tensor] | None,
    dtype: torch.dtype,
    with_tokens: bool,
    pooled: list[torch.Tensor] | None,
    global_kind: str | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B = images.shape[0]
    device = images.device
    pinned = device.type == "cuda"
    height, width = upsampler.token_grid if upsampler.native_resolution_only else size
    comps = mean = None
    if projection is not None:
        comps, mean = (t.to(device=device, dtype=torch.float32) for t in projection)
    channels = comps.shape[0] if comps is not None else upsampler.dim
    out = torch.empty((B, channels, height, width), dtype=dtype, pin_memory=pinned)
    tokens = None
    if capabilities_of(upsampler).banded:  # band by band, straight into the output (bounded memory)
        for r0, r1, band in upsampler.bands(images, (height, width), tap=tap, chunk=chunk_queries):
            part = band.float()
            if comps is not None:
                part = _project(part, comps, mean)
            out[:, :, r0:r1].copy_(part.to(dtype), non_blocking=pinned)
        if pooled is not None and global_kind:
            pooled.append(_pooled(upsampler, tap, global_kind))
        if with_tokens:  # the original backbone's tokens, as visualize and probe show them
            tokens = upsampler.teacher_tokens(images, tap).to("cpu", dtype)
        return out, tokens
    per_image = upsampler.dim * height * width * 4
    step = max(1, min(B, _BUDGET_BYTES // max(1, per_image)))
    parts: list[torch.Tensor] = []
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        feats = upsampler.features(images[b0:b1], (height, width), tap=tap).float()
        if pooled is not None and global_kind:
            parts.append(_pooled(upsampler, tap, global_kind))
        if comps is not None:
            feats = _project(feats, comps, mean)
        out[b0:b1].copy_(feats.to(dtype) if pinned else feats, non_blocking=pinned)  # cast + host copy
        del feats
    if parts and pooled is not None:
        pooled.append(torch.cat(parts))
    if with_tokens:
        tokens = (
            out.clone()
            if (upsampler.native_resolution_only and comps is None)
            else upsampler.teacher_tokens(images, tap)
        ).to("cpu", dtype)
    return out, tokens


# =================================================================================================
# fingerprints
# =================================================================================================
def model_fingerprint(upsampler: Upsampler) -> str | None:
    """sha256 of the weights a store depends on that no name identifies: a random-init backbone, and a
    ViT-Up's own weights and LoRA. None for a training-free upsampler over named weights."""
    backbone = upsampler.backbone
    if backbone.random_init:
        tensors = dict(upsampler.state_dict())
    else:
        tensors = upsampler.trained_tensors()
        if not tensors:
            return None
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
