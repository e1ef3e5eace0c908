"""torchrun coordination for jobs that share one store (``vitup extract``).

``Dist.setup()`` reads the torchrun environment; ranks exchange small messages through the rendezvous
key-value store: ``on_rank0`` runs a step on rank 0 and hands its result (or its ``VitupError``) to every
rank, ``gather`` collects one value per rank, ``teardown`` makes rank 0 (which may host the store) leave
last. A single process (no ``WORLD_SIZE``) is a world of one and needs none of it.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vitup_cli.errors import VitupError


@dataclass
class Dist:
    """Coordination between ``torchrun`` ranks: small messages through the rendezvous key-value store.

    No process group is created: a gloo group's worker threads can still hold Python tensors when a rank
    exits and abort the interpreter, and its 30-minute collective timeout is shorter than the time a
    rank may wait for the slowest one. When the caller already initialised ``torch.distributed``, its
    group is used instead.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    store: Any = None
    _seq: int = 0

    _WAIT = _dt.timedelta(days=7)

    @classmethod
    def setup(cls) -> Dist:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), *local)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        try:
            store, rank, world = next(dist.rendezvous("env://", timeout=cls._WAIT))
        except (ValueError, RuntimeError) as exc:
            raise VitupError(
                f"WORLD_SIZE={world} but the torchrun rendezvous failed ({exc}); launch with torchrun"
            ) from None
        return cls(rank, world, *local, store=dist.PrefixStore("vitup-extract/", store))

    def _key(self) -> str:
        self._seq += 1
        return str(self._seq)

    def teardown(self) -> None:
        if self.store is not None:  # rank 0 may host the store: it leaves last
            key = self._key()
            self.store.set(f"{key}/{self.rank}", b"1")
            if self.rank == 0:
                self.store.wait([f"{key}/{r}" for r in range(self.world)], self._WAIT)

    def _broadcast(self, value: Any) -> Any:
        import pickle  # our own objects between our own ranks (what torch's object collectives do)

        import torch.distributed as dist

        if self.store is None:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        key = self._key()
        if self.rank == 0:
            self.store.set(key, pickle.dumps(value))
            return value
        return pickle.loads(self.store.get(key))

    def on_rank0(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and hand its result (or its ``VitupError``) to every rank."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except VitupError as exc:
                error = str(exc)
        if self.world > 1:
            result, error = self._broadcast((result, error))
        if error is not None:
            raise VitupError(error)
        return result

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        import pickle

        import torch.distributed as dist

        if self.store is None:
            out: list[Any] = [None] * self.world
            dist.all_gather_object(out, value)
            return out
        key = self._key()
        self.store.set(f"{key}/{self.rank}", pickle.dumps(value))
        return [pickle.loads(self.store.get(f"{key}/{r}")) for r in range(self.world)]
