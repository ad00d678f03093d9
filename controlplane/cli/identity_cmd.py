"""`cpctl identity list|get`: read-only views of the security identities."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from controlplane.cli.common import (
    EXIT_OK,
    CommandError,
    add_json_flag,
    print_json,
    print_table,
)
from controlplane.cli.stores import add_cluster_flags, open_stores
from controlplane.model import (
    RESERVED_IDENTITIES,
    Identity,
    ModelError,
    NumericIdentity,
    parse_numeric_identity,
)


def register(subparsers: Any) -> None:
    identity = subparsers.add_parser("identity", help="security identities")
    commands = identity.add_subparsers(dest="identity_command", required=True, metavar="COMMAND")
    lst = commands.add_parser(
        "list",
        help="every identity, with its references (nodes in kvstore mode, endpoints in CRD mode)",
    )
    lst.add_argument("--reserved", action="store_true", help="include the reserved identities")
    lst.set_defaults(run=run_list)
    get = commands.add_parser("get", help="one identity by number")
    get.add_argument("id", help="numeric identity")
    get.set_defaults(run=run_get)
    for parser in (lst, get):
        add_cluster_flags(parser)
        add_json_flag(parser)


def _row(identity: Identity, nodes: Sequence[str], version: int) -> dict[str, Any]:
    return {
        "id": identity.id,
        "labels": identity.labels.to_strings(),
        "reserved": identity.is_reserved,
        "references": sorted(nodes),
        "version": version,
    }


async def run_list(args: argparse.Namespace) -> int:
    async with open_stores(args) as stores:
        identities = await stores.identities.list()
        refs = await stores.references()
        skipped = stores.malformed("identity")
    rows = [_row(v.value, refs.get(v.value.id, []), v.version) for v in identities]
    if args.reserved:
        rows = [_row(Identity(i, lbls), [], 0) for i, lbls in RESERVED_IDENTITIES.items()] + rows
    rows.sort(key=lambda r: int(r["id"]))
    if args.json:
        print_json({"identities": rows, "skipped_malformed": int(skipped or 0)})
        return EXIT_OK
    print_table(
        ["ID", "LABELS", "REFERENCES"],
        [[r["id"], ";".join(r["labels"]), ",".join(r["references"]) or "-"] for r in rows],
    )
    if skipped:
        print(f"({int(skipped)} malformed records skipped)")
    return EXIT_OK


async def run_get(args: argparse.Namespace) -> int:
    try:
        ident = parse_numeric_identity(args.id)
    except ModelError as exc:
        raise CommandError(f"bad identity {args.id!r}: {exc}", 2) from exc
    async with open_stores(args) as stores:
        found = await stores.identities.get(NumericIdentity(ident))
        if found is None:
            raise CommandError(f"identity {ident} not found")
        refs = await stores.references()
    row = _row(found.value, refs.get(found.value.id, []), found.version)
    if args.json:
        print_json(row)
    else:
        print(f"ID:          {row['id']}{' (reserved)' if row['reserved'] else ''}")
        print(f"labels:      {';'.join(row['labels'])}")
        print(f"references:  {', '.join(row['references']) or '-'}")
    return EXIT_OK
