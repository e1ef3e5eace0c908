"""Probe training from a store: streamed from disk vs held in memory, at the protocol's sizes.

Writes a store of N images of C x R x R float16 features (random: the worst case for compression),
then trains the 1x1-conv head for one epoch at a crop of S (labels S x S) twice: with the store held in
memory, and streamed row by row (memory budget 0). Prints images/s of both, the rows read and the most
rows held at once, and checks that both runs end with the same head.

    python benchmarks/probe_streaming.py --n 32 --channels 384 --res 224 --crop 448
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from vitup_cli.probe.train import StoreFeatures, TrainSettings, fit_head
    from vitup_cli.stores import DONE, StoreLayout, create_writer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--crop", type=int, default=448)
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "feats.zarr"
        layout = StoreLayout.for_images(args.n, args.channels, args.res, args.res, 8)
        writer = create_writer(path, layout, [f"img{i}" for i in range(args.n)], {"complete": True})
        t0 = time.perf_counter()
        for a in range(0, args.n, 8):
            b = min(a + 8, args.n)
            feats = rng.standard_normal((b - a, args.channels, args.res, args.res), dtype=np.float32)
            writer.write_rows(a, feats.astype(np.float16), np.full(b - a, DONE), np.zeros((b - a, 2)),
                              np.zeros((b - a, 4)))  # fmt: skip
        writer.finalize()
        written = time.perf_counter() - t0
        targets = rng.integers(0, args.classes, (args.n, args.crop, args.crop), dtype=np.uint8)
        gb = layout.n * layout.image_bytes / 1e9
        print(f"store: {args.n} x {args.channels} x {args.res}^2 float16 = {gb:.2f} GB, written in {written:.1f} s")
        settings = TrainSettings(epochs=1, batch_size=args.batch_size, device=args.device, flip=True)
        heads = {}
        for name, budget in (("in memory", 1 << 40), ("streamed", 0)):
            t0 = time.perf_counter()
            source = StoreFeatures(path, memory_budget=budget)
            load = time.perf_counter() - t0
            t1 = time.perf_counter()
            fit = fit_head(source, targets, settings, args.classes)
            train = time.perf_counter() - t1
            heads[name] = fit.head.state_dict()
            print(
                f"{name:>10}: load {load:5.1f} s, train {train:5.1f} s = {args.n / train:6.1f} img/s "
                f"({args.n / (load + train):6.1f} img/s with the load); rows read {source.rows_read}, "
                f"most rows held at once {source.max_rows_held}"
            )
            source.close()
        same = all(torch.equal(heads["in memory"][k], heads["streamed"][k]) for k in heads["streamed"])
        print(f"same head both ways: {same}")


if __name__ == "__main__":
    main()
