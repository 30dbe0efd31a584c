"""Reads an action's platform (Action first, Command as fallback) into what the worker needs."""

from __future__ import annotations

import fnmatch
import platform as host_platform
import re
from dataclasses import dataclass

from worker.config import ExecutionSettings
from worker.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from worker.reapi import re_pb2

IMAGE = "container-image"
OS_FAMILY = "OSFamily"
ISA = "ISA"
NETWORK = "dockerNetwork"
RUN_AS_ROOT = "dockerRunAsRoot"
USER = "dockerUser"
REUSE = "sidecar-reuse"
KNOWN = {IMAGE, OS_FAMILY, ISA, NETWORK, RUN_AS_ROOT, USER, REUSE}

_ISA_ALIASES = {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "aarch64", "arm64": "aarch64"}
HOST_ISA = _ISA_ALIASES.get(host_platform.machine().lower(), host_platform.machine().lower())


_NUMERIC_USER = re.compile(r"([0-9]{1,10})(?::([0-9]{1,10}))?")
MAX_ID = 2**31 - 1


def parse_user(value: str) -> tuple[int, int]:
    """A numeric `uid[:gid]` (ASCII digits only; gid defaults to uid) as integers, so that
    every spelling of a number (`0`, `00`, `0:0`) means the same user."""
    match = _NUMERIC_USER.fullmatch(value)
    if match is None:
        raise InvalidArgument(f"dockerUser={value!r} must be a numeric uid or uid:gid")
    uid = int(match.group(1))
    gid = int(match.group(2)) if match.group(2) is not None else uid
    if uid > MAX_ID or gid > MAX_ID:
        raise InvalidArgument(f"dockerUser={value!r}: ids above {MAX_ID} are not supported")
    return uid, gid


@dataclass(frozen=True)
class ExecutionPlatform:
    """Where and how one action runs."""

    image: str
    network: str
    uid: int
    gid: int
    reuse_sidecar: bool

    @property
    def user(self) -> str:
        """The canonical `uid:gid`, one spelling per user (pools are keyed by it)."""
        return f"{self.uid}:{self.gid}"

    @property
    def runs_as_root(self) -> bool:
        """uid 0, or gid 0 (root's group owns much of an image and of the host)."""
        return self.uid == 0 or self.gid == 0


def merged_properties(action: re_pb2.Action, command: re_pb2.Command) -> dict[str, str]:
    """Command.platform (old clients) overlaid by Action.platform (v2.2+): the Action wins."""
    properties: dict[str, str] = {}
    for source in (command.platform, action.platform):
        seen: dict[str, str] = {}
        for prop in source.properties:
            if prop.name in seen and seen[prop.name] != prop.value:
                raise InvalidArgument(
                    f"platform property {prop.name!r} is given twice with different values"
                )
            seen[prop.name] = prop.value
        properties.update(seen)
    return properties


def image_reference(value: str) -> str:
    """Strips the `docker://` prefix; keeps any tag or @sha256: digest."""
    image = value.removeprefix("docker://").strip()
    if not image or any(c.isspace() for c in image):
        raise InvalidArgument(f"container-image {value!r} is not an image reference")
    return image


def _flag(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    raise InvalidArgument(f"platform property {name}={value!r} must be true or false")


def resolve_platform(
    action: re_pb2.Action, command: re_pb2.Command, settings: ExecutionSettings
) -> ExecutionPlatform:
    properties = merged_properties(action, command)
    unknown = sorted(set(properties) - KNOWN - set(settings.ignored_properties))
    if unknown:
        raise FailedPrecondition(
            f"unsupported platform properties: {', '.join(unknown)} (supported: "
            f"{', '.join(sorted(KNOWN))}; operators may list others in "
            "execution.ignored_properties)"
        )

    os_family = properties.get(OS_FAMILY)
    if os_family is not None and os_family.lower() != "linux":
        raise FailedPrecondition(f"no worker for OSFamily={os_family!r}: this worker runs linux")
    isa = properties.get(ISA)
    if isa is not None and _ISA_ALIASES.get(isa.lower(), isa.lower()) != HOST_ISA:
        raise FailedPrecondition(f"no worker for ISA={isa!r}: this worker is {HOST_ISA}")

    if IMAGE in properties:
        image = image_reference(properties[IMAGE])
    elif settings.default_image:
        image = image_reference(settings.default_image)
    else:
        raise FailedPrecondition(
            "the action names no container-image and this server has no "
            "execution.default_image; set exec_properties or "
            "--remote_default_exec_properties=container-image=docker://IMAGE"
        )
    if not any(fnmatch.fnmatchcase(image, pattern) for pattern in settings.allowed_images):
        raise PermissionDenied(
            f"image {image!r} is not allowed here (execution.allowed_images: "
            f"{settings.allowed_images})"
        )

    network = properties.get(NETWORK, "none")
    if network not in settings.allowed_networks:
        raise PermissionDenied(
            f"dockerNetwork={network!r} is not allowed (execution.allowed_networks: "
            f"{settings.allowed_networks})"
        )

    uid, gid = parse_user(properties.get(USER, settings.default_user))
    if RUN_AS_ROOT in properties and _flag(RUN_AS_ROOT, properties[RUN_AS_ROOT]):
        uid, gid = 0, 0
    if (uid == 0 or gid == 0) and not settings.allow_root:
        raise PermissionDenied(
            "running actions as root or with group 0 is not allowed (execution.allow_root)"
        )

    reuse = _flag(REUSE, properties[REUSE]) if REUSE in properties else True
    return ExecutionPlatform(image=image, network=network, uid=uid, gid=gid, reuse_sidecar=reuse)
