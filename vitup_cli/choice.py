"""``ModelChoice``: where a command's features come from, the fields every feature command shares.

``vitup extract`` (``extract.ExtractConfig``), ``vitup probe`` (``probe.run.ProbeConfig``), ``vitup probe
spair|keypoints`` (``probe.correspondence.CorrespondenceConfig``) and ``vitup visualize``
(``viz.ModelOptions``) inherit these fields; each command adds its own (the upsampler names it takes, tap,
precision, store dtype, ...). A field is here only when it has the same name, type, default and meaning in
all of them; a command whose default differs (visualize's ``device``) or that takes more (the probes' one
checkpoint per method) redeclares it. Nothing here imports more than the standard library and ``errors``,
so every layer may use it, the CLI's torch-free start included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitup_cli.errors import VitupError


@dataclass(kw_only=True)
class ModelChoice:
    """The model a command runs: a checkpoint (trained upsampler and its backbone) or a backbone by name.

    Attributes:
        checkpoint: a run of ``vitup train``, a release short name or a published file (None: the
            command's default upsampler over ``backbone``).
        backbone: a vitup backbone name (``vitup backbones``), for upsamplers whose weights do not fix one.
        weights: a local file of backbone weights (None: ``pretrained``).
        pretrained: which published backbone weights (``hub``), or ``none`` for a random init.
        backbone_args: timm constructor overrides (``--backbone-args``: ``depth``, ``embed_dim``, ...).
        input_size: the backbone input size (None: the upsampler's own).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        seed: seeds what is random in the run, a random-init backbone (``pretrained='none'``) first, so
            the same seed gives the same features.
    """

    checkpoint: str | Path | None = None
    backbone: str = "dinov3_s+"
    weights: str | Path | None = None
    pretrained: str = "hub"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    input_size: int | None = None
    device: str = "auto"
    seed: int = 0


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``"depth=4,embed_dim=192,num_heads=3"`` -> ``{"depth": 4, ...}`` (ints, floats, bools, strings)."""
    if not text:
        return {}
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VitupError(f"--backbone-args '{text}': expected KEY=VALUE[,KEY=VALUE...]")
        value = value.strip()
        parsed: Any = value
        for cast in (int, float):
            try:
                parsed = cast(value)
                break
            except ValueError:
                continue
        if value.lower() in {"true", "false"}:
            parsed = value.lower() == "true"
        out[key.strip()] = parsed
    return out
