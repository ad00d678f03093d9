"""Node records as ``Node`` objects (cluster-scoped, named as the node).

The agent owns ``spec.addresses``, ``spec.bootID`` and ``spec.flowsAddress`` (its Observer
API for cp-relay, when it serves one over TCP) and writes them with a merge patch
that names only those fields, so ``spec.podCIDRs`` (the operator's) and the status (the
node's IP leases, :mod:`controlplane.crd.ipam`) are never touched by a registration.
Readers get ``Node(name, ips, pod_cidrs, boot_id)`` from spec. The node keeps what it
registered in memory and re-creates or re-writes it when the object is deleted or edited
by hand (:meth:`CrdNodeStore.run`).
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import AsyncIterator

from controlplane.crd.client import JSON, KubeClient
from controlplane.crd.endpoints import ReadOnlyStore
from controlplane.crd.errors import AlreadyExists, Conflict
from controlplane.crd.listwatch import KubeListWatcher
from controlplane.crd.owner import Repairer
from controlplane.crd.records import ObjectCodec, meta_of
from controlplane.crd.resources import NODES
from controlplane.crd.retry import on_conflict
from controlplane.metrics import StoreMetrics
from controlplane.model import InvalidRecord, Node, NodeName, parse_node_name
from controlplane.store_types import StoreEvent, Versioned

__all__ = ["RESOURCE", "CrdNodeStore", "node_object"]

log = logging.getLogger(__name__)

RESOURCE = "node"


def _expand(obj: JSON) -> list[tuple[str, Node]]:
    name = parse_node_name(meta_of(obj).get("name"))
    spec = obj.get("spec") or {}
    if not isinstance(spec, dict):
        raise InvalidRecord("spec is not an object")
    addresses = spec.get("addresses") or []
    if not isinstance(addresses, list):
        raise InvalidRecord("spec.addresses is not a list")
    node = Node.from_dict(
        {
            "name": name,
            "ips": [a["ip"] for a in addresses],
            "pod_cidrs": spec.get("podCIDRs") or [],
            "boot_id": spec.get("bootID") or "",
            "flows_address": spec.get("flowsAddress") or "",
        }
    )
    return [(name, node)]


def node_object(name: str, spec: JSON | None = None) -> JSON:
    return {
        "apiVersion": NODES.api_version,
        "kind": NODES.kind,
        "metadata": {"name": name},
        "spec": spec or {},
    }


class CrdNodeStore:
    """The CRD :class:`~controlplane.store.NodeStore` of one node, or a read-only view
    (``node=None``). Run :meth:`run` in the node's TaskGroup (self-repair)."""

    def __init__(
        self, client: KubeClient, metrics: StoreMetrics, *, node: NodeName | None = None
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.node = node
        self.codec = ObjectCodec(RESOURCE, metrics, _expand)
        self._wanted: JSON | None = None
        """The spec fields this node registered (addresses, bootID)."""
        self.repairer: Repairer | None = None
        if node is not None:
            self.repairer = Repairer(
                f"node {node}",
                lambda: KubeListWatcher(client, NODES, field_selector=f"metadata.name={node}"),
                lambda: [node] if self._wanted is not None else [],
                lambda _key, obj: self._looks_right(obj),
                lambda _key: self._reconcile(repair=True),
            )

    async def run(self) -> None:
        if self.repairer is not None:
            await self.repairer.run()

    # -- writes (this node's record) -------------------------------------------------

    async def register(self, node: Node) -> None:
        """Publish (or update) this node's addresses, boot ID and flows address
        (``node.pod_cidrs`` is the operator's to write and is ignored here)."""
        name = self._writer("register")
        if node.name != name:
            raise ValueError(f"node {node.name!r} is not this store's node {name!r}")
        self._wanted = {
            "addresses": [{"type": "InternalIP", "ip": str(ip)} for ip in node.ips],
            "bootID": node.boot_id,
        }
        if node.flows_address:  # (only when served: no churn for the nodes without)
            self._wanted["flowsAddress"] = node.flows_address
        await self._reconcile(repair=False)

    async def deregister(self) -> None:
        """Delete this node's object (and with it the IP leases in its status)."""
        name = self._writer("deregister")
        self._wanted = None
        await self.client.delete(NODES, name)

    def _looks_right(self, obj: JSON) -> bool:
        wanted = self._wanted
        if wanted is None:
            return True
        spec = obj.get("spec")
        return isinstance(spec, dict) and all(spec.get(k) == v for k, v in wanted.items())

    async def _reconcile(self, *, repair: bool) -> None:
        name = self._writer("write")

        async def step() -> str | None:
            wanted = self._wanted
            if wanted is None:
                return None
            current = await self.client.get_or_none(NODES, name)
            if current is None:
                try:
                    await self.client.create(NODES, node_object(name, dict(wanted)))
                except AlreadyExists:
                    raise Conflict(f"node {name} was created meanwhile", status=409) from None
                return "deleted"
            if self._looks_right(current):
                return None
            await self.client.patch(NODES, name, {"spec": dict(wanted)})
            return "changed"

        reason = await on_conflict(step, f"register node {name}")
        if repair and reason is not None:
            log.info("node %s was %s by someone else; restored", name, reason)
            self.metrics.repairs.labels(RESOURCE, reason).inc()

    # -- reads -----------------------------------------------------------------------

    async def get(self, name: NodeName) -> Versioned[Node] | None:
        obj = await self.client.get_or_none(NODES, name)
        return None if obj is None else self.codec.decode_one(obj)

    async def list(self) -> builtins.list[Versioned[Node]]:
        return self.codec.decode_all((await self.client.list(NODES)).items)

    def watch(self) -> AsyncIterator[StoreEvent[Node]]:
        return self.codec.watch(KubeListWatcher(self.client, NODES))

    def _writer(self, what: str) -> NodeName:
        if self.node is None:
            raise ReadOnlyStore(f"cannot {what} a node: this node store is read-only")
        return self.node
