"""Blob digests (SHA-256 only): validation, hashing, and conversion to and from the proto."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from worker.errors import InvalidArgument
from worker.reapi import re_pb2

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX_DIGITS = b"0123456789abcdef"

MAX_SIZE = 2**63 - 1
"""The largest size a Digest can have: `size_bytes` is an int64 in the proto."""


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated SHA-256 digest: 64 lowercase hex characters and a size in bytes."""

    hash: str
    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.hash, str) or not _HEX64.fullmatch(self.hash):
            raise InvalidArgument(
                f"digest hash {self.hash!r:.100} is not 64 lowercase hex characters (SHA-256)"
            )
        if not isinstance(self.size, int) or isinstance(self.size, bool):
            raise InvalidArgument(f"digest size {self.size!r:.100} is not a whole number")
        if self.size < 0:
            raise InvalidArgument(f"digest size {self.size} is negative")
        if self.size > MAX_SIZE:
            raise InvalidArgument(f"digest size {self.size} is larger than 2**63-1")

    @classmethod
    def from_proto(cls, proto: re_pb2.Digest) -> Digest:
        return cls(proto.hash, proto.size_bytes)

    @classmethod
    def many(cls, hashes: Sequence[str], sizes: Sequence[int]) -> list[Digest]:
        """Digests of parallel lists of hashes and sizes, validated together (a client asks
        about thousands at a time) by check_well_formed; InvalidArgument names the first bad
        one."""
        check_well_formed(hashes, sizes)
        make, assign = object.__new__, object.__setattr__
        digests = []
        for hash_, size in zip(hashes, sizes, strict=True):
            digest = make(cls)
            assign(digest, "hash", hash_)
            assign(digest, "size", size)
            digests.append(digest)
        return digests

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls(hashlib.sha256(data).hexdigest(), len(data))

    def to_proto(self) -> re_pb2.Digest:
        return re_pb2.Digest(hash=self.hash, size_bytes=self.size)

    @property
    def is_empty(self) -> bool:
        return self.size == 0

    def subject(self) -> str:
        """The PreconditionFailure subject for this blob."""
        return f"blobs/{self.hash}/{self.size}"

    def __str__(self) -> str:
        return f"{self.hash}/{self.size}"


def check_well_formed(hashes: Sequence[str], sizes: Sequence[int]) -> None:
    """Raises InvalidArgument, as Digest() would, for the first of these (parallel lists of
    the same length) that is not a well formed digest. They are checked together: a fraction
    of what one Digest() each costs; only a batch with a bad one is looked at one by one."""
    if len(hashes) != len(sizes):
        raise ValueError(f"{len(hashes)} hashes but {len(sizes)} sizes")
    if not _all_well_formed(hashes, sizes):
        for hash_, size in zip(hashes, sizes, strict=True):
            Digest(hash_, size)


def _all_well_formed(hashes: Sequence[str], sizes: Sequence[int]) -> bool:
    """Whether every hash is 64 lowercase hex characters and every size an int in range:
    the checks of Digest.__post_init__, made on the whole lists at once."""
    try:
        return (
            set(map(type, hashes)) <= {str}
            and set(map(type, sizes)) <= {int}
            and (not sizes or (min(sizes) >= 0 and max(sizes) <= MAX_SIZE))
            and set(map(len, hashes)) <= {64}
            and not "".join(hashes).encode("ascii").translate(None, _HEX_DIGITS)
        )
    except (TypeError, UnicodeEncodeError):
        return False


EMPTY_DIGEST = Digest.of(b"")
