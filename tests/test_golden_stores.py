"""Refactors stay behaviour-neutral: stores written through ``vitup extract`` equal, bit for bit, the ones
recorded in ``tests/data/golden_stores.json`` (written by vitup 0.2 before the plug-in redesign).

Each case builds its trained upsampler from seeds (so a change of any model's initialisation shows too),
extracts two images at the backbone's input size (no resize filter takes part, so a method's default filter
may change without touching these digests) and compares sha256 digests of every array and of the
settings the recording had (settings added later are allowed; none may change or vanish).

Re-record only for a deliberate change of output, and say so in the commit:
``python tests/test_golden_stores.py --record``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import TINY, single_thread, tiny_backbone, tiny_vitup  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

GOLDEN = HERE / "data" / "golden_stores.json"
BACKBONE = ["--backbone", "dinov3_s", "--pretrained", "none", "--backbone-args", "depth=2,embed_dim=64,num_heads=1"]
COMMON = ["--workers", "0", "--device", "cpu", "--seed", "0", "--fit", "squash", "--res", "20,24", "--batch-size", "2"]
#: settings that record when and how a store was made, not what it holds
VOLATILE = {"command", "created", "completed", "resumed", "vitup_version", "checkpoint", "layout", "images"}
#: deliberate changes since the recording: (case, group, key) -> the value now expected
CHANGED = {
    # LoftUp fits images with its reference's PIL filter, bilinear (the plug-in redesign; the images here are
    # already at the input size, so the features are unchanged)
    ("loftup", "settings", "resample"): "bilinear",
    ("loftup", "attrs", "resample"): "bilinear",
}
CASES = ("bilinear", "lowres_tokens", "vitup", "uplift", "featsharp", "loftup")


def _randomise(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in names):
                p.normal_(std=0.05)


def _images(folder: Path, side: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def _case_args(case: str, root: Path) -> tuple[list[str], int]:
    """The extract flags of ``case`` (its trained weights written under ``root``) and its input side."""
    from vitup_cli.hub import save_checkpoint
    from vitup_cli.hub.uplift import save_uplift_checkpoint
    from vitup_cli.models import UPLiFT
    from vitup_cli.models.featsharp import FeatSharp, FeatSharpConfig
    from vitup_cli.models.loftup import LoftUpNet

    if case == "bilinear":
        return [*BACKBONE, "--upsampler", "bilinear", "--input-size", "64"], 64
    if case == "lowres_tokens":
        return [*BACKBONE, "--upsampler", "lowres", "--input-size", "64", "--tokens", "--dtype", "float32"], 64
    if case == "vitup":
        model = tiny_vitup()
        _randomise(model, ("film", "lora_B"))
        save_checkpoint(root / "vitup" / "last", model)
        return ["--checkpoint", str(root / "vitup" / "last")], 64
    if case == "uplift":
        torch.manual_seed(4)
        model = UPLiFT(tiny_backbone(), input_size=64)
        save_uplift_checkpoint(root / "uplift" / "last", model, {"step": 3})
        return ["--checkpoint", str(root / "uplift" / "last")], 64
    if case == "featsharp":
        backbone = tiny_backbone()
        torch.manual_seed(1)
        model = FeatSharp(backbone, FeatSharpConfig(factor=2, input_tokens=4)).eval()
        gen = torch.Generator().manual_seed(2)
        model.fit_statistics(torch.rand(8, 3, 96, 96, generator=gen) for _ in range(2))
        with torch.no_grad():
            model.head.debias.normal_(std=0.05)
            model.head.tile_pos.normal_(std=0.05)
        save_checkpoint(root / "featsharp" / "last", model)
        return ["--checkpoint", str(root / "featsharp" / "last")], 64
    if case == "loftup":
        torch.manual_seed(3)
        net = LoftUpNet(TINY["embed_dim"])
        _randomise(net, ("",))
        path = root / "loftup" / "pytorch_model.bin"
        path.parent.mkdir(parents=True)
        torch.save(net.state_dict(), path)
        return [*BACKBONE, "--upsampler", "loftup", "--checkpoint", str(path), "--input-size", "32"], 32
    raise ValueError(case)


def _digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    return hashlib.sha256(str((array.dtype.str, array.shape)).encode() + array.tobytes()).hexdigest()


def store_digests(store_path: Path, root: Path) -> dict:
    """sha256 of every array of a store, and its settings but for the volatile ones (paths under ``root``
    written as ``<root>``)."""
    from vitup_cli.stores import open_store

    with open_store(store_path) as store:
        out = {
            "features": _digest(store[0 : len(store)]),
            "status": _digest(np.asarray(store.status)),
            "sizes": _digest(np.asarray(store.sizes)),
            "valid": _digest(np.asarray(store.valid)),
            "paths": list(store.paths),
        }
        if store.has("lowres"):
            out["lowres"] = _digest(np.stack([store.lowres(i) for i in range(len(store))]))
        attrs = store.attrs
        settings = {k: v for k, v in attrs.pop("settings").items() if k not in VOLATILE}
        attrs = {k: v for k, v in attrs.items() if k not in VOLATILE}
    for key, value in (("settings", settings), ("attrs", attrs)):
        out[key] = json.loads(json.dumps(value, sort_keys=True, default=str).replace(str(root), "<root>"))
    return out


def extract_case(case: str, root: Path) -> dict:
    from vitup_cli.cli import app

    args, side = _case_args(case, root / "weights")
    images = _images(root / "images", side)
    out = root / f"{case}.zarr"
    with single_thread():
        result = CliRunner().invoke(app, ["extract", str(images), "--out", str(out), *COMMON, *args])
    assert result.exit_code == 0, result.output
    return store_digests(out, root)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_store_equals_the_recorded_one(case, tmp_path):
    golden = json.loads(GOLDEN.read_text())[case]
    got = extract_case(case, tmp_path)
    for key in ("features", "status", "sizes", "valid", "paths", "lowres"):
        assert got.get(key) == golden.get(key), f"{case}: {key} differs from the recorded store"
    for group in ("settings", "attrs"):
        for key, value in golden[group].items():
            value = CHANGED.get((case, group, key), value)
            assert got[group].get(key) == value, f"{case}: {group} {key} is {got[group].get(key)!r}, was {value!r}"


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    recorded = {}
    for name in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            recorded[name] = extract_case(name, Path(tmp))
    GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
