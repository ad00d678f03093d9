"""`cpctl ipam list`: the pool's CIDR per node and every node's IP leases."""

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
from controlplane.model import DEFAULT_CLUSTER_POOL, CIDRPool, ModelError


def register(subparsers: Any) -> None:
    ipam = subparsers.add_parser("ipam", help="inspect IPAM: pod CIDRs and IP leases")
    commands = ipam.add_subparsers(dest="ipam_command", required=True, metavar="COMMAND")
    lst = commands.add_parser("list", help="CIDR per node of a pool, and IP leases per node")
    lst.add_argument(
        "--pool", type=pool_name, default="default", help="CIDR pool name (default: default)"
    )
    add_cluster_flags(lst)
    add_json_flag(lst)
    lst.set_defaults(run=run_list)


def pool_name(text: str) -> str:
    try:
        return CIDRPool(DEFAULT_CLUSTER_POOL, name=text).name
    except ModelError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def run_list(args: argparse.Namespace) -> int:
    async with open_stores(args) as stores:
        claims = await stores.claims(args.pool)
        leases = await stores.leases()
        skipped = {resource: stores.malformed(resource) for resource in ("cidr-claim", "ip-lease")}
    by_node: dict[str, dict[str, str]] = {}
    for lease in leases:
        by_node.setdefault(str(lease.value.node), {})[str(lease.value.ip)] = str(lease.value.owner)
    if args.json:
        print_json(
            {
                "pool": args.pool,
                "cidrs": [
                    {"cidr": str(c.value.cidr), "node": str(c.value.node), "revision": c.version}
                    for c in claims
                ],
                "leases": by_node,
                "malformed": skipped,
            }
        )
        return EXIT_OK
    nodes = {str(c.value.node) for c in claims}
    print(f"pool {args.pool}: {len(claims)} CIDR(s) on {len(nodes)} node(s)")
    if claims:
        print_table(["  CIDR", "NODE"], [[f"  {c.value.cidr}", str(c.value.node)] for c in claims])
    print(f"leases: {len(leases)} IP(s) on {len(by_node)} node(s)")
    if leases:
        print_table(
            ["  NODE", "IP", "ENDPOINT"],
            [[f"  {lease.value.node}", lease.value.ip, lease.value.owner] for lease in leases],
        )
    for resource, count in skipped.items():
        if count:
            print(f"cpctl: skipped {count} malformed {resource} record(s)", file=sys.stderr)
    return EXIT_OK
