"""Checks every file of a CAS directory against the digest its name claims, and removes the
damaged ones. Works from the files alone, so it can run beside a service that is serving
from the same directory (see `sidecar-executor cas verify` and docs/STORAGE.md)."""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from worker.cas.integrity import hash_fd

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class VerifyReport:
    checked: int = 0
    checked_bytes: int = 0
    damaged: list[str] = field(default_factory=list)  # paths, relative to the CAS directory
    vanished: int = 0  # evicted (or re-stored) by the service while we looked
    seconds: float = 0.0


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    done_bytes: int
    total_bytes: int
    damaged: int


def _candidates(cas_dir: Path) -> Iterator[tuple[str, str, int]]:
    """(path, the hash it claims, size) of every blob file and executable copy."""
    for shard in sorted((cas_dir / "blobs").iterdir()):
        if shard.is_dir():
            for entry in os.scandir(shard):
                yield entry.path, entry.name, entry.stat(follow_symlinks=False).st_size
    executables = cas_dir / "executables"
    if executables.is_dir():
        for entry in os.scandir(executables):
            yield entry.path, entry.name, entry.stat(follow_symlinks=False).st_size


def verify_cas(
    cas_dir: Path,
    report_progress: Callable[[Progress], None] | None = None,
    remove: bool = True,
    every_s: float = 1.0,
) -> VerifyReport:
    """Hashes every stored file; one that does not hash to its name (or is not a regular
    file, or is named like no blob) is damaged, and removed when `remove` is set, unless
    the service replaced it meanwhile (another inode at that name is left alone)."""
    if not (cas_dir / "blobs").is_dir():
        raise FileNotFoundError(f"{cas_dir} holds no CAS (no blobs/ directory)")
    started = time.monotonic()
    files = list(_candidates(cas_dir))
    total_bytes = sum(size for _, _, size in files)
    report = VerifyReport()
    last = 0.0
    for path, name, _ in files:
        now = time.monotonic()
        if report_progress is not None and now - last >= every_s:
            last = now
            report_progress(_progress(report, len(files), total_bytes))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            report.vanished += 1
            continue
        except OSError:  # A symlink or something else that no blob file is.
            fd = -1
        try:
            info = os.fstat(fd) if fd >= 0 else os.lstat(path)
            good = (
                fd >= 0
                and stat.S_ISREG(info.st_mode)
                and _HEX64.fullmatch(name) is not None
                and hash_fd(fd, info.st_size)[0] == name
            )
        finally:
            if fd >= 0:
                os.close(fd)
        report.checked += 1
        report.checked_bytes += info.st_size
        if good:
            continue
        report.damaged.append(os.path.relpath(path, cas_dir))
        if remove:
            _remove_if_same(path, info.st_ino)
    report.seconds = time.monotonic() - started
    if report_progress is not None:
        report_progress(_progress(report, len(files), total_bytes))
    return report


def _progress(report: VerifyReport, total: int, total_bytes: int) -> Progress:
    return Progress(report.checked, total, report.checked_bytes, total_bytes, len(report.damaged))


def _remove_if_same(path: str, inode: int) -> None:
    """Unlinks `path` if it is still the file that was found damaged."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
