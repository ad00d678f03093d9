"""`cpctl service put FILE|list|delete NS/NAME`: services in the store.

In kvstore mode they are records under ``cp/state/services/v1/``; in CRD mode they are
Kubernetes Services with their EndpointSlices (``list`` shows every balanced Service,
whoever made it: kubectl, the EndpointSlice controller; ``put`` writes a selector-less
Service with the given cluster IP and an EndpointSlice ``<name>-cpctl`` with the
backends; ``delete`` removes both). See :mod:`controlplane.crd.services`.

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
from controlplane.cli.common import EXIT_OK, print_json, print_table
from controlplane.cli.stores import open_stores
from controlplane.model import Backend, Service

KIND = namespaced_cmd.Kind("service", "services", Service.from_dict, lambda s: s.services)


def register(subparsers: Any) -> None:
    lst = namespaced_cmd.register(
        subparsers, KIND, "services: virtual IPs, ports and backends", run_list
    )
    lst.add_argument(
        "--cluster-name",
        default="default",
        metavar="NAME",
        help="the control plane's cluster name in endpoint keys (default: default)",
    )


def _backend(be: Backend, endpoints: dict[str, str]) -> str:
    where = f"@{be.node}" if be.node else ""
    endpoint = endpoints.get(str(be.ip))
    return f"{be}{where}" + ("" if endpoint else " (no endpoint)")


async def run_list(args: argparse.Namespace) -> int:
    async with open_stores(args, cluster=args.cluster_name) as stores:
        found, skipped = await namespaced_cmd.list_all(stores, KIND)
        endpoints = {
            str(e.value.ip): str(e.value.endpoint_id) for e in await stores.endpoints.list()
        }
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
