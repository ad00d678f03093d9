"""What `cpctl policy` and `cpctl service` share: namespaced objects kept in the store,
put from a YAML or JSON file (one object or a list; ``-`` for stdin), listed, deleted by
``NS/NAME``. Bad input is one line and exit status 2; a missing object exit status 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from controlplane.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    add_json_flag,
    add_kvstore_flags,
    kvstore_config,
    print_json,
)
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.namespaced import Namespaced, NamespacedStore
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import ModelError
from controlplane.store_types import Versioned

N = TypeVar("N", bound=Namespaced)


@dataclass(frozen=True)
class Kind(Generic[N]):
    """One namespaced resource as the CLI handles it."""

    name: str
    """``policy``, ``service``: the command, and the word in messages."""
    plural: str
    from_dict: Callable[[object], N]
    store: Callable[[ShardMap, KeyLayout, StoreMetrics], NamespacedStore[N]]

    def open(self, shards: ShardMap) -> NamespacedStore[N]:
        return self.store(shards, KeyLayout(shards.prefix), StoreMetrics.create())


def register(
    subparsers: Any,
    kind: Kind[Any],
    help_: str,
    run_list: Callable[[argparse.Namespace], Any],
) -> argparse.ArgumentParser:
    """Add ``<kind> put FILE | list | delete NS/NAME``; returns the ``list`` parser."""
    parser = subparsers.add_parser(kind.name, help=help_)
    dest = f"{kind.name}_command"
    commands = parser.add_subparsers(dest=dest, required=True, metavar="COMMAND")
    put = commands.add_parser("put", help=f"create or replace {kind.plural} from a YAML/JSON file")
    put.add_argument("file", help=f"YAML or JSON file ('-' for stdin): a {kind.name} or a list")
    put.set_defaults(run=lambda args: run_put(args, kind))
    lst: argparse.ArgumentParser = commands.add_parser("list", help=f"every {kind.name}")
    lst.set_defaults(run=run_list)
    delete = commands.add_parser("delete", help=f"delete one {kind.name}")
    delete.add_argument(kind.name, metavar="NS/NAME")
    delete.set_defaults(run=lambda args: run_delete(args, kind))
    for sub in (put, lst, delete):
        add_kvstore_flags(sub)
        add_json_flag(sub)
    return lst


def load(text: str, kind: Kind[N]) -> list[N]:
    """Parse one object or a list of them (YAML, of which JSON is a subset)."""
    what = f"{kind.name} file"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CommandError(f"{what}: not YAML/JSON: {exc}".splitlines()[0], EXIT_USAGE) from None
    items = data if isinstance(data, list) else [data]
    try:
        objects = [kind.from_dict(item) for item in items]
    except ModelError as exc:
        raise CommandError(f"{what}: {exc}", EXIT_USAGE) from None
    seen: set[str] = set()
    for obj in objects:
        if obj.id in seen:
            raise CommandError(f"{what}: {obj.id} given twice", EXIT_USAGE)
        seen.add(obj.id)
    return objects


def read(name: str, kind: Kind[Any]) -> str:
    try:
        return sys.stdin.read() if name == "-" else Path(name).read_text()
    except OSError as exc:
        raise CommandError(f"{kind.name} file {name}: {exc.strerror or exc}", EXIT_USAGE) from None


async def run_put(args: argparse.Namespace, kind: Kind[Any]) -> int:
    objects = load(read(args.file, kind), kind)
    async with ShardMap(kvstore_config(args)) as shards:
        store = kind.open(shards)
        for obj in objects:
            await store.put(obj)
    if args.json:
        print_json({"put": [obj.id for obj in objects]})
    else:
        for obj in objects:
            print(f"{kind.name} {obj.id} stored")
    return EXIT_OK


async def list_all(args: argparse.Namespace, kind: Kind[N]) -> tuple[list[Versioned[N]], int]:
    """Every object, sorted by ``namespace/name``, and how many malformed were skipped."""
    async with ShardMap(kvstore_config(args)) as shards:
        store = kind.open(shards)
        found = await store.list()
        skipped = store.codec.metrics.registry.get_sample_value(
            "cp_store_malformed_values_total", {"resource": store.codec.resource}
        )
    found.sort(key=lambda v: v.value.id)
    return found, int(skipped or 0)


async def run_delete(args: argparse.Namespace, kind: Kind[Any]) -> int:
    text = str(getattr(args, kind.name))
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise CommandError(f"want NS/NAME, got {text!r}", EXIT_USAGE)
    async with ShardMap(kvstore_config(args)) as shards:
        deleted = await kind.open(shards).delete(namespace, name)
    if not deleted:
        raise CommandError(f"{kind.name} {namespace}/{name} not found")
    if args.json:
        print_json({"deleted": f"{namespace}/{name}"})
    else:
        print(f"{kind.name} {namespace}/{name} deleted")
    return EXIT_OK
