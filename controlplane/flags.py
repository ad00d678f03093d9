"""Command-line flags shared by cpctl and the daemons, and one-line usage errors."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from typing import NoReturn

from controlplane.config import (
    ENV_CONFIG,
    ENV_ENDPOINTS,
    ConfigError,
    CrdConfig,
    DoubleWriteConfig,
    KvstoreConfig,
    load_kvstore_config,
)

EXIT_USAGE = 2
STORES = ("crd", "kvstore")
DOUBLE_WRITE_STORES = ("doublewrite-readcrd", "doublewrite-readkvstore")
"""The migration modes (agent and operator): both stores written, the named one read."""
ENV_STORE = "CP_STORE"


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


def add_store_flags(parser: argparse.ArgumentParser, *, double_write: bool = False) -> None:
    """``--store`` and CRD mode's flags, beside :func:`add_kvstore_flags`
    (``double_write``: the agent's migration modes too)."""
    group = parser.add_argument_group("store")
    extra = (
        "; doublewrite-readcrd / doublewrite-readkvstore: write both (the kubeconfig's and "
        "the kvstore flags'), read the named one (a migration step)"
        if double_write
        else ""
    )
    group.add_argument(
        "--store",
        choices=STORES + DOUBLE_WRITE_STORES if double_write else STORES,
        help="where the state lives: crd (the Kubernetes API; the default) or kvstore "
        "(external etcd). Without this flag: kvstore when a kvstore endpoint or config is "
        f"given (flag or env), else crd (env {ENV_STORE}){extra}",
    )
    group.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="kubeconfig for CRD mode (default: $KUBECONFIG, ~/.kube/config, in-cluster)",
    )
    group.add_argument("--kube-context", metavar="NAME", help="kubeconfig context to use")


def store_mode(args: argparse.Namespace, *, double_write: bool = False) -> str:
    """``crd`` or ``kvstore`` (or with ``double_write`` a double-write mode; raises
    ConfigError with one line)."""
    chosen = getattr(args, "store", None) or os.environ.get(ENV_STORE) or ""
    kvstore_given = bool(
        getattr(args, "kvstore_endpoints", None)
        or getattr(args, "kvstore_config", None)
        or os.environ.get(ENV_ENDPOINTS)
        or os.environ.get(ENV_CONFIG)
    )
    if not chosen:
        return "kvstore" if kvstore_given else "crd"
    allowed = STORES + DOUBLE_WRITE_STORES if double_write else STORES
    if chosen not in allowed:
        raise ConfigError(f"{ENV_STORE}={chosen!r}: expected one of {', '.join(allowed)}")
    if chosen == "crd" and (
        getattr(args, "kvstore_endpoints", None) or getattr(args, "kvstore_config", None)
    ):
        raise ConfigError("--kvstore-endpoints/--kvstore-config need --store kvstore")
    return chosen


def store_config(args: argparse.Namespace) -> KvstoreConfig | CrdConfig:
    """The store the flags name: a kvstore or a Kubernetes API (raises ConfigError)."""
    if store_mode(args) == "kvstore":
        return kvstore_config(args)
    return _crd_config(args)


def _crd_config(args: argparse.Namespace) -> CrdConfig:
    return CrdConfig(
        kubeconfig=getattr(args, "kubeconfig", None),
        context=getattr(args, "kube_context", None),
        request_timeout=getattr(args, "timeout", 10.0),
    )


def double_write_store_config(
    args: argparse.Namespace,
) -> KvstoreConfig | CrdConfig | DoubleWriteConfig:
    """:func:`store_config`, or for a double-write mode both stores (the kvstore flags
    are then required; raises ConfigError)."""
    mode = store_mode(args, double_write=True)
    if mode not in DOUBLE_WRITE_STORES:
        return store_config(args)
    if not (
        getattr(args, "kvstore_endpoints", None)
        or getattr(args, "kvstore_config", None)
        or os.environ.get(ENV_ENDPOINTS)
        or os.environ.get(ENV_CONFIG)
    ):
        raise ConfigError(
            f"--store {mode} needs the kvstore's --kvstore-endpoints or --kvstore-config"
        )
    crd, kv = _crd_config(args), kvstore_config(args)
    if mode == "doublewrite-readcrd":
        return DoubleWriteConfig(read=crd, other=kv)
    return DoubleWriteConfig(read=kv, other=crd)


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
