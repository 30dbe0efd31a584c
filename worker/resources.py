"""ByteStream resource names: `[inst/]blobs/H/S[/x]` and `[inst/]uploads/U/blobs/H/S[/x]`."""

from __future__ import annotations

from dataclasses import dataclass

from worker.digests import Digest
from worker.errors import InvalidArgument


@dataclass(frozen=True)
class ReadResource:
    instance_name: str
    digest: Digest


@dataclass(frozen=True)
class WriteResource:
    instance_name: str
    upload_id: str
    digest: Digest


def _digest_at(parts: list[str], index: int, name: str) -> Digest:
    try:
        hash_, size = parts[index], parts[index + 1]
    except IndexError:
        raise InvalidArgument(f"resource name {name!r} ends before the digest") from None
    if not size.isdigit():
        raise InvalidArgument(f"resource name {name!r}: size {size!r} is not a whole number")
    return Digest(hash_, int(size))


def _reject_compressed(parts: list[str], name: str) -> None:
    if "compressed-blobs" in parts:
        raise InvalidArgument(f"resource name {name!r}: compressed blobs are not supported")


def parse_read_resource(name: str) -> ReadResource:
    parts = name.split("/")
    _reject_compressed(parts, name)
    if "blobs" not in parts:
        raise InvalidArgument(f"resource name {name!r} is not of the form [instance/]blobs/H/S")
    at = parts.index("blobs")
    return ReadResource("/".join(parts[:at]), _digest_at(parts, at + 1, name))


def parse_write_resource(name: str) -> WriteResource:
    parts = name.split("/")
    _reject_compressed(parts, name)
    if "uploads" not in parts:
        raise InvalidArgument(
            f"resource name {name!r} is not of the form [instance/]uploads/UUID/blobs/H/S"
        )
    at = parts.index("uploads")
    if len(parts) < at + 3 or parts[at + 2] != "blobs" or not parts[at + 1]:
        raise InvalidArgument(
            f"resource name {name!r} is not of the form [instance/]uploads/UUID/blobs/H/S"
        )
    return WriteResource("/".join(parts[:at]), parts[at + 1], _digest_at(parts, at + 3, name))
