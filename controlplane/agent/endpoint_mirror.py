"""The agent's endpoint watch, applied: each batch of store events into the agent's cache of
the cluster's endpoints and into the ipcache reconciler.

On a cold sync this runs once for every endpoint of the cluster, so the datapath benchmark
runs this very code for its agent's-path figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from controlplane.datapath.ipcache import FLAG_LOCAL, ip_identity_key, ip_identity_value
from controlplane.datapath.reconciler import IpcacheReconciler
from controlplane.model import IPIdentity, NodeName
from controlplane.store_types import EventKind, StoreEvent

V = TypeVar("V")

ENDPOINT_PRIORITY = 2
"""An endpoint's ipcache claim: above another node's IPs (1), below our own (3)."""


def endpoint_source(name: str) -> str:
    """The reconciler source of the endpoint at key ``name``: the name itself. An endpoint's
    key name is its IP address, and every other source is ``<kind>:<name>`` (``node:a``),
    which no address text equals; the cache's key string serves, with no string per
    endpoint of the cluster."""
    return name


@dataclass(slots=True)
class EndpointMirror:
    """Mirrors the endpoint watch of one kvstore session.

    ``stale`` holds the names cached before this session's list; those the list does not
    deliver again are swept (from the cache and the ipcache) when it ends.
    """

    cache: dict[str, IPIdentity]
    stale: set[str]
    reconciler: IpcacheReconciler
    me: NodeName

    def apply(self, batch: list[StoreEvent[IPIdentity]]) -> bool:
        """Apply one batch; True when it ended a (re-)list (then the caller may end the
        reconciler's resync, once its other streams have synced too)."""
        synced = False
        cache, stale, reconciler, me = self.cache, self.stale, self.reconciler, self.me
        upsert, entry = EventKind.UPSERT, endpoint_entry
        entries: list[tuple[str, bytes, bytes]] = []  # upserts, set in one call
        add = entries.append
        for event in batch:
            name, pair = event.name, event.value
            if event.kind is upsert and pair is not None:
                if stale:
                    stale.discard(name)
                cache[name] = pair
                add(entry(name, pair, me))
                continue
            if entries:  # keep the batch's order
                reconciler.set_entries(entries, ENDPOINT_PRIORITY)
                entries.clear()
            if event.kind is EventKind.SYNCED:
                for gone in sweep_stale(cache, stale):
                    reconciler.remove(endpoint_source(gone))
                synced = True
            else:
                stale.discard(name)
                cache.pop(name, None)
                reconciler.remove(endpoint_source(name))
        if entries:
            reconciler.set_entries(entries, ENDPOINT_PRIORITY)
        return synced


def sweep_stale(cache: dict[str, V], stale: set[str]) -> set[str]:
    """At the end of a re-list: drop from ``cache`` the names still in ``stale`` (the list
    did not deliver them again) and empty ``stale`` in place; returns those names."""
    gone = set(stale)
    stale.clear()
    for name in gone:
        cache.pop(name, None)
    return gone


def endpoint_entry(name: str, pair: IPIdentity, me: NodeName) -> tuple[str, bytes, bytes]:
    """The endpoint at key ``name`` as node ``me`` writes it into the ipcache:
    ``(source, map key, map value)`` for :meth:`IpcacheReconciler.set_entries`."""
    flags = FLAG_LOCAL if pair.node == me else 0
    return endpoint_source(name), ip_identity_key(pair), ip_identity_value(pair, flags)
