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
from typing import Any

from controlplane.cli import namespaced_cmd
from controlplane.cli.common import EXIT_OK, print_json, print_table
from controlplane.cli.stores import open_stores
from controlplane.model import NetworkPolicy

KIND = namespaced_cmd.Kind(
    "policy", "policies", NetworkPolicy.from_dict, lambda stores: stores.policies
)


def register(subparsers: Any) -> None:
    namespaced_cmd.register(subparsers, KIND, "network policies", run_list)


async def run_list(args: argparse.Namespace) -> int:
    async with open_stores(args) as stores:
        found, skipped = await namespaced_cmd.list_all(stores, KIND)
    if args.json:
        rows = [{**v.value.to_dict(), "revision": v.version} for v in found]
        print_json({"policies": rows, "malformed": skipped})
        return EXIT_OK
    print_table(
        ["NAMESPACE/NAME", "SELECTOR", "INGRESS"],
        [
            [v.value.id, ";".join(v.value.endpoint_selector.to_strings()) or "(all)",
             " | ".join(_rule(r) for r in v.value.to_dict()["ingress"]) or "(deny all)"]
            for v in found
        ],
    )  # fmt: skip
    print(f"{len(found)} policies; {skipped} malformed skipped", file=sys.stderr)
    return EXIT_OK


def _rule(rule: dict[str, Any]) -> str:
    source = ";".join(rule["from_selector"]) or "(all)"
    ports = ",".join(f"{p['port'] or '*'}/{p['proto']}" for p in rule["ports"]) or "any"
    return f"{source} -> {ports}"
