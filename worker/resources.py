"""ByteStream resource names: `[inst/]blobs/H/S[/x]` and `[inst/]uploads/U/blobs/H/S[/x]`.

Every name comes from a client and is treated as hostile: anything that does not have
exactly this shape is InvalidArgument, never another error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from worker.digests import Digest
from worker.errors import InvalidArgument

# REAPI: "a path segment cannot equal any of the following keywords: `blobs`, `uploads`,
# `actions`, `actionResults`, `operations` and `capabilities`" (and `compressed-blobs`, added
# with compression), so the first of them ends the instance name.
_KEYWORDS = frozenset(
    ["blobs", "uploads", "actions", "actionResults", "operations", "capabilities"]
    + ["compressed-blobs"]
)
# ASCII digits only (str.isdigit() also accepts "²" and other digits int() refuses), and at
# most 19 of them: 2**63-1, the largest int64, has 19.
_SIZE = re.compile(r"[0-9]{1,19}")
# The upload id is a client's UUID; we keep it (as a dict key) for as long as the upload
# lives, so it is bounded, printable and cannot look like a path component.
MAX_UPLOAD_ID_CHARS = 128
_UPLOAD_ID = re.compile(rf"[!-.0-~]{{1,{MAX_UPLOAD_ID_CHARS}}}")  # printable ASCII but " ", "/"


@dataclass(frozen=True)
class ReadResource:
    instance_name: str
    digest: Digest


@dataclass(frozen=True)
class WriteResource:
    instance_name: str
    upload_id: str
    digest: Digest


def _show(name: str) -> str:
    """The name for an error message, cut short: it may be megabytes long."""
    return repr(name) if len(name) <= 200 else repr(name[:200]) + "..."


def _instance(parts: list[str], name: str) -> tuple[str, int]:
    """The instance name and the index of the first keyword segment after it."""
    at = next((i for i, part in enumerate(parts) if part in _KEYWORDS), None)
    if at is None:
        raise InvalidArgument(f"resource name {_show(name)} has no blobs/ or uploads/ segment")
    if any(part in ("", ".", "..") for part in parts[:at]):
        raise InvalidArgument(
            f"resource name {_show(name)}: instance name has an empty, '.' or '..' segment"
        )
    return "/".join(parts[:at]), at


def _blobs_at(parts: list[str], index: int, name: str, form: str) -> None:
    keyword = parts[index] if index < len(parts) else None
    if keyword == "compressed-blobs":
        raise InvalidArgument(f"resource name {_show(name)}: compressed blobs are not supported")
    if keyword != "blobs":
        raise InvalidArgument(f"resource name {_show(name)} is not of the form {form}")


def _digest_at(parts: list[str], index: int, name: str) -> Digest:
    if len(parts) < index + 2:
        raise InvalidArgument(f"resource name {_show(name)} ends before the digest")
    hash_, size = parts[index], parts[index + 1]
    if not _SIZE.fullmatch(size):
        raise InvalidArgument(
            f"resource name {_show(name)}: size {size[:40]!r} is not a whole number of bytes "
            "(at most 2**63-1, ASCII digits)"
        )
    return Digest(hash_, int(size))  # Digest checks the hash and the size's range.


def parse_read_resource(name: str) -> ReadResource:
    form = "[instance/]blobs/HASH/SIZE"
    parts = name.split("/")
    instance, at = _instance(parts, name)
    _blobs_at(parts, at, name, form)
    return ReadResource(instance, _digest_at(parts, at + 1, name))


def parse_write_resource(name: str) -> WriteResource:
    form = "[instance/]uploads/UUID/blobs/HASH/SIZE"
    parts = name.split("/")
    instance, at = _instance(parts, name)
    if parts[at] != "uploads" or len(parts) < at + 2:
        raise InvalidArgument(f"resource name {_show(name)} is not of the form {form}")
    upload_id = parts[at + 1]
    if upload_id in (".", "..") or not _UPLOAD_ID.fullmatch(upload_id):
        raise InvalidArgument(
            f"resource name {_show(name)}: upload id {upload_id[:40]!r} is not 1 to "
            f"{MAX_UPLOAD_ID_CHARS} printable ASCII characters (a UUID)"
        )
    if upload_id in _KEYWORDS:
        raise InvalidArgument(f"resource name {_show(name)} is not of the form {form}")
    _blobs_at(parts, at + 2, name, form)
    return WriteResource(instance, upload_id, _digest_at(parts, at + 3, name))
