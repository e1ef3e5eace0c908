"""Extraction throughput and memory: is the I/O hidden, and does memory stay flat as the output grows?

For each output resolution R (default 224 and 448), in a fresh child process (so peak memory is its own):

1. model only: the images are decoded and fitted once into memory, then timed through exactly the model
   step of ``vitup extract`` (``dense_features``: batch to device, upsample, cast, copy to the host);
2. end to end: ``run_extract`` on the same files into a new store (decoding workers, model, background
   writer, status), with the same model object;

then prints images/s for both, their ratio (goal >= 0.9), and the peak resident memory of each run side by
side with the 448/224 ratio (goal <= 1.3). All in one invocation, on the same images.

The codec table: step 2 runs once per Zarr codec in ``--codecs`` (default ``zstd,lz4,none``, ``--compression``
of ``vitup extract``), and the table gives, per resolution and codec, end-to-end images/s, its ratio to
model-only, the stored size and the compression ratio: what the default codec is chosen by. With
``--writer-threads auto,0`` every codec also runs with zarr's own codec pipeline (vitup 0.2's writer),
side by side with extract's threaded writer; ``--out FILE`` keeps the results as JSON.

Two diagnostics explain a ratio below 1: ``stall``, the share of the end-to-end loop in which the model
step was not running (waiting for decoded images or for the writer's queue, start-up, the last write),
and ``model slowdown``, how much slower the very same model step ran end to end than alone (the
decoding workers and the writer's compression competing for the same CPU cores; on a GPU box the model
step does not share them).

    PYTHONPATH=. python benchmarks/extract_throughput.py                      # synthetic images, CPU
    PYTHONPATH=. python benchmarks/extract_throughput.py --images ./photos --backbone dinov3_b \\
        --pretrained lvd1689m --device cuda --count 512

Defaults are sized for a small CPU box: a random-init ViT-S/16 shape (``--pretrained none``), the
bilinear upsampler, 448-px input, torch on all cores but one (``--threads``) so the decoding workers and
the writer have a core, as the accelerator leaves them on a GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _synthetic_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(count):
        # smooth colour fields plus noise: JPEG-decodes like a photo, not like pure noise
        base = np.stack([np.sin(xx / (20 + 7 * c + i) + c + i) * np.cos(yy / (30 + 5 * c)) for c in range(3)], -1)
        img = (127 + 100 * base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i:05d}.jpg", quality=90)


class _RssSampler:
    """Peak resident memory of this process and its children (DataLoader workers), sampled."""

    def __init__(self, interval: float = 0.05) -> None:
        self.peak_tree = 0
        self._stop = threading.Event()
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            self._proc = None
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            if self._proc is not None:
                try:
                    total = self._proc.memory_info().rss
                    for child in self._proc.children(recursive=True):
                        with contextlib.suppress(Exception):
                            total += child.memory_info().rss
                    self.peak_tree = max(self.peak_tree, total)
                except Exception:
                    pass
            self._stop.wait(interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _child(args: argparse.Namespace, res: int) -> dict:
    import numpy as np
    import torch

    from vitup_cli.backbones import parse_overrides
    from vitup_cli.distributed import Dist
    from vitup_cli.extract import (
        _SHARD_BYTES,
        ExtractConfig,
        SilentReporter,
        _device,
        _ImageRows,
        dense_features,
        fill_colour,
        run_extract,
    )
    from vitup_cli.features import resolve_precision
    from vitup_cli.hub import open_upsampler

    torch.set_num_threads(args.threads)
    device = _device(args.device, Dist())
    torch.manual_seed(0)
    model = open_upsampler(
        "vitup" if args.checkpoint else args.upsampler,
        checkpoint=args.checkpoint,
        backbone=args.backbone,
        pretrained=args.pretrained,
        overrides=parse_overrides(args.backbone_args),
        input_size=None if args.checkpoint else args.input_size,
        device=device,
    )
    files = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    files = files[: args.count]
    grid = (res, res)
    dtype = torch.float16 if args.dtype == "float16" else torch.float32
    image_bytes = model.dim * res * res * (2 if args.dtype == "float16" else 4)
    batch_size = args.batch_size or max(1, min(8, _SHARD_BYTES // image_bytes))  # what extract picks
    with _RssSampler() as sampler:
        # 1. model only: decoded, fitted images in memory; time exactly the model step
        rows = _ImageRows(files, model.input_size, "pad", fill_colour(model))
        images = torch.stack([rows[i]["image"] for i in range(len(files))])
        batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        precision = resolve_precision("auto", device)  # what extract runs: bf16 autocast on CUDA, fp32 on CPU
        dense_features(model, batches[0].to(device).float() / 255, grid, dtype=dtype, precision=precision)  # warm-up
        t0 = time.perf_counter()
        for batch in batches:
            batch = batch.to(device, non_blocking=True).float() / 255
            out, _ = dense_features(model, batch, grid, dtype=dtype, precision=precision)
            del out
        model_s = time.perf_counter() - t0
        del images, batches
        # 2. end to end on the same files, same model object, once per codec
        codecs = args.codecs.split(",") if args.format == "zarr" else ["gzip"]
        settings = [None if w == "auto" else int(w) for w in str(args.writer_threads).split(",")]
        per_codec = {}
        for codec, writer_threads in ((c, w) for w in settings for c in codecs):
            label = codec if writer_threads is None else f"{codec} w{writer_threads}"
            with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
                listing = Path(tmp) / "list.txt"
                listing.write_text("\n".join(str(f) for f in files))
                config = ExtractConfig(
                    f"@{listing}",
                    Path(tmp) / f"bench.{'zarr' if args.format == 'zarr' else 'h5'}",
                    res=grid,
                    dtype=args.dtype,
                    batch_size=batch_size,
                    workers=args.workers,
                    device=str(device),
                    command="benchmark",
                    writer_threads=writer_threads,
                    **({"compression": codec} if args.format == "zarr" else {}),
                )
                summary = run_extract(config, upsampler=model, reporter=SilentReporter())
            per_codec[label] = {
                "e2e_ips": summary.images_per_s,
                "e2e_model_s": summary.model_seconds,
                "e2e_write_s": summary.write_seconds,
                "stored_bytes": summary.bytes_on_disk,
            }
        summary_codec = next(iter(per_codec.values()))
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "res": res,
        "images": len(files),
        "model_ips": len(files) / model_s,
        **summary_codec,
        "codecs": per_codec,
        "raw_bytes": summary.estimate_bytes,
        "peak_rss": peak_self,
        "peak_rss_tree": sampler.peak_tree or None,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "workers": args.workers,
        "device": str(device),
        "numpy": np.__version__,
    }


def main() -> None:
    cores = os.cpu_count() or 2
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, help="a folder of images (default: synthetic 640x480 JPEGs)")
    p.add_argument("--count", type=int, default=48, help="images to use")
    p.add_argument("--res", default="224,448", help="output resolutions to compare (the first is the baseline)")
    p.add_argument("--backbone", default="dinov3_s")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--backbone-args", default=None)
    p.add_argument("--upsampler", default="bilinear")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--input-size", type=int, default=448)
    p.add_argument("--batch-size", type=int, default=None, help="default: extract's (up to 8, 256 MB of features)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=max(1, cores - 1), help="torch threads (default: cores - 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--format", default="zarr", choices=["zarr", "hdf5"])
    p.add_argument(
        "--codecs", default="zstd,lz4,none", help="Zarr codecs for the codec table (the first is the main row)"
    )
    p.add_argument(
        "--writer-threads",
        default="auto",
        help="store writer settings, comma-separated: auto (extract's default) and/or N (0: zarr's own pipeline, "
        "vitup 0.2's writer); each codec runs once per setting",
    )
    p.add_argument("--workdir", default=None, help="where the temporary stores go (default: system temp)")
    p.add_argument("--out", default=None, help="also write the results as JSON here (with the machine described)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child is not None:
        print(json.dumps(_child(args, args.child)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.images is None:
            args.images = Path(tmp) / "images"
            _synthetic_images(args.images, args.count, (480, 640))
        results = []
        for res in [int(r) for r in args.res.split(",")]:
            cmd = [sys.executable, __file__, "--child", str(res)]
            keys = ("images", "count", "backbone", "pretrained", "backbone_args", "upsampler", "checkpoint")
            keys += ("input_size", "batch_size", "workers", "threads", "device", "dtype", "format", "workdir", "codecs")
            keys += ("writer_threads",)
            for key in keys:
                value = getattr(args, key)
                if value is not None:
                    cmd += [f"--{key.replace('_', '-')}", str(value)]
            env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                sys.exit(f"child for R={res} failed:\n{done.stderr[-4000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    mb = 1e6
    first = results[0]
    print(
        f"extract throughput: {first['images']} images, {args.backbone} ({args.pretrained}) + {args.upsampler}, "
        f"input {args.input_size}, batch {[r['batch_size'] for r in results]}, {args.workers} decode worker(s), "
        f"{first['threads']} torch thread(s), {first['device']}, {args.format}, {args.dtype}"
    )
    print(
        f"{'R':>5} {'model img/s':>12} {'end-to-end img/s':>17} {'ratio':>6} {'stall':>6} {'model slowdown':>15} "
        f"{'peak RSS MB':>12} {'+workers MB':>12} {'stored MB':>10}"
    )
    for r in results:
        tree = f"{r['peak_rss_tree'] / mb:12.0f}" if r["peak_rss_tree"] else f"{'-':>12}"
        loop = r["images"] / r["e2e_ips"]
        stall = 1 - r["e2e_model_s"] / loop  # share of the loop the model step waited (data, disk, start, tail)
        slowdown = r["e2e_model_s"] / (r["images"] / r["model_ips"])  # the same model step, sharing the CPU
        print(
            f"{r['res']:>5} {r['model_ips']:12.2f} {r['e2e_ips']:17.2f} {r['e2e_ips'] / r['model_ips']:6.2f} "
            f"{stall:6.1%} {slowdown:14.2f}x {r['peak_rss'] / mb:12.0f} {tree} {r['stored_bytes'] / mb:10.1f}"
        )
    print(f"codec table ({args.format}; one end-to-end run per codec, same model and images):")
    print(
        f"{'R':>5} {'codec':>6} {'end-to-end img/s':>17} {'ratio':>6} {'write s':>8} {'stored MB':>10} "
        f"{'raw/stored':>11}"
    )
    for r in results:
        for codec, c in r["codecs"].items():
            print(
                f"{r['res']:>5} {codec:>6} {c['e2e_ips']:17.2f} {c['e2e_ips'] / r['model_ips']:6.2f} "
                f"{c['e2e_write_s']:8.1f} {c['stored_bytes'] / mb:10.1f} {r['raw_bytes'] / c['stored_bytes']:10.2f}x"
            )
    ratio = first["e2e_ips"] / first["model_ips"]
    print(f"end-to-end / model-only at R={first['res']}: {ratio:.2f} (goal >= 0.9)")
    for r in results[1:]:
        print(f"peak RSS R={r['res']} / R={first['res']}: {r['peak_rss'] / first['peak_rss']:.2f} (goal <= 1.3)")
    print(json.dumps(results))
    if args.out:
        out = {
            "benchmark": "extract_throughput",
            "command": " ".join(["benchmarks/extract_throughput.py", *sys.argv[1:]]),
            "machine": {
                "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                "load_average_at_end": os.getloadavg(),
            },
            "results": results,
        }
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
