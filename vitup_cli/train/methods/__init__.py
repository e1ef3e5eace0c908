"""Training methods behind ``vitup train --method NAME`` (see ``base.py`` for how to add one)."""

from __future__ import annotations

from vitup_cli.train.methods.base import TrainMethod
from vitup_cli.train.methods.loftup import LoftUpMethod
from vitup_cli.train.methods.vitup import ViTUpMethod

METHODS: dict[str, type[TrainMethod]] = {
    "vitup": ViTUpMethod,
    "loftup": LoftUpMethod,
}

__all__ = ["METHODS", "LoftUpMethod", "TrainMethod", "ViTUpMethod"]
