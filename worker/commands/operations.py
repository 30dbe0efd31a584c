"""`sidecar-executor operations list|cancel`: a running worker's operations, through its admin
interface (the public port lists nothing: operation names are capabilities)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from google.protobuf.json_format import MessageToDict

from worker.commands.admin_client import add_admin_flags, call
from worker.reapi import admin_pb2


def register(commands: Any) -> None:
    operations = commands.add_parser("operations", help="list or cancel a service's operations")
    actions = operations.add_subparsers(dest="operations_command", required=True)
    listing = actions.add_parser("list", help="running, queued and recently finished operations")
    listing.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    add_admin_flags(listing)
    listing.set_defaults(run=run_list)
    cancel = actions.add_parser("cancel", help="cancel an operation by name")
    cancel.add_argument("name", help="operations/UUID")
    add_admin_flags(cancel)
    cancel.set_defaults(run=run_cancel)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def run_list(args: argparse.Namespace) -> int:
    operations: list[admin_pb2.OperationSummary] = []
    token = ""
    while True:
        code, page = call(args, "ListOperations", admin_pb2.ListOperationsRequest(page_token=token))
        if code:
            return code
        operations += page.operations
        token = page.next_page_token
        if not token:
            break
    if args.json:
        document = [
            MessageToDict(
                o, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
            for o in operations
        ]
        _out(json.dumps({"operations": document}, indent=2))
        return 0
    if not operations:
        _out("no operations")
    for operation in operations:
        status = f" status={operation.status_code}" if operation.done else ""
        _out(f"{operation.name}  {operation.stage:<10} {operation.action_digest}{status}")
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    name = args.name
    if not name.startswith("operations/"):
        name = f"operations/{name}"
    code, _ = call(args, "CancelOperation", admin_pb2.CancelOperationRequest(name=name))
    if code:
        return code
    _out(f"cancelled {name}")
    return 0
