from __future__ import annotations

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
