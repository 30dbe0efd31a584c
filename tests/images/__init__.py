"""Test images built offline: busybox-static images A and B, a no-shell single-binary image, and
a "hostile" busybox image with a setuid-root probe and an image user with extra groups, and a
busybox image that declares a world-writable VOLUME."""

from __future__ import annotations

import io
import subprocess
import tarfile
import tempfile
from pathlib import Path

import docker

BUSYBOX = Path("/bin/busybox")
HERE = Path(__file__).parent

IMAGE_A = "sidecar-test/busybox-a:1"
IMAGE_B = "sidecar-test/busybox-b:1"
NO_SHELL = "sidecar-test/noshell:1"
HOSTILE = "sidecar-test/hostile:1"
WITH_VOLUME = "sidecar-test/volume:1"

# The world-writable VOLUME the volume image declares, shipped with one writable file.
IMAGE_VOLUME = "/data"
# The hostile image's user: in /etc/passwd with uid 1000, and a member of two more groups.
IMAGE_USER = "builder"
IMAGE_USER_UID = 1000
IMAGE_USER_GROUPS = (2000, 2001)


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    tar.addfile(info)


def _static_binary(source: str) -> bytes:
    with tempfile.TemporaryDirectory() as temp:
        binary = Path(temp) / "program"
        subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(HERE / source)], check=True)
        return binary.read_bytes()


def _busybox_rootfs(marker: str, hostile: bool = False, volume: bool = False) -> bytes:
    """A root filesystem with static busybox, its applets, and /etc/image-name; the hostile
    one adds a setuid-root probe and an image user with supplementary groups."""
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "etc", "tmp"):
            _add_dir(tar, directory, 0o1777 if directory == "tmp" else 0o755)
        _add(tar, "bin/busybox", BUSYBOX.read_bytes(), 0o755)
        for applet in applets:
            if applet != "busybox":
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type = tarfile.SYMTYPE
                link.linkname = "busybox"
                tar.addfile(link)
        _add(tar, "etc/image-name", f"{marker}\n".encode())
        _add(tar, f"etc/only-in-{marker}", b"yes\n")
        if volume:
            _add_dir(tar, IMAGE_VOLUME.lstrip("/"), 0o1777)
            _add(tar, f"{IMAGE_VOLUME.lstrip('/')}/from-image", b"shipped\n", 0o666)
        if hostile:
            _add(tar, "bin/suid-probe", _static_binary("suid_probe.c"), 0o4755)
            _add(
                tar,
                "etc/passwd",
                f"root:x:0:0:root:/root:/bin/sh\n"
                f"{IMAGE_USER}:x:{IMAGE_USER_UID}:{IMAGE_USER_UID}::/home/{IMAGE_USER}:/bin/sh\n".encode(),
            )
            extra = "".join(f"g{gid}:x:{gid}:{IMAGE_USER}\n" for gid in IMAGE_USER_GROUPS)
            _add(tar, "etc/group", f"root:x:0:\n{IMAGE_USER}:x:{IMAGE_USER_UID}:\n{extra}".encode())
    return buffer.getvalue()


def _no_shell_rootfs() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _add(tar, "tool", _static_binary("tool.c"), 0o755)
    return buffer.getvalue()


def _import(
    client: docker.APIClient,
    reference: str,
    rootfs: bytes,
    env_path: str,
    changes: tuple[str, ...] = (),
) -> None:
    repository, tag = reference.rsplit(":", 1)
    client.import_image_from_data(
        rootfs, repository=repository, tag=tag, changes=[f"ENV PATH={env_path}", *changes]
    )


def ensure_test_images() -> None:
    """Builds the test images unless they exist already (idempotent, offline)."""
    client = docker.APIClient(version="auto")
    try:
        present = {tag for image in client.images() for tag in image.get("RepoTags") or []}
        for reference, marker in ((IMAGE_A, "image-a"), (IMAGE_B, "image-b")):
            if reference not in present:
                _import(client, reference, _busybox_rootfs(marker), "/bin")
        if NO_SHELL not in present:
            _import(client, NO_SHELL, _no_shell_rootfs(), "/")
        if HOSTILE not in present:
            _import(client, HOSTILE, _busybox_rootfs("hostile", hostile=True), "/bin")
        if WITH_VOLUME not in present:
            _import(
                client,
                WITH_VOLUME,
                _busybox_rootfs("volume", volume=True),
                "/bin",
                changes=(f"VOLUME {IMAGE_VOLUME}",),
            )
    finally:
        client.close()
