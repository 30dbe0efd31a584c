"""deploy/kubernetes/: every overlay renders, is valid for Kubernetes, and keeps the rules a
worker pod depends on (one exec-root path, a daemon nobody else can reach, probes and grace
that match the worker's configuration)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.deploy.kustomize import Object, containers, render
from worker.config import Settings, load_settings
from worker.identity import LOCK_FILE

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir())
# The oldest Kubernetes with gRPC probes as GA, and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]
CONFIG_FILE = "config.yaml"


def rendered(overlay: str) -> list[Object]:
    return render(KUBERNETES / "overlays" / overlay)


def one(objects: list[Object], kind: str, name: str) -> Object:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return dict(found)


def container(pod: Object, name: str) -> Object:
    (found,) = [c for c in pod["containers"] if c["name"] == name]
    return dict(found)


def argv(container: Object) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def mounts(container: Object) -> dict[str, str]:
    """mountPath -> volume name."""
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def volume_at(container: Object, path: Path) -> tuple[str, str]:
    """The (mountPath, volume) of the container that holds `path`, the deepest one."""
    candidates = [
        (mount_path, volume)
        for mount_path, volume in mounts(container).items()
        if path == Path(mount_path) or Path(mount_path) in path.parents
    ]
    assert candidates, f"{container['name']} mounts nothing holding {path}"
    return max(candidates, key=lambda c: len(c[0]))


class WorkerPod:
    """The worker Deployment of an overlay and the configuration its ConfigMap holds."""

    def __init__(self, objects: list[Object], tmp_path: Path) -> None:
        self.objects = objects
        self.deployment = one(objects, "Deployment", "sidecar-executor")
        self.pod: Object = self.deployment["spec"]["template"]["spec"]
        self.worker = container(self.pod, "worker")
        self.dind = container(self.pod, "dind")
        worker_argv = argv(self.worker)
        config_path = Path(worker_argv[worker_argv.index("--config") + 1])
        mount_path, volume_name = volume_at(self.worker, config_path)
        (volume,) = [v for v in self.pod["volumes"] if v["name"] == volume_name]
        config_map = one(objects, "ConfigMap", volume["configMap"]["name"])
        key = str(config_path.relative_to(mount_path))
        copy = tmp_path / key
        copy.write_text(config_map["data"][key])
        self.settings: Settings = load_settings(copy)

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.deployment["spec"]["template"]["metadata"]["labels"])

    @property
    def reapi_port(self) -> int:
        return int(self.settings.server.listen.rpartition(":")[2])


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pod(overlay: str, tmp_path: Path) -> WorkerPod:
    return WorkerPod(rendered(overlay), tmp_path)


def test_there_is_a_single_pod_and_a_scale_out_overlay() -> None:
    assert OVERLAYS == ["scale-out", "single"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_for_kubernetes(overlay: str, version: str) -> None:
    objects = rendered(overlay)
    assert len(objects) >= 6
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_renderer_agrees_with_kustomize(overlay: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the Python renderer alone is checked")
    built = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def keyed(objects: list[Any]) -> dict[tuple[str, str, str], Any]:
        return {
            (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
            for o in objects
        }

    assert keyed(rendered(overlay)) == keyed(list(yaml.safe_load_all(built)))


def test_the_daemon_listens_on_a_unix_socket_only_and_is_dockerd_itself(pod: WorkerPod) -> None:
    daemon = argv(pod.dind)
    assert daemon[0] == "dockerd", "a dind entrypoint given flags alone adds a TCP listener"
    hosts = [a.split("=", 1)[1] for a in daemon if a.startswith("--host=")]
    assert hosts and all(h.startswith("unix://") for h in hosts)
    for obj in pod.objects:
        assert "tcp://" not in yaml.safe_dump(obj), f"{obj['kind']} names a TCP daemon"
    assert not any(e["name"] == "DOCKER_HOST" for e in pod.dind.get("env", []))


def test_worker_and_daemon_share_the_socket_and_the_exec_root_at_the_same_paths(
    pod: WorkerPod,
) -> None:
    (socket_url,) = [a.split("=", 1)[1] for a in argv(pod.dind) if a.startswith("--host=")]
    assert pod.settings.execution.docker_url == socket_url
    socket_path = Path(socket_url.removeprefix("unix://"))
    assert volume_at(pod.worker, socket_path) == volume_at(pod.dind, socket_path)
    for path in (pod.settings.exec_root, pod.settings.data_dir):
        assert volume_at(pod.worker, path) == volume_at(pod.dind, path), path
    assert volume_at(pod.worker, pod.settings.exec_root) == volume_at(
        pod.worker, pod.settings.data_dir / "cas"
    ), "the CAS and the exec root must be one filesystem (inputs are hard links)"


def test_no_host_path_and_no_host_docker_socket(pod: WorkerPod) -> None:
    for obj in pod.objects:
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        assert spec.get("hostNetwork", False) is False
        assert spec.get("hostPID", False) is False
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, volume
    assert pod.pod["automountServiceAccountToken"] is False


def test_probes_use_grpc_health_on_the_reapi_port(pod: WorkerPod) -> None:
    port = pod.reapi_port
    for probe in ("startupProbe", "livenessProbe"):
        assert pod.worker[probe]["grpc"] == {"port": port, "service": "liveness"}, probe
    # Readiness asks the overall status, which follows the daemon and the exec root.
    assert pod.worker["readinessProbe"]["grpc"] == {"port": port}
    (declared,) = pod.worker["ports"]
    assert declared["containerPort"] == port


def test_termination_grace_covers_the_drain(pod: WorkerPod) -> None:
    grace = pod.settings.server.shutdown_grace_s
    pre_stop = pod.worker["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_s = float(pre_stop[1])
    # After the grace: open streams get up to 5 s, then sidecars are removed.
    assert pod.pod["terminationGracePeriodSeconds"] >= pre_stop_s + grace + 15
    liveness = pod.worker["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= pre_stop_s + grace + 15
    # The daemon stays until the worker has let go of its data directory (after the drain).
    assert pod.dind["lifecycle"]["preStop"]["exec"]["command"] == [
        "flock",
        str(pod.settings.data_dir / LOCK_FILE),
        "true",
    ]


def test_resources_and_size_limits_are_set_and_consistent(pod: WorkerPod) -> None:
    for each in containers(pod.objects):
        assert each["resources"]["requests"], each["name"]
        assert each["resources"]["limits"]["memory"], each["name"]
    for volume in pod.pod["volumes"]:
        if "emptyDir" in volume:
            assert volume["emptyDir"].get("sizeLimit"), volume["name"]
    data = next(
        v
        for v in pod.pod["volumes"]
        if v["name"] == volume_at(pod.worker, pod.settings.data_dir)[1]
    )
    assert pod.settings.storage.max_bytes < quantity(data["emptyDir"]["sizeLimit"])
    busy = pod.settings.execution.max_concurrent_actions
    sidecar_memory = pod.settings.execution.pool.memory_bytes
    assert sidecar_memory is not None
    assert quantity(pod.dind["resources"]["limits"]["memory"]) >= busy * sidecar_memory


def quantity(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def test_images_are_pinned(pod: WorkerPod) -> None:
    for each in containers(pod.objects):
        image = each["image"]
        name, _, tag = image.rpartition(":")
        assert "@sha256:" in image or (name and tag and tag != "latest"), image
        assert "/" in image.split(":")[0], f"{image} names no registry"


def test_the_namespace_admits_the_privileged_daemon(pod: WorkerPod) -> None:
    assert pod.dind["securityContext"]["privileged"] is True
    namespace = one(pod.objects, "Namespace", pod.deployment["metadata"]["namespace"])
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_network_policy_admits_only_the_reapi_port(overlay: str, pod: WorkerPod) -> None:
    policy = one(pod.objects, "NetworkPolicy", "sidecar-executor")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod.labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = [p for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    if overlay == "single":
        assert ports == [{"port": pod.reapi_port, "protocol": "TCP"}]
        assert all("from" not in rule for rule in policy["spec"]["ingress"])
    else:
        assert ports == [], "scale-out workers only connect out; nothing connects to them"


def test_the_disruption_budget_covers_the_worker_pods(pod: WorkerPod) -> None:
    budget = one(pod.objects, "PodDisruptionBudget", "sidecar-executor")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod.labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


def test_single_pod_serves_reapi_through_its_service(tmp_path: Path) -> None:
    pod = WorkerPod(rendered("single"), tmp_path)
    assert argv(pod.worker)[0] == "serve"
    service = one(pod.objects, "Service", "sidecar-executor")
    assert service["spec"]["selector"].items() <= pod.labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == pod.worker["ports"][0]["name"]
    assert pod.deployment["spec"]["replicas"] == 1


def test_scale_out_runs_bots_against_the_buildgrid_service(tmp_path: Path) -> None:
    pod = WorkerPod(rendered("scale-out"), tmp_path)
    worker_argv = argv(pod.worker)
    assert worker_argv[:3] == ["worker", "--scheduler", "grpc://buildgrid:50051"]
    assert pod.deployment["spec"]["replicas"] > 1
    services = [o["metadata"]["name"] for o in pod.objects if o["kind"] == "Service"]
    assert services == ["buildgrid"], "clients use BuildGrid; nothing connects to a worker"
    service = one(pod.objects, "Service", "buildgrid")
    (port,) = service["spec"]["ports"]
    assert port["port"] == 50051
    buildgrid = one(pod.objects, "Deployment", "buildgrid")
    assert service["spec"]["selector"].items() <= (
        buildgrid["spec"]["template"]["metadata"]["labels"].items()
    )
    policy = one(pod.objects, "NetworkPolicy", "buildgrid")
    assert [p for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [
        {"port": 50051, "protocol": "TCP"}
    ]
    config = yaml.load(  # a loader that only ignores BuildGrid's tags
        one(pod.objects, "ConfigMap", "buildgrid")["data"]["buildgrid.conf"], TagsIgnored
    )
    assert config["server"][0]["address"].endswith(":50051")


class TagsIgnored(yaml.SafeLoader):
    """Reads BuildGrid's configuration, whose `!channel`-style tags name Python classes."""


TagsIgnored.add_multi_constructor(
    "!",
    lambda loader, _, node: (
        loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else None
    ),
)


def test_buildgrid_accepts_its_configuration() -> None:
    """BuildGrid's own linter, from the venv the scale-out tests use."""
    venv = ROOT / ".buildgrid" / "venv"
    subprocess.run([str(ROOT / "deploy" / "local" / "install-buildgrid.sh"), str(venv)], check=True)
    config = KUBERNETES / "overlays" / "scale-out" / "buildgrid.conf"
    lint = subprocess.run(
        [str(venv / "bin" / "bgd"), "server", "lint", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
