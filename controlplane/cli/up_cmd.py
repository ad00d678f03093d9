"""`cpctl up`: a local cluster (two operators, N agents) with a live status view.

In CRD mode (the default) the state lives in custom resources on the local Kubernetes API
server (:mod:`controlplane.apiserver`, on an embedded etcd), so ``kubectl`` works against
it; with ``--store kvstore`` the daemons use the embedded etcd directly.

Every daemon is a separate process, as in a real cluster; their logs and the agents' API
sockets live in a work directory that the command prints. Ctrl-C (or ``--duration``) stops
everything cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from controlplane import codec
from controlplane.agent.api import request
from controlplane.apiserver import KubeServer, KubeServerSettings
from controlplane.cli.common import CommandError, positive_float, positive_int, print_table
from controlplane.cli.etcd_cmd import start_embedded
from controlplane.cli.stores import open_config_stores
from controlplane.config import ClientSettings, CrdConfig, EtcdClusterConfig, KvstoreConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.errors import AlreadyExists, CrdError
from controlplane.crd.kubeconfig import load_connection
from controlplane.crd.resources import LEASES, NAMESPACES, OPERATOR_LEASE
from controlplane.datapath.ipcache import IPCACHE_MAP_NAME
from controlplane.kvstore.health import cluster_health
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.shards import ShardMap
from controlplane.processes import Daemon, stop_all

DEMO_ENDPOINTS = (  # (namespace, name, labels), spread over the agents round-robin
    ("shop", "web-1", ["k8s:app=web", "k8s:tier=frontend"]),
    ("shop", "web-2", ["k8s:app=web", "k8s:tier=frontend"]),
    ("shop", "db-1", ["k8s:app=db", "k8s:tier=backend"]),
    ("shop", "cache-1", ["k8s:app=cache", "k8s:tier=backend"]),
    ("ops", "monitor-1", ["k8s:app=monitor"]),
)


def register(subparsers: Any) -> None:
    up = subparsers.add_parser(
        "up", help="run a local cluster: embedded etcd, 2 operators, N agents, live status"
    )
    up.add_argument(
        "--store",
        choices=("crd", "kvstore"),
        default="crd",
        help="crd: custom resources on a local Kubernetes API server (default); "
        "kvstore: the embedded etcd",
    )
    up.add_argument(
        "--etcd-members",
        type=int,
        choices=(1, 3),
        default=1,
        help="members of the embedded etcd (default 1)",
    )
    up.add_argument("--agents", type=positive_int, default=3, help="agent processes (default 3)")
    up.add_argument(
        "--operators", type=positive_int, default=2, help="operator replicas (default 2)"
    )
    up.add_argument(
        "--heartbeat-interval",
        type=positive_float,
        default=5.0,
        metavar="SECONDS",
        help="operator heartbeat interval (default 5)",
    )
    up.add_argument(
        "--duration",
        type=positive_float,
        metavar="SECONDS",
        help="stop after this long (default: run until Ctrl-C)",
    )
    up.add_argument(
        "--refresh",
        type=positive_float,
        default=5.0,
        metavar="SECONDS",
        help="status refresh interval (default 5)",
    )
    up.add_argument("--workdir", type=Path, help="logs and sockets here (default: a temp dir)")
    up.add_argument("--json", action="store_true", help="print each status as one JSON line")
    up.set_defaults(run=run_up)


def say(text: str) -> None:
    print(text, flush=True)


async def run_up(args: argparse.Namespace) -> int:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cp-up-"))
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"work directory (logs, sockets): {workdir}")
    say(
        "datapath: userspace maps ("
        + (
            "several agents share this host, and the kernel's pinned maps are per host"
            if os.geteuid() == 0
            else "not root"
        )
        + ")"
    )
    say(f"starting an embedded etcd with {args.etcd_members} member(s)...")
    etcd = await start_embedded(args.etcd_members, workdir / "etcd")
    daemons: list[Daemon] = []
    kube: KubeServer | None = None
    try:
        endpoints = ",".join(etcd.client_urls)
        say(f"etcd endpoints: {endpoints}")
        config: KvstoreConfig | CrdConfig
        if args.store == "crd":
            say("starting the local Kubernetes API server (CRD mode)...")
            kube = KubeServer(
                KubeServerSettings(
                    data_dir=workdir / "kube",
                    etcd_endpoints=tuple(etcd.client_urls),
                    endpointslice_controller=True,
                )
            )
            await kube.start()
            say(f"Kubernetes API: {kube.url}")
            say(
                f"  try: KUBECONFIG={kube.kubeconfig} kubectl get "
                "identities,endpoints.controlplane.io -A"
            )
            say(
                f"  a service: KUBECONFIG={kube.kubeconfig} kubectl -n shop create service "
                "clusterip web --tcp=80:8080; cpctl service list --kubeconfig ..."
            )
            store_args = ["--store", "crd", "--kubeconfig", str(kube.kubeconfig)]
            config = CrdConfig(kubeconfig=str(kube.kubeconfig), request_timeout=3.0)
            await create_namespaces(config, sorted({ns for ns, _, _ in DEMO_ENDPOINTS}))
        else:
            store_args = ["--kvstore-endpoints", endpoints]
            config = KvstoreConfig(
                clusters=(EtcdClusterConfig("default", tuple(etcd.client_urls)),),
                client=replace(ClientSettings(), request_timeout=3.0),
            )
        daemons = await start_daemons(args, workdir, store_args)
        agents = [d for d in daemons if d.module.endswith("agent.main")]
        await wait_agents_ready(agents, workdir, daemons)
        await create_demo_endpoints(agents, workdir)
        await status_loop(args, config, daemons, workdir)
    finally:
        say("stopping agents and operators...")
        await stop_all(daemons)
        if kube is not None:
            say("stopping the Kubernetes API server...")
            await kube.stop()
        say("stopping etcd...")
        await etcd.stop()
        say("stopped.")
    return 0


async def start_daemons(
    args: argparse.Namespace, workdir: Path, store_args: list[str]
) -> list[Daemon]:
    hb = str(args.heartbeat_interval)
    daemons = [
        Daemon(
            f"operator-{i}",
            "controlplane.operator.main",
            [
                *store_args,
                "--id",
                f"operator-{i}",
                "--heartbeat-interval",
                hb,
                "--metrics-address",
                "127.0.0.1:0",
            ],
            workdir / f"operator-{i}.log",
        )
        for i in range(args.operators)
    ]
    daemons += [
        Daemon(
            f"node-{i}",
            "controlplane.agent.main",
            [
                *store_args,
                "--node-name",
                f"node-{i}",
                "--api-socket",
                str(workdir / f"node-{i}.sock"),
                # its flow server (userspace maps: an empty ring): cpctl observe --server
                "--flows-socket",
                str(workdir / f"node-{i}-observer.sock"),
                # several agents on one host: each keeps its own userspace maps (kernel
                # mode would make them share the machine-wide pinned ipcache)
                "--datapath",
                "userspace",
                # a local demo never touches the host's networking: no routes to the other
                # nodes' pod CIDRs (they would land in the host's main table)
                "--no-routes",
                "--metrics-address",
                "0",
                "--heartbeat-interval",
                hb,
            ],
            workdir / f"node-{i}.log",
        )
        for i in range(args.agents)
    ]
    for daemon in daemons:
        await daemon.start()
        say(f"started {daemon.name} (pid {daemon.pid})")
    return daemons


async def wait_agents_ready(agents: list[Daemon], workdir: Path, all_: list[Daemon]) -> None:
    say("waiting for agents to register and get their pod CIDRs...")
    deadline = time.monotonic() + 90
    pending = {a.name for a in agents}
    while pending:
        for daemon in all_:
            if not daemon.running:
                raise CommandError(f"{daemon.name} exited: {daemon.log_tail(1)}")
        for name in sorted(pending):
            try:
                status, body = await request(
                    workdir / f"{name}.sock", "GET", "/v1/status", timeout=2
                )
            except (OSError, TimeoutError):
                continue
            if status in (200, 503) and body.get("ready"):
                pending.discard(name)
                say(f"  {name}: ready, pod CIDR {body.get('cidr')}")
        if time.monotonic() > deadline:
            raise CommandError(f"agents not ready after 90 s: {', '.join(sorted(pending))}")
        if pending:
            await asyncio.sleep(0.5)


async def create_namespaces(config: CrdConfig, names: list[str]) -> None:
    """The demo pods' namespaces (in a real cluster the pods' namespaces exist)."""
    async with KubeClient(load_connection(config.kubeconfig), request_timeout=5.0) as client:
        for name in names:
            with contextlib.suppress(AlreadyExists):
                body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
                await client.create(NAMESPACES, body)


async def create_demo_endpoints(agents: list[Daemon], workdir: Path) -> None:
    say("creating demo endpoints...")
    for i, (namespace, name, labels) in enumerate(DEMO_ENDPOINTS):
        agent = agents[i % len(agents)]
        body = {"namespace": namespace, "name": name, "labels": labels}
        status, reply = await request(workdir / f"{agent.name}.sock", "POST", "/v1/endpoints", body)
        if status not in (200, 201):
            raise CommandError(f"creating {namespace}/{name} on {agent.name}: {reply}")
        say(
            f"  {namespace}/{name} on {agent.name}: {reply.get('ip')} "
            f"identity {reply.get('identity')}"
        )


async def snapshot(
    config: KvstoreConfig | CrdConfig, daemons: list[Daemon], workdir: Path
) -> dict[str, Any]:
    async with open_config_stores(config) as stores:
        nodes = await stores.nodes.list()
        endpoints = await stores.endpoints.list()
        identities = await stores.identities.list()
    if isinstance(config, CrdConfig):
        leader, beat, store_state = await crd_view(config)
    else:
        leader, beat, store_state = await kvstore_view(config)
    agents: dict[str, Any] = {}
    for daemon in daemons:
        if not daemon.module.endswith("agent.main"):
            continue
        try:
            _, body = await request(workdir / f"{daemon.name}.sock", "GET", "/v1/status", timeout=2)
            agents[daemon.name] = {
                "ready": body.get("ready"),
                "store": body["kvstore"]["state"],
                "restarts": body["restarts"]["count"],
                "ipcache": body["datapath"]["maps"][IPCACHE_MAP_NAME]["entries"],
            }
        except (OSError, TimeoutError, KeyError, TypeError, ValueError):
            agents[daemon.name] = {
                "ready": False,
                "store": "no answer",
                "restarts": None,
                "ipcache": None,
            }
    return {
        "time": time.strftime("%H:%M:%S"),
        "mode": stores.mode,
        "leader": leader,
        "heartbeat_age": beat[0],
        "heartbeat_writer": beat[1],
        "store": store_state,
        "processes": {
            d.name: "running" if d.running else f"exited {d.process.returncode}"
            for d in daemons
            if d.process is not None
        },
        "nodes": [
            {"name": n.value.name, "cidrs": [str(c) for c in n.value.pod_cidrs]} for n in nodes
        ],
        "endpoints": [
            {
                "id": e.value.endpoint_id,
                "ip": str(e.value.ip),
                "identity": e.value.identity,
                "node": e.value.node,
            }
            for e in endpoints
        ],
        "identities": [
            {"id": i.value.id, "labels": i.value.labels.to_strings()} for i in identities
        ],
        "agents": agents,
    }


async def kvstore_view(
    config: KvstoreConfig,
) -> tuple[str | None, tuple[float | None, str | None], dict[str, str]]:
    """The leader, the heartbeat (age, writer) and each etcd cluster's state."""
    layout = KeyLayout(config.prefix)
    async with ShardMap(config) as shards:
        health = await cluster_health(shards)
        leader = await current_leader(shards, layout)
    shard = health[0]
    return leader, (shard.heartbeat_age, shard.heartbeat_writer), {s.name: s.status for s in health}


async def crd_view(
    config: CrdConfig,
) -> tuple[str | None, tuple[float | None, str | None], dict[str, str]]:
    """The Lease holder (CRD mode has no heartbeat) and the API server's state."""
    async with KubeClient(load_connection(config.kubeconfig), request_timeout=3.0) as client:
        try:
            lease = await client.get_or_none(LEASES, OPERATOR_LEASE, namespace="kube-system")
        except CrdError as exc:
            return None, (None, None), {"apiserver": f"unreachable: {exc}"}
    holder = ((lease or {}).get("spec") or {}).get("holderIdentity") or None
    return holder, (None, None), {"apiserver": "ok"}


async def current_leader(shards: ShardMap, layout: KeyLayout) -> str | None:
    """The operator whose election key has the lowest create revision."""
    backend = shards.all()[0]
    result = await backend.list_prefix(layout.leader_prefix)
    if not result.kvs:
        return None
    first = min(result.kvs, key=lambda kv: kv.create_revision)
    value = codec.to_display(first.value)
    return value if isinstance(value, str) else json.dumps(value)


def show(view: dict[str, Any]) -> None:
    age = view["heartbeat_age"]
    beat = ""
    if view["mode"] == "kvstore":
        beat = "   heartbeat: " + (
            f"{age:.1f}s old by {view['heartbeat_writer']}" if age is not None else "none yet"
        )
    say(
        f"\n=== {view['time']}  leader: {view['leader'] or '-'}{beat}   {view['mode']}: "
        + ", ".join(f"{k} {v}" for k, v in view["store"].items())
    )
    say("processes: " + ", ".join(f"{k} {v}" for k, v in view["processes"].items()))
    print_table(
        ["NODE", "POD CIDRS", "READY", "STORE", "RESTARTS", "IPCACHE"],
        [
            [
                n["name"],
                ",".join(n["cidrs"]) or "-",
                view["agents"].get(n["name"], {}).get("ready"),
                view["agents"].get(n["name"], {}).get("store"),
                view["agents"].get(n["name"], {}).get("restarts"),
                view["agents"].get(n["name"], {}).get("ipcache"),
            ]
            for n in view["nodes"]
        ],
    )
    print_table(
        ["ENDPOINT", "IP", "IDENTITY", "NODE"],
        [[e["id"], e["ip"], e["identity"], e["node"]] for e in view["endpoints"]],
    )
    print_table(
        ["IDENTITY", "LABELS"], [[i["id"], ";".join(i["labels"])] for i in view["identities"]]
    )


async def status_loop(
    args: argparse.Namespace,
    config: KvstoreConfig | CrdConfig,
    daemons: list[Daemon],
    workdir: Path,
) -> None:
    deadline = time.monotonic() + args.duration if args.duration else None
    say(
        "cluster is up; Ctrl-C stops it."
        if deadline is None
        else f"cluster is up; stopping in {args.duration:.0f}s."
    )
    while True:
        view = await snapshot(config, daemons, workdir)
        if args.json:
            say(json.dumps(view))
        else:
            show(view)
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return
        await asyncio.sleep(args.refresh if remaining is None else min(args.refresh, remaining))
