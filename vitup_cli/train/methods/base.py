"""What a training method is: the part of ``vitup train`` that differs between upsamplers.

The loop (``vitup_cli.train.loop``) owns everything generic: processes and DDP, the optimiser (AdamW;
Adam when ``weight_decay`` is 0; a method may override ``optimizer``) and its schedule, precision,
gradient accumulation, clipping, the NaN stop, metrics and progress, checkpoints of
``last``/``best``/``step-N``, the resumable state and exact resume. A method owns its model, what one
sample is, how a batch becomes a loss, which parameters train, and what goes into its checkpoints.

Adding a method ``foo`` (nothing else in vitup changes):

1. ``vitup_cli/models/foo.py``: the ``Upsampler`` subclass (``query``; ``features``/``bands`` where it has a
   faster dense path), its configuration dataclass with the paper's defaults, and one
   ``register_upsampler(UpsamplerSpec(...))`` with its capabilities and reference preprocessing; import it in
   ``vitup_cli/models/__init__.py`` (the import order is the listing order). ``extract``, ``probe``,
   ``visualize``, ``vitup_cli.load`` and vitup checkpoints (``hub.save_checkpoint``) then work.
2. If it trains: ``vitup_cli/train/methods/foo.py`` with a ``CommonConfig`` subclass (``method = "foo"``, its
   own settings, redeclared shared defaults; annotations drive YAML/TOML/flag parsing) and a ``TrainMethod``
   subclass implementing the abstract methods below (``save_checkpoint`` writes through ``vitup_cli.hub``);
   add it to ``METHODS`` in ``train/methods/__init__.py``. Each field its configuration adds is a ``vitup train``
   flag with no CLI code (help: ``field(metadata={"help": ...})``; ``vitup_cli/cli/train.py``).
3. If it has published weights: rows in ``vitup_cli/hub/releases.py`` (data), and a ``vitup_cli/hub/foo.py``
   (imported in ``hub/__init__.py``) calling ``register_readers``, only when its files use a foreign key layout.
4. Tests (a few steps lower the loss, kill/resume equals an uninterrupted run, 2 gloo processes equal one:
   ``tests/_train_helpers.py``) and a README row.

Rules the loop relies on: every random choice of a sample comes from the ``rng`` of its position
(``PositionDataset``), so data never depends on workers, processes or where a run resumed; loss terms
are means over the micro-batch, so equal micro-batches average to the full batch; ``loss`` returns
detached terms including ``"loss"``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vitup_cli.errors import VitupError
from vitup_cli.train.config import CommonConfig
from vitup_cli.train.data import PositionDataset, collate


class TrainMethod(ABC):
    """One training recipe behind the shared loop (see the module docstring)."""

    #: the ``--method`` name
    name: ClassVar[str]
    #: the configuration dataclass (a ``CommonConfig`` subclass with this method's defaults)
    config_class: ClassVar[type[CommonConfig]]
    #: loss terms checked for NaN/inf every step (default: all of them)
    checked_terms: ClassVar[tuple[str, ...] | None] = None

    model: nn.Module

    def __init__(self, cfg: CommonConfig, world_size: int = 1) -> None:
        self.cfg = cfg
        self.world_size = world_size

    # -- building ---------------------------------------------------------------------------------
    @abstractmethod
    def build(self) -> None:
        """Check ``self.cfg`` (``VitupError`` naming the flag), fill its derived values, and build
        ``self.model`` (seeded by ``cfg.seed``; everything the run saves and resumes lives in it)."""

    @abstractmethod
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The optimised parameters, in a fixed order (the optimiser state is saved in this order)."""

    def optimizer(self, params: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        """The optimiser over ``params`` (default AdamW with the shared settings; Adam when weight_decay is 0).
        Every parameter group's ``lr`` is scaled by the shared schedule."""
        cfg = self.cfg
        return torch.optim.AdamW(
            [p for _, p in params], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, eps=1e-8
        )

    def set_train_mode(self) -> None:
        """Train-time behaviour (dropout, BatchNorm statistics) where the method wants it."""
        self.model.train()

    def student(self) -> nn.Module:
        """The module whose forward carries every trainable parameter (what DDP wraps)."""
        return self.model

    def grad_clip_at(self, step: int) -> float:
        """Max gradient norm at optimiser step ``step`` (0-based; 0: no clipping). Default ``cfg.grad_clip``."""
        return self.cfg.grad_clip

    def after_step(self, step: int) -> None:
        """Called after optimiser step ``step`` (0-based) was applied (e.g. an EMA teacher's update).
        Whatever it changes must live in ``self.model`` so that resume restores it."""
        return None

    # -- data and loss ------------------------------------------------------------------------------
    @abstractmethod
    def dataset(self, files: Sequence[Path], stream: int) -> PositionDataset:
        """Samples by global position (``TRAIN_STREAM`` or ``VAL_STREAM``)."""

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples)

    @abstractmethod
    def loss(
        self, student: nn.Module, batch: dict[str, Any], device: torch.device, autocast: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch: targets, the student's predictions through ``student`` (maybe DDP-wrapped),
        the differentiable total and the detached terms (``"loss"`` among them)."""

    @abstractmethod
    def term_keys(self) -> list[str]:
        """Names of the terms ``loss`` returns, ``"loss"`` first (held-out evaluation reports these)."""

    # -- saving -----------------------------------------------------------------------------------
    def keep_in_state(self, name: str) -> bool:
        """Is ``self.model`` tensor ``name`` part of the resumable state? (Frozen weights that can be
        rebuilt from their source, e.g. a pretrained backbone, need not be.)"""
        return True

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {n: t for n, t in self.model.state_dict().items() if self.keep_in_state(n)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], where: Path) -> None:
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        absent = sorted(n for n in missing if self.keep_in_state(n))
        if unexpected or absent:
            raise VitupError(
                f"--resume {where}: the state does not match this model "
                f"(missing {absent[:3]}, unexpected {sorted(unexpected)[:3]})"
            )

    @abstractmethod
    def save_checkpoint(self, path: Path, extra: dict[str, Any]) -> None:
        """Write ``path.safetensors`` + ``path.json`` (``extra`` goes into the JSON), loadable by
        ``vitup_cli.checkpoints.open_upsampler``."""

    def describe(self) -> dict[str, Any]:
        """Extra fields of the run's ``config.json`` (``backbone`` with its ``weights_id`` is checked
        on ``--resume``)."""
        backbone = getattr(self, "backbone", None)
        if backbone is None:
            return {}
        return {"backbone": backbone.describe(), "random_init_backbone": backbone.random_init}

    def weights_id(self) -> str | None:
        backbone = getattr(self, "backbone", None)
        return None if backbone is None else backbone.weights_id

    def notes(self) -> list[str]:
        """Lines to tell the user once at the start."""
        backbone = getattr(self, "backbone", None)
        if backbone is not None and backbone.random_init:
            return ["backbone is randomly initialised (--pretrained none): for tests and demos only"]
        return []
