"""A worker pod run the way Kubernetes runs it, with plain Docker on this host.

What the kubelet would do, from the rendered manifest (deploy/kubernetes/overlays/single):
a pause container owns the pod's network namespace (loopback only: `--network none`), and
the dind and worker containers join it; every emptyDir is a host directory (the daemon's
storage a Docker volume) mounted at the manifest's paths; the ConfigMap is a directory
holding config.yaml; the containers get the manifest's arguments.

One difference, forced by this host: `--privileged` cannot start here (the host's capability
bounding set lacks CAP_SYS_RESOURCE), so dind gets the closest set that works: every
capability but CAP_SYS_RESOURCE, no seccomp or AppArmor profile, unmasked /proc and /sys
paths, every device allowed, and the cgroup hierarchy mounted writable.

Images are built with `make image` and tagged by a hash of what goes into them, so a second
run (and every test of one run) reuses them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.deploy.kustomize import Object, render
from tests.images import IMAGE_A, ensure_test_images

ROOT = Path(__file__).resolve().parents[2]
SINGLE = ROOT / "deploy" / "kubernetes" / "overlays" / "single"
POD_LABEL = "sidecar-executor-test.pod"
# What each image is built from (the worker image's context is what .dockerignore admits).
WORKER_INPUTS = [
    ".dockerignore",
    "deploy/Dockerfile",
    "pyproject.toml",
    "README.md",
    "sidecar/runner.c",
    "protos",
    "worker",
]
DIND_INPUTS = ["deploy/dind"]
DIND_PRIVILEGES: dict[str, Any] = {
    "cap_add": ["ALL"],
    "cap_drop": ["SYS_RESOURCE"],
    "security_opt": ["seccomp=unconfined", "apparmor=unconfined"],
    "device_cgroup_rules": ["a *:* rwm"],
}


def content_hash(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for relative in paths:
        path = ROOT / relative
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(ROOT)).encode() + b"\0")
                digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class PodImages:
    worker: str
    dind: str
    pause: str
    build_s: float


def pod_images() -> PodImages:
    """The worker and dind images for the current sources, built unless already there."""
    ensure_test_images()
    worker = f"sidecar-executor-test/worker:{content_hash(WORKER_INPUTS)}"
    dind = f"sidecar-executor-test/dind:{content_hash(DIND_INPUTS)}"
    client = docker.APIClient(version="auto")
    try:
        present = {t for image in client.images() for t in image.get("RepoTags") or []}
    finally:
        client.close()
    started = time.monotonic()
    if worker not in present or dind not in present:
        build = subprocess.run(
            ["make", "--no-print-directory", "image", f"IMAGE={worker}", f"DIND_IMAGE={dind}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    return PodImages(worker, dind, IMAGE_A, time.monotonic() - started)


def merged(base: Any, changes: Any) -> Any:
    if isinstance(base, dict) and isinstance(changes, dict):
        return {**base, **{k: merged(base.get(k), v) for k, v in changes.items()}}
    return copy.deepcopy(changes)


class SimulatedPod:
    """The single-pod manifest's worker pod; call start_* in the order a test needs."""

    def __init__(
        self, images: PodImages, workdir: Path, config_changes: dict[str, Any] | None = None
    ) -> None:
        self.images = images
        self.name = f"sxpod-{uuid.uuid4().hex[:8]}"
        self.workdir = workdir
        workdir.mkdir(mode=0o755, parents=True)
        objects = render(SINGLE)
        (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
        self.spec: Object = deployment["spec"]["template"]["spec"]
        self.containers = {c["name"]: c for c in self.spec["containers"]}
        self.docker = docker.APIClient(version="auto")
        self.token = secrets.token_hex(16)
        self.volumes = self._make_volumes(objects, config_changes or {})
        self.config = yaml.safe_load((self.volumes["config"] / "config.yaml").read_text())
        self._forwarder: subprocess.Popen[bytes] | None = None
        self.pause_id = ""

    # ------------------------------------------------------------------ volumes

    def _make_volumes(self, objects: list[Object], changes: dict[str, Any]) -> dict[str, Path]:
        """Host directories for the pod's volumes (a Docker volume for the daemon's storage)."""
        paths: dict[str, Path] = {}
        for volume in self.spec["volumes"]:
            name = volume["name"]
            directory = self.workdir / name
            directory.mkdir(mode=0o755)
            paths[name] = directory
            if "configMap" in volume:
                (config_map,) = [
                    o
                    for o in objects
                    if o["kind"] == "ConfigMap"
                    and o["metadata"]["name"] == volume["configMap"]["name"]
                ]
                for key, text in config_map["data"].items():
                    data = merged(yaml.safe_load(text), changes)
                    (directory / key).write_text(yaml.safe_dump(data))
            elif "secret" in volume:
                # The operator's Secret of client tokens (docs/AUTH.md), key `tokens`.
                (directory / "tokens").write_text(f"{self.token}\n")
        self.docker.create_volume(f"{self.name}-dind-storage", labels={POD_LABEL: self.name})
        return paths

    def _binds(self, container: Object, **moved: str) -> dict[str, dict[str, str]]:
        binds: dict[str, dict[str, str]] = {}
        for mount in container.get("volumeMounts", []):
            path = moved.get(mount["name"], mount["mountPath"])
            if path == "/var/lib/docker":
                source = f"{self.name}-dind-storage"
            else:
                source = str(self.volumes[mount["name"]])
            binds[source] = {"bind": path, "mode": "ro" if mount.get("readOnly") else "rw"}
        return binds

    # --------------------------------------------------------------- containers

    def start_pause(self) -> None:
        self.pause_id = self._run(
            "pause",
            self.images.pause,
            ["sleep", "2147483647"],
            entrypoint=None,
            host_config=self.docker.create_host_config(network_mode="none", init=True),
        )

    def start_worker(
        self,
        role: str = "worker",
        moved: dict[str, str] | None = None,
        sources: dict[str, Path] | None = None,
        environment: dict[str, str] | None = None,
    ) -> str:
        """The worker container as the manifest has it. A misconfigured one for a test:
        `moved` mounts volumes at other paths, `sources` gives them other host directories,
        `environment` overrides settings."""
        spec = self.containers["worker"]
        binds = self._binds(spec, **(moved or {}))
        for name, directory in (sources or {}).items():
            (old,) = [s for s in binds if s == str(self.volumes[name])]
            binds[str(directory)] = binds.pop(old)
        return self._run(
            role,
            self.images.worker,
            spec["args"],
            entrypoint=None,
            environment=environment,
            host_config=self.docker.create_host_config(
                network_mode=f"container:{self.pause_id}",
                binds=binds,
                read_only=spec["securityContext"]["readOnlyRootFilesystem"],
                security_opt=["no-new-privileges"],
            ),
        )

    def start_dind(self) -> str:
        spec = self.containers["dind"]
        host_config = self.docker.create_host_config(
            network_mode=f"container:{self.pause_id}",
            binds={
                **self._binds(spec),
                "/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"},
            },
            **DIND_PRIVILEGES,
        )
        # The CLI's `--security-opt systempaths=unconfined`: no masked or read-only paths.
        host_config.update(MaskedPaths=[], ReadonlyPaths=[])
        return self._run("dind", self.images.dind, spec["args"], None, host_config)

    def _run(
        self,
        role: str,
        image: str,
        command: list[str],
        entrypoint: list[str] | None,
        host_config: Any,
        environment: dict[str, str] | None = None,
    ) -> str:
        created = self.docker.create_container(
            image,
            command=command,
            entrypoint=entrypoint,
            environment=environment,
            name=f"{self.name}-{role}",
            labels={POD_LABEL: self.name},
            host_config=host_config,
        )
        self.docker.start(created["Id"])
        return str(created["Id"])

    def container(self, role: str) -> str:
        return f"{self.name}-{role}"

    def state(self, role: str) -> dict[str, Any]:
        inspected = self.docker.inspect_container(self.container(role))
        return {**inspected["State"], "RestartCount": inspected["RestartCount"]}

    def logs(self, role: str) -> str:
        return bytes(self.docker.logs(self.container(role))).decode(errors="replace")

    def wait_exit(self, role: str, timeout_s: float) -> int:
        return int(self.docker.wait(self.container(role), timeout=timeout_s)["StatusCode"])

    # ------------------------------------------------------------------ network

    @property
    def pause_pid(self) -> int:
        return int(self.docker.inspect_container(self.pause_id)["State"]["Pid"])

    def netns(self) -> list[str]:
        """A command prefix that runs a host program in the pod's network namespace."""
        return ["nsenter", f"--net=/proc/{self.pause_pid}/ns/net"]

    def listening_tcp_ports(self) -> set[int]:
        """Every TCP port something in the pod listens on (IPv4 and IPv6)."""
        ports = set()
        for table in ("tcp", "tcp6"):
            lines = Path(f"/proc/{self.pause_pid}/net/{table}").read_text().splitlines()[1:]
            for line in lines:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports

    @property
    def reapi_port(self) -> int:
        return int(str(self.config["server"]["listen"]).rpartition(":")[2])

    def channel(self) -> grpc.Channel:
        """A channel to the pod's REAPI port, through a forwarder inside the pod's namespace."""
        path = self.workdir / "reapi.sock"
        if self._forwarder is None:
            self._forwarder = subprocess.Popen(
                [
                    *self.netns(),
                    sys.executable,
                    "-m",
                    "tests.deploy.netns_forward",
                    str(path),
                    str(self.reapi_port),
                ],
                cwd=ROOT,
            )
            deadline = time.monotonic() + 30
            while not path.exists():
                assert time.monotonic() < deadline, "the forwarder did not start"
                time.sleep(0.05)
        return grpc.insecure_channel(f"unix:{path}")

    def health(self, channel: grpc.Channel, service: str = "") -> int:
        """The health status, or -1 when nothing answers."""
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            return int(stub.Check(request, timeout=5).status)
        except grpc.RpcError:
            return -1

    # ------------------------------------------------------------------- daemon

    def daemon(self) -> docker.APIClient:
        """A client of the pod's own Docker daemon, through the socket volume."""
        socket = self.volumes["dind-socket"] / "docker.sock"
        return docker.APIClient(base_url=f"unix://{socket}", version="auto", timeout=60)

    def wait_for_daemon(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client = self.daemon()
                client.ping()
                client.close()
                return
            except docker.errors.DockerException:
                assert time.monotonic() < deadline, (
                    "the pod's daemon never answered\n" + (self.logs("dind")[-3000:])
                )
                time.sleep(0.2)

    def load_image(self, reference: str) -> None:
        """Copies an image of the host's daemon into the pod's daemon (no registry here)."""
        data = b"".join(self.docker.get_image(reference))
        client = self.daemon()
        try:
            client.load_image(io.BytesIO(data).getvalue())
        finally:
            client.close()

    def daemon_containers(self) -> list[dict[str, Any]]:
        client = self.daemon()
        try:
            return list(client.containers(all=True))
        finally:
            client.close()

    # ------------------------------------------------------------------ cleanup

    def close(self) -> None:
        if self._forwarder is not None:
            self._forwarder.terminate()
            self._forwarder.wait(timeout=10)
        for found in self.docker.containers(
            all=True, filters={"label": f"{POD_LABEL}={self.name}"}
        ):
            with contextlib.suppress(docker.errors.APIError):
                self.docker.remove_container(found["Id"], force=True, v=True)
        with contextlib.suppress(docker.errors.APIError):
            self.docker.remove_volume(f"{self.name}-dind-storage", force=True)
        self.docker.close()
        # What sidecars left in the exec root belongs to their users; root removes it all.
        shutil.rmtree(self.workdir, ignore_errors=True)
