"""A lock on a feature store, so two jobs never write the same store (local disk or object store).

The lock is a small JSON object next to the store (``STORE.vitup-lock/job.json``; a ``--part I/N`` job
holds ``part-I-of-N.json`` instead, so the parts of one job array share the store): who holds it (pid,
host, start time, command) and a heartbeat the holder refreshes while it writes. It is taken with an
exclusive create (``O_EXCL`` locally, a conditional PUT on S3), so two jobs that start together cannot
both win. A lock is stale, and is taken over with a warning, when its holder is a dead process on this
host, or (another host, or a remote store, where no pid can be checked) when its heartbeat is older than
``timeout`` seconds. Nothing here lists objects: every lock a job must respect is read by name.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitup_cli.errors import VitupError
from vitup_cli.stores import Location, is_remote, store_path

LOCK_SUFFIX = ".vitup-lock"
DEFAULT_TIMEOUT = 1800.0  # seconds without a heartbeat before a lock another host holds counts as stale
_HEARTBEAT = 60.0


def lock_location(store: str | Path, storage_options: dict[str, Any] | None = None) -> Location:
    """Where a store's locks live: ``STORE.vitup-lock/`` beside it."""
    return Location(str(store_path(store)) + LOCK_SUFFIX, storage_options)


def lock_name(part: tuple[int, int] | None = None) -> str:
    return "job.json" if part is None else f"part-{part[0]}-of-{part[1]}.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}" + (
        f" (part {holder['part']})" if holder.get("part") else ""
    )


@dataclass
class StoreLock:
    """Held by one job; ``release()`` (or ``with``) gives it back, ``heartbeat()`` keeps it fresh."""

    location: Location
    name: str
    record: dict[str, Any]
    _last: float = field(default=0.0)

    def heartbeat(self, force: bool = False) -> None:
        now = time.time()
        if force or now - self._last >= _HEARTBEAT:
            self._last = now
            self.record["heartbeat"] = now
            current = _read(self.location, self.name)
            if current is not None and current.get("token") == self.record["token"]:
                self.location.write(self.name, json.dumps(self.record).encode())

    def release(self) -> None:
        current = _read(self.location, self.name)
        if current is not None and current.get("token") == self.record["token"]:  # never someone else's
            self.location.delete(self.name)

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(loc: Location, name: str) -> dict[str, Any] | None:
    data = loc.read(name)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"corrupt": True, "heartbeat": 0}


def is_stale(holder: dict[str, Any], remote: bool, timeout: float) -> bool:
    """A dead pid on this host, or (elsewhere or remote) a heartbeat older than ``timeout``."""
    if holder.get("corrupt"):
        return True
    if not remote and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not _pid_alive(holder["pid"])
    return time.time() - float(holder.get("heartbeat") or 0) > timeout


def acquire(
    store: str | Path,
    *,
    part: tuple[int, int] | None = None,
    also_check: Sequence[str] = (),
    storage_options: dict[str, Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    command: str = "",
    warn: Callable[[str], None] = lambda _m: None,
) -> StoreLock:
    """Take the store's lock (``part``: that part's lock), refusing while a live job holds it or any lock
    in ``also_check`` (names in the same folder). Raises ``VitupError`` naming the holder."""
    loc = lock_location(store, storage_options)
    remote = is_remote(store)
    name = lock_name(part)

    def refuse(lock: str, holder: dict[str, Any]) -> None:
        raise VitupError(
            f"--out {store_path(store)}: another job is writing this store ({describe(holder)}; lock "
            f"{loc.key(lock)}). Wait for it to finish; if that job is gone, delete the lock file"
        )

    for other in also_check:
        holder = _read(loc, other)
        if holder is not None and not is_stale(holder, remote, timeout):
            refuse(other, holder)
    now = time.time()
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "heartbeat": now,
        "command": command,
        "part": f"{part[0]}/{part[1]}" if part else None,
        "token": uuid.uuid4().hex,
    }
    for _attempt in range(3):
        try:
            loc.write(name, json.dumps(record).encode(), exclusive=True)
            return StoreLock(loc, name, record, now)
        except FileExistsError:
            holder = _read(loc, name)
            if holder is None:
                continue  # released between our write and our read: try again
            if not is_stale(holder, remote, timeout):
                refuse(name, holder)
            warn(f"taking over a stale lock on {store_path(store)} ({describe(holder)})")
            loc.delete(name)
    raise VitupError(f"--out {store_path(store)}: could not take the lock {loc.key(name)}; try again")


def claim(
    store: str | Path, name: str, storage_options: dict[str, Any] | None = None
) -> tuple[bool, dict[str, Any] | None]:
    """Exclusive create of a marker ``name`` beside the store: ``(True, None)`` when we made it, else
    ``(False, its contents)``. Parts of a job array use it to create the store exactly once."""
    loc = lock_location(store, storage_options)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    try:
        loc.write(name, json.dumps(record).encode(), exclusive=True)
        return True, None
    except FileExistsError:
        return False, _read(loc, name)


def unclaim(store: str | Path, name: str, storage_options: dict[str, Any] | None = None) -> None:
    lock_location(store, storage_options).delete(name)


def remove_folder_if_empty(store: str | Path) -> None:
    """Tidy the local lock folder when the last lock is gone (remote prefixes vanish by themselves)."""
    if is_remote(store):
        return
    folder = Path(str(store_path(store)) + LOCK_SUFFIX)
    with contextlib.suppress(OSError):
        folder.rmdir()
