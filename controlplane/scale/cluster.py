"""The cluster under test: one or more real etcd clusters and real cp-operator processes.

With several etcd clusters (``main``, ``b``, ...), identities, endpoints and IPAM are
sharded over all of them (``shards:`` in the kvstore config file the operators read).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from controlplane.config import ClientSettings, EtcdClusterConfig, KvstoreConfig
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.keys import KeyLayout
from controlplane.processes import Daemon, stop_all
from controlplane.scale import crd_store
from controlplane.scale.invariants import StoreView, read_store
from controlplane.scale.proxy import FaultProxy
from controlplane.scale.scenario import Scenario

SHARDED_KINDS = ("identities", "endpoints", "ipam")
ENDPOINT_NAMESPACE = "scale"
"""The namespace of the workers' endpoints."""
CLIENT = ClientSettings(request_timeout=5.0, keepalive_time=5.0, keepalive_timeout=2.0)
LAYOUT = KeyLayout()


@dataclass
class Cluster:
    scenario: Scenario
    workdir: Path
    """etcd data and the kvstore config file (a temporary directory)."""
    log_dir: Path
    """etcd and operator logs (kept with the run's results)."""
    etcds: dict[str, EmbeddedEtcd] = field(default_factory=dict)
    operators: list[Daemon] = field(default_factory=list)
    proxies: list[dict[str, list[FaultProxy]]] = field(default_factory=list)
    """Per proxy group: per etcd cluster, one proxy per member (the agents' endpoints)."""
    apiserver: Daemon | None = None
    """CRD mode: the local Kubernetes API server process, on the first etcd cluster."""
    apiserver_port: int = 0

    @property
    def crd(self) -> bool:
        return self.scenario.cluster.store == "crd"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kube" / "kubeconfig"

    @property
    def config(self) -> KvstoreConfig:
        clusters = tuple(
            EtcdClusterConfig(name, tuple(etcd.client_urls)) for name, etcd in self.etcds.items()
        )
        shards = {k: tuple(self.etcds) for k in SHARDED_KINDS} if len(self.etcds) > 1 else {}
        return KvstoreConfig(clusters, shards, client=CLIENT)

    def kvstore_spec(self, group: int | None = None) -> dict[str, Any]:
        """The config as the workers take it (JSON); with a proxy group, its proxies'
        addresses in place of the members'."""
        config = self.config
        clusters: list[list[Any]] = [[c.name, list(c.endpoints)] for c in config.clusters]
        if group is not None:
            clusters = [
                [c.name, [p.url for p in self.proxies[group][c.name]]] for c in config.clusters
            ]
        return {"clusters": clusters, "shards": {k: list(v) for k, v in config.shards.items()}}

    async def start_apiserver(self) -> float:
        """CRD mode: start the API server (again: same port and data directory) and wait
        until it answers; how long that took."""
        if self.apiserver is None:
            self.apiserver_port = crd_store.free_port()
            urls = list(next(iter(self.etcds.values())).client_urls)
            self.apiserver = crd_store.apiserver(
                self.kubeconfig.parent, urls, self.apiserver_port, self.log_dir
            )
        await self.apiserver.start()
        took = await crd_store.wait_serving(self.kubeconfig)
        await crd_store.ensure_namespace(self.kubeconfig, ENDPOINT_NAMESPACE)
        return took

    async def read_store(self) -> StoreView:
        if self.crd:
            return await crd_store.read_crd_store(self.kubeconfig)
        return await read_store(self.config)

    def agent_store_spec(self, group: int | None = None) -> dict[str, Any]:
        """What a worker's agents connect to: the kvstore (through a proxy group) or the
        API server."""
        if self.crd:
            return {"crd": str(self.kubeconfig)}
        return self.kvstore_spec(group)

    async def start_proxies(self) -> None:
        for _ in range(self.scenario.cluster.proxy_groups):
            group: dict[str, list[FaultProxy]] = {}
            for name, etcd in self.etcds.items():
                group[name] = []
                for url in etcd.client_urls:
                    parts = urlsplit(url)
                    proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or 2379)
                    await proxy.start()
                    group[name].append(proxy)
            self.proxies.append(group)

    def group_proxies(self, groups: range) -> list[FaultProxy]:
        return [p for g in groups for ps in self.proxies[g].values() for p in ps]

    async def start_etcd(self) -> None:
        spec = self.scenario.cluster
        for name in self.scenario.cluster_names:
            etcd = EmbeddedEtcd(
                spec.etcd_members,
                name=name,
                data_dir=self.workdir / "etcd" / name,
                log_dir=self.log_dir,
                heartbeat_interval_ms=spec.etcd_heartbeat_ms,
                election_timeout_ms=spec.etcd_election_ms,
            )
            await etcd.start()
            self.etcds[name] = etcd

    def _operator_args(self, name: str) -> list[str]:
        spec = self.scenario.cluster
        timings = [
            f"--id={name}",
            f"--lease-duration={spec.lease_duration}",
            f"--renew-deadline={spec.renew_deadline}",
            f"--retry-period={spec.retry_period}",
            f"--cluster-pool-cidr={spec.pool_cidr}",
            "--gc-interval=5",
            "--metrics-address=127.0.0.1:0",
            "--timeout=3",
        ]
        if self.crd:
            return ["--store=crd", f"--kubeconfig={self.kubeconfig}", *timings]
        config_file = self.workdir / "kvstore.yaml"
        config = self.config
        config_file.write_text(
            yaml.safe_dump(
                {
                    "request-timeout": CLIENT.request_timeout,
                    "clusters": [
                        {"name": c.name, "endpoints": list(c.endpoints)} for c in config.clusters
                    ],
                    "shards": {k: list(v) for k, v in config.shards.items()},
                }
            )
        )
        return [
            f"--kvstore-config={config_file}",
            f"--heartbeat-interval={spec.heartbeat_interval}",
            *timings,
        ]

    async def start_operators(self) -> None:
        for i in range(self.scenario.cluster.operators):
            name = f"op-{chr(ord('a') + i)}"
            daemon = Daemon(
                name,
                "controlplane.operator.main",
                self._operator_args(name),
                self.log_dir / f"{name}.log",
            )
            await daemon.start()
            self.operators.append(daemon)

    def operator(self, name: str) -> Daemon:
        return next(d for d in self.operators if d.name == name)

    async def operator_leader(self) -> str | None:
        """The elected operator's id: the leader key with the lowest create revision (CRD
        mode: the Lease's holder)."""
        if self.crd:
            return await crd_store.operator_leader(self.kubeconfig)
        first = self.config.clusters[0]
        async with EtcdBackend(first, CLIENT, own_connection=True) as backend:
            kvs = (await backend.list_prefix(LAYOUT.leader_prefix)).kvs
        if not kvs:
            return None
        return min(kvs, key=lambda kv: kv.create_revision).value.decode()

    def operator_tracebacks(self) -> list[str]:
        found = []
        for daemon in [*self.operators, *([self.apiserver] if self.apiserver else [])]:
            with contextlib.suppress(OSError):
                if "Traceback" in daemon.log_file.read_text(errors="replace"):
                    found.append(daemon.name)
        return found

    async def close(self) -> None:
        await stop_all(self.operators)
        if self.apiserver is not None:
            await self.apiserver.stop()
        for group in self.proxies:
            for proxies in group.values():
                for proxy in proxies:
                    await proxy.close()
        for etcd in self.etcds.values():
            for i in range(len(etcd.members)):
                with contextlib.suppress(Exception):
                    etcd.resume_member(i)
            await etcd.stop()
