"""`cpctl kube up`: run the local Kubernetes API server in the foreground.

It serves until Ctrl-C or SIGTERM, then stops the server and its embedded etcd (children
included) before exiting. The kubeconfig it writes carries the server's CA and token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any

from controlplane.apiserver import KubeServer, KubeServerSettings
from controlplane.cli.common import EXIT_OK, CommandError, add_json_flag, positive_float
from controlplane.kvstore.embedded import EtcdNotFound, EtcdStartError


def register(subparsers: Any) -> None:
    kube = subparsers.add_parser("kube", help="run a local Kubernetes API server")
    commands = kube.add_subparsers(dest="kube_command", required=True, metavar="COMMAND")
    up = commands.add_parser(
        "up", help="start a local Kubernetes API server (on an embedded etcd) until Ctrl-C"
    )
    up.add_argument("--port", type=int, default=0, help="port to listen on (default: any)")
    up.add_argument("--host", default="127.0.0.1", help="address to listen on")
    up.add_argument(
        "--data-dir", type=Path, help="etcd data, PKI, token, kubeconfig (default: a temp dir)"
    )
    up.add_argument(
        "--etcd-endpoints",
        help="comma-separated client URLs of an etcd to use (default: start an embedded one)",
    )
    up.add_argument(
        "--duration",
        type=positive_float,
        metavar="SECONDS",
        help="stop after this long (default: run until Ctrl-C)",
    )
    up.add_argument(
        "--no-endpointslice-controller",
        dest="endpointslice_controller",
        action="store_false",
        help="do not make EndpointSlices for Services with a selector from the controlplane.io "
        "Endpoints (the local stand-in for kube-controller-manager's controller)",
    )
    add_json_flag(up)
    up.set_defaults(run=run_up)


async def run_up(args: argparse.Namespace) -> int:
    endpoints = tuple(e for e in (args.etcd_endpoints or "").split(",") if e)
    settings = KubeServerSettings(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        etcd_endpoints=endpoints,
        endpointslice_controller=args.endpointslice_controller,
    )
    server = KubeServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await server.start()
        except (EtcdNotFound, EtcdStartError) as exc:
            raise CommandError(str(exc).splitlines()[0]) from exc
        except OSError as exc:
            raise CommandError(f"cannot serve on {args.host}:{args.port}: {exc}") from exc
        if args.json:
            info = {
                "url": server.url,
                "kubeconfig": str(server.kubeconfig),
                "ca_file": str(server.ca_file) if server.ca_file else None,
                "etcd_endpoints": server.etcd_endpoints,
                "data_dir": str(server.data_dir),
            }
            print(json.dumps(info), flush=True)
        else:
            print(f"Kubernetes API server (local, for development) at {server.url}", flush=True)
            print(f"  export KUBECONFIG={server.kubeconfig}", flush=True)
            print(f"  KUBECONFIG={server.kubeconfig} kubectl get crds", flush=True)
            print(f"  etcd: {','.join(server.etcd_endpoints)}", flush=True)
            print("Ctrl-C stops it.", flush=True)
        if args.duration:
            await _wait(stop, args.duration)
        else:
            await stop.wait()
    finally:
        await server.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return EXIT_OK


async def _wait(stop: asyncio.Event, duration: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), duration)
