"""Soak: 1,000 actions over two images from 8 concurrent clients while sidecars are killed.

The real service runs in this process (tests.serving) over real gRPC on loopback and the real
Docker daemon. While the clients run, a killer thread kills or force-removes a random sidecar of
this service (only containers whose labels name its unique worker) every 0.2-0.5 s. Then:

- every action got a final answer (nothing lost): a correct result or a retryable status;
- a retry of every retryable one, with the killer stopped, succeeds;
- nothing is cached wrongly: a cacheable action that succeeded is in the action cache with
  exactly the correct result, and nothing else is (no failed and no do_not_cache action);
- after the service stops, no container, sidecar or trash directory, partial upload or file
  descriptor of it is left over, and every blob in the CAS hashes to its name.

The counts before, during and after go to the log (logger tests.soak.test_soak, INFO) and, with
--junitxml, to the report's testsuite properties (record_testsuite_property, which unlike
record_property works with the default xunit2 format).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import grpc
import pytest

from tests.images import IMAGE_A, IMAGE_B
from tests.reapi_client import write_resource
from tests.serving import RunningService, running_service
from worker.config import Settings, load_settings
from worker.digests import Digest
from worker.pool.pools import NAME_LABEL, WORKER_LABEL
from worker.reapi import bs_grpc, bs_pb2, ops_pb2, re_grpc, re_pb2

pytestmark = [pytest.mark.soak, pytest.mark.docker]

log = logging.getLogger(__name__)

ACTIONS = 1000
CLIENTS = 8
IMAGES = {IMAGE_A: "image-a", IMAGE_B: "image-b"}  # image -> its /etc/image-name
KINDS = ("stdout", "file", "image", "dir")
# A sidecar is killed every so often (a random pause in this range) while the clients run.
# Agent-dispatched actions take about a third of the time of exec-dispatched ones, so the
# agent's load ends in ~10 s here; at the exec pace it met only 25 of the 30 faults the test
# asks for in one CI run. The faster pace keeps the pressure per action about the same.
KILL_EVERY_S = {"exec": (0.2, 0.5), "agent": (0.1, 0.25)}
EXECUTE_DEADLINE_S = 60.0
RETRIES = 3
# The whole test must stay well under 3 minutes on a 2-core machine (measured: 57-62 s).
BUDGET_S = 170

OK = grpc.StatusCode.OK.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]
# Retryable answers, and why:
# - UNAVAILABLE in ExecuteResponse.status, whatever its message: gRPC's "transient, try again",
#   which the service gives when sidecars keep dying under a lease ("sidecars of ... keep
#   failing"), when the daemon answers an exec with a server error, and at shutdown.
# - INTERNAL only with the executor's message for a sidecar that died under the running
#   action (the runner left no believable report: outcome lost/unclean/runner_error). That is
#   exactly what killing a sidecar causes; the sidecar is replaced, so a retry runs afresh.
#   Any other INTERNAL ("internal error in the execution service", staging or collection
#   failures) means a bug of the service and fails the test.
# - An Execute RPC that itself fails with UNAVAILABLE (transport trouble).
# Everything else fails the test: a wrong result or exit code, FAILED_PRECONDITION (which would
# blame the action or its inputs for the sidecar's death), CANCELLED, DEADLINE_EXCEEDED, ...
SIDECAR_FAILED = "the sidecar failed while running the action"
# gRPC's core keeps a few process-wide descriptors (its poller's epoll set and wakeup
# eventfds) once a channel has been used; they are made before the first count by a warm-up
# channel. The slack covers a descriptor a background thread of the gRPC or Docker client
# library may hold for a moment (measured: none, the counts were equal in every run); every
# extra one is named in the failure message.
FD_SLACK = 2


# ---------------------------------------------------------------------------- the actions


@dataclass
class SoakAction:
    """One distinct action whose correct result follows from its inputs."""

    index: int
    image: str
    kind: str
    number: int
    cacheable: bool
    via_bytestream: bool
    salt: bytes
    digest: Digest | None = None
    answers: list[str] = field(default_factory=list)  # one line per attempt
    verdict: str = "pending"  # ok | retry | bad
    result: re_pb2.ActionResult | None = None  # the correct result finally served
    rpc_failed: bool = False  # an attempt got no final answer (the server may have one)
    first_verdict: str = ""

    @property
    def marker(self) -> str:
        return IMAGES[self.image]

    @property
    def input_data(self) -> bytes:
        return f"{self.number}\n".encode()

    @property
    def script(self) -> str:
        read = "read n < in/n.txt"
        return {
            "stdout": f"{read}; echo $((n * 3 + 7))",
            "file": f"{read}; echo $((n + 1)) > out/r.txt; echo wrote",
            "image": f"cat /etc/image-name; {read}; echo $((n % 9973))",
            "dir": f"{read}; mkdir res; echo $((n * 2)) > res/a; cat /etc/image-name > res/b",
        }[self.kind]

    @property
    def output_paths(self) -> list[str]:
        return {"file": ["out/r.txt"], "dir": ["res"]}.get(self.kind, [])

    @property
    def expected_stdout(self) -> bytes:
        n = self.number
        return {
            "stdout": f"{n * 3 + 7}\n",
            "file": "wrote\n",
            "image": f"{self.marker}\n{n % 9973}\n",
            "dir": "",
        }[self.kind].encode()

    @property
    def expected_files(self) -> dict[str, Digest]:
        if self.kind == "file":
            return {"out/r.txt": Digest.of(f"{self.number + 1}\n".encode())}
        return {}

    @property
    def expected_dirs(self) -> dict[str, dict[str, Digest]]:
        if self.kind == "dir":
            files = {"a": f"{self.number * 2}\n", "b": f"{self.marker}\n"}
            return {"res": {name: Digest.of(data.encode()) for name, data in files.items()}}
        return {}


def make_actions(run_id: str) -> list[SoakAction]:
    rng = random.Random()
    return [
        SoakAction(
            index=i,
            image=IMAGE_A if i % 2 == 0 else IMAGE_B,
            kind=KINDS[(i // 2) % len(KINDS)],
            number=rng.randrange(10**6, 10**12),
            cacheable=i % 10 != 9,  # a tenth are do_not_cache: never in the cache
            via_bytestream=i % 16 == 0,  # input sent by a resumed ByteStream upload
            salt=f"soak-{run_id}-{i}".encode(),
        )
        for i in range(ACTIONS)
    ]


def _digest_of(message: re_pb2.Directory | re_pb2.Command | re_pb2.Action) -> tuple[Digest, bytes]:
    data = message.SerializeToString(deterministic=True)
    return Digest.of(data), data


def upload(channel: grpc.Channel, action: SoakAction) -> Digest:
    """Uploads the action, its command and input root (`in/n.txt`) in one batch; the input
    file of some goes by ByteStream instead, interrupted once and resumed."""
    data = action.input_data
    inner, inner_data = _digest_of(
        re_pb2.Directory(files=[re_pb2.FileNode(name="n.txt", digest=Digest.of(data).to_proto())])
    )
    root, root_data = _digest_of(
        re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="in", digest=inner.to_proto())])
    )
    command, command_data = _digest_of(
        re_pb2.Command(arguments=["sh", "-c", action.script], output_paths=action.output_paths)
    )
    image = re_pb2.Platform.Property(name="container-image", value=f"docker://{action.image}")
    digest, action_data = _digest_of(
        re_pb2.Action(
            command_digest=command.to_proto(),
            input_root_digest=root.to_proto(),
            do_not_cache=not action.cacheable,
            salt=action.salt,
            platform=re_pb2.Platform(properties=[image]),
        )
    )
    blobs = [inner_data, root_data, command_data, action_data]
    if action.via_bytestream:
        resumed_write(channel, data)
    else:
        blobs.append(data)
    response = re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=Digest.of(b).to_proto(), data=b)
                for b in blobs
            ]
        )
    )
    bad = [r for r in response.responses if r.status.code != OK]
    assert not bad, f"upload of action {action.index} failed: {bad}"
    return digest


def _write(stub: bs_grpc.ByteStreamStub, name: str, offset: int, data: bytes, finish: bool) -> int:
    request = bs_pb2.WriteRequest(
        resource_name=name, write_offset=offset, data=data, finish_write=finish
    )
    return stub.Write(iter([request])).committed_size


def resumed_write(channel: grpc.Channel, data: bytes) -> None:
    """A ByteStream upload whose first stream ends half-way without finish_write (the service
    keeps the partial upload), resumed from QueryWriteStatus."""
    stub = bs_grpc.ByteStreamStub(channel)
    digest = Digest.of(data)
    name = write_resource(digest)
    half = len(data) // 2
    try:
        if _write(stub, name, 0, data[:half], finish=False) == digest.size:
            return  # the blob was stored already
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    status = stub.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert status.committed_size == half, status
    assert _write(stub, name, half, data[half:], finish=True) == digest.size


def abandon_upload(client: Client) -> None:
    """Leaves one partial upload behind, as a client that vanished would: the service keeps
    it (resumable) until it expires or the service stops."""
    data = os.urandom(1024)
    try:
        stub = bs_grpc.ByteStreamStub(client.channel)
        _write(stub, write_resource(Digest.of(data)), 0, data[:512], finish=False)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error


# ------------------------------------------------------------------------ judging results


Fetch = Callable[[re_pb2.Digest], bytes]


def wrong_in(result: re_pb2.ActionResult, action: SoakAction, fetch: Fetch) -> str | None:
    """Why `result` is not the correct result of `action`, or None. Blobs are compared by
    digest; that their contents match their digests is checked on the whole CAS at the end."""
    if result.exit_code != 0:
        return f"exit code {result.exit_code}"
    stdout = Digest.from_proto(result.stdout_digest)
    if stdout != Digest.of(action.expected_stdout):
        return f"stdout {fetch(result.stdout_digest)!r}, expected {action.expected_stdout!r}"
    files = {f.path: Digest.from_proto(f.digest) for f in result.output_files}
    if files != action.expected_files:
        return f"output files {files}, expected {action.expected_files}"
    if result.output_symlinks or result.output_file_symlinks or result.output_directory_symlinks:
        return "unexpected output symlinks"
    dirs = {d.path: d.tree_digest for d in result.output_directories}
    if set(dirs) != set(action.expected_dirs):
        return f"output directories {sorted(dirs)}, expected {sorted(action.expected_dirs)}"
    for path, tree_digest in dirs.items():
        tree = re_pb2.Tree.FromString(fetch(tree_digest))
        got = {f.name: Digest.from_proto(f.digest) for f in tree.root.files}
        if got != action.expected_dirs[path] or tree.root.directories or tree.children:
            return f"output directory {path}: {tree}"
    return None


def judge(
    response: re_pb2.ExecuteResponse, action: SoakAction, worker: str, fetch: Fetch
) -> tuple[str, str]:
    """(verdict, description) of one final answer: ok, retry or bad."""
    status = response.status
    described = f"status {status.code} {status.message!r}"
    if status.code == OK:
        if response.cached_result and not action.rpc_failed:
            return "bad", "served from the cache although no attempt had succeeded"
        if wrong := wrong_in(response.result, action, fetch):
            return "bad", f"OK but wrong: {wrong}"
        served_by = response.result.execution_metadata.worker
        if not response.cached_result and served_by != worker:
            return "bad", f"executed by worker {served_by!r}"
        return "ok", "ok (cached)" if response.cached_result else "ok"
    if status.code == UNAVAILABLE:
        return "retry", described
    if status.code == INTERNAL and status.message.startswith(SIDECAR_FAILED):
        return "retry", described
    return "bad", described


class Client:
    """One client: its own channel (and connection) to the service."""

    def __init__(self, address: str, worker: str) -> None:
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.worker = worker
        self._execution = re_grpc.ExecutionStub(self.channel)
        self._cas = re_grpc.ContentAddressableStorageStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def fetch(self, digest: re_pb2.Digest) -> bytes:
        response = self._cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[digest]))
        (found,) = response.responses
        assert found.status.code == OK, found
        return found.data

    def attempt(self, action: SoakAction) -> None:
        """Uploads (once) and executes the action, recording its answer; never raises."""
        try:
            if action.digest is None:
                action.digest = upload(self.channel, action)
            final: ops_pb2.Operation | None = None
            for operation in self._execution.Execute(
                re_pb2.ExecuteRequest(action_digest=action.digest.to_proto()),
                timeout=EXECUTE_DEADLINE_S,
            ):
                if operation.done:
                    final = operation
            if final is None:
                verdict, described = "bad", "the Execute stream ended without a final answer"
            elif final.HasField("error") or not final.HasField("response"):
                verdict, described = "bad", f"Operation without an ExecuteResponse: {final}"
            else:
                response = re_pb2.ExecuteResponse()
                final.response.Unpack(response)
                verdict, described = judge(response, action, self.worker, self.fetch)
                if verdict == "ok":
                    action.result = response.result
        except grpc.RpcError as error:
            verdict = "retry" if error.code() == grpc.StatusCode.UNAVAILABLE else "bad"
            described = f"Execute RPC failed: {error.code()} {error.details()!r}"
            action.rpc_failed = True
        except Exception as error:  # any surprise is a failure of this action, not lost
            verdict, described = "bad", f"client error: {error!r}"
        action.verdict = verdict
        action.first_verdict = action.first_verdict or verdict
        action.answers.append(described)


def run_clients(
    address: str, worker: str, actions: list[SoakAction], before_each: Callable[[Client], None]
) -> None:
    """CLIENTS threads, each with its own channel, take actions from one queue."""
    work: queue.SimpleQueue[SoakAction] = queue.SimpleQueue()
    for action in actions:
        work.put(action)

    def serve() -> None:
        client = Client(address, worker)
        try:
            before_each(client)
            while True:
                try:
                    action = work.get_nowait()
                except queue.Empty:
                    return
                client.attempt(action)
        except Exception as error:
            log.exception("client thread failed")
            failures.append(error)
        finally:
            client.close()

    failures: list[BaseException] = []
    threads = [threading.Thread(target=serve, name=f"soak-client-{i}") for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures


# ------------------------------------------------------------------------ the killer


@dataclass(frozen=True)
class Sidecars:
    """This test's service's containers, told apart from everyone else's on the shared daemon:
    NAME_LABEL holds the service's worker name, which this test makes unique, and WORKER_LABEL
    its worker id (worker.identity: random per data directory and made when the service
    starts, so "" = not known yet)."""

    worker_name: str
    worker_id: str = ""

    @classmethod
    def of(cls, service: RunningService) -> Sidecars:
        return cls(service.service.worker_name, service.service.identity.worker_id)

    def ours(self, container: dict[str, Any]) -> bool:
        labels = container.get("Labels") or {}
        return labels.get(NAME_LABEL) == self.worker_name and (
            not self.worker_id or labels.get(WORKER_LABEL) == self.worker_id
        )

    def find(self, client: Any, running_only: bool = False) -> list[str]:
        found = client.containers(
            all=not running_only, filters={"label": f"{NAME_LABEL}={self.worker_name}"}
        )
        return [str(c["Id"]) for c in found if self.ours(c)]


def count_containers(sidecars: Sidecars) -> int:
    client = docker.APIClient(version="auto")
    try:
        return len(sidecars.find(client))
    finally:
        client.close()


class Killer:
    """Kills (three times in four) or force-removes a random running sidecar of this service's
    worker every `pace` (a range of seconds) while the clients run."""

    def __init__(self, sidecars: Sidecars, pace: tuple[float, float]) -> None:
        self._sidecars = sidecars
        self._pace = pace
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-killer")
        self.counts: Counter[str] = Counter()
        self.error: BaseException | None = None

    def __enter__(self) -> Killer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        rng = random.Random()
        client = docker.APIClient(version="auto")
        try:
            while not self._stop.wait(rng.uniform(*self._pace)):
                running = self._sidecars.find(client, running_only=True)
                if not running:
                    self.counts["none running"] += 1
                    continue
                victim = rng.choice(running)
                how = "removed" if rng.random() < 0.25 else "killed"
                try:
                    if how == "killed":
                        client.kill(victim)
                    else:
                        client.remove_container(victim, force=True)
                    self.counts[how] += 1
                except docker.errors.APIError:
                    self.counts["already gone"] += 1  # stopped or removed meanwhile
        except BaseException as error:
            self.error = error
        finally:
            client.close()


# ---------------------------------------------------------------------- leftover counts


def open_fds() -> dict[int, str]:
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass  # the listing's own descriptor
    return fds


def entries(directory: Path) -> int:
    return len(os.listdir(directory)) if directory.exists() else 0


def leftovers(
    service: RunningService | None, settings: Settings, sidecars: Sidecars
) -> dict[str, int]:
    exec_root = settings.exec_root
    counts = {
        "containers": count_containers(sidecars),
        "sidecar_dirs": entries(exec_root / "sidecars"),
        "trash_dirs": entries(exec_root / "trash"),
        "cas_tmp_files": entries(settings.data_dir / "cas" / "tmp"),
    }
    if service is not None:
        counts["partial_uploads"] = len(service.service.storage.uploads)
    return counts


def corrupt_blobs(cas: Path) -> tuple[int, list[str]]:
    """(blobs checked, names of those whose content does not hash to their name)."""
    checked, bad = 0, []
    for path in [*cas.glob("blobs/*/*"), *cas.glob("executables/*")]:
        checked += 1
        if hashlib.sha256(path.read_bytes()).hexdigest() != path.name:
            bad.append(str(path))
    return checked, bad


def kind_of(answer: str) -> str:
    """An answer without its container, exec and action ids, to count answers by kind."""
    return re.sub(r"\b[0-9a-f]{12,64}\b", "<id>", answer)[:100]


def chunks(items: list[re_pb2.Digest], size: int) -> Iterator[list[re_pb2.Digest]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def referenced(result: re_pb2.ActionResult, fetch: Fetch) -> list[re_pb2.Digest]:
    digests = [result.stdout_digest, result.stderr_digest]
    digests.extend(f.digest for f in result.output_files)
    for directory in result.output_directories:
        digests.append(directory.tree_digest)
        tree = re_pb2.Tree.FromString(fetch(directory.tree_digest))
        digests.extend(f.digest for f in tree.root.files)
    return digests


# ------------------------------------------------------------------------------ the test


def soak_settings(tmp_path: Path, worker: str, dispatch: str) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        server={"listen": "127.0.0.1:0", "worker_name": worker},
        execution={
            "max_concurrent_actions": 8,
            "default_timeout_s": 30,
            "max_timeout_s": 60,
            "pull_timeout_s": 20,
            "allowed_images": ["sidecar-test/*"],
            "pool": {"max_sidecars": 3, "dispatch": dispatch},
        },
    )


def check_cache(client: Client, actions: list[SoakAction]) -> list[str]:
    """Problems with the action cache: a cacheable action that succeeded must be there with
    exactly the result it was served, which is correct; no other action may be there. Also
    every blob a served result names must be in the CAS."""
    cache = re_grpc.ActionCacheStub(client.channel)
    problems: list[str] = []
    needed: list[re_pb2.Digest] = []
    for action in actions:
        if action.digest is None:
            continue  # never uploaded: already a problem of its own
        try:
            cached: re_pb2.ActionResult | None = cache.GetActionResult(
                re_pb2.GetActionResultRequest(action_digest=action.digest.to_proto())
            )
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                problems.append(f"#{action.index}: GetActionResult failed: {error}")
                continue
            cached = None
        if action.result is None or not action.cacheable:
            if cached is not None:
                why = "never succeeded" if action.result is None else "is do_not_cache"
                problems.append(f"#{action.index} {why} but is cached: {cached}")
        elif cached is None:
            problems.append(f"#{action.index} succeeded but is not in the action cache")
        elif wrong := wrong_in(cached, action, client.fetch):
            problems.append(f"#{action.index} cached wrongly: {wrong}")
        elif cached != action.result:
            problems.append(f"#{action.index}: cached {cached} != served {action.result}")
        if action.result is not None:
            needed.extend(referenced(action.result, client.fetch))
    cas = re_grpc.ContentAddressableStorageStub(client.channel)
    for batch in chunks(needed, 1000):
        request = re_pb2.FindMissingBlobsRequest(blob_digests=batch)
        problems.extend(
            f"blob {missing.hash}/{missing.size_bytes} of a result is missing"
            for missing in cas.FindMissingBlobs(request).missing_blob_digests
        )
    return problems


@pytest.mark.timeout(BUDGET_S)
def test_soak_actions_survive_random_sidecar_kills_and_leave_nothing_behind(
    tmp_path: Path,
    test_images: None,
    dispatch: str,
    record_testsuite_property: Callable[[str, object], None],
) -> None:
    """Every check runs even after an earlier one found problems; they are all listed at the
    end, with the counts, so one failing run tells the whole story."""
    began = time.monotonic()
    worker = f"soak-{uuid.uuid4().hex[:12]}"
    settings = soak_settings(tmp_path, worker, dispatch)
    actions = make_actions(uuid.uuid4().hex[:8])
    problems: list[str] = []

    def report(name: str, value: object) -> None:
        record_testsuite_property(f"soak_{name}", value)
        log.info("soak %s: %s", name, value)

    # gRPC's process-wide descriptors exist from the first channel on (see FD_SLACK).
    grpc.insecure_channel("127.0.0.1:1").close()
    fds_before = open_fds()
    threads_before = set(threading.enumerate())
    named = Sidecars(worker)  # its id is made when it starts
    report("before_start", {"fds": len(fds_before), **leftovers(None, settings, named)})

    with running_service(settings) as service:
        sidecars = Sidecars.of(service)
        report("worker_labels", {WORKER_LABEL: sidecars.worker_id, NAME_LABEL: worker})
        assert count_containers(sidecars) == 0
        started = time.monotonic()
        with Killer(sidecars, KILL_EVERY_S[dispatch]) as killer:
            run_clients(service.address, worker, actions, before_each=abandon_upload)
        report("load_seconds", round(time.monotonic() - started, 1))
        assert killer.error is None, f"the killer failed: {killer.error!r}"
        report("kills", dict(killer.counts))
        assert killer.counts["killed"] + killer.counts["removed"] >= 30, killer.counts
        report("first_answers", dict(Counter(a.first_verdict for a in actions)))
        report(
            "retryable_answers",
            dict(Counter(kind_of(a.answers[0]) for a in actions if a.first_verdict == "retry")),
        )

        # Nothing lost, nothing wrong: every action has a final answer, correct or retryable.
        problems.extend(f"#{a.index} got no answer" for a in actions if not a.answers)
        problems.extend(
            f"#{a.index} ({a.kind}, {a.image}) answered wrongly or not retryably: {a.answers}"
            for a in actions
            if a.verdict == "bad"
        )

        # Retry every retryable one, with no killer: each must succeed.
        for _ in range(RETRIES):
            pending = [a for a in actions if a.verdict == "retry"]
            if pending:
                run_clients(service.address, worker, pending, before_each=lambda client: None)
        report("attempts", dict(Counter(len(a.answers) for a in actions)))
        problems.extend(
            f"#{a.index} failed its retries: {a.answers}"
            for a in actions
            if a.first_verdict == "retry" and a.verdict != "ok"
        )

        # Nothing cached wrongly, and every blob a result names is in the CAS.
        checker = Client(service.address, worker)
        try:
            problems.extend(check_cache(checker, actions))
        finally:
            checker.close()
        report("before_stop", leftovers(service, settings, sidecars))

    # The service is stopped: nothing of it may be left.
    for thread in set(threading.enumerate()) - threads_before:
        if thread.name == "exec-events":
            thread.join(10)
            if thread.is_alive():
                problems.append("the Docker event thread outlived the service")
    after = leftovers(None, settings, sidecars)
    after["partial_uploads"] = len(service.service.storage.uploads)
    fds_after = open_fds()
    after["fds"] = len(fds_after)
    report("after_stop", after)
    problems.extend(
        f"after the service stopped, {name} = {count}"
        for name, count in after.items()
        if name != "fds" and count != 0
    )
    if len(fds_after) > len(fds_before) + FD_SLACK:
        extra = {fd: target for fd, target in fds_after.items() if fds_before.get(fd) != target}
        problems.append(
            f"{len(fds_before)} fds before the service started, {len(fds_after)} after it "
            f"stopped; new ones: {extra}"
        )
    checked, corrupt = corrupt_blobs(settings.data_dir / "cas")
    report("blobs_checked", checked)
    problems.extend(f"blob {path} does not hash to its name" for path in corrupt)
    elapsed = time.monotonic() - began
    report("seconds", round(elapsed, 1))
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:30])
    assert elapsed < BUDGET_S
