"""IPAM against real etcd: pod CIDRs per node (invariant 2), IP leases, restarts, leases,
self-repair, malformed data, fencing, and `cpctl ipam list`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Network

import pytest
from helpers import FAST, eventually

from controlplane import codec
from controlplane.cli import ipam_cmd
from controlplane.cli.common import Parser
from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.ipam.cidr import ClusterPoolAllocator, PoolExhausted
from controlplane.ipam.node_ips import CIDRExhausted, NodeIPAllocator
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.ipam import (
    Fenced,
    KvCIDRStore,
    KvIPLeaseStore,
    list_all_claims,
    list_all_leases,
)
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.owner import Owners
from controlplane.kvstore.shards import ShardMap
from controlplane.kvstore.types import value_is
from controlplane.metrics import StoreMetrics
from controlplane.model import (
    CIDRPool,
    EndpointID,
    IPAddress,
    IPLease,
    IPNetwork,
    NodeName,
    is_usable_ip,
    parse_ip,
)
from controlplane.store import CIDRClaim, EventKind, StoreEvent

LAYOUT = KeyLayout()
POOL = CIDRPool(IPv4Network("10.0.0.0/16"), 24)
NODE_CIDR = IPv4Network("10.1.0.0/24")


def config_for(etcd: EmbeddedEtcd) -> KvstoreConfig:
    return KvstoreConfig(
        clusters=(EtcdClusterConfig("default", tuple(etcd.client_urls)),), client=FAST
    )


def malformed(metrics: StoreMetrics, resource: str) -> float:
    value = metrics.registry.get_sample_value(
        "cp_store_malformed_values_total", {"resource": resource}
    )
    return value or 0.0


@dataclass
class Operator:
    shards: ShardMap
    metrics: StoreMetrics
    store: KvCIDRStore
    allocator: ClusterPoolAllocator


@contextlib.asynccontextmanager
async def operator(config: KvstoreConfig, pool: CIDRPool = POOL) -> AsyncIterator[Operator]:
    """One operator replica: its own etcd connection, store and allocator (restored)."""
    async with ShardMap(config, own_connection=True) as shards:
        metrics = StoreMetrics.create()
        store = KvCIDRStore(shards, LAYOUT, metrics)
        allocator = ClusterPoolAllocator(store, pool)
        await allocator.restore()
        yield Operator(shards, metrics, store, allocator)


@dataclass
class Agent:
    node: NodeName
    shards: ShardMap
    metrics: StoreMetrics
    owners: Owners
    store: KvIPLeaseStore
    allocator: NodeIPAllocator


@contextlib.asynccontextmanager
async def agent(
    config: KvstoreConfig, node: str = "node-a", cidr: IPNetwork = NODE_CIDR, ttl: int = 60
) -> AsyncIterator[Agent]:
    """One agent: its own connection, lease pool (kept alive, self-repairing) and IPAM."""
    async with ShardMap(config, own_connection=True) as shards:
        metrics = StoreMetrics.create()
        owners = Owners(metrics, ttl=ttl, keepalive_interval=0.2)
        store = KvIPLeaseStore(shards, LAYOUT, metrics, owners, node=NodeName(node))
        allocator = NodeIPAllocator(store, cidr, NodeName(node))
        task = asyncio.create_task(owners.run(), name=f"owners:{node}")
        try:
            await allocator.restore()
            yield Agent(NodeName(node), shards, metrics, owners, store, allocator)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def stored_leases(shards: ShardMap, node: str = "node-a") -> dict[IPAddress, str]:
    backend = shards.shard_for("ipam", node)
    prefix = LAYOUT.ipam_node_leases(node)
    result = await backend.list_prefix(prefix)
    return {
        parse_ip(kv.key[len(prefix) :].decode()): codec.decode("ip-lease", kv.value)["owner"]
        for kv in result.kvs
    }


def ep(i: int) -> EndpointID:
    return EndpointID(f"ep-{i}")


# --- pod CIDRs ---------------------------------------------------------------------------


async def test_concurrent_operators_give_distinct_cidrs(etcd3: EmbeddedEtcd) -> None:
    config = config_for(etcd3)
    async with contextlib.AsyncExitStack() as stack:
        ops = [await stack.enter_async_context(operator(config)) for _ in range(20)]
        # Every allocator starts from the same empty view and races for the lowest CIDR.
        cidrs = await asyncio.gather(
            *(op.allocator.allocate(NodeName(f"node-{i}")) for i, op in enumerate(ops))
        )
        assert len(set(cidrs)) == 20
        assert all(POOL.contains(c) for c in cidrs)
        assert {POOL.index_of(c) for c in cidrs} == set(range(20))  # lowest free, no gaps

        claims = await ops[0].store.list(POOL.name)
        assert len(claims) == 20
        by_node = {c.value.node: c.value.cidr for c in claims}
        assert by_node == {NodeName(f"node-{i}"): c for i, c in enumerate(cidrs)}
        # Asking again is idempotent, also on a fresh allocator.
        assert await ops[3].allocator.allocate(NodeName("node-3")) == cidrs[3]
        async with operator(config) as fresh:
            assert fresh.allocator.in_use == 20
            assert fresh.allocator.allocations() == by_node
            assert await fresh.allocator.allocate(NodeName("node-7")) == cidrs[7]


async def test_operator_restart_mid_stream(etcd1: EmbeddedEtcd) -> None:
    config = config_for(etcd1)
    async with operator(config) as old:
        first = [await old.allocator.allocate(NodeName(f"a-{i}")) for i in range(10)]
        async with operator(config) as new:  # restarted: a new instance restores the pool
            assert new.allocator.allocations() == {
                NodeName(f"a-{i}"): c for i, c in enumerate(first)
            }
            # The old instance (a stale view) keeps going while the new one allocates.
            old_more, new_more = await asyncio.gather(
                asyncio.gather(*(old.allocator.allocate(NodeName(f"b-{i}")) for i in range(10))),
                asyncio.gather(*(new.allocator.allocate(NodeName(f"c-{i}")) for i in range(10))),
            )
            everything = first + list(old_more) + list(new_more)
            assert len(set(everything)) == 30
            claims = await new.store.list(POOL.name)
            assert len(claims) == 30 and len({c.value.node for c in claims}) == 30

            # Release frees the claim; the lowest free CIDR is handed out next.
            await new.allocator.release(NodeName("a-0"))
            assert new.allocator.cidr_of(NodeName("a-0")) is None
            assert await new.allocator.allocate(NodeName("d-0")) == first[0]
            assert len(await new.store.list(POOL.name)) == 30


async def test_pool_exhaustion(etcd1: EmbeddedEtcd) -> None:
    tiny = CIDRPool(IPv4Network("10.0.0.0/28"), 30, name="tiny")
    async with operator(config_for(etcd1), tiny) as op:
        got = [await op.allocator.allocate(NodeName(f"n{i}")) for i in range(4)]
        assert got == list(tiny.iter_cidrs())
        with pytest.raises(PoolExhausted, match="tiny"):
            await op.allocator.allocate(NodeName("n4"))
        assert await op.allocator.allocate(NodeName("n2")) == got[2]  # existing: still fine
        assert op.allocator.in_use == 4
        await op.allocator.release(NodeName("n1"))
        assert await op.allocator.allocate(NodeName("n4")) == got[1]
        with pytest.raises(PoolExhausted):
            await op.allocator.allocate(NodeName("n5"))


async def test_a_preferred_cidr_is_claimed_when_free(etcd1: EmbeddedEtcd) -> None:
    """A node that shows a CIDR but lost its claim gets that CIDR back if it is free."""
    config = config_for(etcd1)
    async with operator(config) as op, operator(config) as other:
        assert await op.allocator.allocate(NodeName("a"), prefer=POOL.cidr_at(7)) == POOL.cidr_at(7)
        # Taken in our view: the lowest free instead.
        assert await op.allocator.allocate(NodeName("b"), prefer=POOL.cidr_at(7)) == POOL.cidr_at(0)
        # Taken by a claim we have not read (another allocator's): refused, lowest free.
        taken = await other.allocator.allocate(NodeName("d"), prefer=POOL.cidr_at(9))
        assert taken == POOL.cidr_at(9)
        assert await op.allocator.allocate(NodeName("e"), prefer=POOL.cidr_at(9)) == POOL.cidr_at(1)
        # Outside the pool: ignored.
        outside = IPv4Network("192.168.0.0/24")
        assert await op.allocator.allocate(NodeName("f"), prefer=outside) == POOL.cidr_at(2)
        claims = await op.store.list(POOL.name)
        cidrs = [c.value.cidr for c in claims]
        assert len(cidrs) == len(set(cidrs))


async def test_fenced_writes_are_refused(etcd1: EmbeddedEtcd) -> None:
    config = config_for(etcd1)
    leader_key = LAYOUT.leader_prefix + b"1"
    async with ShardMap(config) as shards:
        backend = shards.shard_for("ipam", POOL.name)
        metrics = StoreMetrics.create()
        store = KvCIDRStore(
            shards, LAYOUT, metrics, fence=lambda: [value_is(leader_key, b"operator-a")]
        )
        claim = CIDRClaim(POOL.name, POOL.cidr_at(0), NodeName("node-a"))
        with pytest.raises(Fenced):
            await store.claim(claim)  # not the leader: refused
        assert await store.list(POOL.name) == []
        # The allocator gives up at once (it does not walk the pool thinking all is taken).
        with pytest.raises(Fenced):
            await ClusterPoolAllocator(store, POOL).allocate(NodeName("node-a"))
        assert await store.list(POOL.name) == []

        await backend.put(leader_key, b"operator-a")
        assert await store.claim(claim) is True
        assert await store.claim(claim) is False  # taken
        [versioned] = await store.list(POOL.name)

        await backend.put(leader_key, b"operator-b")  # deposed
        with pytest.raises(Fenced):
            await store.free(versioned)
        with pytest.raises(Fenced):
            await store.claim(CIDRClaim(POOL.name, POOL.cidr_at(1), NodeName("node-b")))
        assert [c.value for c in await store.list(POOL.name)] == [claim]

        await backend.put(leader_key, b"operator-a")
        assert await store.free(versioned) is True
        assert await store.free(versioned) is False  # gone
        assert await store.list(POOL.name) == []


async def test_watch_claims(etcd1: EmbeddedEtcd) -> None:
    async with operator(config_for(etcd1)) as op:
        first = await op.allocator.allocate(NodeName("node-a"))
        events: list[StoreEvent[CIDRClaim]] = []

        async def pump() -> None:
            async for event in op.store.watch(POOL.name):
                events.append(event)

        task = asyncio.create_task(pump())
        try:
            await eventually(lambda: any(e.kind is EventKind.SYNCED for e in events))
            second = await op.allocator.allocate(NodeName("node-b"))
            await op.allocator.release(NodeName("node-a"))
            await eventually(lambda: len(events) == 4, message="four events")
            kinds = [(e.kind, e.value.cidr if e.value else None) for e in events]
            assert kinds == [
                (EventKind.UPSERT, first),
                (EventKind.SYNCED, None),
                (EventKind.UPSERT, second),
                (EventKind.DELETE, first),
            ]
            assert events[0].name == "10.0.0.0_24"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --- IP leases ---------------------------------------------------------------------------


async def test_concurrent_endpoints_on_one_node(etcd1: EmbeddedEtcd) -> None:
    async with agent(config_for(etcd1)) as a:
        ips = await asyncio.gather(*(a.allocator.allocate(ep(i)) for i in range(100)))
        assert len(set(ips)) == 100
        assert all(is_usable_ip(NODE_CIDR, ip) for ip in ips)
        assert a.allocator.leases() == {ip: ep(i) for i, ip in enumerate(ips)}
        assert await stored_leases(a.shards) == {ip: f"ep-{i}" for i, ip in enumerate(ips)}
        # Idempotent per endpoint, also when asked concurrently.
        again = await asyncio.gather(*(a.allocator.allocate(ep(i)) for i in (5, 5, 77)))
        assert again == [ips[5], ips[5], ips[77]]
        # Every lease key is on one of the node's live etcd leases.
        kvs = (await a.store.backend.list_prefix(a.store.prefix)).kvs
        assert {kv.lease for kv in kvs} <= set(a.store.owner.leases.leases)
        assert all(kv.lease for kv in kvs)


async def test_round_robin_and_exhaustion(etcd1: EmbeddedEtcd) -> None:
    small = IPv4Network("10.2.0.0/29")  # usable: .2 .. .6
    async with agent(config_for(etcd1), cidr=small) as a:
        got = [await a.allocator.allocate(ep(i)) for i in range(3)]
        assert [str(ip) for ip in got] == ["10.2.0.2", "10.2.0.3", "10.2.0.4"]
        await a.allocator.release(got[1])
        assert got[1] not in await stored_leases(a.shards)
        # A just-freed IP is not reused at once: the allocator moves on.
        assert str(await a.allocator.allocate(ep(3))) == "10.2.0.5"
        assert str(await a.allocator.allocate(ep(4))) == "10.2.0.6"
        assert str(await a.allocator.allocate(ep(5))) == "10.2.0.3"  # wrapped around
        with pytest.raises(CIDRExhausted):
            await a.allocator.allocate(ep(6))
        assert len(await stored_leases(a.shards)) == 5


async def test_agent_restart_mid_stream(etcd1: EmbeddedEtcd) -> None:
    config = config_for(etcd1)
    async with agent(config) as old:
        tasks = [asyncio.create_task(old.allocator.allocate(ep(i))) for i in range(60)]
        await eventually(lambda: sum(t.done() for t in tasks) >= 20, message="20 allocated")
        for task in tasks:  # the agent dies with allocations in flight
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        before = old.allocator.leases()
        old_leases = set(old.store.owner.leases.leases)
    assert len(before) >= 20

    async with agent(config) as new:
        # Everything the old agent recorded is kept; an allocation that reached etcd just
        # before the crash is adopted too (it is in the store, so it is a lease).
        restored = new.allocator.leases()
        assert restored.items() >= before.items()
        stored = await stored_leases(new.shards)
        assert stored == {ip: str(owner) for ip, owner in restored.items()}
        kvs = (await new.store.backend.list_prefix(new.store.prefix)).kvs
        assert all(kv.lease in new.store.owner.leases.leases for kv in kvs)  # re-attached

        # Allocating continues without duplicates, and held endpoints keep their IP.
        more = await asyncio.gather(*(new.allocator.allocate(ep(100 + i)) for i in range(40)))
        assert not set(more) & set(restored)
        assert len(set(more)) == 40
        first = next(iter(before.items()))
        assert await new.allocator.allocate(first[1]) == first[0]

        # The old session's etcd leases expiring takes nothing away.
        for lease in old_leases:
            await new.store.backend.revoke(lease)
        assert await stored_leases(new.shards) == {
            ip: str(owner) for ip, owner in new.allocator.leases().items()
        }


async def test_restore_releases_leases_outside_the_cidr(etcd1: EmbeddedEtcd) -> None:
    config = config_for(etcd1)
    async with agent(config) as old:
        kept = [await old.allocator.allocate(ep(i)) for i in range(3)]
    async with agent(config) as other:  # write a lease outside the node's next CIDR
        assert await other.store.claim(
            IPLease(node=NodeName("node-a"), ip=parse_ip("10.9.0.5"), owner=ep(9))
        )
    async with agent(config) as new:
        assert set(new.allocator.leases()) == set(kept)
        assert set(await stored_leases(new.shards)) == set(kept)


async def test_lease_loss_recreates_leases(etcd1: EmbeddedEtcd) -> None:
    async with agent(config_for(etcd1)) as a:
        ips = [await a.allocator.allocate(ep(i)) for i in range(10)]
        expected = {ip: f"ep-{i}" for i, ip in enumerate(ips)}
        owner = a.store.owner
        lost = set(owner.leases.leases)
        for lease in lost:
            await a.store.backend.revoke(lease)

        async def recreated() -> bool:
            kvs = (await a.store.backend.list_prefix(a.store.prefix)).kvs
            live = set(owner.leases.leases)
            return await stored_leases(a.shards) == expected and all(
                kv.lease in live and kv.lease not in lost for kv in kvs
            )

        await eventually(recreated, message="leases re-created on a new etcd lease")
        assert owner.leases.lost_total >= 1
        assert a.allocator.leases() == {ip: ep(i) for i, ip in enumerate(ips)}


async def test_changed_or_deleted_lease_comes_back(etcd1: EmbeddedEtcd) -> None:
    config = config_for(etcd1)
    async with agent(config) as a, ShardMap(config) as outsider:
        ips = [await a.allocator.allocate(ep(i)) for i in range(3)]
        expected = {ip: f"ep-{i}" for i, ip in enumerate(ips)}
        victim = LAYOUT.ipam_lease("node-a", str(ips[1]))
        backend = outsider.shard_for("ipam", "node-a")
        live = a.store.owner.leases.leases

        # Someone rewrites the key without our lease: it is re-attached to ours. (Whether
        # the repair watcher lists before or after this put, it sees a foreign lease.)
        kv = await backend.get(victim)
        assert kv is not None and kv.lease in live
        await backend.put(victim, kv.value)

        async def reattached() -> bool:
            now = await backend.get(victim)
            return now is not None and now.lease in a.store.owner.leases.leases

        await eventually(reattached, message="lease re-attached")
        # counted once the repair's own write is answered, which may come after the key
        # is visible
        await eventually(lambda: a.store.owner.repaired_total >= 1, message="repair counted")

        # The watcher is live now: a delete by someone else is undone.
        repaired = a.store.owner.repaired_total
        await backend.delete(victim)
        await eventually(
            lambda: a.store.owner.repaired_total > repaired, message="deleted lease re-created"
        )
        await eventually(reattached, message="deleted lease back on our lease")
        assert await stored_leases(a.shards) == expected

        # A released lease is not repaired.
        await a.allocator.release(ips[0])
        assert ips[0] not in await stored_leases(a.shards)
        assert a.allocator.leases() == {ips[1]: ep(1), ips[2]: ep(2)}


async def test_malformed_values_are_skipped_and_counted(etcd1: EmbeddedEtcd) -> None:
    config = config_for(etcd1)
    junk_claim = LAYOUT.ipam_cidr(POOL.name, "10.0.0.0/24")  # the first CIDR, unreadable
    junk_lease = LAYOUT.ipam_lease("node-a", "10.1.0.2")  # the first IP, unreadable
    async with ShardMap(config) as shards:
        backend = shards.shard_for("ipam", "node-a")
        await backend.put(junk_claim, b"\xc1 not msgpack")
        await backend.put(LAYOUT.ipam_cidr(POOL.name, "bogus"), codec.encode("cidr-claim", {}))
        await backend.put(junk_lease, codec.encode("ip-lease", {"owner": 7}))
        await backend.put(LAYOUT.ipam_lease("node-a", "999.1.1.1"), b"x")
        await backend.put(LAYOUT.ipam_leases_prefix + b"no-node-component", b"x")

    async with operator(config) as op:
        assert op.allocator.in_use == 0
        assert malformed(op.metrics, "cidr-claim") == 2
        # The unreadable key still holds the CIDR: the claim loses and the next one is used.
        assert await op.allocator.allocate(NodeName("node-a")) == POOL.cidr_at(1)
        assert await op.allocator.allocate(NodeName("node-b")) == POOL.cidr_at(2)
        assert op.allocator.in_use == 3

    async with agent(config) as a:
        assert a.allocator.leases() == {}
        assert malformed(a.metrics, "ip-lease") == 2
        assert str(await a.allocator.allocate(ep(1))) == "10.1.0.3"
        assert [v.value.ip for v in await a.store.list()] == [parse_ip("10.1.0.3")]
        async with ShardMap(config) as shards:
            metrics = StoreMetrics.create()
            leases = await list_all_leases(shards, LAYOUT, metrics)
            claims = await list_all_claims(shards, LAYOUT, metrics)
        assert [(v.value.node, str(v.value.ip)) for v in leases] == [("node-a", "10.1.0.3")]
        assert [str(v.value.cidr) for v in claims] == ["10.0.1.0/24", "10.0.2.0/24"]
        assert malformed(metrics, "ip-lease") == 3
        assert malformed(metrics, "cidr-claim") == 2


# --- cpctl ipam list ---------------------------------------------------------------------


async def test_cli_ipam_list(etcd1: EmbeddedEtcd, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_for(etcd1)
    async with operator(config) as op:
        cidr_a = await op.allocator.allocate(NodeName("node-a"))
        cidr_b = await op.allocator.allocate(NodeName("node-b"))
    async with agent(config, "node-a", cidr=cidr_a) as a:
        ip_a = await a.allocator.allocate(EndpointID("default/web-1"))
    async with agent(config, "node-b", cidr=cidr_b) as b:
        ip_b = await b.allocator.allocate(EndpointID("default/db-1"))

    parser = Parser(prog="cpctl")
    ipam_cmd.register(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    flags = ["--kvstore-endpoints", ",".join(etcd1.client_urls)]

    args = parser.parse_args(["ipam", "list", "--json", *flags])
    assert await args.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pool"] == "default"
    assert [(c["cidr"], c["node"]) for c in report["cidrs"]] == [
        (str(cidr_a), "node-a"),
        (str(cidr_b), "node-b"),
    ]
    assert report["leases"] == {
        "node-a": {str(ip_a): "default/web-1"},
        "node-b": {str(ip_b): "default/db-1"},
    }
    assert report["malformed"] == {"cidr-claim": 0, "ip-lease": 0}

    args = parser.parse_args(["ipam", "list", *flags])
    assert await args.run(args) == 0
    out = capsys.readouterr().out
    assert "pool default: 2 CIDR(s) on 2 node(s)" in out
    assert f"{ip_b}" in out and "default/db-1" in out

    args = parser.parse_args(["ipam", "list", "--pool", "other", "--json", *flags])
    assert await args.run(args) == 0
    assert json.loads(capsys.readouterr().out)["cidrs"] == []

    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["ipam", "list", "--pool", "Not_A_Pool", *flags])
    assert exc.value.code == 2
