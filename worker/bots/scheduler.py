"""Where the scheduler is: `grpc://HOST:PORT` (plain) or `grpcs://HOST:PORT` (TLS), and a channel
to it sized for CAS traffic."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

# Our side's message limit; the scheduler's CAS batch limit (GetCapabilities) is kept below it.
MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class SchedulerAddress:
    target: str
    tls: bool

    def __str__(self) -> str:
        return f"{'grpcs' if self.tls else 'grpc'}://{self.target}"


def parse_scheduler(url: str) -> SchedulerAddress:
    """ValueError unless `url` is grpc://HOST:PORT or grpcs://HOST:PORT."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("grpc", "grpcs"):
        raise ValueError(f"scheduler {url!r} must start with grpc:// or grpcs://")
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise ValueError(f"scheduler {url!r} is not grpc[s]://HOST:PORT")
    return SchedulerAddress(f"{host}:{int(port)}", scheme == "grpcs")


def open_channel(address: SchedulerAddress, root_certificates: Path | None) -> grpc.aio.Channel:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Notice a scheduler that vanished without closing the connection.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
    if not address.tls:
        return grpc.aio.insecure_channel(address.target, options=options)
    roots = root_certificates.read_bytes() if root_certificates is not None else None
    return grpc.aio.secure_channel(
        address.target, grpc.ssl_channel_credentials(root_certificates=roots), options=options
    )
