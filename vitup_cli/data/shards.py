"""Tar shards (the webdataset layout) and brace patterns, local or at an fsspec URL.

``shards/{000..099}.tar`` expands like a shell brace (zero-padded ranges, ``{a,b}`` lists) into shard names,
in order. Inside a shard, members are grouped by key (the name up to the first dot of the file name:
``0001.jpg``, ``0001.json`` and ``0001.cls`` are one sample ``0001``) and the sample's image is the member
whose extension is an image extension (the first one, in tar order, if a sample has several). The sample is
recorded as ``shard/key``. Order is stable: shards in pattern order, samples in tar order.

Listing reads the tar headers (seeking past the members' data); each image is
then read by offset and size, so DataLoader workers fetch only their own bytes. A shard whose headers are
corrupt from some point on keeps the samples before that point and reports the rest as one failed entry;
a member that does not decode is a failed row like any unreadable image.
"""

from __future__ import annotations

import itertools
import re
import tarfile
from dataclasses import dataclass
from typing import Any

from vitup_cli.data.io import open_binary
from vitup_cli.errors import VitupError

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a/{00..02}.tar`` -> ``['a/00.tar', 'a/01.tar', 'a/02.tar']``; ``{x,y}`` lists; several braces nest in order."""
    parts: list[list[str]] = []
    pos = 0
    for match in _BRACE.finditer(pattern):
        parts.append([pattern[pos : match.start()]])
        body = match.group(1)
        span = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
        if span:
            a, b = span.group(1), span.group(2)
            width = len(a) if a.startswith("0") or b.startswith("0") else 0
            lo, hi = int(a), int(b)
            step = 1 if hi >= lo else -1
            parts.append([str(i).zfill(width) for i in range(lo, hi + step, step)])
        elif "," in body:
            parts.append(body.split(","))
        else:
            raise VitupError(f"{pattern}: brace '{{{body}}}' is neither a range {{000..099}} nor a list {{a,b}}")
        pos = match.end()
    parts.append([pattern[pos:]])
    return ["".join(p) for p in itertools.product(*parts)]


def is_shard_input(source: str) -> bool:
    """True for ``*.tar`` inputs and brace patterns of them."""
    return source.endswith(".tar") or (("{" in source) and source.split("}")[-1].endswith(".tar"))


@dataclass(frozen=True)
class TarMember:
    """One image inside a tar shard: where its bytes are (``offset``, ``size``) and its recorded name."""

    shard: str  # the shard's path or URL
    name: str  # ``shard_label/key``, what the store's ``path`` records
    member: str  # the member's file name inside the tar
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.shard}:{self.member}"


@dataclass(frozen=True)
class BrokenShard:
    """The part of a shard that could not be listed (a failed row: ``reason`` says why)."""

    shard: str
    name: str
    reason: str

    def __str__(self) -> str:
        return self.shard


def _key_and_ext(member: str) -> tuple[str, str]:
    folder, _, base = member.rpartition("/")
    stem, dot, rest = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ("." + rest.rsplit(".", 1)[-1].lower()) if dot else ""


def list_shard(
    shard: str, label: str, image_extensions: frozenset[str], storage_options: dict[str, Any] | None = None
) -> list[TarMember | BrokenShard]:
    """The samples of one shard that have an image member, in tar order (see the module docstring)."""

    samples: dict[str, TarMember] = {}
    out: list[TarMember | BrokenShard] = []
    try:
        with open_binary(shard, storage_options) as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _key_and_ext(info.name)
                if ext in image_extensions and key not in samples:
                    samples[key] = TarMember(shard, f"{label}/{key}", info.name, info.offset_data, info.size)
                    out.append(samples[key])
            # tarfile ends quietly at a corrupt header after the first: whatever follows must be zero blocks
            fh.seek(tar.offset)
            if fh.read(1 << 20).strip(b"\0"):
                raise tarfile.ReadError(f"a corrupt header at byte {tar.offset}")
    except FileNotFoundError:
        raise VitupError(f"{shard}: no such tar shard") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        reason = f"corrupt tar after {len(out)} samples ({type(exc).__name__}: {exc})"
        out.append(BrokenShard(shard, f"{label}/<unreadable after {len(out)} samples>", reason))
    return out


def read_member(member: TarMember, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes of one member (a ranged read)."""

    with open_binary(member.shard, storage_options) as fh:
        fh.seek(member.offset)
        data = fh.read(member.size)
    if len(data) != member.size:
        raise EOFError(f"{member}: the shard ends {member.size - len(data)} bytes early")
    return data
