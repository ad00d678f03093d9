"""`cpctl service put FILE|list|delete NS/NAME`: services in the kvstore.

``put`` reads one service (or a list of them) from a YAML or JSON file (``-`` for stdin)
in the stored form (``docs/key-layout.md``)::

    namespace: default
    name: web
    cluster_ip: 10.96.0.10
    frontends: [{port: 80, protocol: TCP}]
    backends:
      - {ip: 10.0.1.5, port: 8080, node: node-a}
      - {ip: 10.0.2.7, port: 8080, node: node-b}

With several frontends each has a ``name`` and each backend names its ``frontend``.

``list`` shows each frontend with its backends and, for each backend, the endpoint the
store has at that address (``no endpoint``: nothing is published there, so connections
sent to it will likely fail).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from controlplane.cli import namespaced_cmd
from controlplane.cli.common import EXIT_OK, kvstore_config, print_json, print_table
from controlplane.kvstore.endpoints import KvEndpointStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.services import KvServiceStore
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import Backend, Service

KIND = namespaced_cmd.Kind("service", "services", Service.from_dict, KvServiceStore)


def register(subparsers: Any) -> None:
    lst = namespaced_cmd.register(
        subparsers, KIND, "services: virtual IPs, ports and backends (kvstore)", run_list
    )
    lst.add_argument(
        "--cluster-name",
        default="default",
        metavar="NAME",
        help="the control plane's cluster name in endpoint keys (default: default)",
    )


async def _endpoints(args: argparse.Namespace) -> dict[str, str]:
    """Endpoint IP -> ``namespace/name``, to say which backends have an endpoint."""
    config = kvstore_config(args)
    async with ShardMap(config) as shards:
        store = KvEndpointStore(
            shards,
            KeyLayout(config.prefix),
            StoreMetrics.create(),
            None,
            node=None,
            cluster=args.cluster_name,
        )
        return {str(e.value.ip): str(e.value.endpoint_id) for e in await store.list()}


def _backend(be: Backend, endpoints: dict[str, str]) -> str:
    where = f"@{be.node}" if be.node else ""
    endpoint = endpoints.get(str(be.ip))
    return f"{be}{where}" + ("" if endpoint else " (no endpoint)")


async def run_list(args: argparse.Namespace) -> int:
    found, skipped = await namespaced_cmd.list_all(args, KIND)
    endpoints = await _endpoints(args)
    if args.json:
        rows = [
            {
                **v.value.to_dict(),
                "revision": v.version,
                "backend_endpoints": {
                    str(be): endpoints.get(str(be.ip)) for be in v.value.backends
                },
            }
            for v in found
        ]
        print_json({"services": rows, "malformed": skipped})
        return EXIT_OK
    table: list[list[Any]] = []
    for v in found:
        svc = v.value
        for fe in svc.frontends:
            backends = ", ".join(_backend(be, endpoints) for be in svc.backends_of(fe))
            name = f" ({fe.name})" if fe.name else ""
            table.append([svc.id, f"{svc.cluster_ip}:{fe}{name}",
                          backends or "(none: connections refused)"])  # fmt: skip
    print_table(["NAMESPACE/NAME", "FRONTEND", "BACKENDS"], table)
    print(f"{len(found)} services; {skipped} malformed skipped", file=sys.stderr)
    return EXIT_OK
