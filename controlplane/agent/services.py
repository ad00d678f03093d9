"""The node's service load balancing: the cache's services, written to the LB maps.

Each change of a service (a watch event names it) wakes :meth:`ServiceFlusher.run`,
which recomputes the frontends ``(VIP, port, protocol)`` -> ordered backends of the
services that changed and lets :class:`~controlplane.datapath.lbmap.LbMaps` write only
those (new backend sets under a new revision, then the flip, then the old sets' slots).
Changes that arrive during a flush form the next batch, so a flush costs what changed,
not the number of services. Nothing is written before the services were listed once in a
session: a new process on pinned maps keeps serving what they hold (a SIGKILLed agent's
last truth) rather than a half-known one, and its first flush is a mark-and-sweep of the
whole state (as after every re-list, and after a failed write).

Two services may not share a frontend: the one with the smallest ``namespace/name``
wins, the other's frontend is reported as a conflict (logged once, in the status).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric

from controlplane.agent.flushing import Flusher
from controlplane.datapath.bpf_syscall import KernelMapError
from controlplane.datapath.lbmap import BackendAddr, FrontendAddr, LbMaps
from controlplane.model import IPAddress, Service

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FrontendOwner:
    """Which service (and which of its frontends) a datapath frontend belongs to."""

    service: str
    frontend: str
    """``VIP:port/PROTO``."""
    name: str
    """The frontend's name (empty when the service has one unnamed frontend)."""


_Frontends = dict[FrontendAddr, tuple[list[BackendAddr], FrontendOwner]]


def service_frontends(sid: str, service: Service) -> _Frontends:
    """One service's frontends with their backends (sorted, so that a backend keeps its
    slot while the set is unchanged)."""
    vip = _v4(service.cluster_ip)
    out: _Frontends = {}
    for fe in service.frontends:
        backends = sorted(BackendAddr(_v4(be.ip), be.port) for be in service.backends_of(fe))
        out[FrontendAddr(vip, fe.port, fe.protocol)] = (
            backends,
            FrontendOwner(sid, f"{vip}:{fe}", fe.name),
        )
    return out


class _FrontendIndex:
    """Every service's frontends and who claims each datapath frontend."""

    def __init__(self) -> None:
        self.of: dict[str, _Frontends] = {}
        self.claims: dict[FrontendAddr, set[str]] = {}

    def set(self, sid: str, service: Service | None) -> set[FrontendAddr]:
        """Record ``sid``'s frontends (None: gone); the frontends whose winner may change."""
        old = self.of.pop(sid, {})
        new = service_frontends(sid, service) if service is not None else {}
        if new:
            self.of[sid] = new
        for addr in old.keys() - new.keys():
            claimants = self.claims[addr]
            claimants.discard(sid)
            if not claimants:
                del self.claims[addr]
        for addr in new:
            self.claims.setdefault(addr, set()).add(sid)
        return old.keys() | new.keys()

    def winner(self, addr: FrontendAddr) -> tuple[list[BackendAddr], FrontendOwner] | None:
        claimants = self.claims.get(addr)
        return None if not claimants else self.of[min(claimants)][addr]

    def conflicts(self) -> list[str]:
        out = []
        for addr, claimants in self.claims.items():
            if len(claimants) > 1:
                owner = min(claimants)
                for sid in sorted(claimants - {owner}):
                    frontend = self.of[sid][addr][1].frontend
                    out.append(f"{sid}: frontend {frontend} already belongs to {owner}")
        return sorted(out)

    @classmethod
    def of_services(cls, services: Mapping[str, Service]) -> _FrontendIndex:
        index = cls()
        for sid, service in services.items():
            index.set(sid, service)
        return index

    def desired(
        self,
    ) -> tuple[dict[FrontendAddr, list[BackendAddr]], dict[FrontendAddr, FrontendOwner]]:
        """Every frontend's winning backends, and who owns each."""
        desired: dict[FrontendAddr, list[BackendAddr]] = {}
        owners: dict[FrontendAddr, FrontendOwner] = {}
        for addr, claimants in self.claims.items():
            desired[addr], owners[addr] = self.of[min(claimants)][addr]
        return desired, owners


def desired_frontends(
    services: Mapping[str, Service],
) -> tuple[dict[FrontendAddr, list[BackendAddr]], dict[FrontendAddr, FrontendOwner], list[str]]:
    """Every service's frontends with their backends, who owns each, and the conflicts."""
    index = _FrontendIndex.of_services(services)
    return (*index.desired(), index.conflicts())


def _v4(ip: IPAddress) -> IPv4Address:
    if not isinstance(ip, IPv4Address):  # the model takes IPv4 services only
        raise AssertionError(f"not an IPv4 address: {ip}")
    return ip


class ServiceFlusher(Flusher):
    """Keeps the LB maps equal to the services in the cache."""

    def __init__(
        self,
        services: Mapping[str, Service],
        maps: LbMaps,
        inputs_listed: Callable[[], bool],
    ) -> None:
        super().__init__()
        self.services = services
        self.maps = maps
        self._inputs_listed = inputs_listed
        self.owners: dict[FrontendAddr, FrontendOwner] = {}
        self.conflicts: list[str] = []
        self.flushes = 0
        self.full_syncs = 0
        self.synced_revision = 0
        """How many flushes wrote the maps successfully (tests wait on it)."""
        self.written_at: dict[FrontendAddr, float] = {}
        """Frontend -> when (monotonic) its current backend set was flipped in: the end of
        a store-to-map latency measurement."""
        self._index = _FrontendIndex()
        self._dirty: set[str] = set()
        self._full = True
        self._listed_once = False

    def changed(self, name: str | None = None) -> None:
        """Service ``name`` changed (None: any may have, after a (re-)list): flush soon."""
        if name is None:
            self._full = True
        else:
            self._dirty.add(name)
        super().changed()

    def flush(self) -> bool | None:
        """Write the differences; False when the services are not listed yet (nothing
        written), None when a map write failed (the caller retries, with a full sync)."""
        if not self._listed_once:
            self._listed_once = self._inputs_listed()
            if not self._listed_once:
                return False
        self.flushes += 1
        if not (self._full_sync() if self._full else self._update()):
            self._full = True  # the maps are read again and compared whole
            return None
        now = time.monotonic()
        for addr in self.maps.last_flipped:
            self.written_at[addr] = now
        self.synced_revision += 1
        return True

    def _full_sync(self) -> bool:
        self._dirty.clear()
        self._full = False
        self._index = _FrontendIndex.of_services(self.services)
        desired, owners = self._index.desired()
        self._conflicts_changed(self._index.conflicts())
        self.full_syncs += 1
        if not self.maps.sync(desired):
            return False
        self.owners = owners
        self.written_at = {a: t for a, t in self.written_at.items() if a in owners}
        return True

    def _update(self) -> bool:
        dirty, self._dirty = self._dirty, set()
        affected: set[FrontendAddr] = set()
        for sid in dirty:
            affected |= self._index.set(sid, self.services.get(sid))
        changes: dict[FrontendAddr, list[BackendAddr] | None] = {}
        for addr in affected:
            won = self._index.winner(addr)
            if won is None:
                changes[addr] = None
                self.owners.pop(addr, None)
                self.written_at.pop(addr, None)
            else:
                changes[addr], self.owners[addr] = won
        self._conflicts_changed(self._index.conflicts())
        return self.maps.update(changes)

    def _conflicts_changed(self, conflicts: list[str]) -> None:
        for conflict in conflicts:
            if conflict not in self.conflicts:
                log.warning("service frontend conflict: %s", conflict)
        self.conflicts = conflicts

    def status(self) -> dict[str, Any]:
        return {
            "services": len(self.services),
            "frontends": len(self.maps.frontend_ids),
            "flushes": self.flushes,
            "full_syncs": self.full_syncs,
            "map_updates": self.maps.stats.updates,
            "map_deletes": self.maps.stats.deletes,
            "conflicts": list(self.conflicts),
        }


class ServiceCounters:
    """A collector of the socket LB's per-frontend counters, read from ``cp_lb_metrics``
    at each scrape: ``cp_service_connections_total{service, frontend, result}`` with
    result ``connect`` (a connect() translated), ``datagram`` (an unconnected UDP
    datagram translated) or ``refused`` (no backend: ECONNREFUSED)."""

    def __init__(self, flusher: ServiceFlusher) -> None:
        self.flusher = flusher
        self._failing = False

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        maps = self.flusher.maps
        try:
            for addr, fid in maps.frontend_ids.items():
                counters = maps.counters(fid)
                owner = self.flusher.owners.get(addr)
                if counters is None or owner is None:
                    continue
                for result, value in (
                    ("connect", counters.connects),
                    ("datagram", counters.datagrams),
                    ("refused", counters.refused),
                ):
                    family.add_metric([owner.service, owner.frontend, result], value)
        except (KernelMapError, OSError) as exc:
            if not self._failing:
                log.warning("service counters unreadable: %s", exc)
            self._failing = True
        else:
            self._failing = False
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "cp_service_connections",
            "Connections (and unconnected UDP datagrams) to service frontends, by result",
            labels=["service", "frontend", "result"],
        )
