"""torch.hub entry points: ``torch.hub.load("PATH/TO/vitup", "vitup", source="local")`` from a clone.

Every entry is ``vitup_cli.load``: a release (``vit-up:dinov3_splus``, the default), a checkpoint path, or a
method name with ``backbone=``. Published ViT-Up weights are cc-by-nc-sa-4.0 (vitup says so when it loads them).
"""

dependencies = ["torch", "timm", "peft", "safetensors", "huggingface_hub"]

from vitup_cli import list_upsamplers as _list_upsamplers  # noqa: E402
from vitup_cli import load as _load  # noqa: E402


def vitup(name: str = "vit-up:dinov3_splus", **kwargs):
    """ViT-Up (or any upsampler ``vitup_cli.load`` knows): ``torch.hub.load(REPO, "vitup", "vit-up:dinov3_b")``."""
    return _load(name, **kwargs)


def upsampler(name: str, **kwargs):
    """Any registered upsampler by name, release or checkpoint, e.g. ``upsampler("bilinear", backbone="dinov3_s")``."""
    return _load(name, **kwargs)


def upsamplers():
    """The registered upsamplers (``vitup_cli.list_upsamplers``)."""
    return _list_upsamplers()
