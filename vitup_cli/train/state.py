"""The resumable training state: one ``state.safetensors`` file, written atomically.

Tensors: the method's model tensors (``TrainMethod.state_tensors``: trainable weights, and frozen ones
that nothing else could rebuild, such as a randomly initialised backbone), the optimiser
moments, and every process's torch RNG state. The file's metadata holds the rest as JSON: step,
optimiser hyperparameters, scheduler, Python/NumPy RNG, best held-out loss, unreadable files. Nothing
is pickled, so a state file from anywhere is safe to open.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitup_cli.errors import VitupError
from vitup_cli.fileio import atomic_write_bytes, jsonable

STATE_FORMAT = "vitup-train-state/1"
STATE_NAME = "state.safetensors"


@dataclass
class RunState:
    """Everything besides tensors that a resumed run needs."""

    step: int = 0
    best_val: float | None = None
    best_step: int | None = None
    last_checkpoint_step: int | None = None
    bad_files: dict[str, str] = field(default_factory=dict)
    world_size: int = 1
    images_seen: int = 0


def _host_rng() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _set_host_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def torch_rng_state(device: torch.device) -> torch.Tensor:
    """This process's torch RNG (CPU, plus its CUDA device's) as one uint8 tensor."""
    parts = [torch.get_rng_state()]
    if device.type == "cuda":
        parts.append(torch.cuda.get_rng_state(device))
    return torch.cat([torch.tensor([len(p) for p in parts], dtype=torch.int64).view(torch.uint8), *parts])


def set_torch_rng_state(state: torch.Tensor, device: torch.device) -> None:
    n = 2 if device.type == "cuda" else 1
    lengths = state[: 8 * n].view(torch.int64).tolist()
    if len(lengths) != n or sum(lengths) + 8 * n != state.numel():
        raise VitupError("state.safetensors: RNG state was saved on another kind of device; cannot resume exactly")
    offset = 8 * n
    cpu = state[offset : offset + lengths[0]].clone()
    torch.set_rng_state(cpu)
    if n == 2:
        torch.cuda.set_rng_state(state[offset + lengths[0] :].clone(), device)


def save_state(
    path: Path,
    *,
    model: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    run: RunState,
    rng_states: list[torch.Tensor],
    config: dict[str, Any],
) -> None:
    """Write the state atomically (``model``: the method's tensors by name; ``rng_states``: one per
    process, rank order)."""
    from safetensors.torch import save

    tensors = {f"model/{k}": v for k, v in model.items()}
    opt = optimizer.state_dict()
    for index, slot in opt["state"].items():
        for key, value in slot.items():
            tensors[f"optim/{index}/{key}"] = value if value.ndim else value.reshape(1)
    for rank, rng in enumerate(rng_states):
        tensors[f"rng/{rank}"] = rng
    meta = {
        "format": STATE_FORMAT,
        "run": run.__dict__,
        "param_groups": jsonable(opt["param_groups"]),
        "scalar_slots": sorted({f"{i}/{k}" for i, s in opt["state"].items() for k, v in s.items() if not v.ndim}),
        "scheduler": jsonable(scheduler.state_dict()),
        "host_rng": _host_rng(),
        "config": config,
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    blob = save(tensors, metadata={"vitup": json.dumps(meta)})
    atomic_write_bytes(path, blob)


@dataclass
class LoadedState:
    run: RunState
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[torch.Tensor]
    host_rng: dict[str, Any]
    config: dict[str, Any]


def load_state(path: Path) -> LoadedState:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise VitupError(f"--resume: {path} is missing; the run never reached its first save (--save-every)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("vitup", "{}"))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise VitupError(f"--resume: {path} is unreadable ({exc}); resume from an earlier copy or start anew") from None
    if meta.get("format") != STATE_FORMAT:
        raise VitupError(f"--resume: {path} is not a vitup training state (format {meta.get('format')!r})")
    scalar = set(meta["scalar_slots"])
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            slots.setdefault(int(index), {})[name] = value.reshape(()) if f"{index}/{name}" in scalar else value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    ranks = sorted(int(k.split("/")[1]) for k in tensors if k.startswith("rng/"))
    return LoadedState(
        run=RunState(**meta["run"]),
        model={k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")},
        optimizer={"state": slots, "param_groups": groups},
        scheduler=meta["scheduler"],
        rng=[tensors[f"rng/{r}"] for r in ranks],
        host_rng=meta["host_rng"],
        config=meta["config"],
    )


def restore_host_rng(state: LoadedState) -> None:
    _set_host_rng(state.host_rng)
