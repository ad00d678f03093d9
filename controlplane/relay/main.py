"""cp-relay: the relay daemon's command line. The node records come from either store mode
(``--store crd``, the default: the Kubernetes API's Node objects; ``--store kvstore``: etcd),
through the store's read-only node store."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from controlplane.config import ConfigError, CrdConfig, KvstoreConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.kubeconfig import load_connection
from controlplane.crd.nodes import CrdNodeStore
from controlplane.flags import (
    EXIT_USAGE,
    Parser,
    add_kvstore_flags,
    add_store_flags,
    positive_float,
    positive_int,
    store_config,
)
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.nodes import KvNodeStore
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import Node
from controlplane.relay.daemon import Relay, RelaySettings
from controlplane.relay.observer import MergeSettings
from controlplane.relay.peers import DEFAULT_PEER_PORT, PeerSettings
from controlplane.runtime import tune_gc
from controlplane.store_types import StoreEvent

PROG = "cp-relay"
_MERGE = MergeSettings()
EXIT_OK = 0
EXIT_FAILURE = 1


def _address(text: str) -> tuple[str, int] | None:
    if text in ("", "none", "off"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"want HOST:PORT or none, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _readable(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Every node's flows in one Observer API: finds the agents' flow servers "
        "from the node records, merges their GetFlows streams by time.",
        epilog="Exit status: 0 after SIGTERM/SIGINT, 1 on a fatal error, 2 on a bad flag.",
    )
    add_store_flags(parser)
    add_kvstore_flags(parser)
    relay = parser.add_argument_group("relay")
    relay.add_argument(
        "--listen",
        type=_address,
        default=("127.0.0.1", 4245),
        metavar="HOST:PORT",
        help="the relay's Observer API (default 127.0.0.1:4245; none = only --socket)",
    )
    relay.add_argument("--socket", type=Path, metavar="PATH", help="also serve on this socket")
    relay.add_argument("--cluster-name", default="default", help="whose nodes (default default)")
    relay.add_argument(
        "--peer-port",
        type=positive_int,
        default=DEFAULT_PEER_PORT,
        metavar="PORT",
        help=f"a node's Observer API port when its record publishes no address (default "
        f"{DEFAULT_PEER_PORT})",
    )
    relay.add_argument(
        "--sort-buffer",
        type=positive_int,
        default=_MERGE.sort_buffer,
        metavar="N",
        help=f"responses the follow merge holds to order them (default {_MERGE.sort_buffer})",
    )
    relay.add_argument(
        "--drain-timeout",
        type=positive_float,
        default=_MERGE.drain_timeout,
        metavar="S",
        help=f"the longest a response waits in the sort buffer (default {_MERGE.drain_timeout})",
    )
    relay.add_argument(
        "--tls-cert", type=_readable, metavar="FILE", help="serve TLS with this certificate"
    )
    relay.add_argument("--tls-key", type=_readable, metavar="FILE", help="... and this key")
    relay.add_argument(
        "--peer-tls-ca",
        type=_readable,
        metavar="FILE",
        help="connect to the agents with TLS, verified by this CA (default: plain)",
    )
    relay.add_argument(
        "--metrics-address",
        type=_address,
        default=("127.0.0.1", 9966),
        metavar="HOST:PORT",
        help="/metrics, /healthz, /readyz (default 127.0.0.1:9966; none = off)",
    )
    relay.add_argument(
        "--ui-listen",
        type=_address,
        default=("127.0.0.1", 12000),
        metavar="HOST:PORT",
        help="the web UI: live flows, filters, a service map (default 127.0.0.1:12000; none = off)",
    )
    relay.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    return parser


def settings_from_args(args: argparse.Namespace) -> RelaySettings:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    server_credentials = None
    if args.tls_cert is not None:
        server_credentials = grpc.ssl_server_credentials(
            [(args.tls_key.read_bytes(), args.tls_cert.read_bytes())]
        )
    peer_credentials = None
    if args.peer_tls_ca is not None:
        peer_credentials = grpc.ssl_channel_credentials(args.peer_tls_ca.read_bytes())
    listen = None if args.listen is None else f"{args.listen[0]}:{args.listen[1]}"
    if ":" in (args.listen or ("", 0))[0]:
        listen = f"[{args.listen[0]}]:{args.listen[1]}"
    return RelaySettings(
        listen=listen,
        socket=args.socket,
        peers=PeerSettings(port=args.peer_port, credentials=peer_credentials),
        merge=MergeSettings(sort_buffer=args.sort_buffer, drain_timeout=args.drain_timeout),
        metrics_host=args.metrics_address[0] if args.metrics_address else "127.0.0.1",
        metrics_port=args.metrics_address[1] if args.metrics_address else None,
        server_credentials=server_credentials,
        ui_host=args.ui_listen[0] if args.ui_listen else "127.0.0.1",
        ui_port=args.ui_listen[1] if args.ui_listen else None,
    )


def kvstore_nodes(kvstore: KvstoreConfig, cluster: str) -> AsyncIterator[StoreEvent[Node]]:
    """The node records of ``cluster`` in the kvstore (a read-only node store's watch)."""

    async def watch() -> AsyncIterator[StoreEvent[Node]]:
        async with ShardMap(kvstore) as shards:
            layout = KeyLayout(kvstore.prefix)
            metrics = StoreMetrics.create()
            store = KvNodeStore(shards, layout, metrics, None, node=None, cluster=cluster)
            async for event in store.watch():
                yield event

    return watch()


def crd_nodes(config: CrdConfig) -> AsyncIterator[StoreEvent[Node]]:
    """The Node objects of the Kubernetes API (a read-only CRD node store's watch)."""

    async def watch() -> AsyncIterator[StoreEvent[Node]]:
        connection = load_connection(config.kubeconfig, config.context)
        async with KubeClient(
            connection, request_timeout=config.request_timeout, user_agent=PROG
        ) as client:
            async for event in CrdNodeStore(client, StoreMetrics.create()).watch():
                yield event

    return watch()


def node_watch(
    config: KvstoreConfig | CrdConfig, cluster: str
) -> Callable[[], AsyncIterator[StoreEvent[Node]]]:
    """The node watch of either store mode (a new one at each call)."""
    if isinstance(config, CrdConfig):
        return lambda: crd_nodes(config)
    return lambda: kvstore_nodes(config, cluster)


async def serve(settings: RelaySettings, config: KvstoreConfig | CrdConfig, cluster: str) -> int:
    relay = Relay(settings, node_watch(config, cluster), CollectorRegistry())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop)
    log = logging.getLogger(PROG)

    async def announce() -> None:
        await relay.started.wait()
        log.info(
            "listening on %s (Observer API), metrics on %s, UI on %s",
            settings.listen,
            relay.telemetry.port if relay.telemetry is not None else "-",
            relay.ui.port if relay.ui.port is not None else "-",
        )

    task = asyncio.create_task(announce(), name="relay-announce")
    try:
        await relay.run()
    finally:
        task.cancel()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        config = store_config(args)
    except (ConfigError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    tune_gc()
    try:
        return asyncio.run(serve(settings, config, args.cluster_name))
    except OSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
