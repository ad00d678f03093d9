"""Endpoints as ``Endpoint`` objects: one per pod, one store endpoint per address.

The object is namespaced and named as the pod; ``spec.addressing`` lists its addresses
keyed by family (at most one IPv4 and one IPv6), ``spec.identity.id`` its security
identity, ``spec.node`` and ``spec.hostIP`` where it runs. Labels let readers select it
without a full list: ``controlplane.io/node`` and one label per address
(``controlplane.io/ipv4``, ``controlplane.io/ipv6``). Readers see one store endpoint per
address, named by the IP as in kvstore mode; an address that disappears from an object
is a DELETE, and an IP claimed by two objects is shown as the claim of the object whose
``namespace/name`` sorts first (every node picks the same one).

Writes come from the pod's node only: :meth:`CrdEndpointStore.upsert` merges its address
into the pod's object (create, or an update guarded by the resourceVersion; a 409 is
re-read and retried with backoff). An object of another node is never overwritten, and
an IP that another node's object already publishes is refused
(:class:`EndpointConflict`), as far as the store knows (what its ipcache watch,
:meth:`CrdEndpointStore.watch_ip_identities`, has seen; without one, a label-selector read
just before the write): two nodes writing one IP into different objects at once both succeed,
and readers then pick one as above (IPAM's disjoint per-node CIDRs are what keeps IPs
unique). The node keeps what it published in memory and repairs it: an object deleted or
edited by hand is re-created or re-written (:meth:`CrdEndpointStore.run`). As for any
namespaced object, the pod's namespace must exist (else the write fails with NotFound).
"""

from __future__ import annotations

import builtins
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from controlplane.crd.client import JSON, KubeClient
from controlplane.crd.errors import AlreadyExists, Conflict, CrdError
from controlplane.crd.listwatch import KubeListWatcher, object_key
from controlplane.crd.names import (
    ENDPOINT_IPV4,
    ENDPOINT_IPV6,
    ENDPOINT_NODE,
    address_label,
    address_selector,
    label_value,
    node_selector,
)
from controlplane.crd.owner import Repairer
from controlplane.crd.records import ObjectCodec, meta_of, spec_of
from controlplane.crd.resources import ENDPOINTS
from controlplane.crd.retry import on_conflict
from controlplane.keyedlocks import KeyedLocks
from controlplane.metrics import StoreMetrics
from controlplane.model import (
    Endpoint,
    InvalidRecord,
    IPAddress,
    IPIdentity,
    ModelError,
    NodeName,
    ip_identity_from_dict,
    parse_ip,
)
from controlplane.store_types import AddressConflict, EventKind, StoreEvent, Versioned

__all__ = ["RESOURCE", "CrdEndpointStore", "EndpointConflict", "ReadOnlyStore"]

log = logging.getLogger(__name__)

RESOURCE = "endpoint"
"""The ``resource`` label of the malformed and repair metrics (as in kvstore mode)."""
FAMILIES = {4: "IPv4", 6: "IPv6"}


class ReadOnlyStore(RuntimeError):
    """A write method was called on a store built without a node (a read-only view)."""


class EndpointConflict(CrdError, AddressConflict):
    """The IP (or the pod's object) is published by another node; nothing was written."""


@dataclass(slots=True)
class _AddressBook:
    """Who claims each IP, as an ip-identity watch of this store sees it."""

    claims: dict[str, dict[str, IPIdentity]] = field(default_factory=dict)
    synced: bool = False


def _records(obj: JSON) -> list[tuple[str, dict[str, Any]]]:
    """(family, endpoint record as ``Endpoint.from_dict`` reads it) per address."""
    meta, spec = meta_of(obj), spec_of(obj)
    addressing = spec["addressing"]
    if not isinstance(addressing, list) or not addressing:
        raise InvalidRecord("spec.addressing is not a non-empty list")
    common = {
        "identity": spec["identity"]["id"],
        "node": spec["node"],
        "host_ip": spec["hostIP"],
        "name": meta["name"],
        "namespace": meta["namespace"],
    }
    out: list[tuple[str, dict[str, Any]]] = []
    for entry in addressing:
        record = {"ip": entry["ip"], "prefix_len": entry.get("prefixLen", -1), **common}
        out.append((entry["family"], record))
    if len({family for family, _ in out}) != len(out):
        raise InvalidRecord("spec.addressing names one family twice")
    return out


def _expand(obj: JSON) -> list[tuple[str, Endpoint]]:
    out: list[tuple[str, Endpoint]] = []
    for family, record in _records(obj):
        endpoint = Endpoint.from_dict(record)
        if FAMILIES[endpoint.ip.version] != family:
            raise InvalidRecord(f"address {endpoint.ip} listed as {family}")
        out.append((str(endpoint.ip), endpoint))
    return out


def _expand_ip_identities(obj: JSON) -> list[tuple[str, IPIdentity]]:
    out: list[tuple[str, IPIdentity]] = []
    for family, record in _records(obj):
        pair = ip_identity_from_dict(record)
        if FAMILIES[4 if len(pair.ip) == 4 else 6] != family:
            raise InvalidRecord(f"address {record['ip']} listed as {family}")
        out.append((str(ipaddress.ip_address(pair.ip)), pair))
    return out


def _holder(obj: JSON) -> str | None:
    """The node an existing object belongs to, or None when it names none (malformed)."""
    spec = obj.get("spec")
    node = spec.get("node") if isinstance(spec, dict) else None
    return node if isinstance(node, str) and node else None


def _entries(obj: JSON) -> list[JSON]:
    spec = obj.get("spec")
    addressing = spec.get("addressing") if isinstance(spec, dict) else None
    if not isinstance(addressing, list):
        return []
    return [e for e in addressing if isinstance(e, dict)]


def _is_ip(entry: JSON, ip: IPAddress) -> bool:
    try:
        return parse_ip(entry.get("ip")) == ip
    except ModelError:
        return False


def _labels_for(node: str, spec: JSON) -> dict[str, str]:
    labels = {ENDPOINT_NODE: label_value(node)}
    for entry in spec["addressing"]:
        key, value = address_label(parse_ip(entry["ip"]))
        labels[key] = value
    return labels


class CrdEndpointStore:
    """The CRD :class:`~controlplane.store.EndpointStore` of one node, or a read-only
    view (``node=None``: lists and watches; writes raise :class:`ReadOnlyStore`).

    Run :meth:`run` in the node's TaskGroup: it repairs this node's objects."""

    def __init__(
        self, client: KubeClient, metrics: StoreMetrics, *, node: NodeName | None = None
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.node = node
        self.codec = ObjectCodec(RESOURCE, metrics, _expand)
        self.ip_codec = ObjectCodec(RESOURCE, metrics, _expand_ip_identities)
        self._wanted: dict[str, JSON] = {}
        """namespace/name -> the spec this node wants its object to have."""
        self._where: dict[IPAddress, str] = {}
        self._locks: KeyedLocks[str] = KeyedLocks()
        self._book: _AddressBook | None = None
        self.repairer: Repairer | None = None
        if node is not None:
            self.repairer = Repairer(
                f"endpoints of {node}",
                lambda: KubeListWatcher(client, ENDPOINTS, label_selector=node_selector(node)),
                lambda: self._wanted.keys(),
                self._looks_right,
                self._reconcile,
            )

    async def run(self) -> None:
        """Repair this node's objects (deleted or edited by others) until cancelled."""
        if self.repairer is not None:
            await self.repairer.run()

    # -- writes (this node's endpoints) ----------------------------------------------

    async def upsert(self, endpoint: Endpoint) -> float:
        """Publish one of this node's endpoints; :class:`EndpointConflict` when another
        node publishes its IP or owns the pod's object, ``ValueError`` for another node's
        endpoint."""
        node = self._writer("upsert")
        if endpoint.node != node:
            raise ValueError(
                f"endpoint {endpoint.ip} belongs to node {endpoint.node!r}; "
                f"this store publishes node {node!r} only"
            )
        key = f"{endpoint.namespace}/{endpoint.name}"
        await self._take_address(endpoint.ip, key, node)
        family = FAMILIES[endpoint.ip.version]
        entry = {"family": family, "ip": str(endpoint.ip), "prefixLen": endpoint.prefix_len}

        async def step() -> float:
            current = await self.client.get_or_none(ENDPOINTS, endpoint.name, endpoint.namespace)
            addressing: dict[str, JSON] = {}
            if current is not None:
                holder = _holder(current)
                if holder is not None and holder != node:
                    self._wanted.pop(key, None)
                    raise EndpointConflict(
                        f"endpoint {key} is published by node {holder!r}; node {node!r} "
                        f"did not overwrite it",
                        status=409,
                    )
                if holder == node:
                    addressing = {str(e.get("family")): e for e in _entries(current)}
            dropped = addressing.get(family)
            addressing[family] = entry
            spec = {
                "addressing": [addressing[f] for f in sorted(addressing)],
                "identity": {"id": int(endpoint.identity)},
                "node": str(node),
                "hostIP": str(endpoint.host_ip),
            }
            self._wanted[key] = spec
            if current is not None and self._looks_right(key, current):
                # already so (a re-publish after a restart): no write, no event; nothing
                # propagates, so "issued" is now
                return time.monotonic()
            issued = await self._write(key, spec, current)
            if dropped is not None and dropped.get("ip") != entry["ip"]:
                with contextlib.suppress(ModelError):
                    self._where.pop(parse_ip(dropped.get("ip")), None)
            return issued

        async with self._locks(key):
            issued = await on_conflict(step, f"upsert endpoint {key}")
        self._where[endpoint.ip] = key
        return issued

    async def remove(self, ip: IPAddress) -> None:
        """Withdraw this node's endpoint at ``ip``; another node's object is left alone."""
        node = self._writer("remove")
        key = self._where.get(ip)
        if key is not None:
            keys = [key]
        else:  # not known in memory (published before a restart): find it
            found = await self.client.list(ENDPOINTS, label_selector=address_selector(ip))
            keys = [object_key(o) for o in found.items if _holder(o) == node]
        for key in keys:
            await self._remove_from(key, ip, node)

    async def _take_address(self, ip: IPAddress, key: str, node: str) -> None:
        """Refuse an IP another node's object publishes; drop it from our other objects."""
        claimants: dict[str, str | None] = {}
        book = self._book
        if book is not None and book.synced:
            for other, pair in book.claims.get(str(ip), {}).items():
                claimants[other] = pair.node
        else:
            found = await self.client.list(ENDPOINTS, label_selector=address_selector(ip))
            for obj in found.items:
                if any(_is_ip(e, ip) for e in _entries(obj)):
                    claimants[object_key(obj)] = _holder(obj)
        claimants.pop(key, None)
        for other, holder in sorted(claimants.items()):
            if holder is not None and holder != node:
                log.warning(
                    "IP %s is held by node %r (%s); node %r gives it up", ip, holder, other, node
                )
                raise EndpointConflict(
                    f"IP {ip} is already published by node {holder!r}; node {node!r} did not "
                    f"overwrite it",
                    status=409,
                )
        for other in sorted(claimants):
            await self._remove_from(other, ip, node)  # a stale object of ours

    async def _remove_from(self, key: str, ip: IPAddress, node: str) -> None:
        namespace, _, name = key.partition("/")

        async def step() -> None:
            current = await self.client.get_or_none(ENDPOINTS, name, namespace)
            if current is None or _holder(current) != node:
                self._wanted.pop(key, None)
                return
            entries = _entries(current)
            keep = [e for e in entries if not _is_ip(e, ip)]
            if len(keep) == len(entries):
                return
            if not keep:
                self._wanted.pop(key, None)
                meta = meta_of(current)
                await self.client.delete(
                    ENDPOINTS,
                    name,
                    namespace=namespace,
                    uid=str(meta.get("uid", "")),
                    resource_version=str(meta.get("resourceVersion", "")),
                )
                return
            spec = {**spec_of(current), "addressing": keep}
            if key in self._wanted:
                self._wanted[key] = spec
            await self._write(key, spec, current)

        async with self._locks(key):
            await on_conflict(step, f"remove {ip} from endpoint {key}")
            if self._where.get(ip) == key:
                del self._where[ip]

    async def _write(self, key: str, spec: JSON, current: JSON | None) -> float:
        """Create the object, or replace ``current`` guarded by its resourceVersion;
        :class:`Conflict` when either lost a race. Returns when the request was issued
        (``time.monotonic()``)."""
        node = self._writer("write")
        namespace, _, name = key.partition("/")
        labels = _labels_for(node, spec)
        meta: JSON = {"name": name, "namespace": namespace, "labels": labels}
        body: JSON = {"apiVersion": ENDPOINTS.api_version, "kind": ENDPOINTS.kind, "spec": spec}
        if current is None:
            body["metadata"] = meta
            issued = time.monotonic()
            try:
                await self.client.create(ENDPOINTS, body)
            except AlreadyExists:
                raise Conflict(f"endpoint {key} was created meanwhile", status=409) from None
            return issued
        old = meta_of(current)
        kept = {
            k: v
            for k, v in (old.get("labels") or {}).items()
            if k not in (ENDPOINT_NODE, ENDPOINT_IPV4, ENDPOINT_IPV6)
        }
        body["metadata"] = {**old, "labels": {**kept, **labels}}
        issued = time.monotonic()
        await self.client.replace(ENDPOINTS, body)
        return issued

    # -- repair ----------------------------------------------------------------------

    def _looks_right(self, key: str, obj: JSON) -> bool:
        spec = self._wanted.get(key)
        if spec is None or self.node is None:
            return True
        labels = meta_of(obj).get("labels") or {}
        wanted_labels = _labels_for(self.node, spec)
        return obj.get("spec") == spec and all(labels.get(k) == v for k, v in wanted_labels.items())

    async def _reconcile(self, key: str) -> None:
        node = self._writer("repair")
        namespace, _, name = key.partition("/")

        async def step() -> str | None:
            spec = self._wanted.get(key)
            if spec is None:
                return None
            current = await self.client.get_or_none(ENDPOINTS, name, namespace)
            if current is not None:
                if self._looks_right(key, current):
                    return None
                holder = _holder(current)
                if holder is not None and holder != node:
                    self._wanted.pop(key, None)
                    log.warning(
                        "endpoint %s now belongs to node %r; node %r gives it up", key, holder, node
                    )
                    return None
            await self._write(key, spec, current)
            return "deleted" if current is None else "changed"

        async with self._locks(key):
            reason = await on_conflict(step, f"repair endpoint {key}")
        if reason is not None:
            log.info("endpoint %s was %s by someone else; restored", key, reason)
            self.metrics.repairs.labels(RESOURCE, reason).inc()

    # -- reads (every node's endpoints) ----------------------------------------------

    async def list(self) -> builtins.list[Versioned[Endpoint]]:
        return self.codec.decode_all((await self.client.list(ENDPOINTS)).items)

    def watch(self) -> AsyncIterator[StoreEvent[Endpoint]]:
        return self.codec.watch(KubeListWatcher(self.client, ENDPOINTS))

    def watch_ip_identities(self) -> AsyncIterator[builtins.list[StoreEvent[IPIdentity]]]:
        """:meth:`watch`, as the ipcache needs it. While one runs (an agent's ipcache
        watch always does), who claims each IP is known here, and :meth:`upsert` checks
        an IP against it instead of listing the API server."""
        return self._ip_identities()

    async def _ip_identities(self) -> AsyncIterator[builtins.list[StoreEvent[IPIdentity]]]:
        book = _AddressBook()
        self._book = book
        try:
            watcher = KubeListWatcher(self.client, ENDPOINTS)
            async for batch in self.ip_codec.watch_batches(watcher, book.claims):
                if not book.synced and any(e.kind is EventKind.SYNCED for e in batch):
                    book.synced = True
                yield batch
        finally:
            if self._book is book:
                self._book = None

    def _writer(self, what: str) -> NodeName:
        if self.node is None:
            raise ReadOnlyStore(f"cannot {what} endpoints: this endpoint store is read-only")
        return self.node
