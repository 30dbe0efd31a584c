"""`sidecar-executor pools list|scale|drain|recycle|refresh`: operate a running worker's pools
through its admin interface."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from google.protobuf.json_format import MessageToDict

from worker.commands.admin_client import (
    add_admin_flags,
    call,
    non_negative_int,
    positive_int,
    positive_seconds,
)
from worker.commands.common import fail
from worker.reapi import admin_pb2


def register(commands: Any) -> None:
    pools = commands.add_parser("pools", help="list and operate the sidecar pools of a service")
    actions = pools.add_subparsers(dest="pools_command", required=True)

    listing = actions.add_parser("list", help="every pool: sidecars, waiters, actions served")
    listing.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    add_admin_flags(listing)
    listing.set_defaults(run=run_list)

    scale = actions.add_parser(
        "scale", help="change an image's min_idle / max / idle TTL now (lifts a drain)"
    )
    scale.add_argument("image")
    scale.add_argument("--min-idle", type=non_negative_int, help="sidecars kept warm")
    scale.add_argument("--max", type=positive_int, help="most sidecars of one pool")
    scale.add_argument("--idle-ttl", type=positive_seconds, metavar="S", help="seconds")
    add_admin_flags(scale)
    scale.set_defaults(run=run_scale)

    for name, text in (
        ("drain", "no new leases; running actions finish, then the sidecars go"),
        ("recycle", "replace every sidecar once its actions are done"),
        ("refresh", "re-resolve (pull) the tag and move the pools to the image it names now"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("image")
        add_admin_flags(action)
        action.set_defaults(run=run_pool_action, pools_command=name)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _limits(pool: admin_pb2.Pool) -> str:
    parts = []
    if pool.HasField("cpus"):
        parts.append(f"cpu={pool.cpus:g}")
    if pool.HasField("memory_bytes"):
        parts.append(f"mem={pool.memory_bytes // (1 << 20)}Mi")
    if pool.HasField("pids_limit"):
        parts.append(f"pids={pool.pids_limit}")
    return ",".join(parts) or "-"


def table(pools: list[admin_pb2.Pool]) -> str:
    header = (
        "IMAGE",
        "IMAGE ID",
        "USER",
        "NETWORK",
        "LIMITS",
        "IDLE/BUSY/MAX",
        "WAITING",
        "SERVED",
        "P50 RUN",
        "STATE",
    )
    rows = [header]
    for pool in pools:
        state = "drained" if pool.drained else "winding down" if pool.winding_down else "serving"
        rows.append(
            (
                pool.image,
                pool.image_id.removeprefix("sha256:")[:12],
                pool.user,
                pool.network,
                _limits(pool),
                f"{pool.idle}/{pool.busy}/{pool.max_sidecars}",
                str(pool.waiting),
                str(pool.served),
                f"{pool.run_p50_s:.3f}s" if pool.HasField("run_p50_s") else "-",
                state,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def as_json(pool: admin_pb2.Pool) -> dict[str, Any]:
    """The pool as a JSON object with numbers as numbers (the proto mapping writes 64-bit
    integers as strings)."""
    view = MessageToDict(
        pool, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for field in pool.DESCRIPTOR.fields:
        if field.name in view and field.type in (field.TYPE_INT64, field.TYPE_UINT64):
            view[field.name] = int(view[field.name])
    return view


def run_list(args: argparse.Namespace) -> int:
    code, response = call(args, "ListPools", admin_pb2.ListPoolsRequest())
    if code:
        return code
    pools = list(response.pools)
    if args.json:
        document = [as_json(p) for p in pools]
        _out(json.dumps({"pools": document}, indent=2))
    elif pools:
        _out(table(pools))
    else:
        _out("no pools")
    return 0


def run_scale(args: argparse.Namespace) -> int:
    request = admin_pb2.ScalePoolRequest(image=args.image)
    if args.min_idle is not None:
        request.min_idle = args.min_idle
    if args.max is not None:
        request.max_sidecars = args.max
    if args.idle_ttl is not None:
        request.idle_ttl_s = args.idle_ttl
    if args.min_idle is not None and args.max is not None and args.min_idle > args.max:
        return fail(f"--min-idle {args.min_idle} is above --max {args.max}")
    code, response = call(args, "ScalePool", request)
    if code:
        return code
    _out(
        f"{args.image}: min_idle={response.min_idle} max={response.max_sidecars} "
        f"idle_ttl={response.idle_ttl_s:g}s"
    )
    return 0


def run_pool_action(args: argparse.Namespace) -> int:
    request = admin_pb2.PoolRequest(image=args.image)
    if args.pools_command == "refresh":
        code, refreshed = call(args, "RefreshPool", request)
        if code:
            return code
        before = ", ".join(refreshed.previous_image_ids) or "no pool"
        _out(f"{args.image}: {before} -> {refreshed.image_id}")
        return 0
    method = "DrainPool" if args.pools_command == "drain" else "RecyclePool"
    code, changed = call(args, method, request)
    if code:
        return code
    if args.pools_command == "drain":
        _out(f"{args.image}: drained {changed.pools} pool(s)")
    else:
        _out(f"{args.image}: recycling {changed.sidecars} sidecar(s) in {changed.pools} pool(s)")
    return 0
