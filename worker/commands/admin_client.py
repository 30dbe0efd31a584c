"""What the operator subcommands share: finding the admin interface of a running service (from
--admin, or the --config/--data-dir it was started with) and turning its errors into exit codes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import grpc
import yaml

from worker.commands.common import ConfigError, add_settings_flags, fail, settings_from_args
from worker.reapi import admin_pb2_grpc

# An operator command that gets no answer in this time reports the service unreachable.
TIMEOUT_S = 30.0


class AdminUnreachable(Exception):
    """No running service answers at the admin address; the message says where we looked."""


def add_admin_flags(parser: argparse.ArgumentParser) -> None:
    add_settings_flags(parser)
    parser.add_argument(
        "--admin",
        metavar="ADDRESS",
        help="the admin interface (unix:PATH or HOST:PORT); default: admin.listen of the "
        "settings, or unix:DATA_DIR/admin.sock",
    )


def admin_address(args: argparse.Namespace) -> str:
    if args.admin:
        return str(args.admin)
    try:
        return settings_from_args(args).admin_address
    except ConfigError:
        # A broken file (the reload the operator is looking into) still names where the
        # running service listens.
        address = _address_in_raw_file(args)
        if address is None:
            raise
        print(  # noqa: T201
            "sidecar-executor: warning: the configuration does not validate; using the admin "
            "address it names anyway",
            file=sys.stderr,
        )
        return address


def _address_in_raw_file(args: argparse.Namespace) -> str | None:
    if args.config is None:
        return None
    try:
        raw = yaml.safe_load(Path(args.config).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict):
        return None
    admin = raw.get("admin")
    if isinstance(admin, dict) and isinstance(admin.get("listen"), str):
        return str(admin["listen"])
    data_dir = args.data_dir or raw.get("data_dir") or Path(".data")
    return f"unix:{(Path(data_dir) / 'admin.sock').absolute()}"


def admin_stub(args: argparse.Namespace) -> tuple[grpc.Channel, admin_pb2_grpc.AdminStub]:
    address = admin_address(args)
    if address.startswith("unix:"):
        path = Path(address.removeprefix("unix:").removeprefix("//"))
        if not path.is_socket():
            raise AdminUnreachable(
                f"no admin socket at {path}: is the service running with this --config / "
                "--data-dir (or give --admin ADDRESS)?"
            )
    channel = grpc.insecure_channel(address)
    return channel, admin_pb2_grpc.AdminStub(channel)


def call(args: argparse.Namespace, method: str, request: Any) -> tuple[int, Any]:
    """Calls one admin method; (0, response), or (exit code, None) after printing why."""
    try:
        channel, stub = admin_stub(args)
    except ConfigError as error:
        return fail(str(error)), None
    except AdminUnreachable as error:
        return fail(str(error), code=1), None
    with channel:
        try:
            return 0, getattr(stub, method)(request, timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            code = error.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return fail(
                    f"the service at {admin_address(args)} does not answer: {error.details()}",
                    code=1,
                ), None
            # The service judged the arguments: unknown image, min > max...
            bad_input = code in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            return fail(f"{code.name}: {error.details()}", code=2 if bad_input else 1), None


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value
