"""`cpctl endpoint list` and `cpctl node list`: what the agents published, decoded."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from controlplane.cli.common import (
    EXIT_OK,
    add_json_flag,
    print_json,
    print_table,
)
from controlplane.cli.stores import add_cluster_flags, open_stores
from controlplane.model import Endpoint, Node
from controlplane.store_types import Versioned


def register_endpoint(subparsers: Any) -> None:
    endpoint = subparsers.add_parser("endpoint", help="endpoints every node published")
    commands = endpoint.add_subparsers(dest="endpoint_command", required=True, metavar="COMMAND")
    lst = commands.add_parser("list", help="list every node's endpoints (all shards merged)")
    _add_flags(lst)
    lst.set_defaults(run=run_endpoint_list)


def register_node(subparsers: Any) -> None:
    node = subparsers.add_parser("node", help="node records")
    commands = node.add_subparsers(dest="node_command", required=True, metavar="COMMAND")
    lst = commands.add_parser("list", help="list every registered node")
    _add_flags(lst)
    lst.set_defaults(run=run_node_list)


def _add_flags(parser: argparse.ArgumentParser) -> None:
    add_cluster_flags(parser)
    add_json_flag(parser)
    parser.add_argument(
        "--cluster-name",
        default="default",
        metavar="NAME",
        help="the control plane's cluster name in keys (default: default)",
    )


def _report(what: str, count: int, skipped: int) -> None:
    note = f"; {skipped} malformed skipped (see the log with -v)" if skipped else ""
    print(f"# {count} {what}{note}", file=sys.stderr)


async def run_endpoint_list(args: argparse.Namespace) -> int:
    async with open_stores(args, cluster=args.cluster_name) as stores:
        found = await stores.endpoints.list()
        skipped = stores.malformed("endpoint")
    items = sorted(found, key=lambda e: (e.value.ip.version, int(e.value.ip)))
    if args.json:
        print_json({"endpoints": [endpoint_json(e) for e in items], "malformed": skipped})
        return EXIT_OK
    print_table(
        ["IP/PREFIX", "IDENTITY", "NODE", "HOST IP", "NAMESPACE/NAME"],
        [
            [
                str(e.value.prefix),
                int(e.value.identity),
                e.value.node,
                str(e.value.host_ip),
                e.value.endpoint_id,
            ]
            for e in items
        ],
    )
    _report("endpoints", len(items), skipped)
    return EXIT_OK


def endpoint_json(item: Versioned[Endpoint]) -> dict[str, Any]:
    return {**item.value.to_dict(), "prefix": str(item.value.prefix), "revision": item.version}


async def run_node_list(args: argparse.Namespace) -> int:
    async with open_stores(args, cluster=args.cluster_name) as stores:
        found = await stores.nodes.list()
        skipped = stores.malformed("node")
    items = sorted(found, key=lambda n: n.value.name)
    if args.json:
        print_json({"nodes": [node_json(n) for n in items], "malformed": skipped})
        return EXIT_OK
    print_table(
        ["NAME", "IPS", "POD CIDRS", "BOOT ID"],
        [
            [
                n.value.name,
                ",".join(str(ip) for ip in n.value.ips) or None,
                ",".join(str(c) for c in n.value.pod_cidrs) or None,
                n.value.boot_id or None,
            ]
            for n in items
        ],
    )
    _report("nodes", len(items), skipped)
    return EXIT_OK


def node_json(item: Versioned[Node]) -> dict[str, Any]:
    return {**item.value.to_dict(), "revision": item.version}
