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
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from controlplane.cli import namespaced_cmd
from controlplane.cli.common import EXIT_OK, print_json, print_table
from controlplane.kvstore.services import KvServiceStore
from controlplane.model import Service

KIND = namespaced_cmd.Kind("service", "services", Service.from_dict, KvServiceStore)


def register(subparsers: Any) -> None:
    namespaced_cmd.register(
        subparsers, KIND, "services: virtual IPs, ports and backends (kvstore)", run_list
    )


async def run_list(args: argparse.Namespace) -> int:
    found, skipped = await namespaced_cmd.list_all(args, KIND)
    if args.json:
        rows = [{**v.value.to_dict(), "revision": v.version} for v in found]
        print_json({"services": rows, "malformed": skipped})
        return EXIT_OK
    table: list[list[Any]] = []
    for v in found:
        svc = v.value
        for fe in svc.frontends:
            backends = ", ".join(
                f"{be}@{be.node}" if be.node else str(be) for be in svc.backends_of(fe)
            )
            name = f" ({fe.name})" if fe.name else ""
            table.append([svc.id, f"{svc.cluster_ip}:{fe}{name}",
                          backends or "(none: connections refused)"])  # fmt: skip
    print_table(["NAMESPACE/NAME", "FRONTEND", "BACKENDS"], table)
    print(f"{len(found)} services; {skipped} malformed skipped", file=sys.stderr)
    return EXIT_OK
