"""The agent's endpoint watch applied to its cache and ipcache (EndpointMirror)."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.agent.endpoint_mirror import EndpointMirror, endpoint_source
from controlplane.datapath.ipcache import (
    FLAG_LOCAL,
    ip_identity_key,
    ip_identity_value,
    userspace_ipcache,
)
from controlplane.datapath.reconciler import IpcacheReconciler
from controlplane.model import IPIdentity, NodeName, NumericIdentity
from controlplane.store_types import EventKind, StoreEvent

ME = NodeName("node-a")


def pair(name: str, identity: int, node: str = "node-b") -> IPIdentity:
    packed = socket.inet_pton(socket.AF_INET, name)
    host = socket.inet_pton(socket.AF_INET, "192.168.0.1")
    return IPIdentity(packed, 32, NumericIdentity(identity), NodeName(node), host)


def up(name: str, identity: int, node: str = "node-b") -> StoreEvent[IPIdentity]:
    return StoreEvent(EventKind.UPSERT, name, pair(name, identity, node), 1)


def down(name: str) -> StoreEvent[IPIdentity]:
    return StoreEvent(EventKind.DELETE, name, None, 2)


SYNCED: StoreEvent[IPIdentity] = StoreEvent(EventKind.SYNCED, "", None, 3)


def map_of(rec: IpcacheReconciler) -> dict[bytes, bytes]:
    rec.flush()
    return dict(rec.ipcache.map.items())


def expected_map(state: dict[str, IPIdentity]) -> dict[bytes, bytes]:
    return {
        ip_identity_key(p): ip_identity_value(p, FLAG_LOCAL if p.node == ME else 0)
        for p in state.values()
    }


def test_upserts_and_deletes_reach_cache_and_map_in_batch_order() -> None:
    rec = IpcacheReconciler(userspace_ipcache())
    mirror = EndpointMirror({}, set(), rec, ME)
    batch = [
        up("10.0.0.1", 300),
        up("10.0.0.2", 301, "node-a"),  # ours: flagged local
        up("10.0.0.3", 302),
        down("10.0.0.3"),  # gone again within the batch
        down("10.0.0.4"),  # never seen: nothing to do
        up("10.0.0.1", 310),  # changed within the batch
    ]
    assert mirror.apply(batch) is False
    assert mirror.cache == {"10.0.0.1": pair("10.0.0.1", 310), "10.0.0.2": batch[1].value}
    assert map_of(rec) == expected_map(mirror.cache)
    ours = pair("10.0.0.2", 301, "node-a")
    assert rec.ipcache.map.lookup(ip_identity_key(ours)) == ip_identity_value(ours, FLAG_LOCAL)
    assert rec.sources() == {endpoint_source("10.0.0.1"), endpoint_source("10.0.0.2")}


def test_a_relist_sweeps_the_endpoints_it_did_not_deliver_again() -> None:
    rec = IpcacheReconciler(userspace_ipcache())
    first = EndpointMirror({}, set(), rec, ME)
    first.apply([up("10.0.0.1", 300), up("10.0.0.2", 301), up("10.0.0.3", 302), SYNCED])
    # a new kvstore session: the cache survives, its names are stale until listed again
    rec.begin_resync()
    second = EndpointMirror(first.cache, set(first.cache), rec, ME)
    assert second.apply([up("10.0.0.1", 300), up("10.0.0.3", 399)]) is False
    assert set(second.cache) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}  # not swept yet
    assert second.apply([SYNCED]) is True
    rec.end_resync()
    assert set(second.cache) == {"10.0.0.1", "10.0.0.3"}
    assert second.stale == set()
    assert map_of(rec) == expected_map(second.cache)
    assert second.cache["10.0.0.3"].identity == 399


_NAMES = [f"10.0.0.{i}" for i in range(1, 6)]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.lists(
            st.one_of(
                st.tuples(st.sampled_from(_NAMES), st.integers(256, 260), st.booleans()),
                st.sampled_from(_NAMES),
            ),
            max_size=8,
        ),
        max_size=6,
    ),
    st.sets(st.sampled_from(_NAMES)),
)
def test_the_mirror_matches_the_last_event_of_each_endpoint(
    batches: list[list[tuple[str, int, bool] | str]], cached: set[str]
) -> None:
    """After a resync over a cache holding ``cached``, any batches then SYNCED leave cache
    and map equal to the last upsert of each endpoint the list delivered (a delete or no
    event at all means gone)."""
    rec = IpcacheReconciler(userspace_ipcache())
    old = {name: pair(name, 1000) for name in cached}
    EndpointMirror({}, set(), rec, ME).apply([up(n, 1000) for n in cached])
    rec.flush()
    rec.begin_resync()
    mirror = EndpointMirror(dict(old), set(old), rec, ME)
    model: dict[str, IPIdentity] = {}
    for ops in batches:
        events = []
        for op in ops:
            if isinstance(op, str):
                events.append(down(op))
                model.pop(op, None)
            else:
                name, identity, ours = op
                events.append(up(name, identity, ME if ours else "node-b"))
                model[name] = pair(name, identity, ME if ours else "node-b")
        assert mirror.apply(events) is False
    assert mirror.apply([SYNCED]) is True
    rec.end_resync()
    assert mirror.cache == model
    assert map_of(rec) == expected_map(model)
    assert rec.sources() == {endpoint_source(n) for n in model}
