"""Operator leader election against real etcd: one leader, hand-over, fencing by epoch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import pytest_asyncio
from helpers import FAST, eventually

from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.kvstore.election import (
    Election,
    ElectionSettings,
    NotLeader,
    Term,
    encode_epoch,
    parse_epoch,
)
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.shards import ShardMap
from controlplane.kvstore.types import Put

SETTINGS = ElectionSettings(lease_duration=3, renew_deadline=2.0, retry_period=0.5)
LAYOUT = KeyLayout()


@pytest_asyncio.fixture
async def second_etcd() -> AsyncIterator[EmbeddedEtcd]:
    async with EmbeddedEtcd(1) as etcd:
        yield etcd


def shard_map(*clusters: EmbeddedEtcd) -> ShardMap:
    config = KvstoreConfig(
        clusters=tuple(
            EtcdClusterConfig(f"c{i}", tuple(etcd.client_urls)) for i, etcd in enumerate(clusters)
        ),
        client=FAST,
    )
    return ShardMap(config, own_connection=True)


class Ledger:
    """Records which candidates do leader work, failing on any overlap."""

    def __init__(self) -> None:
        self.active: set[str] = set()
        self.overlaps: list[tuple[str, ...]] = []
        self.terms: list[tuple[str, int]] = []

    def work(self, name: str) -> Callable[[Term], Coroutine[Any, Any, None]]:
        async def lead(term: Term) -> None:
            if self.active:
                self.overlaps.append((name, *self.active))
            self.active.add(name)
            self.terms.append((name, term.epoch))
            try:
                await asyncio.Event().wait()
            finally:
                self.active.discard(name)

        return lead


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_settings_validation() -> None:
    ElectionSettings().validate()
    with pytest.raises(ValueError, match="renew deadline"):
        ElectionSettings(lease_duration=5, renew_deadline=5).validate()
    with pytest.raises(ValueError, match="retry period"):
        ElectionSettings(renew_deadline=2, retry_period=3).validate()
    with pytest.raises(ValueError, match="at least 2"):
        ElectionSettings(lease_duration=1, renew_deadline=0.5, retry_period=0.1).validate()


def test_epoch_encoding_orders_bytewise() -> None:
    assert encode_epoch(9, "a") < encode_epoch(10, "a") < encode_epoch(123456, "z")
    assert parse_epoch(encode_epoch(42, "op-1")) == (42, "op-1")
    assert parse_epoch(b"garbage") is None


async def test_one_leader_at_a_time_and_resign_hands_over(etcd1: EmbeddedEtcd) -> None:
    ledger = Ledger()
    async with shard_map(etcd1) as shards:
        elections = {
            name: Election(shards, LAYOUT, name, SETTINGS) for name in ("op-a", "op-b", "op-c")
        }
        tasks = {
            name: asyncio.create_task(e.run(ledger.work(name)), name=f"election:{name}")
            for name, e in elections.items()
        }
        try:
            await eventually(lambda: len(ledger.terms) == 1, message="a first leader")
            first, first_epoch = ledger.terms[0]
            await eventually(
                lambda: all(e.leader_id == first for e in elections.values()),
                message="every candidate sees the leader",
            )
            assert [n for n, e in elections.items() if e.is_leader] == [first]
            with pytest.raises(NotLeader):
                elections["op-a" if first != "op-a" else "op-b"].fence(shards.all()[0])

            # Resign (clean shutdown revokes the lease): the next one leads well within TTL.
            loop = asyncio.get_running_loop()
            resigned_at = loop.time()
            await _stop([tasks.pop(first)])
            assert not elections[first].is_leader
            await eventually(lambda: len(ledger.terms) == 2, message="a second leader")
            assert loop.time() - resigned_at < SETTINGS.lease_duration
            second, second_epoch = ledger.terms[1]
            assert second != first and second_epoch > first_epoch

            await _stop([tasks.pop(second)])
            await eventually(lambda: len(ledger.terms) == 3, message="a third leader")
            assert ledger.terms[2][1] > second_epoch
            assert ledger.overlaps == []
            epoch = await shards.all()[0].get(LAYOUT.operator_epoch)
            assert epoch is not None and parse_epoch(epoch.value) == (
                ledger.terms[2][1],
                ledger.terms[2][0],
            )
        finally:
            await _stop(list(tasks.values()))


async def test_deposed_leader_is_fenced_on_every_cluster(
    etcd1: EmbeddedEtcd, second_etcd: EmbeddedEtcd
) -> None:
    ledger = Ledger()
    async with shard_map(etcd1, second_etcd) as shards:
        primary, other = shards.all()
        a = Election(shards, LAYOUT, "op-a", SETTINGS)
        task_a = asyncio.create_task(a.run(ledger.work("op-a")))
        tasks = [task_a]
        try:
            await eventually(lambda: a.is_leader, message="op-a leads")
            old_fences = {b.name: a.fence(b) for b in (primary, other)}
            old_epoch = a.epoch
            assert old_epoch is not None
            for backend in (primary, other):
                ok = await backend.txn(old_fences[backend.name], [Put(b"probe", b"a")])
                assert ok.succeeded

            b = Election(shards, LAYOUT, "op-b", SETTINGS)
            tasks.append(asyncio.create_task(b.run(ledger.work("op-b"))))
            await eventually(lambda: b.leader_id == "op-a", message="op-b follows op-a")
            # Depose op-a the way a lease expiry would: its leader key vanishes.
            term_key = a.term.leader_key if a.term else b""
            assert await primary.delete(term_key) == 1
            await eventually(lambda: b.is_leader, message="op-b takes over")
            assert b.epoch is not None and b.epoch > old_epoch
            # Whatever op-a still holds can never land again, on either cluster.
            for backend in (primary, other):
                stale = await backend.txn(old_fences[backend.name], [Put(b"probe", b"stale")])
                assert not stale.succeeded
                fresh = await backend.txn(b.fence(backend), [Put(b"probe", b"b")])
                assert fresh.succeeded
                epoch = await backend.get(LAYOUT.operator_epoch)
                assert epoch is not None and parse_epoch(epoch.value) == (b.epoch, "op-b")
            await eventually(lambda: not a.is_leader and a.leader_id == "op-b")
            with pytest.raises(NotLeader):
                a.fence(primary)
            assert ledger.overlaps == []
        finally:
            await _stop(tasks)


async def test_newer_epoch_elsewhere_blocks_and_malformed_epoch_is_replaced(
    etcd1: EmbeddedEtcd, second_etcd: EmbeddedEtcd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controlplane.kvstore.election")
    ledger = Ledger()
    async with shard_map(etcd1, second_etcd) as shards:
        primary, other = shards.all()
        await other.put(LAYOUT.operator_epoch, encode_epoch(10**15, "from-the-future"))
        await primary.put(LAYOUT.operator_epoch, b"not an epoch")
        election = Election(shards, LAYOUT, "op-a", SETTINGS)
        task = asyncio.create_task(election.run(ledger.work("op-a")))
        try:
            # It sees itself first in line, but a newer epoch exists: it must not lead.
            def refusals() -> int:
                return sum("newer epoch exists" in r.getMessage() for r in caplog.records)

            await eventually(lambda: refusals() >= 2, message="two candidacies refused")
            assert ledger.terms == [] and not election.is_leader
            await other.delete(LAYOUT.operator_epoch)
            await eventually(lambda: election.is_leader, message="leads once it is the newest")
            for backend in (primary, other):
                epoch = await backend.get(LAYOUT.operator_epoch)
                assert epoch is not None and parse_epoch(epoch.value) == (election.epoch, "op-a")
        finally:
            await _stop([task])


async def test_leader_that_stepped_down_in_an_outage_frees_its_key_at_once(
    etcd1: EmbeddedEtcd,
) -> None:
    """A leader that could not renew steps down; when etcd answers again it revokes that
    lease first, so the next term starts at once, not after the old key's whole TTL."""
    settings = ElectionSettings(lease_duration=20, renew_deadline=2.0, retry_period=0.5)
    ledger = Ledger()
    async with shard_map(etcd1) as shards:
        election = Election(shards, LAYOUT, "op-a", settings)
        task = asyncio.create_task(election.run(ledger.work("op-a")), name="election:op-a")
        try:
            await eventually(lambda: len(ledger.terms) == 1, message="a first term")
            etcd1.pause_member(0)
            paused = asyncio.get_running_loop().time()
            try:
                await eventually(lambda: not election.is_leader, timeout=10, message="stepped down")
                # The outage outlasts the resignation's own request (FAST: 5 s timeout).
                outage = settings.renew_deadline + FAST.request_timeout + 1.0
                await asyncio.sleep(max(0.0, outage - (asyncio.get_running_loop().time() - paused)))
            finally:
                etcd1.resume_member(0)
            resumed = asyncio.get_running_loop().time()
            await eventually(lambda: len(ledger.terms) == 2, timeout=10, message="a new term")
            took = asyncio.get_running_loop().time() - resumed
            assert took < 5.0, f"the next term began {took:.1f}s after etcd came back"
            assert ledger.overlaps == []
        finally:
            await _stop([task])
