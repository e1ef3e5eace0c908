"""Training methods by name (``vitup train --method NAME``): see ``base.TrainMethod`` for how to add one."""

from __future__ import annotations

from vitup_cli.train.methods.base import TrainMethod
from vitup_cli.train.methods.featsharp import FeatSharpMethod
from vitup_cli.train.methods.loftup import LoftUpMethod
from vitup_cli.train.methods.uplift import UpliftMethod
from vitup_cli.train.methods.vitup import ViTUpMethod

METHODS: dict[str, type[TrainMethod]] = {
    "vitup": ViTUpMethod,
    "uplift": UpliftMethod,
    "loftup": LoftUpMethod,
    "featsharp": FeatSharpMethod,
}

__all__ = ["METHODS", "FeatSharpMethod", "LoftUpMethod", "TrainMethod", "UpliftMethod", "ViTUpMethod"]
