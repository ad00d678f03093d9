"""`cpctl kvstore`: health, get, put, delete, list and watch against etcd."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from controlplane import codec
from controlplane.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    CommandError,
    add_json_flag,
    add_kvstore_flags,
    human_bytes,
    kvstore_config,
    positive_int,
    print_json,
    print_table,
)
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.health import ShardHealth, cluster_health
from controlplane.kvstore.shards import ShardMap
from controlplane.kvstore.types import EventType, KeyValue, WatchEvent
from controlplane.kvstore.watch import ListWatcher


def register(subparsers: Any) -> None:
    kv = subparsers.add_parser("kvstore", help="inspect and edit the etcd kvstore")
    commands = kv.add_subparsers(dest="kvstore_command", required=True, metavar="COMMAND")

    health = commands.add_parser("health", help="health of every shard and member")
    health.add_argument(
        "--strict",
        action="store_true",
        help="also fail when a shard is degraded (a member down, an alarm)",
    )
    health.set_defaults(run=run_health)

    get = commands.add_parser("get", help="show a key, or every key under a prefix")
    get.add_argument("key")
    get.add_argument("--prefix", action="store_true", help="treat KEY as a prefix")
    get.set_defaults(run=run_get)

    put = commands.add_parser("put", help="write a key")
    put.add_argument("key")
    put.add_argument("value")
    put.add_argument(
        "--envelope", metavar="KIND", help="VALUE is JSON: store it as a msgpack envelope of KIND"
    )
    put.set_defaults(run=run_put)

    delete = commands.add_parser("delete", help="delete a key, or every key under a prefix")
    delete.add_argument("key")
    delete.add_argument("--prefix", action="store_true", help="treat KEY as a prefix")
    delete.set_defaults(run=run_delete)

    lst = commands.add_parser("list", help="list the keys under a prefix")
    lst.add_argument("prefix", nargs="?", default="")
    lst.add_argument("--keys-only", action="store_true")
    lst.set_defaults(run=run_list)

    watch = commands.add_parser("watch", help="list then watch a prefix (Ctrl-C stops)")
    watch.add_argument("prefix")
    watch.add_argument("--no-list", action="store_true", help="show only changes")
    watch.add_argument("--count", type=positive_int, metavar="N", help="stop after N change events")
    watch.set_defaults(run=run_watch)

    for parser in (health, get, put, delete, lst, watch):
        add_kvstore_flags(parser)
        add_json_flag(parser)
        if parser is not health:
            parser.add_argument(
                "--raw", action="store_true", help="show values as stored, not decoded"
            )
            parser.add_argument(
                "--cluster", metavar="NAME", help="which etcd cluster (default: the first)"
            )


def _backend(args: argparse.Namespace) -> EtcdBackend:
    config = kvstore_config(args)
    name = args.cluster or config.clusters[0].name
    try:
        cluster = config.cluster(name)
    except ValueError as exc:
        raise CommandError(str(exc), 2) from exc
    return EtcdBackend(cluster, config.client, fail_fast=False)


def _value(raw: bytes, as_raw: bool) -> Any:
    if as_raw:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return {"hex": raw.hex()}
    return codec.to_display(raw)


def _key(key: bytes) -> str:
    return key.decode("utf-8", errors="backslashreplace")


def kv_json(kv: KeyValue, as_raw: bool) -> dict[str, Any]:
    return {
        "key": _key(kv.key),
        "value": _value(kv.value, as_raw),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
        "lease": f"{kv.lease:x}" if kv.lease else None,
    }


def _show_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


async def run_health(args: argparse.Namespace) -> int:
    config = kvstore_config(args)
    async with ShardMap(config) as shards:
        report = await cluster_health(shards)
    healthy = all(s.healthy for s in report)
    if args.strict:
        healthy = healthy and all(s.status == "healthy" for s in report)
    if args.json:
        print_json({"healthy": healthy, "shards": [s.to_json() for s in report]})
    else:
        _print_health(report)
    return EXIT_OK if healthy else EXIT_FAIL


def _print_health(report: list[ShardHealth]) -> None:
    for shard in report:
        heartbeat = "absent"
        if shard.heartbeat_age is not None:
            heartbeat = (
                f"{shard.heartbeat_age:.1f}s old (stale after {shard.heartbeat_threshold:.0f}s)"
            )
        verdict = shard.status if shard.healthy else f"UNHEALTHY: {shard.status}"
        print(f"shard {shard.name}: {verdict}")
        print(
            f"  quorum: {'yes' if shard.quorum else 'NO'}"
            + (f" ({shard.quorum_error})" if shard.quorum_error else "")
            + f"   revision: {shard.revision or '-'}   leader: {shard.leader or '-'}"
            + f"   leases: {shard.lease_count if shard.lease_count is not None else '-'}"
        )
        print(
            f"  heartbeat: {heartbeat}"
            + (f" by {shard.heartbeat_writer}" if shard.heartbeat_writer else "")
        )
        rows = []
        for e in shard.endpoints:
            if e.reachable:
                rows.append(
                    [
                        e.endpoint,
                        "yes",
                        e.version,
                        e.member_id,
                        "yes" if e.is_leader else "no",
                        e.raft_term,
                        e.revision,
                        human_bytes(e.db_size),
                        f"{e.latency_ms:.1f} ms",
                        ",".join(e.alarms),
                    ]
                )
            else:
                rows.append([e.endpoint, "NO", None, None, None, None, None, None, None, e.error])
        print_table(
            [
                "  ENDPOINT",
                "REACHABLE",
                "VERSION",
                "MEMBER",
                "LEADER",
                "TERM",
                "REVISION",
                "DB SIZE",
                "RTT",
                "NOTE",
            ],
            [["  " + str(r[0]), *r[1:]] for r in rows],
        )


async def run_get(args: argparse.Namespace) -> int:
    async with _backend(args) as backend:
        key = args.key.encode()
        if args.prefix:
            kvs = list((await backend.list_prefix(key)).kvs)
        else:
            kv = await backend.get(key)
            if kv is None:
                raise CommandError(f"key {args.key!r} not found")
            kvs = [kv]
    if args.json:
        items = [kv_json(kv, args.raw) for kv in kvs]
        print_json(items if args.prefix else items[0])
    else:
        for kv in kvs:
            print(f"{_key(kv.key)}\t{_show_value(_value(kv.value, args.raw))}")
    return EXIT_OK


async def run_put(args: argparse.Namespace) -> int:
    value: bytes
    if args.envelope:
        try:
            payload = json.loads(args.value)
        except json.JSONDecodeError as exc:
            raise CommandError(f"--envelope needs a JSON value: {exc.msg}", 2) from exc
        value = codec.encode(args.envelope, payload)
    else:
        value = args.value.encode()
    async with _backend(args) as backend:
        revision = await backend.put(args.key.encode(), value)
    if args.json:
        print_json({"key": args.key, "revision": revision})
    else:
        print(f"OK revision {revision}")
    return EXIT_OK


async def run_delete(args: argparse.Namespace) -> int:
    async with _backend(args) as backend:
        deleted = await backend.delete(args.key.encode(), prefix=args.prefix)
    if args.json:
        print_json({"deleted": deleted})
    else:
        print(f"deleted {deleted}")
    return EXIT_OK if deleted or args.prefix else EXIT_FAIL


async def run_list(args: argparse.Namespace) -> int:
    async with _backend(args) as backend:
        result = await backend.list_prefix(args.prefix.encode())
    if args.json:
        print_json(
            {
                "revision": result.revision,
                "kvs": [
                    {"key": _key(kv.key)} if args.keys_only else kv_json(kv, args.raw)
                    for kv in result.kvs
                ],
            }
        )
    else:
        for kv in result.kvs:
            if args.keys_only:
                print(_key(kv.key))
            else:
                print(f"{_key(kv.key)}\t{_show_value(_value(kv.value, args.raw))}")
        print(f"# {len(result.kvs)} keys at revision {result.revision}", file=sys.stderr)
    return EXIT_OK


def event_json(event: WatchEvent, as_raw: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "type": event.type.value,
        "key": _key(event.key),
        "revision": event.revision,
    }
    if event.type is EventType.PUT:
        data["value"] = _value(event.value, as_raw)
    if event.synthetic:
        data["synthetic"] = True
    return data


async def run_watch(args: argparse.Namespace) -> int:
    changes = 0
    listing = True
    async with _backend(args) as backend:
        async for event in ListWatcher(backend, args.prefix.encode()).events():
            if event.type is EventType.LIST_DONE:
                listing = False
                if not args.no_list:
                    _emit(args, event)
                continue
            if listing and args.no_list:
                continue
            _emit(args, event)
            if not listing:
                changes += 1
                if args.count and changes >= args.count:
                    break
    return EXIT_OK


def _emit(args: argparse.Namespace, event: WatchEvent) -> None:
    if args.json:
        print(json.dumps(event_json(event, args.raw)), flush=True)
    elif event.type is EventType.LIST_DONE:
        print(f"# listed at revision {event.revision}; watching", flush=True)
    elif event.type is EventType.PUT:
        print(f"PUT\t{_key(event.key)}\t{_show_value(_value(event.value, args.raw))}", flush=True)
    else:
        print(f"DELETE\t{_key(event.key)}", flush=True)
