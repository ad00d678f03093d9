"""cp-operator in CRD mode (controlplane/operator/crd_daemon.py) on the local API server:
CRD install by replicas at once, CIDR assignment (unique, surviving a restart, repaired
after a hand edit), identity GC (two rounds, preconditions), GC of gone nodes, malformed
objects, and real processes: clean failover and a paused leader (SIGSTOP)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import eventually
from test_operator import OperatorProcess

from controlplane.apiserver import KubeServer, KubeServerSettings
from controlplane.crd.client import JSON, KubeClient
from controlplane.crd.identities import CrdIdentityCollector
from controlplane.crd.install import definitions, install_crds
from controlplane.crd.kubeconfig import load_connection
from controlplane.crd.names import cidr_name
from controlplane.crd.resources import CRDS, ENDPOINTS, GC_MARK, IDENTITIES, NODES, POD_CIDRS
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.metrics import StoreMetrics
from controlplane.operator.crd_daemon import CrdOperator
from controlplane.operator.main import main as operator_main
from controlplane.operator.settings import OperatorSettings
from tests.crdop_support import (
    GatedClient,
    endpoint_object,
    identity_object,
    kube_client,
    node_object,
)

pytest_plugins = ["tests.kube_fixtures"]

LEASE, RENEW, RETRY = 3, 2.0, 0.3


def settings(name: str, **overrides: Any) -> OperatorSettings:
    base: dict[str, Any] = {
        "store": "crd",
        "id": name,
        "lease_duration": LEASE,
        "renew_deadline": RENEW,
        "retry_period": RETRY,
        "gc_interval": 0.3,
        "node_gc_grace": 300.0,
        "metrics_port": 0,
    }
    return OperatorSettings(**{**base, **overrides})


@contextlib.asynccontextmanager
async def running(*ops: CrdOperator) -> AsyncIterator[None]:
    stop = [asyncio.Event() for _ in ops]
    tasks = [
        asyncio.create_task(op.run(event, lambda port: None), name=f"operator:{op.settings.id}")
        for op, event in zip(ops, stop, strict=True)
    ]
    try:
        yield
    finally:
        for event in stop:
            event.set()
        async with asyncio.timeout(15):
            await asyncio.gather(*tasks)


def operator(kube: KubeServer, name: str, **overrides: Any) -> CrdOperator:
    return CrdOperator(settings(name, **overrides), load_connection(str(kube.kubeconfig)))


def sample(op: CrdOperator, name: str, **labels: str) -> float:
    return op.metrics.registry.get_sample_value(name, labels) or 0.0


def leader(*ops: CrdOperator) -> CrdOperator | None:
    leaders = [op for op in ops if op.election is not None and op.election.is_leader]
    assert len(leaders) <= 1, "two leaders at once"
    return leaders[0] if leaders else None


async def pod_cidrs(client: KubeClient) -> dict[str, list[str]]:
    """Node -> spec.podCIDRs, for the nodes that have some."""
    out: dict[str, list[str]] = {}
    for obj in (await client.list(NODES)).items:
        cidrs = (obj.get("spec") or {}).get("podCIDRs")
        if cidrs:
            out[obj["metadata"]["name"]] = cidrs
    return out


async def claims(client: KubeClient) -> list[JSON]:
    return (await client.list(POD_CIDRS)).items


def assert_one_cidr_per_node(assigned: dict[str, list[str]], claimed: list[JSON]) -> None:
    cidrs = [c for values in assigned.values() for c in values]
    assert len(cidrs) == len(set(cidrs)), f"a CIDR given twice: {assigned}"
    by_cidr = {c["spec"]["cidr"]: c["spec"]["node"] for c in claimed}
    assert len(by_cidr) == len(claimed)
    for node, values in assigned.items():
        assert len(values) == 1
        assert by_cidr.get(values[0]) == node, f"{node}: {values} is not claimed for it"


async def all_assigned(client: KubeClient, names: list[str]) -> dict[str, list[str]] | None:
    assigned = await pod_cidrs(client)
    return assigned if all(n in assigned for n in names) else None


# -- install, election, telemetry ------------------------------------------------------


async def test_two_replicas_install_the_crds_at_once_and_one_leads(kube: KubeServer) -> None:
    async with kube_client(kube) as c1, kube_client(kube) as c2:
        first, second = await asyncio.gather(install_crds(c1), install_crds(c2))
        assert len(first) == len(second) == len(definitions()) == 5
        names = {c["metadata"]["name"] for c in (await c1.list(CRDS)).items}
        assert {d["metadata"]["name"] for d in definitions()} <= names

    a, b = operator(kube, "op-a"), operator(kube, "op-b")
    async with running(a, b):
        await eventually(lambda: a.crds_installed and b.crds_installed, message="installed")
        found = await eventually(lambda: leader(a, b), message="a leader")
        other = b if found is a else a
        await eventually(lambda: other.health()["election"].ok, message="the other follows")
        assert other.health()["election"].detail == f"following {found.settings.id}"
        assert all(check.ok for check in found.health().values()), found.health()
        assert sample(found, "cp_operator_leader") == 1.0
        assert sample(other, "cp_operator_leader") == 0.0
        await eventually(
            lambda: sample(found, "cp_operator_lease_renewals_total", result="ok") >= 2,
            message="renewals counted",
        )
    assert leader(a, b) is None


async def test_an_unreachable_api_server_is_reported_not_fatal(kube: KubeServer) -> None:
    from controlplane.crd.kubeconfig import KubeConnection

    op = CrdOperator(settings("op-x"), KubeConnection(server="https://127.0.0.1:9"))
    async with running(op):
        await eventually(lambda: op._install_error != "not installed yet", message="tried")
        health = op.health()
        assert not health["apiserver"].ok and "CRDs" in health["apiserver"].detail
        assert not health["election"].ok


def test_crd_mode_without_a_kubeconfig_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = operator_main(["--store", "crd", "--kubeconfig", str(tmp_path / "none")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kubeconfig" in err[0]


# -- CIDRs -------------------------------------------------------------------------------


async def test_cidrs_are_unique_survive_a_restart_and_hand_edits_are_repaired(
    kube: KubeServer,
) -> None:
    names = [f"node-{i}" for i in range(12)]
    async with kube_client(kube) as client:
        a = operator(kube, "op-a")
        async with running(a):
            await eventually(lambda: leader(a), message="op-a leads")
            for name in names[:8]:
                await client.create(NODES, node_object(name))
            first = await eventually(lambda: all_assigned(client, names[:8]), message="CIDRs")
            assert_one_cidr_per_node(first, await claims(client))
            assert sample(a, "cp_operator_cidr_allocations_total", result="ok") == 8
            assert sample(a, "cp_ipam_cidrs_in_use") == 8

        # While no operator runs, node-2's claim is lost (deleted by hand): the next leader
        # claims node-2's CIDR again rather than moving the node to another one.
        await client.delete(
            POD_CIDRS, cidr_name("default", ipaddress.ip_network(first["node-2"][0]))
        )
        b = operator(kube, "op-b")
        async with running(b):
            await eventually(lambda: leader(b), message="op-b leads")
            for name in names[8:]:
                await client.create(NODES, node_object(name))
            second = await eventually(lambda: all_assigned(client, names), message="CIDRs")
            assert {n: second[n] for n in names[:8]} == first  # kept across the restart
            assert_one_cidr_per_node(second, await claims(client))
            assert sample(b, "cp_operator_cidr_allocations_total", result="ok") == 5

            # kubectl edit: a node's podCIDRs set by hand is set back to its claim.
            await client.patch(NODES, "node-3", {"spec": {"podCIDRs": ["10.200.0.0/24"]}})
            await eventually(
                lambda: _cidrs_of(client, "node-3", first["node-3"]), message="repaired"
            )
            assert len(await claims(client)) == len(names)

            # kubectl delete of a live node's claim: re-created, the node keeps its CIDR.
            claim = cidr_name("default", ipaddress.ip_network(first["node-5"][0]))
            await client.delete(POD_CIDRS, claim)
            await eventually(
                lambda: _claimed_for(client, claim, "node-5"), message="claim re-created"
            )
            assert (await pod_cidrs(client))["node-5"] == first["node-5"]
            assert sample(b, "cp_store_repairs_total", resource="cidr-claim", reason="deleted") == 1
            assert_one_cidr_per_node(await pod_cidrs(client), await claims(client))


async def _claimed_for(client: KubeClient, name: str, node: str) -> bool:
    obj = await client.get_or_none(POD_CIDRS, name)
    return obj is not None and obj["spec"]["node"] == node


async def _cidrs_of(client: KubeClient, node: str, wanted: list[str]) -> bool:
    obj = await client.get(NODES, node)
    return bool(obj["spec"].get("podCIDRs") == wanted)


async def test_malformed_nodes_are_logged_counted_and_skipped(
    kube: KubeServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with kube_client(kube) as client:
        a = operator(kube, "op-a")
        async with running(a):
            await eventually(lambda: leader(a), message="op-a leads")
            await client.create(
                NODES,
                {
                    "apiVersion": NODES.api_version,
                    "kind": NODES.kind,
                    "metadata": {"name": "garbage"},
                    "spec": {"addresses": [{"ip": "not-an-ip"}], "bootID": "has spaces!"},
                },
            )
            await client.create(NODES, node_object("bad-boot", bootID="../../etc"))
            await client.create(NODES, node_object("good"))
            await eventually(lambda: all_assigned(client, ["good"]), message="good served")
            await eventually(
                lambda: sample(a, "cp_store_malformed_values_total", resource="node") >= 2,
                message="malformed nodes counted",
            )
            assigned = await pod_cidrs(client)
            assert "garbage" not in assigned and "bad-boot" not in assigned
            assert [c["spec"]["node"] for c in await claims(client)] == ["good"]
            assert "skipping malformed node 'garbage'" in caplog.text
            assert leader(a) is a  # still leading: nothing crashed


# -- identity GC ---------------------------------------------------------------------------


class _AgentRacesTheDelete(GatedClient):
    """Before the collector's delete of ``target`` goes out, an agent takes a reference
    to it (the store's acquire removes the mark: a write that changes the version)."""

    target = ""
    other: KubeClient | None = None

    async def _call(self, method: str, path: str, what: str, **kwargs: Any) -> JSON:
        if method == "DELETE" and path.endswith(f"/identities/{self.target}"):
            assert self.other is not None
            await self.other.patch(
                IDENTITIES, self.target, {"metadata": {"annotations": {GC_MARK: None}}}
            )
        return await super()._call(method, path, what, **kwargs)


async def test_identity_gc_deletes_only_what_stayed_unused_for_two_rounds(
    kube: KubeServer,
) -> None:
    metrics = StoreMetrics.create()
    async with kube_client(kube) as client, kube_client(kube, _AgentRacesTheDelete) as gc_client:
        await install_crds(client)
        for ident in (1001, 1002, 1003, 1004, 1005):
            await client.create(IDENTITIES, identity_object(ident))
        await client.create(IDENTITIES, identity_object("not-a-number"))
        await client.create(ENDPOINTS, endpoint_object("pod-1", "10.0.0.5", 1001, "node-a"))
        await client.create(
            ENDPOINTS, endpoint_object("pod-2", "10.0.0.6", 1005, "node-a", namespace="kube-system")
        )
        gc_client.target, gc_client.other = "1004", client
        collector = CrdIdentityCollector(gc_client, metrics)

        first = await collector.collect()  # marks 1002, 1003, 1004; deletes nothing
        assert (first.candidates, first.deleted, first.skipped) == (3, 0, 0)
        for ident in ("1002", "1003", "1004"):
            marked = await client.get(IDENTITIES, ident)
            assert GC_MARK in marked["metadata"]["annotations"]
        assert GC_MARK not in ((await client.get(IDENTITIES, "1001"))["metadata"].get(
            "annotations") or {})  # fmt: skip

        # Between the rounds 1003 gains a user (its endpoint is published).
        await client.create(ENDPOINTS, endpoint_object("pod-3", "10.0.0.7", 1003, "node-b"))
        second = await collector.collect()
        # 1002 deleted; 1003 kept (referenced, unmarked); 1004 gained a user between the
        # second round's list and its delete: the rv precondition refused it.
        assert (second.deleted, second.skipped) == (1, 1)
        assert await client.get_or_none(IDENTITIES, "1002") is None
        for ident in ("1001", "1003", "1004", "1005", "not-a-number"):
            assert await client.get_or_none(IDENTITIES, ident) is not None, ident
        assert GC_MARK not in ((await client.get(IDENTITIES, "1003"))["metadata"].get(
            "annotations") or {})  # fmt: skip
        assert metrics.registry.get_sample_value("cp_identity_gc_deleted_total") == 1
        assert metrics.registry.get_sample_value("cp_identity_gc_skipped_total") == 1
        # 1004 is unused again: marked anew, deleted one round later.
        gc_client.target = ""
        await collector.collect()
        third = await collector.collect()
        assert third.deleted == 1 and await client.get_or_none(IDENTITIES, "1004") is None
        assert await client.get_or_none(IDENTITIES, "1003") is not None


async def test_the_leader_runs_identity_gc(kube: KubeServer) -> None:
    async with kube_client(kube) as client:
        await install_crds(client)
        await client.create(IDENTITIES, identity_object(2001))
        await client.create(IDENTITIES, identity_object(2002))
        await client.create(ENDPOINTS, endpoint_object("pod-1", "10.0.0.5", 2001, "node-a"))
        a = operator(kube, "op-a")
        async with running(a):
            await eventually(
                lambda: _gone(client, IDENTITIES, "2002"), timeout=10, message="2002 collected"
            )
            assert await client.get_or_none(IDENTITIES, "2001") is not None
            assert sample(a, "cp_identity_gc_deleted_total") == 1


async def _gone(client: KubeClient, resource: Any, name: str, namespace: str | None = None) -> bool:
    return await client.get_or_none(resource, name, namespace) is None


# -- GC of gone nodes ----------------------------------------------------------------------


async def test_claims_and_endpoints_of_gone_nodes_are_collected_after_the_grace(
    kube: KubeServer,
) -> None:
    async with kube_client(kube) as client:
        a = operator(kube, "op-a", node_gc_grace=1.0)
        async with running(a):
            await eventually(lambda: leader(a), message="op-a leads")
            for name in ("stays", "goes"):
                await client.create(NODES, node_object(name))
            await eventually(lambda: all_assigned(client, ["stays", "goes"]), message="CIDRs")
            await client.create(ENDPOINTS, endpoint_object("kept", "10.0.0.5", 1001, "stays"))
            await client.create(ENDPOINTS, endpoint_object("stale", "10.0.1.5", 1001, "goes"))
            goes_cidr = (await pod_cidrs(client))["goes"][0]
            await client.delete(NODES, "goes")
            await eventually(
                lambda: _gone(client, ENDPOINTS, "stale", "default"), message="endpoint collected"
            )
            claim = cidr_name("default", ipaddress.ip_network(goes_cidr))
            await eventually(lambda: _gone(client, POD_CIDRS, claim), message="claim collected")
            assert await client.get_or_none(ENDPOINTS, "kept", "default") is not None
            assert [c["spec"]["node"] for c in await claims(client)] == ["stays"]
            assert sample(a, "cp_operator_node_gc_deleted_total", resource="endpoint") == 1
            assert sample(a, "cp_operator_node_gc_deleted_total", resource="cidr-claim") == 1


# -- API server outage -----------------------------------------------------------------------


class RestartableServer:
    """A local API server on an external etcd, stopped and started again on the same
    port, data directory, CA and token (kubeconfigs stay valid)."""

    def __init__(self, etcd: EmbeddedEtcd, data_dir: Path) -> None:
        self.settings = KubeServerSettings(
            data_dir=data_dir, etcd_endpoints=tuple(etcd.client_urls), bookmark_interval=0.5
        )
        self.server: KubeServer | None = None
        self.kubeconfig = data_dir / "kubeconfig"

    async def start(self) -> None:
        server = KubeServer(self.settings)
        await server.start()
        self.server = server
        self.settings = replace(self.settings, port=int(server.url.rsplit(":", 1)[1]))

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None


async def test_an_api_server_outage_steps_the_leader_down_and_it_comes_back(
    etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    server = RestartableServer(etcd1, tmp_path / "kube")
    await server.start()
    try:
        connection = load_connection(str(server.kubeconfig))
        a = CrdOperator(settings("op-a"), connection, request_timeout=1.0)
        b = CrdOperator(settings("op-b"), connection, request_timeout=1.0)
        async with running(a, b), kube_client(server) as client:
            first = await eventually(lambda: leader(a, b), timeout=20, message="a leader")
            await client.create(NODES, node_object("node-0"))
            await eventually(lambda: all_assigned(client, ["node-0"]), message="CIDR")

            await server.stop()
            await eventually(lambda: leader(a, b) is None, timeout=RENEW + 3, message="down")
            await eventually(lambda: sample(first, "cp_operator_leader") == 0.0, message="0")
            await eventually(lambda: not first.health()["apiserver"].ok, message="reported")

            await server.start()
            await eventually(lambda: leader(a, b), timeout=LEASE + 10, message="leads again")
            await client.create(NODES, node_object("node-1"))
            assigned = await eventually(
                lambda: all_assigned(client, ["node-0", "node-1"]), message="CIDRs after"
            )
            assert_one_cidr_per_node(assigned, await claims(client))
            await eventually(
                lambda: all(op.health()["apiserver"].ok for op in (a, b)), message="healthy"
            )
    finally:
        await server.stop()


# -- real processes ------------------------------------------------------------------------


# Real processes on a shared, maybe loaded machine: a lease long enough that renewals
# never miss their deadline because the host is slow, and that "at once" (a release) and
# "after a lease" (an expiry) stay far apart. No bound below depends on the host's speed.
PROC_LEASE, PROC_RENEW = 8, 6


class CrdOperatorProcess(OperatorProcess):
    def __init__(
        self, tmp_path: Path, name: str, kubeconfig: Path, *, lease: int = PROC_LEASE
    ) -> None:
        super().__init__(tmp_path, name, [])
        self.args = [
            *self.args[:3],
            "--store=crd",
            f"--kubeconfig={kubeconfig}",
            f"--id={name}",
            f"--lease-duration={lease}",
            f"--renew-deadline={lease * PROC_RENEW // PROC_LEASE}",
            f"--retry-period={RETRY}",
            "--gc-interval=0.5",
            "--metrics-address=127.0.0.1:0",
            "--timeout=3",
        ]


@contextlib.asynccontextmanager
async def processes(*procs: CrdOperatorProcess) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            await proc.stop()


async def test_processes_fail_over_at_once_on_a_clean_stop(
    kube: KubeServer, tmp_path: Path
) -> None:
    long = 30
    a = CrdOperatorProcess(tmp_path, "op-a", kube.kubeconfig, lease=long)
    b = CrdOperatorProcess(tmp_path, "op-b", kube.kubeconfig, lease=long)
    async with processes(a, b), kube_client(kube) as client:
        a.start()
        await eventually(a.is_leader, timeout=30, message="op-a leads")
        b.start()
        await eventually(lambda: _following(b, "op-a"), timeout=30, message="op-b follows")
        loop = asyncio.get_running_loop()
        stopped = loop.time()
        a.signal(signal.SIGTERM)
        assert await a.wait_exit() == 0
        await eventually(b.is_leader, timeout=long, message="op-b leads")
        # Released: op-b took over at its next retry, not after the (long) lease expired.
        assert loop.time() - stopped < long
        assert "released the Lease" in a.log()
        await client.create(NODES, node_object("node-0"))
        await eventually(lambda: all_assigned(client, ["node-0"]), message="op-b serves")
        assert "Traceback" not in a.log() + b.log()


async def test_a_killed_leader_is_replaced_within_a_lease_duration(
    kube: KubeServer, tmp_path: Path
) -> None:
    a = CrdOperatorProcess(tmp_path, "op-a", kube.kubeconfig)
    b = CrdOperatorProcess(tmp_path, "op-b", kube.kubeconfig)
    async with processes(a, b):
        a.start()
        await eventually(a.is_leader, timeout=30, message="op-a leads")
        b.start()
        await eventually(lambda: _following(b, "op-a"), timeout=30, message="follows")
        loop = asyncio.get_running_loop()
        killed = loop.time()
        a.signal(signal.SIGKILL)  # no release: op-b waits out the Lease by its own clock
        await eventually(b.is_leader, timeout=3 * PROC_LEASE, message="op-b leads")
        took = loop.time() - killed
        # op-b starts counting when it sees the last renewal change the record: no earlier
        # than a renewal interval before the kill, no later than one (jittered) poll after
        # it; it takes over at its first poll a whole lease duration later (never earlier;
        # how much later depends on the host's load, so that is not asserted).
        assert took >= PROC_LEASE - 2 * RETRY, took


async def test_a_paused_leader_lands_no_write_and_steps_down(
    kube: KubeServer, tmp_path: Path
) -> None:
    a = CrdOperatorProcess(tmp_path, "op-a", kube.kubeconfig)
    b = CrdOperatorProcess(tmp_path, "op-b", kube.kubeconfig)
    async with processes(a, b), kube_client(kube) as client:
        a.start()
        await eventually(a.is_leader, timeout=30, message="op-a leads")
        b.start()
        await eventually(lambda: _following(b, "op-a"), timeout=30, message="op-b follows")
        await client.create(NODES, node_object("node-0"))
        await client.create(NODES, node_object("node-1"))
        await eventually(lambda: all_assigned(client, ["node-0", "node-1"]), message="CIDRs")

        a.signal(signal.SIGSTOP)
        await eventually(b.is_leader, timeout=3 * PROC_LEASE, message="op-b takes over")
        # Work op-a would do if it could: it sees these only when it runs again.
        await client.create(NODES, node_object("node-2"))
        await client.create(NODES, node_object("node-3"))
        names = [f"node-{i}" for i in range(4)]
        await eventually(lambda: all_assigned(client, names), message="op-b assigns")
        before = await snapshot(client)
        resumed_at = len(a.log())
        a.signal(signal.SIGCONT)
        await eventually(lambda: "stepped down" in a.log()[resumed_at:], message="steps down")
        await eventually(lambda: _following(a, "op-b"), timeout=30, message="op-a follows")
        assert await a.sample("cp_operator_leader") == 0.0
        assert await a.sample("cp_operator_leader_transitions_total", 'event="lost"') == 1.0
        # Nothing op-a did after it woke up reached the API server: no claim and no node
        # changed (op-b had nothing left to do either), and op-b still leads.
        renewals = await b.sample("cp_operator_lease_renewals_total", 'result="ok"') or 0.0
        await eventually(
            lambda: _renewals_above(b, renewals + 2), message="op-b renews after op-a woke"
        )
        assert await snapshot(client) == before
        assert "allocated CIDR" not in a.log()[resumed_at:]
        assert_one_cidr_per_node(await pod_cidrs(client), await claims(client))
        assert await b.is_leader()
        assert "Traceback" not in a.log() + b.log()


async def snapshot(client: KubeClient) -> dict[str, str]:
    """Every PodCIDR and Node object -> its uid and resourceVersion."""
    out: dict[str, str] = {}
    for resource in (POD_CIDRS, NODES):
        for obj in (await client.list(resource)).items:
            meta = obj["metadata"]
            out[f"{resource.plural}/{meta['name']}"] = f"{meta['uid']}@{meta['resourceVersion']}"
    return out


async def _renewals_above(proc: OperatorProcess, value: float) -> bool:
    return (await proc.sample("cp_operator_lease_renewals_total", 'result="ok"') or 0.0) > value


async def _following(proc: OperatorProcess, leader_id: str) -> bool:
    with contextlib.suppress(OSError, AssertionError):
        status, body = await proc.health("/readyz")
        return bool(status == 200 and f"following {leader_id}" in str(body))
    return False
