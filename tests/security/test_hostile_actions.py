"""Attacks by actions on the worker host, the CAS and each other, against the real daemon.

Each test runs an attack as an action of the real service and then checks what the host
(a root-only canary file), the CAS (every blob still hashes to its name, none holds the
canary) and the answers look like. docs/SECURITY.md lists which guarantee each one proves.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import docker
import grpc
import pytest

from tests.execution_client import (
    ActionSpec,
    InputFile,
    read_blob,
    run,
    shell_action,
    stdout_of,
)
from tests.images import HOSTILE, IMAGE_VOLUME, WITH_VOLUME
from tests.security.conftest import (
    HOSTILE_PLATFORM,
    ROOT_PLATFORM,
    Canary,
    assert_cas_intact,
    attack_settings,
    hostile,
)
from tests.serving import RunningService, running_service
from worker.digests import Digest
from worker.pool.pools import WORKER_LABEL
from worker.pool.sidecar_pool import SidecarPool

pytestmark = pytest.mark.docker

OK = grpc.StatusCode.OK.value[0]

# Everything an action can name in its own action directory, swapped for a link to the host
# canary (by path: the worker would follow it on the host) or to the host's root.
SWAP_EVERYTHING = """
d=$(dirname "$HOME")
for name in control control/stdout control/stderr control/status control/pid home tmp; do
  rm -rf "$d/$name" 2>/dev/null; ln -s {canary} "$d/$name" 2>/dev/null
done
mv "$d/root" "$d/moved" 2>/dev/null; ln -s / "$d/root" 2>/dev/null
ln -s / "$d/../escape" 2>/dev/null
echo {marker}
"""


def pool_of(service: RunningService) -> SidecarPool:
    execution = service.service.execution
    assert execution is not None
    (pool,) = execution.pools.pools
    return pool


def test_swapping_control_files_and_dirs_for_host_links_changes_nothing(
    attacked: RunningService, canary: Canary
) -> None:
    """A non-root action cannot replace the runner's control files or its own directories:
    stdout is what it printed, and no host file comes back."""
    script = SWAP_EVERYTHING.format(canary=canary.path, marker="still-mine")
    response = run(attacked.channel, hostile(script, output_paths=["out"]))
    assert response.status.code == OK, response.status
    assert stdout_of(attacked.channel, response) == b"still-mine\n"
    canary.assert_untouched()
    assert_cas_intact(attacked, canary)


def test_root_action_swapping_everything_gets_no_host_file(
    root_allowed: RunningService, canary: Canary
) -> None:
    """A root action can replace anything in its directory; the worker still follows nothing,
    and its sidecar is not used again."""
    script = SWAP_EVERYTHING.format(canary=canary.path, marker="root-was-here")
    response = run(
        root_allowed.channel,
        hostile(script, action_platform=ROOT_PLATFORM, output_paths=["etc/shadow", "x"]),
    )
    assert response.status.code != OK
    assert not response.result.output_files
    canary.assert_untouched()
    assert_cas_intact(root_allowed, canary)
    assert pool_of(root_allowed).stats.destroyed == 1


@pytest.mark.parametrize(
    ("script", "outputs"),
    [
        ("ln -s {canary} out", {"output_paths": ["out"]}),
        ("ln -s {canary} out", {"output_files": ["out"]}),
        ("mkdir d && ln -s {canary} d/leak", {"output_paths": ["d"]}),
        ("rm -rf d && ln -s / d", {"output_paths": ["d/" + "{canary_rel}"]}),
        (
            "rm -rf up && ln -s ../../../../../../../../../../.. up",
            {"output_files": ["up/etc/passwd"]},
        ),
        ("ln -s ../../../../../../../../../../.. up", {"output_directories": ["up"]}),
    ],
)
def test_output_links_to_the_host_are_refused(
    attacked: RunningService, canary: Canary, script: str, outputs: dict[str, list[str]]
) -> None:
    """Capabilities say symlink_absolute_path_strategy DISALLOWED: "If an action tries to create
    an output symlink with an absolute target, a FAILED_PRECONDITION will be returned"; a path
    reached through a link the action made is refused the same way."""
    fields = {
        key: [p.format(canary_rel=str(canary.path).lstrip("/")) for p in paths]
        for key, paths in outputs.items()
    }
    response = run(attacked.channel, hostile(script.format(canary=canary.path), **fields))
    assert response.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], response
    assert not response.result.output_files
    canary.assert_untouched()
    assert_cas_intact(attacked, canary)


def test_forged_report_and_signals_to_the_runner_do_not_end_a_timeout(
    attacked: RunningService,
) -> None:
    """The report and the runner are root's: the action can neither write the one nor kill
    the other, so a timeout stays DEADLINE_EXCEEDED and the exit code says it was killed."""
    script = r"""
    d=$(dirname "$HOME")
    printf 'outcome=exited\ncode=0\nstrays_killed=0\nsurvivors=0\noom_kills=0\nscrubbed=1\n' \
      > "$d/control/status" && echo FORGED
    for p in /proc/[0-9]*; do
      grep -q '^Uid:.0' "$p/status" 2>/dev/null && kill -9 "${p#/proc/}" 2>/dev/null && echo KILLED
    done
    sleep 100
    """
    began = time.monotonic()
    response = run(attacked.channel, hostile(script, timeout_s=2))
    assert time.monotonic() - began < 20
    assert response.status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert response.result.exit_code == 137
    out = stdout_of(attacked.channel, response)
    assert b"FORGED" not in out and b"KILLED" not in out


def test_a_process_left_behind_cannot_touch_a_later_action(one_sidecar: RunningService) -> None:
    """Whatever the first action leaves running is killed before the sidecar serves again,
    so it cannot rewrite the next action's outputs (which would then be cached)."""
    tamper = r"""
    setsid sh -c 'while :; do
        for f in $(dirname $(dirname "$HOME"))/*/root/out.txt; do echo evil > "$f"; done
        sleep 0.02; done' >/dev/null 2>&1 &
    (trap "" HUP TERM; nohup sleep 1000 >/dev/null 2>&1 &)
    echo left
    """
    first = run(one_sidecar.channel, hostile(tamper))
    assert first.status.code == OK and first.result.exit_code == 0
    victim = run(
        one_sidecar.channel,
        hostile(
            "echo good > out.txt; sleep 2; ps -o comm | grep -c sleep; cat out.txt",
            output_paths=["out.txt"],
        ),
    )
    (output,) = victim.result.output_files
    assert read_blob(one_sidecar.channel, output.digest) == b"good\n"
    assert stdout_of(one_sidecar.channel, victim) == b"0\ngood\n"  # no sleep of the first
    assert pool_of(one_sidecar).stats.created == 1  # reused: the runner confirmed it clean


def test_setuid_binary_gives_no_root_and_input_blobs_stay_intact(
    attacked: RunningService,
) -> None:
    """no-new-privileges and no capabilities: a setuid-root program stays the action's user,
    so the input file (a hard link to the CAS blob) cannot be appended to."""
    victim = b"original input\n"
    script = (
        "suid-probe victim.txt; chmod 666 victim.txt 2>&1 | head -c 0; echo x >> victim.txt;"
        " grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs)' /proc/self/status"
    )
    response = run(attacked.channel, hostile(script, files={"victim.txt": InputFile(victim)}))
    out = stdout_of(attacked.channel, response).decode()
    assert "euid=65534 ruid=65534" in out
    assert "append: Permission denied" in out
    for line in out.splitlines():
        if line.startswith("Cap"):
            assert line.split()[1] == "0000000000000000", out
    assert "NoNewPrivs:\t1" in out
    blob = attacked.service.settings.data_dir / "cas" / "blobs"
    digest = Digest.of(victim)
    assert (blob / digest.hash[:2] / digest.hash).read_bytes() == victim
    assert_cas_intact(attacked)


def test_root_action_gets_copies_and_cannot_poison_the_cas(root_allowed: RunningService) -> None:
    """Root ignores file modes, so a root action's inputs are copies: what it writes to them
    never reaches the CAS or a later action."""
    victim = b"shared input\n"
    files = {"victim.txt": InputFile(victim), "tool.sh": InputFile(b"echo hi\n", executable=True)}
    poison = "chmod 666 victim.txt tool.sh; echo poisoned >> victim.txt; echo poisoned >> tool.sh"
    response = run(
        root_allowed.channel, hostile(poison, files=files, action_platform=ROOT_PLATFORM)
    )
    assert response.status.code == OK, response.status
    after = run(root_allowed.channel, hostile("cat victim.txt tool.sh", files=files))
    assert stdout_of(root_allowed.channel, after) == victim + b"echo hi\n"
    assert_cas_intact(root_allowed)


def test_concurrent_actions_cannot_see_each_other(
    root_allowed: RunningService,
) -> None:
    """Each sidecar mounts only its own directory: an attacker, even root, finds nothing of a
    victim running at the same time, and no CAS file."""
    victim_done = threading.Event()
    results: dict[str, object] = {}

    def victim() -> None:
        results["victim"] = run(
            root_allowed.channel,
            hostile("echo secret > victim-marker-7c1; sleep 4; cat victim-marker-7c1"),
        )
        victim_done.set()

    thread = threading.Thread(target=victim)
    thread.start()
    time.sleep(1.5)
    attacker = run(
        root_allowed.channel,
        hostile(
            "find / -name 'victim-marker-7c1' 2>/dev/null; find / -path '*/cas/blobs*' 2>/dev/null"
            " | head -3; ls $(dirname $(dirname $HOME)) | wc -l",
            action_platform=ROOT_PLATFORM,
        ),
    )
    thread.join(30)
    assert victim_done.is_set()
    assert stdout_of(root_allowed.channel, attacker) == b"1\n"


@pytest.mark.parametrize(
    "spec",
    [
        {"output_paths": ["s/planted/file"]},
        {"output_files": ["s/planted"]},
        {"output_directories": ["s/planted/dir"]},
        {"working_directory": "s/planted"},
        {"output_paths": ["f/under-a-file"]},
    ],
)
def test_staging_refuses_paths_through_input_links_before_creating_anything(
    attacked: RunningService, tmp_path_factory: pytest.TempPathFactory, spec: dict[str, object]
) -> None:
    """An input symlink pointing out of the tree plus an output path or working directory
    below it is INVALID_ARGUMENT, and nothing is created where the link points."""
    target = tmp_path_factory.mktemp("outside")
    up = "../" * 40
    response = run(
        attacked.channel,
        hostile(
            "true",
            symlinks={"s": f"{up}{str(target).lstrip('/')}"},
            files={"f": InputFile(b"a file\n")},
            **spec,
        ),
    )
    assert response.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], response
    assert list(target.iterdir()) == []


def test_nothing_an_action_writes_outside_its_directory_reaches_the_next(
    one_sidecar: RunningService,
) -> None:
    """Scratch places are emptied after every action and the rest of the image is read-only."""
    litter = (
        "mkdir -p /tmp/a/b/c && echo x > /tmp/a/b/c/f && echo y > /var/tmp/y;"
        " echo z > /dev/shm/z; chmod 000 /tmp/a;"
        " touch /etc/planted /planted /bin/planted 2>/dev/null; echo done"
    )
    first = run(one_sidecar.channel, hostile(litter))
    assert stdout_of(one_sidecar.channel, first) == b"done\n"
    # Directories on the way to the sidecar's own mount may be under /tmp: those stay.
    look = run(
        one_sidecar.channel,
        hostile(
            "for p in $(find /tmp /var/tmp /dev/shm -xdev -mindepth 1); do"
            ' case "$HOME" in "$p"/*) ;; *) echo "left: $p";; esac; done;'
            " ls /etc/planted /planted /bin/planted 2>&1 | wc -l"
        ),
    )
    assert stdout_of(one_sidecar.channel, look) == b"3\n"
    assert pool_of(one_sidecar).stats.created == 1


def test_the_image_users_supplementary_groups_are_given_as_docker_exec_gives_them(
    attacked: RunningService,
) -> None:
    """`docker exec -u 1000:1000` adds the groups /etc/group lists for uid 1000's name; the
    runner, which switches users itself, does the same."""
    response = run(
        attacked.channel,
        hostile(
            "id -G",
            action_platform={
                "container-image": f"docker://{HOSTILE}",
                "dockerUser": "1000",
            },
        ),
    )
    assert sorted(stdout_of(attacked.channel, response).split()) == [b"1000", b"2000", b"2001"]


def test_an_image_volume_carries_nothing_to_the_next_action(one_sidecar: RunningService) -> None:
    """A VOLUME the image declares is a writable mount of its own that no scrub can reset to
    the image's content: sidecars of such an image serve one action each."""
    plant = run(
        one_sidecar.channel,
        shell_action(f"echo POISONED > {IMAGE_VOLUME}/from-image && echo planted", WITH_VOLUME),
    )
    assert stdout_of(one_sidecar.channel, plant) == b"planted\n"
    look = run(one_sidecar.channel, shell_action(f"cat {IMAGE_VOLUME}/from-image", WITH_VOLUME))
    assert stdout_of(one_sidecar.channel, look) == b"shipped\n"
    assert pool_of(one_sidecar).stats.created == 2


def test_a_root_action_cannot_make_device_nodes(root_allowed: RunningService) -> None:
    """MKNOD is not among a root sidecar's capabilities: a device node in the action's
    directory would be a device of the host, which shares that filesystem."""
    response = run(
        root_allowed.channel,
        hostile(
            "mknod null-clone c 1 3 && echo made; mknod disk b 253 0 && echo made; echo done",
            action_platform=ROOT_PLATFORM,
        ),
    )
    assert stdout_of(root_allowed.channel, response) == b"done\n"


def test_files_an_action_leaves_are_out_of_reach_of_other_host_users(
    attacked: RunningService,
) -> None:
    """A setgid copy of a program made by an action sits on the host's filesystem; no other
    user of the host may reach it (the sidecars directory is root's alone)."""
    sidecars = attacked.service.settings.exec_root / "sidecars"
    started = threading.Event()
    results: dict[str, object] = {}

    def plant() -> None:
        started.set()
        try:
            results["response"] = run(
                attacked.channel,
                hostile("cp /bin/busybox ./sgid && chmod 2755 ./sgid && echo planted; sleep 4"),
            )
        except grpc.RpcError as error:  # reported by the assertions below, not by the thread
            results["error"] = error

    thread = threading.Thread(target=plant)
    thread.start()
    started.wait()
    deadline = time.monotonic() + 20
    planted: list[Path] = []
    while not planted and time.monotonic() < deadline:
        planted = list(sidecars.glob("*/*/root/sgid"))
        time.sleep(0.1)
    assert planted, "the action did not run"
    # setpriv rather than subprocess's user=: a fork of this multi-threaded (gRPC) process
    # that runs Python before exec can crash.
    as_nobody = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls", "-l", planted[0]],
        capture_output=True,
        text=True,
    )
    assert as_nobody.returncode != 0 and "Permission denied" in as_nobody.stderr
    thread.join(30)


def test_one_client_cannot_make_the_worker_hold_unbounded_sidecars(
    tmp_path: Path, test_images: None, dispatch: str
) -> None:
    """Every distinct user is a pool of its own; execution.max_sidecars_total bounds them all
    together, idle sidecars of other pools making room."""
    settings = attack_settings(tmp_path, dispatch, max_sidecars_total=2)
    with running_service(settings) as service:
        execution = service.service.execution
        assert execution is not None
        for uid in range(2000, 2006):
            response = run(
                service.channel,
                hostile("id -u", action_platform={**HOSTILE_PLATFORM, "dockerUser": str(uid)}),
            )
            assert stdout_of(service.channel, response) == f"{uid}\n".encode()
            live = sum(len(pool.sidecars) for pool in execution.pools.pools)
            assert live <= 2
        client = docker.APIClient(version="auto")
        try:
            labelled = client.containers(
                filters={"label": f"{WORKER_LABEL}={service.service.identity.worker_id}"}
            )
        finally:
            client.close()
        assert len(labelled) <= 2


@pytest.mark.parametrize(
    "spec",
    [
        {"argv": ["sh", "-c", "echo a\0b"]},
        {"env": {"": "empty name"}},
        {"env": {"A=B": "equals in the name"}},
        {"env": {"NUL": "a\0b"}},
        {"argv": ["sh", "-c", "true", "x" * (1 << 20)]},
        {"output_paths": ["a\0b"]},
    ],
    ids=["nul-argument", "empty-name", "equals-name", "nul-value", "huge", "nul-path"],
)
def test_a_command_no_process_can_start_with_is_invalid_and_costs_no_sidecar(
    attacked: RunningService, spec: dict[str, object]
) -> None:
    """Refused before any sidecar is leased: a malformed Command must not pass for a broken
    sidecar (which would be destroyed, and the client told to retry)."""
    fields: dict[str, Any] = {"argv": ["true"], "action_platform": HOSTILE_PLATFORM, **spec}
    response = run(attacked.channel, ActionSpec(**fields))
    assert response.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], response.status
    execution = attacked.service.execution
    assert execution is not None
    assert all(pool.stats.created == 0 for pool in execution.pools.pools)


def test_a_root_action_that_replaces_its_agent_socket_reaches_nothing(
    root_allowed: RunningService, canary: Canary, dispatch: str
) -> None:
    """A root action can write its sidecar's agent directory (dispatch agent). It swaps the
    socket for links to the host's Docker socket and to the canary, and plants a listener of
    its own: the sidecar serves no second action (single-use), the worker never sends anything
    to what it did not verify, and the host is untouched."""
    tamper = (
        "d=/.sidecar-agent; [ -d $d ] || { echo no-agent; exit 0; };"
        f" rm -f $d/agent.sock; ln -s /var/run/docker.sock $d/agent.sock; ln -s {canary.path}"
        " $d/secret; (nc -lk -s 0 -U $d/fake.sock >/dev/null 2>&1 &); echo swapped"
    )
    first = run(root_allowed.channel, hostile(tamper, action_platform=ROOT_PLATFORM))
    assert first.status.code == OK, first.status
    expected = b"swapped\n" if dispatch == "agent" else b"no-agent\n"
    assert stdout_of(root_allowed.channel, first) == expected
    after = run(root_allowed.channel, hostile("echo next", action_platform=ROOT_PLATFORM))
    assert stdout_of(root_allowed.channel, after) == b"next\n"
    assert pool_of(root_allowed).stats.created == 2  # the tampered sidecar was not reused
    canary.assert_untouched()
    assert_cas_intact(root_allowed, canary)
