"""What `cpctl policy` and `cpctl service` share: namespaced objects kept in the store of
either mode (:func:`controlplane.cli.stores.open_stores`), put from a YAML or JSON file
(one object or a list; ``-`` for stdin), listed, deleted by ``NS/NAME``. Bad input is one
line and exit status 2; a missing object exit status 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import yaml

from controlplane.cli.common import EXIT_OK, EXIT_USAGE, CommandError, add_json_flag, print_json
from controlplane.cli.stores import ClusterStores, add_cluster_flags, open_stores
from controlplane.model import ModelError
from controlplane.store_types import Versioned


class Named(Protocol):
    @property
    def id(self) -> str:
        """``namespace/name``."""
        ...


N = TypeVar("N", bound=Named)


class NamespacedStore(Protocol[N]):
    """What :class:`~controlplane.store.PolicyStore` and ``ServiceStore`` have in common."""

    async def put(self, obj: N, /) -> None: ...

    async def delete(self, namespace: str, name: str) -> bool: ...

    async def list(self) -> list[Versioned[N]]: ...


@dataclass(frozen=True)
class Kind(Generic[N]):
    """One namespaced resource as the CLI handles it."""

    name: str
    """``policy``, ``service``: the command, the word in messages, the metrics' resource."""
    plural: str
    from_dict: Callable[[object], N]
    store: Callable[[ClusterStores], NamespacedStore[N] | None]
    """The resource's store in the mode the flags name; None: that mode has none yet."""

    def of(self, stores: ClusterStores) -> NamespacedStore[N]:
        store = self.store(stores)
        if store is None:
            raise CommandError(
                f"{self.plural} are not available in {stores.mode} mode yet; use --store kvstore",
                EXIT_USAGE,
            )
        return store


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
        add_cluster_flags(sub)
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
    async with open_stores(args) as stores:
        store = kind.of(stores)
        for obj in objects:
            await store.put(obj)
    if args.json:
        print_json({"put": [obj.id for obj in objects]})
    else:
        for obj in objects:
            print(f"{kind.name} {obj.id} stored")
    return EXIT_OK


async def list_all(stores: ClusterStores, kind: Kind[N]) -> tuple[list[Versioned[N]], int]:
    """Every object, sorted by ``namespace/name``, and how many malformed were skipped."""
    found = await kind.of(stores).list()
    found.sort(key=lambda v: v.value.id)
    return found, stores.malformed(kind.name)


async def run_delete(args: argparse.Namespace, kind: Kind[Any]) -> int:
    text = str(getattr(args, kind.name))
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise CommandError(f"want NS/NAME, got {text!r}", EXIT_USAGE)
    async with open_stores(args) as stores:
        deleted = await kind.of(stores).delete(namespace, name)
    if not deleted:
        raise CommandError(f"{kind.name} {namespace}/{name} not found")
    if args.json:
        print_json({"deleted": f"{namespace}/{name}"})
    else:
        print(f"{kind.name} {namespace}/{name} deleted")
    return EXIT_OK
