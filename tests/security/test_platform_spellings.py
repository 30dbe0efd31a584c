"""Every spelling of root is root, and only true/false are booleans (no Docker needed)."""

from __future__ import annotations

import pytest

from worker.config import ExecutionSettings, load_settings
from worker.errors import InvalidArgument, PermissionDenied
from worker.execution.platform import ExecutionPlatform, resolve_platform
from worker.reapi import re_pb2


def resolve(properties: dict[str, str], allow_root: bool = False) -> ExecutionPlatform:
    action = re_pb2.Action(
        platform=re_pb2.Platform(
            properties=[
                re_pb2.Platform.Property(name=k, value=v)
                for k, v in {"container-image": "a:1", **properties}.items()
            ]
        )
    )
    settings = ExecutionSettings.model_validate({"allow_root": allow_root})
    return resolve_platform(action, re_pb2.Command(), settings)


@pytest.mark.parametrize(
    "user", ["0", "00", "0:0", "000:5", "0:00", "0000000000", "00:65534", "1000:0", "65534:000"]
)
def test_every_spelling_of_uid_or_gid_zero_needs_allow_root(user: str) -> None:
    with pytest.raises(PermissionDenied):
        resolve({"dockerUser": user})
    platform = resolve({"dockerUser": user}, allow_root=True)
    assert platform.runs_as_root and 0 in (platform.uid, platform.gid)


@pytest.mark.parametrize(
    "user",
    ["+0", "-0", " 0", "0 ", "0x0", "٠", "０", "0:", ":0", "0:0:0", "1e3", "", "99999999999"],
)
def test_anything_but_ascii_digits_is_invalid(user: str) -> None:
    with pytest.raises(InvalidArgument):
        resolve({"dockerUser": user}, allow_root=True)


def test_user_spellings_are_canonical_so_pools_match() -> None:
    assert resolve({"dockerUser": "01000:0100"}).user == "1000:100"
    assert resolve({"dockerUser": "1000"}).user == "1000:1000"


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "tRuE"])
def test_run_as_root_true_in_any_case_is_root(value: str) -> None:
    with pytest.raises(PermissionDenied):
        resolve({"dockerRunAsRoot": value})
    assert resolve({"dockerRunAsRoot": value}, allow_root=True).runs_as_root


@pytest.mark.parametrize("value", ["1", "yes", "on", "y", "t", " true", "true ", "", "0", "no"])
def test_booleans_accept_only_true_or_false(value: str) -> None:
    with pytest.raises(InvalidArgument):
        resolve({"dockerRunAsRoot": value}, allow_root=True)
    with pytest.raises(InvalidArgument):
        resolve({"sidecar-reuse": value})


def test_false_means_false() -> None:
    assert not resolve({"dockerRunAsRoot": "FALSE"}).runs_as_root
    assert not resolve({"sidecar-reuse": "False"}).reuse_sidecar


def test_configured_default_user_is_canonical() -> None:
    settings = load_settings(execution={"default_user": "0065534:065534"})
    assert settings.execution.default_user == "65534:65534"
    with pytest.raises(ValueError, match="numeric"):
        load_settings(execution={"default_user": "٠:٠"})
