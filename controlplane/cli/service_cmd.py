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
from pathlib import Path
from typing import Any

import yaml

from controlplane.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    add_json_flag,
    add_kvstore_flags,
    kvstore_config,
    print_json,
    print_table,
)
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.services import SERVICE_RESOURCE, KvServiceStore
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import ModelError, Service


def register(subparsers: Any) -> None:
    service = subparsers.add_parser("service", help="services: virtual IPs and backends (kvstore)")
    commands = service.add_subparsers(dest="service_command", required=True, metavar="COMMAND")
    put = commands.add_parser("put", help="create or replace services from a YAML/JSON file")
    put.add_argument("file", help="YAML or JSON file ('-' for stdin): a service or a list")
    put.set_defaults(run=run_put)
    lst = commands.add_parser("list", help="every service with its frontends and backends")
    lst.set_defaults(run=run_list)
    delete = commands.add_parser("delete", help="delete one service")
    delete.add_argument("service", metavar="NS/NAME")
    delete.set_defaults(run=run_delete)
    for parser in (put, lst, delete):
        add_kvstore_flags(parser)
        add_json_flag(parser)


def _store(shards: ShardMap) -> KvServiceStore:
    return KvServiceStore(shards, KeyLayout(shards.prefix), StoreMetrics.create())


def load_services(text: str) -> list[Service]:
    """Parse one service or a list of them (YAML, of which JSON is a subset)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CommandError(
            f"service file: not YAML/JSON: {exc}".splitlines()[0], EXIT_USAGE
        ) from None
    items = data if isinstance(data, list) else [data]
    try:
        services = [Service.from_dict(item) for item in items]
    except ModelError as exc:
        raise CommandError(f"service file: {exc}", EXIT_USAGE) from None
    seen: set[str] = set()
    for service in services:
        if service.id in seen:
            raise CommandError(f"service file: {service.id} given twice", EXIT_USAGE)
        seen.add(service.id)
    return services


def _read(name: str) -> str:
    try:
        return sys.stdin.read() if name == "-" else Path(name).read_text()
    except OSError as exc:
        raise CommandError(f"service file {name}: {exc.strerror or exc}", EXIT_USAGE) from None


async def run_put(args: argparse.Namespace) -> int:
    services = load_services(_read(args.file))
    async with ShardMap(kvstore_config(args)) as shards:
        store = _store(shards)
        for service in services:
            await store.put(service)
    if args.json:
        print_json({"put": [s.id for s in services]})
    else:
        for service in services:
            print(f"service {service.id} stored")
    return EXIT_OK


async def run_list(args: argparse.Namespace) -> int:
    async with ShardMap(kvstore_config(args)) as shards:
        store = _store(shards)
        found = await store.list()
        skipped = store.codec.metrics.registry.get_sample_value(
            "cp_store_malformed_values_total", {"resource": SERVICE_RESOURCE}
        )
    found.sort(key=lambda v: v.value.id)
    if args.json:
        rows = [{**v.value.to_dict(), "revision": v.version} for v in found]
        print_json({"services": rows, "malformed": int(skipped or 0)})
        return EXIT_OK
    rows_out: list[list[Any]] = []
    for v in found:
        svc = v.value
        for fe in svc.frontends:
            backends = svc.backends_of(fe)
            rows_out.append([
                svc.id,
                f"{svc.cluster_ip}:{fe}" + (f" ({fe.name})" if fe.name else ""),
                ", ".join(
                    f"{be}" + (f"@{be.node}" if be.node else "") for be in backends
                ) or "(none: connections refused)",
            ])  # fmt: skip
    print_table(["NAMESPACE/NAME", "FRONTEND", "BACKENDS"], rows_out)
    print(f"{len(found)} services; {int(skipped or 0)} malformed skipped", file=sys.stderr)
    return EXIT_OK


async def run_delete(args: argparse.Namespace) -> int:
    namespace, sep, name = str(args.service).partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise CommandError(f"want NS/NAME, got {args.service!r}", EXIT_USAGE)
    async with ShardMap(kvstore_config(args)) as shards:
        deleted = await _store(shards).delete(namespace, name)
    if not deleted:
        raise CommandError(f"service {namespace}/{name} not found")
    if args.json:
        print_json({"deleted": f"{namespace}/{name}"})
    else:
        print(f"service {namespace}/{name} deleted")
    return EXIT_OK
