"""``vitup train``: one loop (``loop.py``) and per-method recipes (``methods/``: ViT-Up, ...);
configuration (``config.py``: the shared dataclass and checks; ``settings.py``: a run's configuration by
method), data, losses, resumable state."""

from __future__ import annotations

from vitup_cli.train.config import RESUME_MUTABLE, CommonConfig, Sizes, TrainConfig, resolve
from vitup_cli.train.loop import TrainingDiverged, TrainResult, build_model, lr_at, make_method, train
from vitup_cli.train.settings import build_config, config_class, read_config_file, resume_config

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
