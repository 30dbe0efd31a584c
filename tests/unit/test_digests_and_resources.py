from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

import pytest

from worker.digests import EMPTY_DIGEST, Digest
from worker.errors import InvalidArgument
from worker.resources import parse_read_resource, parse_write_resource

H = "a" * 64


def test_digest_of_empty_blob_is_the_well_known_one() -> None:
    assert EMPTY_DIGEST.hash == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert EMPTY_DIGEST.size == 0


@pytest.mark.parametrize("bad", ["", "a" * 63, "a" * 65, "A" * 64, "g" * 64])
def test_digest_rejects_hash_that_is_not_sha256_hex(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="64 lowercase hex"):
        Digest(bad, 1)


def test_digest_rejects_negative_size() -> None:
    with pytest.raises(InvalidArgument, match="negative"):
        Digest(H, -1)


def test_many_digests_at_once_are_the_digests_one_at_a_time() -> None:
    hashes = [f"{i:064x}" for i in range(50)]
    sizes = list(range(50))
    many = Digest.many(hashes, sizes)
    assert many == [Digest(h, s) for h, s in zip(hashes, sizes, strict=True)]
    assert {type(d) for d in many} == {Digest}
    assert Digest.many([], []) == []


def test_many_good_digests_are_checked_together_not_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The point of Digest.many: a batch of good digests never runs the one-digest check."""
    checked = 0
    one_by_one = Digest.__post_init__

    def counting(self: Digest) -> None:
        nonlocal checked
        checked += 1
        one_by_one(self)

    monkeypatch.setattr(Digest, "__post_init__", counting)
    assert len(Digest.many([H] * 100, [1] * 100)) == 100
    assert checked == 0
    with pytest.raises(InvalidArgument):
        Digest.many([H, "A" * 64], [1, 1])
    assert checked > 0  # a bad batch falls back to the one-digest check, which names it


class Size(IntEnum):
    SMALL = 5


def test_many_digests_accept_and_reject_what_one_digest_does_at_the_edges() -> None:
    assert Digest.many([H], [Size.SMALL]) == [Digest(H, 5)]  # an int, though not exactly
    assert Digest.many([H], [2**63 - 1]) == [Digest(H, 2**63 - 1)]
    with pytest.raises(InvalidArgument, match="larger than"):
        Digest.many([H], [2**63])
    with pytest.raises(InvalidArgument, match="64 lowercase hex"):
        Digest.many([None], [1])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("bad_hash", "bad_size", "message"),
    [
        ("a" * 63, 1, "64 lowercase hex"),
        ("a" * 65, 1, "64 lowercase hex"),
        ("A" * 64, 1, "64 lowercase hex"),
        ("g" * 64, 1, "64 lowercase hex"),
        ("\u00e9" * 64, 1, "64 lowercase hex"),  # not ASCII
        ("a" * 32 + "\n" + "a" * 31, 1, "64 lowercase hex"),
        (H, -1, "negative"),
        (H, True, "whole number"),
    ],
)
def test_many_digests_reject_a_bad_one_as_one_digest_would(
    bad_hash: str, bad_size: int, message: str
) -> None:
    """One bad digest among good ones is found, and named as Digest() names it (the batch
    check looks at all of them together, then falls back to one at a time)."""
    hashes, sizes = [H, "b" * 64, bad_hash, "c" * 64], [1, 2, bad_size, 3]
    with pytest.raises(InvalidArgument, match=message):
        Digest.many(hashes, sizes)


@pytest.mark.parametrize(
    ("name", "instance"),
    [
        (f"blobs/{H}/12", ""),
        (f"main/blobs/{H}/12", "main"),
        (f"a/b/blobs/{H}/12/file.txt", "a/b"),
    ],
)
def test_read_resource_names_with_and_without_instance(name: str, instance: str) -> None:
    parsed = parse_read_resource(name)
    assert parsed.instance_name == instance
    assert parsed.digest == Digest(H, 12)


@pytest.mark.parametrize(
    ("name", "instance"),
    [
        (f"uploads/u-1/blobs/{H}/12", ""),
        (f"inst/uploads/u-1/blobs/{H}/12/meta", "inst"),
    ],
)
def test_write_resource_names_with_and_without_instance(name: str, instance: str) -> None:
    parsed = parse_write_resource(name)
    assert (parsed.instance_name, parsed.upload_id, parsed.digest) == (
        instance,
        "u-1",
        Digest(H, 12),
    )


@pytest.mark.parametrize(
    "name",
    [
        "",
        "blobs",
        f"blobs/{H}",
        f"blobs/{H}/twelve",
        "blobs/xyz/12",
        f"compressed-blobs/zstd/{H}/12",
    ],
)
def test_malformed_read_resource_is_invalid_argument(name: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_read_resource(name)


@pytest.mark.parametrize(
    "name",
    [f"blobs/{H}/12", f"uploads/blobs/{H}/12", f"uploads/u/{H}/12", f"uploads/u/blobs/{H}"],
)
def test_malformed_write_resource_is_invalid_argument(name: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_write_resource(name)


def test_digest_rejects_sizes_beyond_int64_and_accepts_the_largest_one() -> None:
    """REAPI `Digest.size_bytes` is an int64: nothing above 2**63-1 can be a blob's size."""
    assert Digest(H, 2**63 - 1).size == 2**63 - 1
    with pytest.raises(InvalidArgument, match="2\\*\\*63-1"):
        Digest(H, 2**63)


@pytest.mark.parametrize("size", ["²", "١٢", "-1", "+5", " 5", "1_000", "0x10", "", "9" * 5000])
@pytest.mark.parametrize("parse", [parse_read_resource, parse_write_resource])
def test_sizes_that_are_not_plain_ascii_digits_are_invalid_argument(
    size: str, parse: Callable[[str], object]
) -> None:
    """`str.isdigit()` accepts "²" and other Unicode digits that `int()` refuses, and `int()`
    refuses more than 4300 digits: each must be INVALID_ARGUMENT, never a ValueError."""
    prefix = "uploads/u-1/" if parse is parse_write_resource else ""
    with pytest.raises(InvalidArgument):
        parse(f"{prefix}blobs/{H}/{size}")


@pytest.mark.parametrize("size", ["9223372036854775808", "99999999999999999999"])
def test_sizes_beyond_int64_in_resource_names_are_invalid_argument(size: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_read_resource(f"blobs/{H}/{size}")
    with pytest.raises(InvalidArgument):
        parse_write_resource(f"uploads/u/blobs/{H}/{size}")


def test_largest_int64_size_in_a_resource_name_is_accepted() -> None:
    assert parse_read_resource(f"blobs/{H}/9223372036854775807").digest.size == 2**63 - 1


@pytest.mark.parametrize(
    "name",
    [
        f"uploads//blobs/{H}/12",  # empty upload id
        f"uploads/../blobs/{H}/12",
        f"uploads/./blobs/{H}/12",
        f"uploads/{'u' * 129}/blobs/{H}/12",  # longer than any UUID we keep in memory
        f"uploads/u\x00x/blobs/{H}/12",
        f"uploads/u x/blobs/{H}/12",
        f"../uploads/u/blobs/{H}/12",  # instance name tricks
        f"a/../uploads/u/blobs/{H}/12",
        f"/uploads/u/blobs/{H}/12",
        f"a//b/uploads/u/blobs/{H}/12",
        f"uploads/u/blobs/{'A' * 64}/12",  # REAPI: "always be a lowercase hex string"
        f"uploads/u/blobs/../{H}/12",
        f"uploads/u/compressed-blobs/zstd/{H}/12",
        "uploads/u/blobs",
    ],
)
def test_hostile_write_resource_names_are_invalid_argument(name: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_write_resource(name)


@pytest.mark.parametrize(
    "name",
    [f"../blobs/{H}/12", f"/blobs/{H}/12", f"a/./blobs/{H}/12", f"blobs/{H.upper()}/12"],
)
def test_hostile_read_resource_names_are_invalid_argument(name: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_read_resource(name)


def test_anything_after_the_size_is_ignored() -> None:
    """REAPI: "Anything after the `size` is ignored" (an optional file name or metadata)."""
    parsed = parse_write_resource(f"uploads/u/blobs/{H}/12/../../etc/passwd")
    assert (parsed.upload_id, parsed.digest) == ("u", Digest(H, 12))
