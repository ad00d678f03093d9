"""cp-operator: the operator daemon (leader election, heartbeat, CIDRs, garbage collection).

Usage errors and bad configuration print one line and exit 2; SIGTERM or SIGINT resigns
leadership and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from controlplane.config import ConfigError, CrdConfig, DoubleWriteConfig, KvstoreConfig
from controlplane.crd.kubeconfig import KubeConnection, load_connection
from controlplane.flags import (
    EXIT_USAGE,
    Parser,
    add_kvstore_flags,
    add_store_flags,
    double_write_store_config,
    non_negative_float,
    positive_float,
    positive_int,
    store_mode,
)
from controlplane.operator.crd_daemon import CrdOperator
from controlplane.operator.daemon import Operator
from controlplane.operator.doublewrite import DoubleWriteOperator
from controlplane.operator.migration_drift import add_migration_peer_flags, migration_peer
from controlplane.operator.settings import (
    LOG_LEVELS,
    OperatorSettings,
    default_id,
    parse_address,
    parse_pool,
)
from controlplane.runtime import tune_gc

PROG = "cp-operator"
EXIT_OK = 0
EXIT_FAILURE = 1


def build_parser() -> Parser:
    d = OperatorSettings(id="-")
    parser = Parser(prog=PROG, description="The control plane's operator daemon.")
    add_store_flags(parser, double_write=True)
    add_kvstore_flags(parser)
    kube = parser.add_argument_group("CRD mode: the election Lease")
    kube.add_argument(
        "--lease-namespace",
        default=d.lease_namespace,
        help=f"namespace of the election Lease (default {d.lease_namespace})",
    )
    kube.add_argument(
        "--lease-name",
        default=d.lease_name,
        help=f"name of the election Lease (default {d.lease_name})",
    )
    op = parser.add_argument_group("operator")
    op.add_argument("--id", help="replica identity (default: <hostname>-<pid>)")
    op.add_argument(
        "--heartbeat-interval",
        type=positive_float,
        default=d.heartbeat_interval,
        metavar="SECONDS",
        help=f"seconds between heartbeats on every shard (default {d.heartbeat_interval:g})",
    )
    op.add_argument(
        "--lease-duration",
        type=positive_int,
        default=d.lease_duration,
        metavar="SECONDS",
        help=f"TTL of the election lease (default {d.lease_duration})",
    )
    op.add_argument(
        "--renew-deadline",
        type=positive_float,
        default=d.renew_deadline,
        metavar="SECONDS",
        help=f"leader steps down after failing to renew this long (default {d.renew_deadline:g})",
    )
    op.add_argument(
        "--retry-period",
        type=positive_float,
        default=d.retry_period,
        metavar="SECONDS",
        help=f"lease renewal and retry interval (default {d.retry_period:g})",
    )
    op.add_argument(
        "--gc-interval",
        type=positive_float,
        default=d.gc_interval,
        metavar="SECONDS",
        help=f"identity GC and stale-node GC interval (default {d.gc_interval:g})",
    )
    op.add_argument(
        "--identity-gc-rate",
        type=positive_float,
        default=d.identity_gc_rate,
        metavar="PER_SECOND",
        help=f"identity deletes per second, at most (default {d.identity_gc_rate:g})",
    )
    op.add_argument(
        "--node-gc-grace",
        type=non_negative_float,
        default=d.node_gc_grace,
        metavar="SECONDS",
        help="collect a gone node's CIDRs, IP leases and endpoints after it was absent "
        f"this long (default {d.node_gc_grace:g})",
    )
    op.add_argument(
        "--cluster-pool-cidr",
        default=str(d.pool.cidr),
        metavar="CIDR",
        help=f"the pool per-node pod CIDRs are cut from (default {d.pool.cidr})",
    )
    op.add_argument(
        "--cluster-pool-mask-size",
        type=positive_int,
        default=d.pool.mask_size,
        metavar="BITS",
        help=f"prefix length of each node's CIDR (default {d.pool.mask_size})",
    )
    op.add_argument(
        "--cluster-name",
        default=d.cluster_name,
        help=f"cluster whose nodes and endpoints to serve (default {d.cluster_name})",
    )
    op.add_argument(
        "--metrics-address",
        default=f"{d.metrics_host}:{d.metrics_port}",
        metavar="HOST:PORT",
        help="/metrics, /healthz, /readyz endpoint; port 0 picks a free one "
        f"(default {d.metrics_host}:{d.metrics_port})",
    )
    op.add_argument("--log-level", choices=LOG_LEVELS, default=d.log_level, help="default info")
    add_migration_peer_flags(parser)
    return parser


def settings_from_args(args: argparse.Namespace) -> OperatorSettings:
    """The settings named by the flags (ConfigError with one line when invalid)."""
    host, port = parse_address(args.metrics_address)
    settings = OperatorSettings(
        store=store_mode(args, double_write=True),
        lease_namespace=args.lease_namespace,
        lease_name=args.lease_name,
        id=args.id if args.id is not None else default_id(),
        heartbeat_interval=args.heartbeat_interval,
        lease_duration=args.lease_duration,
        renew_deadline=args.renew_deadline,
        retry_period=args.retry_period,
        gc_interval=args.gc_interval,
        identity_gc_rate=args.identity_gc_rate,
        node_gc_grace=args.node_gc_grace,
        pool=parse_pool(args.cluster_pool_cidr, args.cluster_pool_mask_size),
        cluster_name=args.cluster_name,
        metrics_host=host,
        metrics_port=port,
        log_level=args.log_level,
        migration_peer=migration_peer(args),
        migration_drift_interval=args.migration_drift_interval,
    )
    settings.validate()
    return settings


Backend = KvstoreConfig | KubeConnection | tuple[KvstoreConfig, KubeConnection, CrdConfig]
"""The kvstore, the Kubernetes API, or (double-write) both."""


async def serve(settings: OperatorSettings, backend: Backend, request_timeout: float = 5.0) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    operator: Operator | CrdOperator | DoubleWriteOperator
    if isinstance(backend, KubeConnection):
        operator = CrdOperator(settings, backend, request_timeout=request_timeout)
    elif isinstance(backend, tuple):
        kvstore, connection, crd = backend
        operator = DoubleWriteOperator(
            settings, kvstore, connection, crd, request_timeout=request_timeout
        )
    else:
        operator = Operator(settings, backend)

    def listening(port: int) -> None:
        logging.getLogger("cp-operator").info(
            "%s listening on http://%s:%d (metrics, healthz, readyz)",
            settings.id,
            settings.metrics_host,
            port,
        )

    await operator.run(stop, listening)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        store = double_write_store_config(args)
        backend: Backend
        if isinstance(store, DoubleWriteConfig):
            crd, kvstore = store.read, store.other
            if isinstance(crd, KvstoreConfig):
                crd, kvstore = kvstore, crd
            assert isinstance(crd, CrdConfig) and isinstance(kvstore, KvstoreConfig)
            backend = (kvstore, load_connection(crd.kubeconfig, crd.context), crd)
        elif isinstance(store, CrdConfig):
            backend = load_connection(store.kubeconfig, store.context)
        else:
            backend = store
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    tune_gc()
    try:
        return asyncio.run(serve(settings, backend, args.timeout))
    except OSError as exc:  # e.g. the metrics port is taken
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
