"""`sidecar-executor cas verify`: checks every stored blob against its digest, removes the
damaged ones and prints a summary; safe to run while the service serves."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from worker.cas.verify import Progress, verify_cas
from worker.commands.common import ConfigError, add_settings_flags, fail, settings_from_args

GiB = 1 << 30


def register(commands: Any) -> None:
    cas = commands.add_parser("cas", help="maintain the content-addressable storage")
    actions = cas.add_subparsers(dest="cas_command", required=True)
    verify = actions.add_parser(
        "verify",
        help="hash every stored blob, remove the damaged ones (safe while the service serves)",
    )
    add_settings_flags(verify)
    verify.add_argument(
        "--dry-run", action="store_true", help="only report damaged blobs, remove nothing"
    )
    verify.add_argument("--quiet", action="store_true", help="no progress lines")
    verify.set_defaults(run=run_verify)


def _show(progress: Progress) -> None:
    print(  # noqa: T201
        f"verified {progress.done}/{progress.total} files, "
        f"{progress.done_bytes / GiB:.2f}/{progress.total_bytes / GiB:.2f} GiB, "
        f"{progress.damaged} damaged",
        file=sys.stderr,
        flush=True,
    )


def run_verify(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ConfigError as error:
        return fail(str(error))
    cas_dir = settings.data_dir / "cas"
    try:
        report = verify_cas(
            cas_dir, report_progress=None if args.quiet else _show, remove=not args.dry_run
        )
    except FileNotFoundError as error:
        return fail(str(error))
    action = "found" if args.dry_run else "removed"
    for path in report.damaged:
        print(f"damaged: {path} ({action})")  # noqa: T201
    print(  # noqa: T201
        f"checked {report.checked} files ({report.checked_bytes} bytes) in "
        f"{report.seconds:.1f} s: {len(report.damaged)} damaged ({action}), "
        f"{report.vanished} evicted while checking"
    )
    return 1 if report.damaged else 0
