"""The node's service load balancing: the cache's services, written to the LB maps.

Any change of a service wakes :meth:`ServiceFlusher.run`, which turns every cached
service into frontends ``(VIP, port, protocol)`` -> ordered backends and lets
:class:`~controlplane.datapath.lbmap.LbMaps` write only the differences (new backend sets
under a new revision, then the flip, then the sweep). Changes that arrive during a flush
form the next batch. Nothing is written before the services were listed once in a
session: a new process on pinned maps keeps serving what they hold (a SIGKILLed agent's
last truth) rather than a half-known one, and its first flush is a mark-and-sweep.

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


def desired_frontends(
    services: Mapping[str, Service],
) -> tuple[dict[FrontendAddr, list[BackendAddr]], dict[FrontendAddr, FrontendOwner], list[str]]:
    """Every service's frontends with their backends (sorted, so that a backend keeps its
    slot while the set is unchanged), who owns each, and the conflicts."""
    desired: dict[FrontendAddr, list[BackendAddr]] = {}
    owners: dict[FrontendAddr, FrontendOwner] = {}
    conflicts: list[str] = []
    for sid in sorted(services):
        service = services[sid]
        vip = _v4(service.cluster_ip)
        for fe in service.frontends:
            addr = FrontendAddr(vip, fe.port, fe.protocol)
            if addr in owners:
                conflicts.append(
                    f"{sid}: frontend {vip}:{fe} already belongs to {owners[addr].service}"
                )
                continue
            backends = sorted(BackendAddr(_v4(be.ip), be.port) for be in service.backends_of(fe))
            desired[addr] = backends
            owners[addr] = FrontendOwner(sid, f"{vip}:{fe}", fe.name)
    return desired, owners, conflicts


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
        self.synced_revision = 0
        """How many flushes wrote the maps successfully (tests wait on it)."""
        self.written_at: dict[FrontendAddr, float] = {}
        """Frontend -> when (monotonic) its current backend set was flipped in: the end of
        a store-to-map latency measurement."""
        self._listed_once = False

    def flush(self) -> bool | None:
        """Write the differences; False when the services are not listed yet (nothing
        written), None when a map write failed (the caller retries)."""
        if not self._listed_once:
            self._listed_once = self._inputs_listed()
            if not self._listed_once:
                return False
        desired, owners, conflicts = desired_frontends(self.services)
        for conflict in conflicts:
            if conflict not in self.conflicts:
                log.warning("service frontend conflict: %s", conflict)
        self.conflicts = conflicts
        self.flushes += 1
        if not self.maps.sync(desired):
            return None
        now = time.monotonic()
        for addr in self.maps.last_flipped:
            self.written_at[addr] = now
        for addr in [a for a in self.written_at if a not in owners]:
            del self.written_at[addr]
        self.owners = owners
        self.synced_revision += 1
        return True

    def status(self) -> dict[str, Any]:
        return {
            "services": len(self.services),
            "frontends": len(self.maps.frontend_ids),
            "flushes": self.flushes,
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
