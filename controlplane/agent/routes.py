"""Routes to the other nodes' pod CIDRs (``--routes``), kept equal to the node cache.

Every change of the node cache wakes :meth:`RouteSyncer.run`, which makes the routes
(only those of our own protocol number, see :class:`~controlplane.datapath.routes.RouteManager`)
match "every other node's pod CIDRs via that node's first IP of the CIDR's family". Not
before the node list was known once: a new process would otherwise delete the routes of
nodes it has not listed yet, while forwarding still uses them. Failures retry with
backoff (a gateway not reachable yet, a missing netns).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from controlplane.datapath.routes import RouteManager
from controlplane.model import IPAddress, IPNetwork, Node, NodeName

log = logging.getLogger(__name__)


class RouteSyncer:
    """Programs the routes to other nodes (a no-op when ``manager`` is None)."""

    def __init__(
        self,
        node: NodeName,
        nodes: Mapping[str, Node],
        manager: RouteManager | None,
        *,
        netns: str | None,
    ) -> None:
        self.node = node
        self.nodes = nodes
        self.manager = manager
        self.netns = netns
        self.error: str | None = None
        self.synced = 0
        self.nodes_listed = False
        """Set once the node list was known (the first sync waits for it)."""
        self._wake = asyncio.Event()

    def changed(self) -> None:
        """The node cache changed: re-sync the routes soon."""
        self._wake.set()

    def desired(self) -> dict[IPNetwork, IPAddress]:
        """Every other node's pod CIDRs → that node's first IP of the CIDR's family."""
        desired: dict[IPNetwork, IPAddress] = {}
        for node in self.nodes.values():
            if node.name == self.node:
                continue
            for cidr in node.pod_cidrs:
                gateway = next((ip for ip in node.ips if ip.version == cidr.version), None)
                if gateway is not None:
                    desired[cidr] = gateway
        return desired

    async def run(self, stop: asyncio.Event) -> None:
        if self.manager is None:
            return
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.nodes_listed:
                continue
            ok = await self.sync()
            failures = 0 if ok else failures + 1
            if failures and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(30.0, 0.5 * 2 ** min(failures, 6))):
                        await stop.wait()
                self._wake.set()

    async def sync(self) -> bool:
        """Make the routes match the node cache now; False when something failed."""
        if self.manager is None:
            return True
        try:
            result = await self.manager.sync_async(self.desired())
        except Exception as exc:  # RouteError, NetlinkError, LoaderError (setns), OSError
            error = f"{type(exc).__name__}: {exc}"
            if error != self.error:
                log.error("%s: routes not programmed: %s", self.node, error)
            self.error = error
            return False
        self.synced += 1
        if result.errors:
            self.error = "; ".join(
                f"{k}: {v}" for k, v in sorted(result.errors.items(), key=lambda kv: str(kv[0]))
            )
            return False
        self.error = None
        return True

    async def remove_all(self) -> None:
        """``--cleanup-on-exit``: remove every route this node programmed."""
        if self.manager is None:
            return
        try:
            removed = await asyncio.to_thread(self.manager.flush)
        except Exception as exc:
            log.error("%s: removing the routes failed: %s", self.node, exc)
        else:
            log.info("%s: removed %d routes to other nodes", self.node, removed)

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.manager is not None,
            "netns": self.netns,
            "desired": len(self.desired()) if self.manager is not None else 0,
            "syncs": self.synced,
            "error": self.error,
        }
