from __future__ import annotations

import pytest

from worker.config import ExecutionSettings
from worker.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from worker.execution.platform import ExecutionPlatform, image_reference, resolve_platform
from worker.reapi import re_pb2


def platform(**properties: str) -> re_pb2.Platform:
    return re_pb2.Platform(
        properties=[re_pb2.Platform.Property(name=k, value=v) for k, v in properties.items()]
    )


def resolve(
    action: dict[str, str] | None = None,
    command: dict[str, str] | None = None,
    **settings: object,
) -> ExecutionPlatform:
    a = re_pb2.Action(platform=platform(**(action or {})))
    c = re_pb2.Command(platform=platform(**(command or {})))
    return resolve_platform(a, c, ExecutionSettings.model_validate(settings))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("docker://golang:1.20", "golang:1.20"),
        ("golang:1.20", "golang:1.20"),
        (
            "docker://registry:5000/team/img@sha256:" + "a" * 64,
            "registry:5000/team/img@sha256:" + "a" * 64,
        ),
    ],
)
def test_image_reference_strips_the_docker_prefix_only(value: str, expected: str) -> None:
    assert image_reference(value) == expected


def test_action_platform_wins_over_command_platform() -> None:
    got = resolve({"container-image": "a:1"}, {"container-image": "b:1"})
    assert got.image == "a:1"


def test_command_platform_is_the_fallback_for_old_clients() -> None:
    assert resolve(None, {"container-image": "b:1"}).image == "b:1"


def test_default_image_when_none_is_named() -> None:
    got = resolve({"OSFamily": "LINUX"}, default_image="docker://base:2")
    assert got.image == "base:2"


def test_no_image_and_no_default_is_a_clear_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition, match="default_image"):
        resolve({})


def test_unknown_property_is_named_unless_ignored() -> None:
    with pytest.raises(FailedPrecondition, match="Pool"):
        resolve({"container-image": "a:1", "Pool": "gpu"})
    resolve({"container-image": "a:1", "Pool": "gpu"}, ignored_properties=["Pool"])


@pytest.mark.parametrize(("name", "value"), [("OSFamily", "windows"), ("ISA", "sparc")])
def test_os_and_isa_must_match_the_worker(name: str, value: str) -> None:
    with pytest.raises(FailedPrecondition, match=name):
        resolve({"container-image": "a:1", name: value})


def test_isa_accepts_the_usual_spellings_of_this_machine() -> None:
    import platform as host

    if host.machine() != "x86_64":
        pytest.skip("spelling check written for x86-64")
    for spelling in ("x86-64", "x86_64", "amd64"):
        resolve({"container-image": "a:1", "ISA": spelling})


def test_allowlist_refuses_other_images() -> None:
    with pytest.raises(PermissionDenied, match="evil"):
        resolve({"container-image": "evil/x:1"}, allowed_images=["corp/*"])
    resolve({"container-image": "corp/x:1"}, allowed_images=["corp/*"])


def test_network_other_than_none_needs_configuration() -> None:
    with pytest.raises(PermissionDenied):
        resolve({"container-image": "a:1", "dockerNetwork": "host"})
    got = resolve(
        {"container-image": "a:1", "dockerNetwork": "host"}, allowed_networks=["none", "host"]
    )
    assert got.network == "host"


def test_user_defaults_to_unprivileged_and_root_needs_configuration() -> None:
    assert resolve({"container-image": "a:1"}).user == "65534:65534"
    with pytest.raises(PermissionDenied):
        resolve({"container-image": "a:1", "dockerRunAsRoot": "true"})
    got = resolve({"container-image": "a:1", "dockerRunAsRoot": "true"}, allow_root=True)
    assert got.user == "0:0" and got.runs_as_root
    assert resolve({"container-image": "a:1", "dockerUser": "1000"}).user == "1000:1000"


@pytest.mark.parametrize("user", ["root", "1000:staff", "abc"])
def test_named_users_are_invalid(user: str) -> None:
    with pytest.raises(InvalidArgument):
        resolve({"container-image": "a:1", "dockerUser": user})


def test_sidecar_reuse_false_asks_for_a_fresh_sidecar() -> None:
    assert not resolve({"container-image": "a:1", "sidecar-reuse": "false"}).reuse_sidecar
    with pytest.raises(InvalidArgument):
        resolve({"container-image": "a:1", "sidecar-reuse": "maybe"})


def test_same_property_twice_with_different_values_in_one_platform_is_invalid() -> None:
    action = re_pb2.Action(
        platform=re_pb2.Platform(
            properties=[
                re_pb2.Platform.Property(name="container-image", value="a:1"),
                re_pb2.Platform.Property(name="container-image", value="b:1"),
            ]
        )
    )
    with pytest.raises(InvalidArgument):
        resolve_platform(action, re_pb2.Command(), ExecutionSettings())
