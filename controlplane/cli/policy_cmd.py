"""`cpctl policy put FILE|list|delete NS/NAME`: network policies, in the store of either mode
(NetworkPolicy objects in CRD mode, keys in kvstore mode).

``put`` reads one policy (or a list of them) from a YAML or JSON file (``-`` for stdin) in
the stored form (``docs/key-layout.md``)::

    name: db
    namespace: default
    endpoint_selector: [app=db]
    ingress:
      - from_selector: [app=web]
        ports: [{port: 5432, proto: TCP}]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from controlplane.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    add_json_flag,
    print_json,
    print_table,
)
from controlplane.cli.stores import add_cluster_flags, open_stores
from controlplane.model import ModelError, NetworkPolicy


def register(subparsers: Any) -> None:
    policy = subparsers.add_parser("policy", help="network policies")
    commands = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    put = commands.add_parser("put", help="create or replace policies from a YAML/JSON file")
    put.add_argument("file", help="YAML or JSON file ('-' for stdin): a policy or a list")
    put.set_defaults(run=run_put)
    lst = commands.add_parser("list", help="every policy")
    lst.set_defaults(run=run_list)
    delete = commands.add_parser("delete", help="delete one policy")
    delete.add_argument("policy", metavar="NS/NAME")
    delete.set_defaults(run=run_delete)
    for parser in (put, lst, delete):
        add_cluster_flags(parser)
        add_json_flag(parser)


def load_policies(text: str) -> list[NetworkPolicy]:
    """Parse one policy or a list of them (YAML, of which JSON is a subset)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CommandError(
            f"policy file: not YAML/JSON: {exc}".splitlines()[0], EXIT_USAGE
        ) from None
    items = data if isinstance(data, list) else [data]
    try:
        return [NetworkPolicy.from_dict(item) for item in items]
    except ModelError as exc:
        raise CommandError(f"policy file: {exc}", EXIT_USAGE) from None


def _read(name: str) -> str:
    try:
        return sys.stdin.read() if name == "-" else Path(name).read_text()
    except OSError as exc:
        raise CommandError(f"policy file {name}: {exc.strerror or exc}", EXIT_USAGE) from None


async def run_put(args: argparse.Namespace) -> int:
    policies = load_policies(_read(args.file))
    async with open_stores(args) as stores:
        for policy in policies:
            await stores.policies.put(policy)
    if args.json:
        print_json({"put": [p.id for p in policies]})
    else:
        for policy in policies:
            print(f"policy {policy.id} stored")
    return EXIT_OK


async def run_list(args: argparse.Namespace) -> int:
    async with open_stores(args) as stores:
        found = await stores.policies.list()
        skipped = stores.malformed("policy")
    found.sort(key=lambda v: v.value.id)
    if args.json:
        rows = [{**v.value.to_dict(), "revision": v.version} for v in found]
        print_json({"policies": rows, "malformed": int(skipped or 0)})
        return EXIT_OK
    print_table(
        ["NAMESPACE/NAME", "SELECTOR", "INGRESS"],
        [
            [v.value.id, ";".join(v.value.endpoint_selector.to_strings()) or "(all)",
             " | ".join(_rule(r) for r in v.value.to_dict()["ingress"]) or "(deny all)"]
            for v in found
        ],
    )  # fmt: skip
    print(f"{len(found)} policies; {int(skipped or 0)} malformed skipped", file=sys.stderr)
    return EXIT_OK


def _rule(rule: dict[str, Any]) -> str:
    source = ";".join(rule["from_selector"]) or "(all)"
    ports = ",".join(f"{p['port'] or '*'}/{p['proto']}" for p in rule["ports"]) or "any"
    return f"{source} -> {ports}"


async def run_delete(args: argparse.Namespace) -> int:
    namespace, sep, name = str(args.policy).partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise CommandError(f"want NS/NAME, got {args.policy!r}", EXIT_USAGE)
    async with open_stores(args) as stores:
        deleted = await stores.policies.delete(namespace, name)
    if not deleted:
        raise CommandError(f"policy {namespace}/{name} not found")
    if args.json:
        print_json({"deleted": f"{namespace}/{name}"})
    else:
        print(f"policy {namespace}/{name} deleted")
    return EXIT_OK
