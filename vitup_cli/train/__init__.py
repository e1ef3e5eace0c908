"""``vitup train``: one loop (``loop.py``) and per-method recipes (``methods/``: ViT-Up, ...);
configuration (``config.py``: the shared dataclass and checks; ``settings.py``: a run's configuration by
method), data, losses, resumable state."""

from __future__ import annotations

from typing import Any

from vitup_cli.train.config import RESUME_MUTABLE, CommonConfig, Sizes, TrainConfig, resolve

#: names loaded on first use (PEP 562): they import torch and every method, and ``train.config`` must stay
#: importable without them (the CLI reads the configuration classes before anything heavy loads)
_LAZY = {
    **{n: "vitup_cli.train.loop" for n in ("TrainingDiverged", "TrainResult", "build_model", "lr_at", "make_method")},
    "train": "vitup_cli.train.loop",
    **{n: "vitup_cli.train.settings" for n in ("build_config", "config_class", "read_config_file", "resume_config")},
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
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
    "config_class",
    "lr_at",
    "make_method",
    "read_config_file",
    "resolve",
    "resume_config",
    "train",
]
