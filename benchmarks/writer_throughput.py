"""Can the store writer keep up with a GPU? Feature batches of realistic statistics go to the real store writer
(``vitup_cli.stores``, exactly as ``vitup extract``'s background writer drives it) as fast as it takes them.

For each output side (``--res``, default 224 and 448), codec (``--codecs``), dtype (``--dtypes``), spatial
chunk (``--chunks``) and writer setting (``--threads``: ``0`` is zarr's own codec pipeline, vitup 0.2's
writer; ``N`` is vitup's shard encoder with N compression threads and two shards in flight), it writes
``--images`` feature maps of 384 channels into a fresh local Zarr store (and, with ``--s3``, a moto S3
bucket on 127.0.0.1) and reports:

- MB/s of features taken (uncompressed bytes / wall time), and the CPU cores that took (process CPU time /
  wall time), as CPU seconds per GB;
- the compression ratio actually reached on disk;
- the largest model rate it could sustain, in images/s at that side, beside the rate it must keep up with:
  the ViT-Up paper's Table 9 on one GPU (24.1 ms for 224^2, 62.6 ms for 448^2, batch 1, bf16), and
- the cores such a writer needs for 2.5 GB/s (one GPU at 448^2) from its CPU seconds per GB.

The features: ``--source vitup`` (default) decodes a pool of ``--pool`` images with a random-init ViT-Up over
a random-init DINOv3-S+ shape (384-d) at the given side, as ``vitup extract`` would store them; ``--source
bilinear`` upsamples the same backbone's tokens bilinearly (smoother, so it compresses better). The pool is
cycled: Blosc compresses every chunk on its own, so repeating images does not flatter the ratio.

    PYTHONPATH=. python benchmarks/writer_throughput.py                     # the default grid, ~10 minutes
    PYTHONPATH=. python benchmarks/writer_throughput.py --res 224 --codecs zstd --threads 0,2 --images 32

Writes ``benchmarks/results/writer_throughput.json`` (``--out``) with the machine described.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitup_cli import stores  # noqa: E402
from vitup_cli._version import __version__  # noqa: E402
from vitup_cli.extract import BackgroundWriter, writer_workers  # noqa: E402
from vitup_cli.progress import NullReporter  # noqa: E402

#: the ViT-Up paper's Table 9 (one GPU, batch 1, bf16): milliseconds per image by output side
TABLE9_MS = {224: 24.1, 448: 62.6}
GOAL_BYTES_PER_S = 2.5e9  # float16 features of one GPU at 448^2 (Table 9), before batching
CHANNELS = 384


def feature_pool(res: int, pool: int, source: str, seed: int = 0) -> np.ndarray:
    """``(pool, 384, res, res)`` float32 features from random-init models (see the module docstring)."""
    from vitup_cli.backbones import load_backbone
    from vitup_cli.models import BilinearUpsampler, ViTUp, ViTUpConfig

    torch.manual_seed(seed)
    backbone = load_backbone("dinov3_s+", pretrained="none")
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(pool, 3, 448, 448, generator=gen)
    if source == "vitup":
        backbone.add_lora()
        model = ViTUp(backbone, ViTUpConfig()).eval()
    else:
        model = BilinearUpsampler(backbone, 448).eval()
    out = []
    with torch.no_grad():
        for i in range(pool):
            out.append(model.features(images[i : i + 1], (res, res))[0].float().numpy())
    return np.stack(out)


def _moto(port: int) -> subprocess.Popen:
    """A moto S3 server on 127.0.0.1:port (the project's offline S3; ``pip install 'moto[server]'``)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto did not start")


def write_once(
    target: str,
    pool: np.ndarray,
    images: int,
    codec: str,
    dtype: str,
    chunk: int,
    threads: int,
    batch: int,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``images`` rows cycled from ``pool`` through the real writer; the measurements of one cell."""
    _, c, h, w = pool.shape
    layout = stores.StoreLayout.for_images(images, c, h, w, batch, dtype=dtype)
    old_chunk = stores.SPATIAL_CHUNK
    stores.SPATIAL_CHUNK = chunk  # the layout's inner chunk side (56 in vitup extract)
    try:
        writer = stores.create_writer(
            target, layout, [f"{i}.png" for i in range(images)], storage_options=storage_options,
            compression=codec, threads=threads,
        )  # fmt: skip
    finally:
        stores.SPATIAL_CHUNK = old_chunk
    cast = pool.astype(dtype)
    shards = [np.stack([cast[(k * batch + j) % len(cast)] for j in range(batch)]) for k in range(2)]
    workers = writer_workers(writer)
    background = BackgroundWriter(writer, NullReporter(), depth=3 - workers, workers=workers)
    t0, c0 = time.perf_counter(), time.process_time()
    for k in range(layout.num_shards):
        a, b = layout.shard_rows(k)
        n = b - a
        background.submit(
            k,
            {
                "features": shards[k % 2][:n],
                "status": np.full(n, stores.DONE, np.uint8),
                "sizes": np.zeros((n, 2)),
                "valid": np.zeros((n, 4)),
            },
        )
    background.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    writer.finalize()
    writer.close()
    raw = images * c * h * w * np.dtype(dtype).itemsize
    return {"wall_s": wall, "cpu_s": cpu, "raw_bytes": raw, "shards": layout.num_shards, "workers": workers}


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _machine() -> dict[str, Any]:
    import zarr

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    model = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model or platform.processor(),
        "cores": cores,
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "vitup": __version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", default="224,448", help="output sides (default 224,448)")
    p.add_argument("--codecs", default="zstd,lz4,none")
    p.add_argument("--dtypes", default="float16")
    p.add_argument("--chunks", default="56", help="inner chunk sides (vitup extract: 56)")
    p.add_argument("--threads", default="0,1,2,4", help="writer threads; 0 = zarr's own pipeline (vitup 0.2)")
    p.add_argument("--images", type=int, default=48, help="rows written per cell")
    p.add_argument("--batch", type=int, default=8, help="rows per shard (vitup extract's batch)")
    p.add_argument("--pool", type=int, default=4, help="distinct feature maps cycled")
    p.add_argument("--source", choices=("vitup", "bilinear"), default="vitup")
    p.add_argument("--repeats", type=int, default=2, help="runs per cell; the best is kept")
    p.add_argument("--s3", action="store_true", help="also write to a moto S3 bucket on 127.0.0.1")
    p.add_argument("--s3-res", default="224", help="the sides written to S3 too (moto is slow; default 224)")
    p.add_argument("--dir", default=None, help="where the local stores go (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "writer_throughput.json"))
    args = p.parse_args(argv)
    sides = [int(r) for r in args.res.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    machine = _machine()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load {machine['load_average_at_start']}")
    targets = ["local"] + (["s3"] if args.s3 else [])
    moto = None
    s3_options: dict[str, Any] = {}
    if args.s3:
        import s3fs

        port = 5123
        moto = _moto(port)
        s3_options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "x", "secret": "x"}
        s3fs.S3FileSystem(**s3_options).mkdir("bench")
    rows: list[dict[str, Any]] = []
    root = Path(args.dir or tempfile.mkdtemp(prefix="vitup-writer-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for res in sides:
            t0 = time.perf_counter()
            pool = feature_pool(res, args.pool, args.source)
            print(f"\n{res}^2: {args.pool} {args.source} feature maps made in {time.perf_counter() - t0:.0f} s")
            image_mb = CHANNELS * res * res * 2 / 1e6
            for target in (t for t in targets if t == "local" or str(res) in args.s3_res.split(",")):
                for codec in args.codecs.split(","):
                    for dtype in args.dtypes.split(","):
                        for chunk in (int(c) for c in args.chunks.split(",")):
                            for th in threads:
                                best = None
                                for rep in range(args.repeats):
                                    name = f"r{res}-{codec}-{dtype}-{chunk}-{th}-{rep}.zarr"
                                    path = f"s3://bench/{name}" if target == "s3" else str(root / name)
                                    so = s3_options if target == "s3" else None
                                    cell = write_once(path, pool, args.images, codec, dtype, chunk, th, args.batch, so)
                                    if target == "local":
                                        cell["disk_bytes"] = _disk_bytes(Path(path))
                                        shutil.rmtree(path)
                                    else:
                                        import s3fs

                                        fs = s3fs.S3FileSystem(**s3_options)
                                        cell["disk_bytes"] = sum(fs.du(f"bench/{name}", total=False).values())
                                        fs.rm(f"bench/{name}", recursive=True)
                                    if best is None or cell["wall_s"] < best["wall_s"]:
                                        best = cell
                                assert best is not None
                                mb_s = best["raw_bytes"] / best["wall_s"] / 1e6
                                need = round(1000 / TABLE9_MS[res], 1) if res in TABLE9_MS else None
                                cores = best["cpu_s"] / best["wall_s"]
                                cpu_s_per_gb = best["cpu_s"] / (best["raw_bytes"] / 1e9)
                                row = {
                                    "target": target, "res": res, "codec": codec, "dtype": dtype, "chunk": chunk,
                                    "threads": th, "workers": best["workers"], "images": args.images,
                                    "mb_per_s": round(mb_s, 1), "cores_used": round(cores, 2),
                                    "cpu_s_per_gb": round(cpu_s_per_gb, 2),
                                    "compression_ratio": round(best["raw_bytes"] / max(1, best["disk_bytes"]), 3),
                                    "max_images_per_s": round(mb_s / image_mb, 1),
                                    "table9_images_per_s": need,
                                    "cores_for_2_5_gb_s": round(GOAL_BYTES_PER_S / 1e9 * cpu_s_per_gb, 1),
                                }  # fmt: skip
                                rows.append(row)
                                print(
                                    f"  {target:5s} {codec:4s} {dtype} chunk {chunk:3d} threads {th}: "
                                    f"{mb_s:7.0f} MB/s on {cores:.2f} cores ({cpu_s_per_gb:.2f} CPU s/GB), "
                                    f"ratio {row['compression_ratio']:.2f}, up to {row['max_images_per_s']:.1f} img/s"
                                    + (f" (one GPU, Table 9: {need})" if need else "")
                                    + f"; 2.5 GB/s needs ~{row['cores_for_2_5_gb_s']} cores"
                                )
    finally:
        if moto is not None:
            moto.kill()
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    speedups = []
    for r in rows:
        if r["threads"] == 0:
            continue
        base = [
            b for b in rows
            if b["threads"] == 0 and all(b[k] == r[k] for k in ("target", "res", "codec", "dtype", "chunk"))
        ]  # fmt: skip
        if base:
            speedups.append({**{k: r[k] for k in ("target", "res", "codec", "dtype", "chunk", "threads")},
                             "speedup_vs_zarr_pipeline": round(r["mb_per_s"] / base[0]["mb_per_s"], 2)})  # fmt: skip
    print("\nspeed-up over zarr's own pipeline (vitup 0.2's writer), same run:")
    for s in speedups:
        print(f"  {s['target']} {s['res']}^2 {s['codec']} {s['dtype']} chunk {s['chunk']} threads {s['threads']}: "
              f"{s['speedup_vs_zarr_pipeline']:.2f}x")  # fmt: skip
    result = {
        "benchmark": "writer_throughput",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**machine, "load_average_at_end": os.getloadavg()},
        "settings": vars(args),
        "table9_ms": TABLE9_MS,
        "rows": rows,
        "speedups": speedups,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
