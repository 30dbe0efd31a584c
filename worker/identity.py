"""Who this worker is on a shared Docker daemon: an id kept in the data directory, and a lock
so that two services never use one data directory (or one identity) at once."""

from __future__ import annotations

import fcntl
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

ID_FILE = "worker-id"
LOCK_FILE = ".lock"


@dataclass
class WorkerIdentity:
    """`worker_id` labels every container this worker makes; it is random per data directory
    and the same across restarts, so a restarted worker finds (and removes) its own leftovers
    and never another service's, whatever `server.worker_name` says."""

    worker_id: str
    _lock_fd: int

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def claim_data_dir(data_dir: Path) -> WorkerIdentity:
    """Locks the data directory for this process and returns its identity. Raises OSError if
    another service holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(
            f"data directory {data_dir} is in use by another sidecar-executor; give each "
            "service its own --data-dir"
        ) from None
    id_path = data_dir / ID_FILE
    try:
        worker_id = id_path.read_text().strip()
    except FileNotFoundError:
        worker_id = ""
    if len(worker_id) != 32 or any(c not in "0123456789abcdef" for c in worker_id):
        worker_id = uuid.uuid4().hex
        staged = id_path.with_name(ID_FILE + ".new")
        staged.write_text(worker_id + "\n")
        os.replace(staged, id_path)
    return WorkerIdentity(worker_id, fd)
