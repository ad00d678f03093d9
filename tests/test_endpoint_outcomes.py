"""Endpoint creates and deletes whose store write fails in flight (etcd paused): what the
agent owns and what the store holds converge, whether or not the lost write landed.

The agent's status checks are slowed so the outage restarts nothing: a restart's restore
would tidy up and hide what these tests look at (a shard recovery, or an etcd leader kill
that etcd absorbs, restarts nothing either).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from controlplane import codec
from controlplane.agent.agent import Agent
from controlplane.config import ClientSettings, EtcdClusterConfig, KvstoreConfig
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.endpoints import KvEndpointStore
from controlplane.kvstore.errors import KvstoreError
from controlplane.kvstore.ipam import list_all_leases
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.owner import KeyOwner, Owners
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import NodeName
from tests.helpers import eventually, running
from tests.test_agent import agent_settings, api, create, give_cidrs
from tests.test_stores import endpoint

LAYOUT = KeyLayout()
SHORT = ClientSettings(request_timeout=1.5, keepalive_time=5.0, keepalive_timeout=2.0)
"""Requests to a paused etcd fail after 1.5 s."""


def config(etcd: EmbeddedEtcd, b: EmbeddedEtcd | None = None) -> KvstoreConfig:
    """``etcd`` alone, or with ``b`` holding the endpoint records (the rest on ``etcd``)."""
    clusters = [EtcdClusterConfig("default", tuple(etcd.client_urls))]
    if b is None:
        return KvstoreConfig(tuple(clusters), client=SHORT)
    clusters.append(EtcdClusterConfig("b", tuple(b.client_urls)))
    return KvstoreConfig(tuple(clusters), shards={"endpoints": ("b",)}, client=SHORT)


async def records_of(cfg: KvstoreConfig, node: str) -> set[str]:
    """The IPs of ``node``'s endpoint records, read from the store directly."""
    async with ShardMap(cfg, own_connection=True) as shards:
        store = KvEndpointStore(shards, LAYOUT, StoreMetrics.create(), None, node=None)
        return {str(v.value.ip) for v in await store.list() if v.value.node == node}


async def leases_of(cfg: KvstoreConfig, node: str) -> set[str]:
    """The IPs leased to ``node``, read from the store directly."""
    async with ShardMap(cfg, own_connection=True) as shards:
        leases = await list_all_leases(shards, LAYOUT, StoreMetrics.create())
        return {str(v.value.ip) for v in leases if v.value.node == node}


def owned_ips(agent: Agent) -> set[str]:
    return {str(e.ip) for e in agent.owned.items.values() if e.ip is not None}


def owners_of(agent: Agent) -> list[KeyOwner]:
    session = agent._session
    assert session is not None
    owners: Owners = session.store.owners  # type: ignore[attr-defined]
    return owners.all()


@pytest.mark.parametrize("paused", ["records", "leases"])
async def test_create_and_delete_failing_in_flight_converge(
    etcd1: EmbeddedEtcd, second_etcd: EmbeddedEtcd, tmp_path: Path, paused: str
) -> None:
    """``records``: the cluster of the endpoint records is paused (the IP lease and the
    identity are taken, the record's write fails); ``leases``: the cluster of IP leases
    and identities is (the create fails at its IP lease, the delete after the record)."""
    await give_cidrs(etcd1, "node-a")
    cfg = config(etcd1, second_etcd)
    target = second_etcd if paused == "records" else etcd1
    settings = replace(agent_settings(tmp_path, "node-a", "127.0.0.11"), status_check_interval=60)
    a = Agent(settings, cfg)
    async with running(a):
        await asyncio.wait_for(a.wait_ready(), 20)
        (records_owner,) = [o for o in owners_of(a) if o.backend.name == "b"]
        await eventually(
            lambda: LAYOUT.ip_prefix("default") not in records_owner.self_watched(),
            message="the agent's endpoint watch feeds the repair of its records",
        )
        kept = await create(a, "default", "kept", ["k8s:app=web"])
        await create(a, "default", "gone", ["k8s:app=db"])
        target.pause_member(0)
        try:
            status, body = await api(a, "POST", "/v1/endpoints", {
                "namespace": "default", "name": "new", "labels": ["k8s:app=new"],
            })  # fmt: skip
            assert status == 503, body
            status, body = await api(a, "DELETE", "/v1/endpoints/default/gone")
            assert status == 503, body
        finally:
            target.resume_member(0)
        # Neither is owned now (the caller was told the create failed; the delete's
        # endpoint is leaving), whatever etcd applied of the lost writes.
        assert owned_ips(a) == {kept["ip"]}
        owners = owners_of(a)

        async def converged() -> bool:
            """Records are the owned endpoints'; IP leases too, but those of a leaving
            endpoint may stay until its withdrawal is finished."""
            if any(o.unresolved() for o in owners):
                return False
            mine = owned_ips(a)
            leaving = {str(e.ip) for e in a.owned.leaving.values() if e.ip is not None}
            leases = await leases_of(cfg, "node-a")
            return await records_of(cfg, "node-a") == mine and mine <= leases <= mine | leaving

        await eventually(converged, timeout=30, message="store follows the agent")

        # A lease loss re-creates every owned key, and only those.
        repaired = sum(o.repaired_total for o in owners)
        for owner in owners:
            for lease in list(owner.leases.leases):
                await owner.backend.revoke(lease)
        await eventually(
            lambda: sum(o.repaired_total for o in owners) > repaired, message="keys re-created"
        )
        await eventually(converged, timeout=30, message="store follows the agent after")
        assert await records_of(cfg, "node-a") == {kept["ip"]}

        # What a runtime does next: DEL again (finishes the withdrawal), ADD again.
        status, _ = await api(a, "DELETE", "/v1/endpoints/default/gone")
        assert status in (200, 204)
        assert not a.owned.leaving
        again = await create(a, "default", "new", ["k8s:app=new"])
        assert owned_ips(a) == {kept["ip"], again["ip"]}
        await eventually(converged, timeout=30, message="store holds the retried create")
        assert await leases_of(cfg, "node-a") == owned_ips(a)


async def test_a_lost_write_that_lands_late_is_deleted(etcd1: EmbeddedEtcd) -> None:
    """The write of a create that failed may be applied after its caller gave the key up:
    the owner deletes it again when the watch shows our value back."""
    metrics = StoreMetrics.create()
    async with ShardMap(config(etcd1)) as shards:
        owners = Owners(metrics, ttl=10, keepalive_interval=0.2)
        store = KvEndpointStore(shards, LAYOUT, metrics, owners, node=NodeName("node-a"))
        owner = owners.for_backend(shards.backends["default"])
        backend = owner.backend
        first, lost = endpoint("10.0.1.2", "node-a"), endpoint("10.0.1.3", "node-a")
        key = store.key(lost.ip)
        value = codec.encode("endpoint", lost.to_dict())
        await store.upsert(first)
        async with asyncio.TaskGroup() as group:
            run = group.create_task(owners.run())
            await eventually(lambda: owner.leases.keepalives_total > 0, message="running")
            etcd1.pause_member(0)
            try:
                with pytest.raises(KvstoreError):
                    await store.upsert(lost)
                # the caller gives the endpoint up (the agent's rollback) while etcd is away
                with pytest.raises(KvstoreError):
                    await store.remove(lost.ip)
                assert not owner.owns(key) and owner.unresolved() == {key}
            finally:
                etcd1.resume_member(0)
            await eventually(lambda: not owner.unresolved(), timeout=20, message="resolved")
            assert await backend.get(key) is None

            # etcd applies the lost write now: our value, on our lease
            withdrawn = owner.withdrawn_total
            await backend.put(key, value, lease=next(iter(owner.leases.leases)))
            await eventually(lambda: owner.withdrawn_total > withdrawn, message="withdrawn")
            assert await backend.get(key) is None
            # someone else's record at that IP is not ours to delete
            theirs = codec.encode("endpoint", endpoint("10.0.1.3", "node-b").to_dict())
            await backend.put(key, theirs)
            await backend.put(store.key(first.ip), codec.encode("endpoint", first.to_dict()))
            await eventually(lambda: owner.repaired_total >= 1, message="own key repaired")
            kv = await backend.get(key)
            assert kv is not None and kv.value == theirs
            assert {str(v.value.ip) for v in await store.list()} == {"10.0.1.2", "10.0.1.3"}
            run.cancel()
