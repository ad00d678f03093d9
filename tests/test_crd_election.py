"""The operator's Lease election (controlplane/crd/election.py) on the local API server:
client-go semantics, expiry by the observer's clock, release, and fencing of a paused
ex-leader (refused locally, and by the API server for a write already past the check)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from helpers import eventually

from controlplane.apiserver import KubeServer
from controlplane.crd.client import KubeClient
from controlplane.crd.election import (
    LeaseElection,
    LeaseRecord,
    LeaseSettings,
    LeaseTerm,
    NotLeader,
    micro_time,
)
from controlplane.crd.errors import Conflict
from controlplane.crd.install import install_crds
from controlplane.crd.ipam import CrdCIDRStore
from controlplane.crd.names import cidr_name
from controlplane.crd.resources import LEASES, NODES, POD_CIDRS
from controlplane.metrics import StoreMetrics
from controlplane.model import NodeName
from controlplane.store_types import CIDRClaim
from tests.crdop_support import GatedClient, StoppableClock, kube_client, node_object

pytest_plugins = ["tests.kube_fixtures"]

FAST = LeaseSettings(lease_duration=2.0, renew_deadline=1.5, retry_period=0.2)
# A lease long enough that "at the next retry" and "after the lease expired" are far apart
# even on a loaded machine (no assertion here may depend on how fast the host is).
LONG = LeaseSettings(lease_duration=10.0, renew_deadline=6.0, retry_period=0.2)
NS, NAME = FAST.namespace, FAST.name


class Candidate:
    """One LeaseElection running in a task, recording its terms."""

    def __init__(self, election: LeaseElection) -> None:
        self.election = election
        self.terms: list[LeaseTerm] = []
        self.led_at: list[float] = []
        self.stepped_down_at: list[float] = []
        self.task: asyncio.Task[None] | None = None

    async def _lead(self, term: LeaseTerm) -> None:
        self.terms.append(term)
        self.led_at.append(time.monotonic())
        try:
            await asyncio.Event().wait()
        finally:
            self.stepped_down_at.append(time.monotonic())

    def start(self) -> None:
        self.task = asyncio.create_task(self.election.run(self._lead), name="candidate")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    def leads(self) -> bool:
        return self.election.is_leader


@contextlib.asynccontextmanager
async def candidates(*cands: Candidate) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for cand in cands:
            await cand.stop()


async def lease_record(client: KubeClient) -> LeaseRecord:
    return LeaseRecord.from_object(await client.get(LEASES, NAME, NS))


async def test_one_leads_and_a_clean_release_hands_over_at_once(kube: KubeServer) -> None:
    async with kube_client(kube) as ca, kube_client(kube) as cb:
        a = Candidate(LeaseElection(ca, "op-a", LONG))
        b = Candidate(LeaseElection(cb, "op-b", LONG))
        async with candidates(a, b):
            a.start()
            await eventually(a.leads, message="op-a leads")
            b.start()
            await eventually(lambda: b.election.leader_id == "op-a", message="op-b follows")
            # Several renewals later, still one leader, and op-b never took over.
            first = await lease_record(ca)
            await eventually(lambda: _renewed_since(ca, first), message="op-a renews the Lease")
            assert a.leads() and not b.leads()
            assert first.holder == "op-a" and first.duration == 10

            stopped = time.monotonic()
            await a.stop()
            released = a.election.observed  # what op-a wrote last (op-b may be quicker)
            assert released is not None
            assert released.holder == "" and released.duration == 1
            await eventually(b.leads, timeout=LONG.lease_duration, message="op-b takes over")
            # At op-b's next retry (0.2 s, jittered up to x2.2), not after a lease duration.
            assert b.led_at[0] - stopped < LONG.lease_duration
            record = await lease_record(cb)
            assert record.holder == "op-b"
            assert record.transitions == first.transitions + 1
            assert a.stepped_down_at and a.stepped_down_at[0] <= b.led_at[0]


async def _renewed_since(client: KubeClient, before: LeaseRecord) -> bool:
    now = await lease_record(client)
    return now.holder == before.holder and now.renew_time != before.renew_time


async def test_a_partitioned_leader_steps_down_before_anyone_takes_over(
    kube: KubeServer,
) -> None:
    async with kube_client(kube, GatedClient) as ca, kube_client(kube) as cb:
        a = Candidate(LeaseElection(ca, "op-a", FAST))
        b = Candidate(LeaseElection(cb, "op-b", FAST))
        async with candidates(a, b):
            a.start()
            await eventually(a.leads, message="op-a leads")
            b.start()
            await eventually(lambda: b.election.leader_id == "op-a", message="op-b follows")
            ca.gate.clear()  # op-a can no longer reach the API server
            cut = time.monotonic()
            await eventually(b.leads, timeout=FAST.lease_duration + 3, message="op-b leads")
            # op-a stopped leading by its renew deadline; op-b began after a whole lease
            # duration of its own clock since it last saw op-a's renewal: never two leaders.
            assert a.stepped_down_at, "op-a never stepped down"
            assert a.stepped_down_at[0] < b.led_at[0]
            assert b.led_at[0] - cut >= FAST.lease_duration - FAST.retry_period * 2.2 - 0.1
            ca.gate.set()
            await eventually(lambda: a.election.leader_id == "op-b", message="op-a follows")
            assert not a.leads()


async def test_expiry_is_judged_by_the_observers_clock_not_the_timestamps(
    kube: KubeServer,
) -> None:
    async with kube_client(kube) as client:
        # A holder whose renewTime is a day in the future, and one with a renewTime in
        # 2001: both wait out leaseDurationSeconds of *our* clock, no more, no less.
        for renew_time in ("2001-01-01T00:00:00.000000Z", micro_time().replace("20", "21", 1)):
            with contextlib.suppress(Exception):
                await client.delete(LEASES, NAME, namespace=NS)
            spec = LeaseRecord("ghost", 2, renew_time, renew_time, 4).spec()
            await client.create(
                LEASES,
                {"apiVersion": LEASES.api_version, "kind": "Lease",
                 "metadata": {"name": NAME, "namespace": NS}, "spec": spec},
            )  # fmt: skip
            election = LeaseElection(client, "op-a", FAST)
            started = time.monotonic()
            assert not await election.try_acquire_or_renew()
            assert election.leader_id == "ghost"
            took = await eventually(
                election.try_acquire_or_renew, timeout=5, interval=0.1, message="acquired"
            )
            assert took
            waited = time.monotonic() - started
            assert 2.0 <= waited < 3.5, f"waited {waited:.2f}s for a 2 s lease"
            record = await lease_record(client)
            assert record.holder == "op-a" and record.transitions == 5


async def test_racing_candidates_one_wins_the_other_gets_409(kube: KubeServer) -> None:
    async with kube_client(kube) as client:
        elections = [LeaseElection(client, f"op-{i}", FAST) for i in range(4)]
        created = await asyncio.gather(*(e.try_acquire_or_renew() for e in elections))
        assert sorted(created) == [False, False, False, True]
        winner = elections[created.index(True)]
        # Released: every candidate sees a free Lease and races for it at once.
        await winner._release()
        others = [e for e in elections if e is not winner]
        results = await asyncio.gather(
            *(e.try_acquire_or_renew() for e in others), return_exceptions=True
        )
        wins = [r for r in results if r is True]
        assert len(wins) == 1, results
        assert all(r is True or isinstance(r, Conflict) for r in results), results
        holder = (await lease_record(client)).holder
        assert holder == others[results.index(True)].identity


async def test_a_paused_leader_is_fenced_locally_and_by_the_api_server(
    kube: KubeServer,
) -> None:
    """op-a leads and is paused (its clock stands still, its requests are held) with two
    writes that already passed the local check: a CIDR claim and an rv-guarded patch.
    op-b takes over and writes. When op-a runs again, the held writes reach the API
    server and are refused (AlreadyExists, 409); op-a steps down and every later write
    is refused locally: nothing more is sent."""
    clock = StoppableClock()
    metrics = StoreMetrics.create()
    cidr = ipaddress.ip_network("10.0.0.0/24")
    async with (
        kube_client(kube, GatedClient) as ca,
        kube_client(kube) as cb,
    ):
        await install_crds(cb)
        await cb.create(NODES, node_object("node-x"))
        a = Candidate(LeaseElection(ca, "op-a", FAST, clock=clock))
        b = Candidate(LeaseElection(cb, "op-b", FAST))
        async with candidates(a, b):
            a.start()
            await eventually(a.leads, message="op-a leads")
            b.start()
            await eventually(lambda: b.election.leader_id == "op-a", message="op-b follows")
            term_a = a.terms[0]
            store_a = CrdCIDRStore(ca, metrics, fence=_async(term_a.check))
            node_seen_by_a = await ca.get(NODES, "node-x")

            clock.freeze()
            ca.gate.clear()
            held_claim = asyncio.create_task(
                store_a.claim(CIDRClaim("default", cidr, NodeName("node-a")))
            )
            held_patch = asyncio.create_task(
                _fenced_patch(ca, term_a, node_seen_by_a, "10.0.0.0/24")
            )
            await asyncio.sleep(0.1)
            assert not held_claim.done() and not held_patch.done()  # past the check, held

            await eventually(b.leads, timeout=FAST.lease_duration + 3, message="op-b leads")
            term_b = b.terms[0]
            store_b = CrdCIDRStore(cb, metrics, fence=_async(term_b.check))
            assert await store_b.claim(CIDRClaim("default", cidr, NodeName("node-b")))
            await _fenced_patch(cb, term_b, await cb.get(NODES, "node-x"), "10.0.1.0/24")

            clock.thaw()  # op-a runs again: its clock moved on by the pause
            ca.gate.set()
            assert await held_claim is False  # AlreadyExists: op-b's claim stands
            with pytest.raises(Conflict):
                await held_patch  # node-x changed since op-a read it
            await eventually(lambda: not a.leads(), message="op-a steps down")
            sent = len(ca.sent)
            with pytest.raises(NotLeader):
                await store_a.claim(CIDRClaim("default", ipaddress.ip_network("10.0.2.0/24"),
                                              NodeName("node-c")))  # fmt: skip
            with pytest.raises(NotLeader):
                term_a.check()
            writes = [m for m, p in ca.sent[sent:] if m != "GET"]
            assert writes == [], f"the deposed leader sent {writes}"
            assert b.leads()
            await eventually(lambda: a.election.leader_id == "op-b", message="op-a follows")

        claim = await cb.get(POD_CIDRS, cidr_name("default", cidr))
        assert claim["spec"]["node"] == "node-b"
        assert (await cb.get(NODES, "node-x"))["spec"]["podCIDRs"] == ["10.0.1.0/24"]
        assert await cb.get_or_none(POD_CIDRS, "default.10.0.2.0-24") is None


def _async(check: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def fence() -> None:
        check()

    return fence


async def _fenced_patch(client: KubeClient, term: LeaseTerm, node: Any, cidr: str) -> Any:
    patch = {
        "metadata": {"resourceVersion": node["metadata"]["resourceVersion"]},
        "spec": {"podCIDRs": [cidr]},
    }
    term.check()
    return await client.patch(NODES, node["metadata"]["name"], patch)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="renew deadline"):
        LeaseSettings(lease_duration=5, renew_deadline=5).validate()
    with pytest.raises(ValueError, match="retry period"):
        LeaseSettings(renew_deadline=2, retry_period=2).validate()


def test_a_garbled_lease_reads_as_free() -> None:
    record = LeaseRecord.from_object(
        {"spec": {"holderIdentity": 5, "leaseDurationSeconds": "x", "leaseTransitions": True}}
    )
    assert record == LeaseRecord()
    assert LeaseRecord.from_object({"spec": "nonsense"}) == LeaseRecord()
