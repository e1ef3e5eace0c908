"""The weights layer: the vitup checkpoint format, the releases table, the foreign layouts (official ViT-Up,
UPLiFT, LoftUp ``.bin`` and run checkpoints, AnyUp, JAFAR, NAF and FeatUp files published by URL) and the one
opener behind every ``--checkpoint``, ``--init-from`` and ``vitup_cli.load``. It imports ``vitup_cli.models``;
``train``, ``extract``, ``probe`` and ``viz`` import it; nothing here imports them.

Importing this package registers every method's readers (``format.register_readers``).
"""

from vitup_cli.hub import anyup, featup, jafar, loftup, naf, uplift, vitup  # noqa: F401  (they register their readers)
from vitup_cli.hub.format import (
    FORMAT,
    OpenOptions,
    checkpoint_paths,
    load_checkpoint,
    read_checkpoint_meta,
    rebuild_backbone,
    register_readers,
    save_checkpoint,
    write_checkpoint,
)
from vitup_cli.hub.open import checkpoint_method, default_checkpoint, load_trained, open_upsampler
from vitup_cli.hub.releases import RELEASES, Release, licence_notice, releases_for, resolve_weights
from vitup_cli.hub.vitup import init_from, open_vitup

__all__ = [
    "FORMAT",
    "RELEASES",
    "OpenOptions",
    "Release",
    "checkpoint_method",
    "checkpoint_paths",
    "default_checkpoint",
    "init_from",
    "licence_notice",
    "load_checkpoint",
    "load_trained",
    "open_upsampler",
    "open_vitup",
    "read_checkpoint_meta",
    "rebuild_backbone",
    "register_readers",
    "releases_for",
    "resolve_weights",
    "save_checkpoint",
    "write_checkpoint",
]
