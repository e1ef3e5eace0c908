"""Runtime and memory of every upsampler, side by side, the way the ViT-Up paper's Table 9 measures them.

Batch 1, one 448-px input (28 tokens per side at patch 16), outputs 56/112/224/448 (``--outputs`` adds
896 where it fits). For each upsampler of the registry (ViT-Up at query chunks of 112^2, 224^2 and none)
and each output size, in a fresh child process so its peak memory is its own:

- ``total_ms``: backbone + upsampler, ``features(image, size)`` end to end (warm-up runs, then the median
  of ``--repeats`` timed runs; CUDA timings synchronise before reading the clock);
- ``backbone_ms``: the backbone pass alone on the same prepared input, at the taps the upsampler reads;
- ``upsampler_ms``: the upsampler alone. For ViT-Up this is timed directly (``decode`` against a cache
  computed once); for the others it is ``total_ms - backbone_ms`` (``upsampler_how`` says which);
- peak memory: CUDA max allocated and max reserved (MiB, after ``reset_peak_memory_stats``); CPU the peak
  resident-set growth over the timed runs (sampled every 5 ms, MiB).

Weights are random (``--pretrained none``): time and memory do not depend on their values. Models that
need fitted statistics or a trained state to run at all are given synthetic ones and marked so.

    python benchmarks/runtime.py                                   # CPU, fp32, every upsampler
    python benchmarks/runtime.py --device cuda --precision bf16    # the paper's setting
    python benchmarks/runtime.py --upsamplers vitup,bilinear --outputs 112,224
    python benchmarks/runtime.py --device cuda --precision bf16 --compile   # torch.compile'd (first call apart)

Each cell runs with the allocator the ``vitup`` command sets (``vitup_cli/allocator.py``; ``--allocator
default`` for glibc's own).

Writes ``benchmarks/results/runtime_<device>_<precision>.json`` (the machine described) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: registry name -> [(row label, constructor variant)]; names not listed get one row with no variant.
VARIANTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "vitup": [
        ("vitup chunk 112^2", {"chunk_queries": 112 * 112}),
        ("vitup chunk 224^2", {"chunk_queries": 224 * 224}),
        ("vitup no chunk", {"chunk_queries": None}),
    ],
    "featsharp": [("featsharp 2x", {"factor": 2}), ("featsharp 4x", {"factor": 4})],
}


def _rows(names: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(name, label, variant) for name in names for label, variant in VARIANTS.get(name, [(name, {})])]


class _PeakRss:
    """Peak resident memory of this process while active, sampled every few milliseconds."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.start_rss = 0
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> _PeakRss:
        self.start_rss = self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _build(name: str, variant: dict[str, Any], args: argparse.Namespace):
    """The upsampler under test over a random-init backbone, and notes on what was synthesised."""
    import torch

    from vitup_cli.backbones import load_backbone, parse_overrides
    from vitup_cli.models import UPSAMPLERS, ViTUp, ViTUpConfig

    notes: list[str] = []
    backbone = load_backbone(args.backbone, pretrained="none", overrides=parse_overrides(args.backbone_args))
    if name == "vitup":
        chunk = variant.get("chunk_queries")
        config = ViTUpConfig(chunk_queries=chunk or 10**9)
        backbone.add_lora()
        model: Any = ViTUp(backbone, config)
    elif name == "featsharp":
        from vitup_cli.models import FeatSharp, FeatSharpConfig

        tokens = args.input_size // backbone.patch_size
        model = FeatSharp(backbone, FeatSharpConfig(factor=variant["factor"], input_tokens=tokens))
        gen = torch.Generator().manual_seed(0)
        model.fit_statistics([torch.rand(2, 3, model.input_size, model.input_size, generator=gen)])
        notes.append("PHI-S statistics fitted on 2 random images (values do not change the time)")
        notes.append(
            f"the global view at {args.input_size} px plus {variant['factor']}^2 tiles: images at "
            f"{model.input_size} px; backbone_ms is one pass at that size, upsampler_ms not split"
        )
    else:
        model = UPSAMPLERS[name](backbone, input_size=args.input_size, **variant)
    return model.to(args.device).eval(), notes, torch


def _sync(torch: Any, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn: Any, torch: Any, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(torch, device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(torch, device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    """One (upsampler, output) cell, in this process."""
    name, label, variant = args.name, args.label, json.loads(args.variant)
    if args.allocator == "tuned":
        from vitup_cli.allocator import tune_malloc

        tune_malloc()
    model, notes, torch = _build(name, variant, args)
    device = args.device
    if args.compile:
        from vitup_cli.features import compile_upsampler

        compile_upsampler(model)
    torch.manual_seed(0)
    image = torch.rand(1, 3, model.input_size, model.input_size, device=device)
    size = args.output
    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )
    is_vitup = hasattr(model, "encode") and hasattr(model, "decode")
    taps = model.backbone.taps if is_vitup else [model.backbone.taps[-1]]

    def total() -> Any:
        with torch.inference_mode(), autocast:
            return model.features(image, size)

    prepared = model.prepare(image)

    def backbone() -> Any:
        with torch.inference_mode(), autocast:
            return model.backbone.hidden_states(prepared, taps)

    out: dict[str, Any] = {"upsampler": name, "label": label, "output": size, "notes": notes}
    if args.compile:  # the first call compiles: timed apart, then the usual warm-up
        t0 = time.perf_counter()
        total()
        _sync(torch, device)
        out["first_call_s"] = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with _PeakRss() as rss:
            out["total_ms"] = _median_ms(total, torch, device, args.warmup, args.repeats)
    except torch.OutOfMemoryError:
        return {**out, "status": "out of memory"}
    if device.startswith("cuda"):
        out["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    else:
        out["peak_rss_delta_mib"] = (rss.peak - rss.start_rss) / 2**20
    out["backbone_ms"] = _median_ms(backbone, torch, device, 1, args.repeats)
    if is_vitup:
        from vitup_cli.models import grid_xy

        with torch.inference_mode(), autocast:
            cache = model.encode(image)
        xy = grid_xy(size, size, device=device)[None]
        level = [len(model.decoders) - 1]

        def decode() -> Any:
            with torch.inference_mode(), autocast:
                return model.decode(cache, xy, level)

        out["upsampler_ms"] = _median_ms(decode, torch, device, args.warmup, args.repeats)
        out["upsampler_how"] = "timed (decode on a cached encode)"
    elif name == "featsharp":  # the 1 + u^2 backbone passes are part of the method
        out["upsampler_ms"] = None
        out["upsampler_how"] = "not split (FeatSharp runs the backbone on its tiles)"
    else:
        out["upsampler_ms"] = max(0.0, out["total_ms"] - out["backbone_ms"])
        out["upsampler_how"] = "total - backbone"
    out["status"] = "ok"
    return out


def _machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _child(args: argparse.Namespace, name: str, label: str, variant: dict[str, Any], output: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_cell",
        "--name",
        name,
        "--label",
        label,
        "--variant",
        json.dumps(variant),
        "--output",
        str(output),
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--backbone",
        args.backbone,
        "--input-size",
        str(args.input_size),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--allocator",
        args.allocator,
        *(["--compile"] if args.compile else []),
    ]
    if args.backbone_args:
        cmd += ["--backbone-args", args.backbone_args]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.cell_timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"upsampler": name, "label": label, "output": output, "status": f"failed: {tail[0][:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(cells: list[dict[str, Any]], device: str) -> None:
    mem_key = "peak_allocated_mib" if device.startswith("cuda") else "peak_rss_delta_mib"
    mem_name = "peak alloc MiB" if device.startswith("cuda") else "peak RSS +MiB"
    print(f"{'upsampler':<20} {'out':>5} {'total ms':>10} {'upsampler ms':>13} {'backbone ms':>12} {mem_name:>15}")
    for c in cells:
        if c.get("status") != "ok":
            print(f"{c['label']:<20} {c['output']:>5}  {c.get('status')}")
            continue
        print(
            f"{c['label']:<20} {c['output']:>5} {_fmt(c['total_ms']):>10} {_fmt(c['upsampler_ms']):>13} "
            f"{_fmt(c['backbone_ms']):>12} {_fmt(c.get(mem_key)):>15}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--upsamplers", default=None, help="comma-separated registry names (default: all)")
    p.add_argument("--outputs", default="56,112,224,448")
    p.add_argument("--backbone", default="dinov3_s+")
    p.add_argument("--backbone-args", default=None, help="timm overrides for a shrunk backbone (depth=...,...)")
    p.add_argument("--input-size", type=int, default=448)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cell-timeout", type=float, default=1800)
    p.add_argument("--skip", default="", help="cells to leave out, as LABEL@OUTPUT,... (e.g. 'vitup no chunk@448')")
    p.add_argument("--compile", action="store_true", help="torch.compile as `vitup extract --compile` does")
    p.add_argument(
        "--allocator",
        choices=("tuned", "default"),
        default="tuned",
        help="tuned: glibc malloc thresholds raised as the vitup command does (allocator.py); default: as it comes",
    )
    p.add_argument("--out", type=Path, default=None)
    # one cell in a child process
    p.add_argument("--_cell", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--label", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--output", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._cell:
        print(json.dumps(_measure(args)))
        return 0

    sys.path.insert(0, str(ROOT))
    from vitup_cli.models import UPSAMPLERS

    names = args.upsamplers.split(",") if args.upsamplers else list(UPSAMPLERS)
    unknown = [n for n in names if n not in UPSAMPLERS]
    if unknown:
        p.error(f"unknown upsampler(s) {', '.join(unknown)}; the registry has {', '.join(UPSAMPLERS)}")
    outputs = [int(o) for o in args.outputs.split(",")]
    skip = {c.strip() for c in args.skip.split(",") if c.strip()}
    suffix = "_compile" if args.compile else ""
    out = args.out or RESULTS / f"runtime_{args.device.split(':')[0]}_{args.precision}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cells: list[dict[str, Any]] = []
    for name, label, variant in _rows(names):
        for output in outputs:
            if f"{label}@{output}" in skip:
                continue
            cell = _child(args, name, label, variant, output)
            cells.append(cell)
            print(f"  {label} @ {output}: {cell.get('status')} {_fmt(cell.get('total_ms'))} ms", file=sys.stderr)
            _write(out, args, cells, complete=False)  # an interrupted run keeps what it measured
    _write(out, args, cells, complete=True)
    print_table(cells, args.device)
    print(f"wrote {out}")
    return 0


def _write(out: Path, args: argparse.Namespace, cells: list[dict[str, Any]], complete: bool) -> None:
    result = {
        "benchmark": "runtime",
        "settings": {
            "device": args.device,
            "precision": args.precision,
            "backbone": args.backbone,
            "backbone_args": args.backbone_args,
            "input_size": args.input_size,
            "batch": 1,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "weights": "random init (time and memory do not depend on weight values)",
            "threads": os.environ.get("OMP_NUM_THREADS"),
            "compile": bool(args.compile),
            "allocator": args.allocator,
        },
        "machine": _machine(args.device),
        "skipped_cells": sorted(c.strip() for c in args.skip.split(",") if c.strip()),
        "complete": complete,
        "cells": cells,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
