"""ViT-Up distillation (``vitup train``): configuration, data, losses, the loop, resumable state.

The configuration is importable without torch (the CLI builds it before anything heavy loads); the
loop's names are loaded on first use.
"""

from __future__ import annotations

from typing import Any

from vitup_cli.train.config import (
    RESUME_MUTABLE,
    Sizes,
    TrainConfig,
    build_config,
    read_config_file,
    resolve,
    resume_config,
)

_LOOP = {"TrainingDiverged", "TrainResult", "build_model", "lr_at", "train"}


def __getattr__(name: str) -> Any:
    if name in _LOOP:
        from vitup_cli.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'vitup_cli.train' has no attribute '{name}'")


__all__ = [
    "RESUME_MUTABLE",
    "Sizes",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "build_config",
    "build_model",
    "lr_at",
    "read_config_file",
    "resolve",
    "resume_config",
    "train",
]
