"""``vitup train``: one loop (``loop.py``) and per-method recipes (``methods/``: ViT-Up, ...);
configuration, data, losses, resumable state.

The configuration module is importable without torch (the CLI imports it before anything heavy
loads); the loop's names and the methods are loaded on first use.
"""

from __future__ import annotations

from typing import Any

from vitup_cli.train.config import (
    RESUME_MUTABLE,
    CommonConfig,
    Sizes,
    TrainConfig,
    build_config,
    read_config_file,
    resolve,
    resume_config,
)

_LOOP = {"TrainingDiverged", "TrainResult", "build_model", "lr_at", "make_method", "train"}


def __getattr__(name: str) -> Any:
    if name in _LOOP:
        from vitup_cli.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'vitup_cli.train' has no attribute '{name}'")


__all__ = [
    "RESUME_MUTABLE",
    "CommonConfig",
    "Sizes",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "build_config",
    "build_model",
    "lr_at",
    "make_method",
    "read_config_file",
    "resolve",
    "resume_config",
    "train",
]
