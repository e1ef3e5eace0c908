"""vitup: dense, faithful, per-pixel features from Vision Transformers (ViT-Up and its peers).

``vitup_cli.load(name_or_checkpoint, ...)`` gives an upsampler (``features(images, size)`` /
``query(images, xy)``); ``vitup_cli.list_upsamplers()`` says which exist.
"""

from vitup_cli._version import __version__
from vitup_cli.api import UpsamplerInfo, list_upsamplers, load

__all__ = ["UpsamplerInfo", "__version__", "list_upsamplers", "load"]
