"""What every `cpctl bench` subcommand shares: where it measures (the kvstore flags, or
--embedded for an etcd started for the run), progress on stderr, comma-list arguments,
and running a benchmark to write and print its JSON record."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable

from controlplane.bench.common import (
    STORE_MODES,
    BenchError,
    Record,
    measure,
    record_path,
    write_record,
)
from controlplane.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    add_kvstore_flags,
    kvstore_config,
    positive_int,
    print_json,
)
from controlplane.config import KvstoreConfig


def concurrency_list(text: str) -> tuple[int, ...]:
    levels = tuple(positive_int(part.strip()) for part in text.split(",") if part.strip())
    if not levels:
        raise argparse.ArgumentTypeError("want a comma list like 1,32")
    return tuple(dict.fromkeys(levels))


def store_list(text: str) -> tuple[str, ...]:
    stores = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [s for s in stores if s not in STORE_MODES]
    if not stores or unknown:
        raise argparse.ArgumentTypeError(
            f"want a comma list of {', '.join(STORE_MODES)}, got {text!r}"
        )
    return stores


def store_one(text: str) -> tuple[str, ...]:
    if text not in STORE_MODES:
        raise argparse.ArgumentTypeError(f"want one of {', '.join(STORE_MODES)}, got {text!r}")
    return (text,)


def add_store_choice(parser: argparse.ArgumentParser) -> None:
    """``--stores kvstore,crd`` (the default: both, side by side) or ``--store MODE``;
    either sets ``args.stores``."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--stores",
        type=store_list,
        default=STORE_MODES,
        metavar="MODE,MODE",
        help=f"store modes measured side by side (default {','.join(STORE_MODES)})",
    )
    which.add_argument(
        "--store",
        dest="stores",
        type=store_one,
        metavar="{" + ",".join(STORE_MODES) + "}",
        help="one mode only",
    )


def add_target_flags(parser: argparse.ArgumentParser) -> None:
    """The kvstore flags, or --embedded [--members N] for an etcd started for the run."""
    add_kvstore_flags(parser)
    target = parser.add_argument_group("embedded etcd")
    target.add_argument(
        "--embedded",
        action="store_true",
        help="start a local etcd for the run and stop it afterwards",
    )
    target.add_argument(
        "--members", type=positive_int, default=1, help="members of the embedded etcd (default 1)"
    )


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def target_config(args: argparse.Namespace) -> KvstoreConfig | None:
    """The kvstore flags' config, or None for --embedded (an etcd started for the run)."""
    if not args.embedded:
        return kvstore_config(args)
    if args.kvstore_endpoints or args.kvstore_config:
        raise CommandError("--embedded excludes --kvstore-endpoints/--kvstore-config", EXIT_USAGE)
    return None


async def run_measure(
    args: argparse.Namespace,
    name: str,
    run: Callable[[KvstoreConfig], Awaitable[Record]],
    show: Callable[[Record, KvstoreConfig], None],
) -> int:
    """Run one benchmark on the target, write its JSON record, print it."""
    output = args.output or record_path(name)
    config = target_config(args)
    try:
        record, config = await measure(
            run, config, members=args.members, timeout=args.timeout, progress=progress
        )
        write_record(output, record)
    except BenchError as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        print_json(record)
    else:
        show(record, config)
    progress(f"wrote {output}")
    return EXIT_OK
