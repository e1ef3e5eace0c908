"""Working memory of the upsamplers at growing output sizes: does banding keep it flat?

For each upsampler (``--upsamplers``, default every trained one that makes any output size) and output size R
(default 224, 448, 896) from one 448-px input, in a fresh child process (so the peak is its own): a
DINOv2-S-shaped backbone (random init: memory does not depend on the weights), the upsampler at its default
configuration, one image through ``vitup_cli.features.dense_features`` exactly as ``vitup extract`` runs it
(bands or sub-batches, each cast to float16 and copied to the host output). Printed per row: the peak resident
memory of the process (sampled every 2 ms), the working memory (that peak minus the resident size before the
call, minus the float16 host output ``C x R x R`` that any extractor must hold or write), and the seconds.
Goal (the field issue): working memory at 896 within 1.5x of that at 224.

    PYTHONPATH=. python benchmarks/memory.py                                   # CPU, several minutes
    PYTHONPATH=. python benchmarks/memory.py --upsamplers loftup,anyup --sizes 224,896 --device cuda

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


def _child(name: str, res: int, input_size: int, device: str) -> dict:
    import torch

    from vitup_cli.backbones import load_backbone
    from vitup_cli.features import dense_features
    from vitup_cli.models import build_upsampler

    torch.manual_seed(0)
    backbone = load_backbone("dinov2_s", pretrained="none")
    model = build_upsampler(name, backbone, input_size=input_size).to(device).eval()
    image = torch.rand(1, 3, input_size, input_size, device=device)
    base = _rss()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        dev_base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.no_grad(), _Peak() as sampler:
        out, _ = dense_features(model, image, (res, res), dtype=torch.float16)
    seconds = time.perf_counter() - t0
    output_bytes = out.numel() * out.element_size()
    row = {
        "upsampler": name,
        "res": res,
        "input_size": input_size,
        "seconds": round(seconds, 2),
        "peak_rss": sampler.peak,
        "working": sampler.peak - base - output_bytes,
        "output_bytes": output_bytes,
        "finite": bool(torch.isfinite(out).all()),
    }
    if device.startswith("cuda"):
        row["device_working"] = torch.cuda.max_memory_allocated() - dev_base
    return row


def _default_upsamplers() -> str:
    from vitup_cli.models import specs

    names = [n for n, s in specs().items() if s.capabilities.trained and not s.capabilities.native_resolution_only]
    return ",".join(n for n in names if n not in ("vitup", "featsharp", "uplift")) or "loftup"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upsamplers", default=None, help="comma-separated (default: the field's any-size methods)")
    parser.add_argument("--sizes", default="224,448,896", help="output sizes R (R x R), comma-separated")
    parser.add_argument("--input-size", type=int, default=448, help="backbone input in pixels (448: 32x32 tokens)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        name, res = args.child.split(":")
        print(json.dumps(_child(name, int(res), args.input_size, args.device)))
        return
    names = (args.upsamplers or _default_upsamplers()).split(",")
    rows = []
    for name in names:
        for res in [int(s) for s in args.sizes.split(",")]:
            cmd = [sys.executable, __file__, "--child", f"{name}:{res}", "--input-size", str(args.input_size),
                   "--device", args.device]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)  # each row as soon as it is measured
    mb = 1e6
    print(f"{'upsampler':>10} {'R':>5} {'seconds':>8} {'peak RSS MB':>12} {'working MB':>11} {'output MB':>10}")
    for r in rows:
        print(
            f"{r['upsampler']:>10} {r['res']:5d} {r['seconds']:8.1f} {r['peak_rss'] / mb:12.0f} "
            f"{r['working'] / mb:11.0f} {r['output_bytes'] / mb:10.1f}"
        )
    ratios = {}
    for name in names:
        mine = [r for r in rows if r["upsampler"] == name]
        for r in mine[1:]:
            ratio = r["working"] / max(1, mine[0]["working"])
            ratios[f"{name} {r['res']}/{mine[0]['res']}"] = round(ratio, 2)
            print(f"{name}: working memory R={r['res']} / R={mine[0]['res']}: {ratio:.2f} (goal <= 1.5)")
    if args.json:
        result = {"benchmark": "memory", "command": " ".join(sys.argv), "rows": rows, "ratios": ratios}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
