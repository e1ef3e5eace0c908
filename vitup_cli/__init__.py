"""vitup: dense, faithful, per-pixel features from Vision Transformers (ViT-Up and its peers).

``vitup_cli.load(name_or_checkpoint, ...)`` gives an upsampler (``features(images, size)`` /
``query(images, xy)``); ``vitup_cli.list_upsamplers()`` says which exist. Both load on first use (PEP 562),
so ``import vitup_cli`` (and the ``vitup`` command's start) stays free of torch.
"""

from typing import Any

from vitup_cli._version import __version__

_API = ("UpsamplerInfo", "list_upsamplers", "load")


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module("vitup_cli.api"), name)
    raise AttributeError(f"module 'vitup_cli' has no attribute '{name}'")


__all__ = ["UpsamplerInfo", "__version__", "list_upsamplers", "load"]
