"""Command-line flags shared by cpctl and the daemons, and one-line usage errors."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import NoReturn

from controlplane.config import KvstoreConfig, load_kvstore_config

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def add_kvstore_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("kvstore")
    group.add_argument(
        "--kvstore-endpoints",
        metavar="URLS",
        help="comma-separated etcd client URLs (env CP_KVSTORE_ENDPOINTS)",
    )
    group.add_argument(
        "--kvstore-config",
        metavar="FILE",
        help="YAML file describing etcd clusters, TLS, auth, shards (env CP_KVSTORE_CONFIG)",
    )
    group.add_argument(
        "--kvstore-prefix", metavar="PREFIX", help="key prefix (default cp/; env CP_KVSTORE_PREFIX)"
    )
    group.add_argument(
        "--timeout",
        type=positive_float,
        default=5.0,
        metavar="SECONDS",
        help="deadline of each etcd request (default 5)",
    )


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def kvstore_config(args: argparse.Namespace) -> KvstoreConfig:
    """The kvstore settings named by the flags (raises ConfigError with one line)."""
    config = load_kvstore_config(args.kvstore_endpoints, args.kvstore_config, args.kvstore_prefix)
    client = replace(config.client, request_timeout=args.timeout, dial_timeout=args.timeout)
    return replace(config, client=client)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value
