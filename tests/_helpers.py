"""Shared test helpers that are neither fixtures nor tied to one command: data builders and payloads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from vitup_cli.data.masks import encode_rle


def make_sa1b(root: Path, n: int = 3, h: int = 48, w: int = 64, seed: int = 0) -> Path:
    """``n`` SA-1B-layout images (sa_N.jpg + sa_N.json) with a few RLE masks each (discs and boxes)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        img = np.zeros((h, w, 3), np.float32) + rng.uniform(0, 255, 3)
        anns = []
        for k in range(int(rng.integers(2, 6))):
            if k % 2:
                cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, h / 2)
                m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            else:
                y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
                m = np.zeros((h, w), bool)
                m[y0 : y0 + int(rng.integers(4, h // 2)), x0 : x0 + int(rng.integers(4, w // 2))] = True
            img[m] = rng.uniform(0, 255, 3)
            anns.append({"id": k, "segmentation": encode_rle(m), "area": int(m.sum())})
        img += rng.normal(0, 6, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"sa_{i + 1}.jpg", quality=95)
        meta = {"image": {"image_id": i + 1, "width": w, "height": h, "file_name": f"sa_{i + 1}.jpg"}}
        (root / f"sa_{i + 1}.json").write_text(json.dumps({**meta, "annotations": anns}))
    return root


class PicklePayload:
    """Unpickling it runs a shell command (``touch PWNED_BY_PICKLE``): what refusing pickles guards against."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_PICKLE",))
