"""LoftUp's memory at growing output sizes: does banding keep it flat?

For each output size R (default 224, 448, 896) from one 448-px input, in a fresh child process (so the peak
is its own): a DINOv2-S-shaped backbone (random init: memory does not depend on the weights) and a 384-d
LoftUp (4.30M parameters), one image, ``LoftUp.bands`` consumed as ``vitup extract`` consumes them (each
band cast to float16 and copied to the host output, then dropped). Printed per R: the peak resident memory
of the process while the bands run (sampled), the working memory (that peak minus the resident size once the
model was built and the host output allocated), the host
output array itself (``C x R x R`` float16, which any extractor must hold or write), the seconds, and the
attention matrix the reference would materialise (``R^2 x tokens x 4 heads`` float32, plus the head
average ``nn.MultiheadAttention`` returns). Goal: working memory at 896 within 1.5x of that at 224.

    PYTHONPATH=. python benchmarks/loftup_memory.py                  # CPU, ~3 minutes on 2 cores
    PYTHONPATH=. python benchmarks/loftup_memory.py --sizes 224,896 --device cuda

On CUDA the peak is ``torch.cuda.max_memory_allocated`` (the host output is not on the device).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Peak:
    """The largest resident size seen while the block runs (sampled every 2 ms by a thread)."""

    def __enter__(self) -> _Peak:
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _child(res: int, input_size: int, device: str, chunk: int | None) -> dict:
    import torch

    from vitup_cli.backbones import load_backbone
    from vitup_cli.models.loftup import LoftUp

    torch.manual_seed(0)
    backbone = load_backbone("dinov2_s", pretrained="none")
    model = LoftUp(backbone, input_size=input_size).to(device).eval()
    if chunk:
        model.config.chunk_pixels = chunk
    image = torch.rand(1, 3, input_size, input_size, device=device)
    out = torch.empty(1, model.dim, res, res, dtype=torch.float16)
    out.zero_()  # touch the host output before the baseline: it is reported separately
    base = _rss()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        dev_base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    bands = 0
    with torch.no_grad(), _Peak() as sampler:
        for r0, r1, part in model.bands(image, (res, res)):
            out[:, :, r0:r1].copy_(part)
            bands += 1
            del part
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = sampler.peak
    tokens = (input_size // backbone.patch_size) ** 2
    row = {
        "res": res,
        "input_size": input_size,
        "tokens": tokens,
        "bands": bands,
        "chunk_pixels": model.config.chunk_pixels,
        "seconds": round(seconds, 2),
        "peak_rss": peak,
        "working": peak - base,
        "output_bytes": out.numel() * 2,
        "reference_attention_bytes": res * res * tokens * (4 + 1) * 4,
        "finite": bool(torch.isfinite(out).all()),
    }
    if device.startswith("cuda"):
        row["device_working"] = torch.cuda.max_memory_allocated() - dev_base
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="224,448,896", help="output sizes R (R x R), comma-separated")
    parser.add_argument("--input-size", type=int, default=448, help="backbone input in pixels (448: 32x32 tokens)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-pixels", type=int, default=None, help="pixels per band (default: LoftUp's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.input_size, args.device, args.chunk_pixels)))
        return
    rows = []
    for res in [int(s) for s in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(res), "--input-size", str(args.input_size),
               "--device", args.device]  # fmt: skip
        if args.chunk_pixels:
            cmd += ["--chunk-pixels", str(args.chunk_pixels)]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)  # each size as soon as it is measured
    mb = 1e6
    print(
        f"{'R':>5} {'bands':>6} {'seconds':>8} {'peak RSS MB':>12} {'working MB':>11} {'output MB':>10} "
        f"{'ref. attention MB':>18}"
    )
    for r in rows:
        print(
            f"{r['res']:5d} {r['bands']:6d} {r['seconds']:8.1f} {r['peak_rss'] / mb:12.0f} {r['working'] / mb:11.0f} "
            f"{r['output_bytes'] / mb:10.1f} {r['reference_attention_bytes'] / mb:18.0f}"
        )
    first = rows[0]
    for r in rows[1:]:
        ratio = r["working"] / max(1, first["working"])
        print(f"working memory R={r['res']} / R={first['res']}: {ratio:.2f} (goal <= 1.5)")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "loftup_memory", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
