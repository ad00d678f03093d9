"""Routes to other nodes' pod CIDRs, reconciled with the kernel through pyroute2.

:class:`RouteManager` owns the routes of one routing table that carry its own route
protocol number (``RTPROT_CP`` by default): :meth:`RouteManager.sync` makes exactly the
desired ``{pod CIDR: node IP}`` set exist among them (add, replace a changed gateway,
delete what is no longer wanted) and never touches a route with another protocol, even in
the same table. A desired prefix already held by a foreign route (an administrator's, a
routing daemon's) is left alone and reported as a conflict.

The calls are blocking netlink round trips. pyroute2's synchronous ``IPRoute`` refuses to
start inside a running asyncio loop, so from the agent use :meth:`RouteManager.sync_async`
(``asyncio.to_thread`` around :meth:`RouteManager.sync`); never call ``sync`` on the loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from typing import Any, Final

from controlplane.datapath.loader import in_netns
from controlplane.model import IPAddress, IPNetwork

__all__ = ["RTPROT_CP", "RT_TABLE_MAIN", "RouteError", "RouteManager", "SyncResult"]

log = logging.getLogger(__name__)

RT_TABLE_MAIN: Final = 254
# Unassigned in /etc/iproute2/rt_protos (kernel, boot, static, dhcp, bird, bgp... are).
RTPROT_CP: Final = 201
_AF_INET: Final = 2
_AF_INET6: Final = 10


class RouteError(RuntimeError):
    """Reading the routing table failed (the netlink socket could not be used)."""


@dataclass(slots=True)
class SyncResult:
    """What one :meth:`RouteManager.sync` changed, and what it could not."""

    added: list[IPNetwork] = field(default_factory=list)
    replaced: list[IPNetwork] = field(default_factory=list)
    deleted: list[IPNetwork] = field(default_factory=list)
    unchanged: int = 0
    conflicts: list[IPNetwork] = field(default_factory=list)  # held by a foreign route
    errors: dict[IPNetwork, str] = field(default_factory=dict)  # e.g. gateway unreachable

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.deleted)


@dataclass(frozen=True, slots=True)
class _Route:
    dst: IPNetwork
    gateway: IPAddress | None
    proto: int
    priority: int


class RouteManager:
    """Reconciles ``{pod CIDR → via node IP}`` with one kernel routing table.

    ``netns`` (a name under /run/netns or a path) is for tests; the agent uses its own
    namespace (None).
    """

    def __init__(
        self,
        *,
        table: int = RT_TABLE_MAIN,
        proto: int = RTPROT_CP,
        netns: str | None = None,
    ) -> None:
        if not 0 < table < 2**32:
            raise ValueError(f"route table {table} out of range")
        if not 0 < proto < 256:
            raise ValueError(f"route protocol {proto} out of range (1..255)")
        self.table = table
        self.proto = proto
        self.netns = netns

    @contextmanager
    def _ipr(self) -> Iterator[Any]:
        from pyroute2 import IPRoute

        with in_netns(self.netns):
            ipr = IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()

    def _dump(self, ipr: Any) -> list[_Route]:
        from pyroute2 import NetlinkError

        routes: list[_Route] = []
        for family, width in ((_AF_INET, 32), (_AF_INET6, 128)):
            try:
                msgs = ipr.route("dump", family=family, table=self.table)
            except NetlinkError as e:
                raise RouteError(f"dump table {self.table}: {e}") from e
            for msg in msgs:
                if msg.get("type", 1) != 1:  # unicast only (not local/broadcast/...)
                    continue
                table = msg.get_attr("RTA_TABLE") or msg.get("table")
                if table != self.table:
                    continue
                dst = msg.get_attr("RTA_DST")
                prefix = ip_network(f"{dst or ('::' if width == 128 else '0.0.0.0')}/"
                                    f"{msg.get('dst_len', 0)}")  # fmt: skip
                gw = msg.get_attr("RTA_GATEWAY")
                routes.append(
                    _Route(
                        prefix,
                        None if gw is None else ip_address(gw),
                        int(msg.get("proto", 0)),
                        int(msg.get_attr("RTA_PRIORITY") or 0),
                    )
                )
        return routes

    def owned(self) -> dict[IPNetwork, IPAddress | None]:
        """Our routes in the table right now: prefix → gateway."""
        with self._ipr() as ipr:
            return {r.dst: r.gateway for r in self._dump(ipr) if r.proto == self.proto}

    def sync(self, desired: Mapping[IPNetwork, IPAddress]) -> SyncResult:
        """Make our routes in the table exactly ``desired`` (prefix → gateway).

        Idempotent; a failed route (gateway not on a connected network, ...) is reported in
        ``errors`` and retried by the next call, the others are still applied.
        """
        from pyroute2 import NetlinkError

        result = SyncResult()
        with self._ipr() as ipr:
            current = self._dump(ipr)
            ours = {r.dst: r for r in current if r.proto == self.proto}
            foreign = {r.dst for r in current if r.proto != self.proto}
            for dst, gateway in desired.items():
                have = ours.get(dst)
                if have is not None and have.gateway == gateway:
                    result.unchanged += 1
                    continue
                if have is None and dst in foreign:
                    result.conflicts.append(dst)
                    continue
                try:
                    ipr.route(
                        "replace",
                        dst=str(dst),
                        gateway=str(gateway),
                        table=self.table,
                        proto=self.proto,
                        family=_AF_INET6 if dst.version == 6 else _AF_INET,
                    )
                except NetlinkError as e:
                    result.errors[dst] = f"{e.args[1] if len(e.args) > 1 else e}"
                    continue
                (result.added if have is None else result.replaced).append(dst)
            for dst, route in ours.items():
                if dst in desired:
                    continue
                try:
                    self._delete(ipr, route)
                except NetlinkError as e:
                    if e.code != errno.ESRCH:
                        result.errors[dst] = f"{e.args[1] if len(e.args) > 1 else e}"
                        continue
                result.deleted.append(dst)
        if result.changed or result.errors or result.conflicts:
            log.info(
                "routes: +%d ~%d -%d =%d%s%s",
                len(result.added),
                len(result.replaced),
                len(result.deleted),
                result.unchanged,
                f", conflicts {[str(c) for c in result.conflicts]}" if result.conflicts else "",
                f", errors { {str(k): v for k, v in result.errors.items()} }"
                if result.errors
                else "",
            )
        return result

    async def sync_async(self, desired: Mapping[IPNetwork, IPAddress]) -> SyncResult:
        """:meth:`sync` in a worker thread (for callers on an event loop)."""
        return await asyncio.to_thread(self.sync, dict(desired))

    def flush(self) -> int:
        """Delete every route of ours in the table (agent cleanup); returns how many."""
        return len(self.sync({}).deleted)

    def _delete(self, ipr: Any, route: _Route) -> None:
        kwargs: dict[str, Any] = {
            "dst": str(route.dst),
            "table": self.table,
            "proto": self.proto,
            "family": _AF_INET6 if route.dst.version == 6 else _AF_INET,
        }
        if route.priority:
            kwargs["priority"] = route.priority
        ipr.route("del", **kwargs)
