"""Services in CRD mode: Kubernetes ``v1`` Services and their ``discovery.k8s.io/v1``
EndpointSlices, as the model's :class:`~controlplane.model.Service`.

**Where backends come from.** From EndpointSlices, as Cilium and kube-proxy take them:
a backend is an endpoint of a slice labelled ``kubernetes.io/service-name`` with the
service's name, in its namespace, whose ``conditions.ready`` is not false, with the slice
port of the service port's name (and protocol) as its port and ``nodeName`` as its node.
In a real cluster kube-controller-manager writes those slices from the Pods (with their
readiness); the agent computes nothing. A cluster without that controller (the local API
server of ``cpctl up`` has no Pods) runs :class:`EndpointSliceController`, which does the
same from the ``controlplane.io`` Endpoint objects (our pods) and their Identities' labels.
Why not have every agent compute backends from the selector: it would ignore readiness,
selector-less services with hand-written slices (external backends) would not work, and
every agent would join Services x Endpoints x Identities itself instead of reading one
small object per service.

**The mapping** (docs/architecture.md): ``cluster_ip`` is ``spec.clusterIP``; a frontend
is a ``spec.ports[]`` entry (``name``, ``port``, ``protocol`` TCP or UDP); backends as
above, the port's name as ``frontend``. Not balanced, each counted in
:attr:`CrdServiceStore.skipped` by reason and logged once when a service starts being
skipped (not an error: these are valid Services): ``headless`` (no cluster IP),
``external-name``, ``ipv6``, ``no-tcp-udp-ports`` (SCTP only). SCTP ports of a service
are left out; IPv6 and FQDN slices are ignored. A Service or slice that does not decode
(or that the model refuses: more than 1024 backends on a port...) is logged, counted in
``cp_store_malformed_values_total{resource="service"}`` and skipped, as every CRD store
does.

**Writes** (``cpctl service put`` in CRD mode, the store contract): a selector-less
Service with the given cluster IP and ports, and one EndpointSlice ``<name>-cpctl``
(managed-by ``cpctl.controlplane.io``) with the backends. The cluster IP of a Service is
immutable: a put that changes it deletes the Service and creates it again.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Address
from typing import Final

from controlplane.crd.client import JSON, ApiResource, KubeClient
from controlplane.crd.errors import AlreadyExists, Conflict, CrdError, Invalid, NotFound
from controlplane.crd.listwatch import (
    EventType,
    KubeEvent,
    KubeListWatcher,
    object_revision,
    revision_of,
)
from controlplane.crd.records import MALFORMED, meta_of
from controlplane.crd.resources import ENDPOINTS, IDENTITIES
from controlplane.crd.retry import on_conflict
from controlplane.metrics import StoreMetrics
from controlplane.model import (
    SERVICE_PROTOCOLS,
    Backend,
    Frontend,
    InvalidRecord,
    ModelError,
    NodeName,
    Service,
    parse_ip,
)
from controlplane.store_types import EventKind, StoreEvent, Versioned

__all__ = [
    "CONTROLLER_MANAGER",
    "CPCTL_MANAGER",
    "ENDPOINT_SLICES",
    "MANAGED_BY",
    "RESOURCE",
    "SERVICES",
    "SERVICE_NAME",
    "CrdServiceStore",
    "EndpointSliceController",
    "desired_slice",
    "service_from",
]

log = logging.getLogger(__name__)

RESOURCE = "service"
"""The ``resource`` label of the malformed metric (as in kvstore mode)."""
SERVICES: Final = ApiResource("", "v1", "services", "Service", namespaced=True)
ENDPOINT_SLICES: Final = ApiResource(
    "discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", namespaced=True
)
SERVICE_NAME: Final = "kubernetes.io/service-name"
"""EndpointSlice label: the service it belongs to (kube's)."""
MANAGED_BY: Final = "endpointslice.kubernetes.io/managed-by"
"""EndpointSlice label: who writes it (kube's controller: endpointslice-controller.k8s.io)."""
CONTROLLER_MANAGER: Final = "endpointslice-controller.controlplane.io"
CPCTL_MANAGER: Final = "cpctl.controlplane.io"


class Skip(Exception):
    """A valid Service the datapath does not balance; ``reason`` is the counter's key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- Kubernetes objects -> the model -------------------------------------------------------


def _frontends(spec: JSON) -> list[Frontend]:
    ports = spec.get("ports") or []
    if not isinstance(ports, list):
        raise InvalidRecord("spec.ports is not a list")
    out: list[Frontend] = []
    for port in ports:
        protocol = str(port.get("protocol") or "TCP")
        if protocol not in SERVICE_PROTOCOLS:
            continue  # SCTP: not balanced
        out.append(
            Frontend(
                port=port["port"], protocol=SERVICE_PROTOCOLS[protocol], name=port.get("name") or ""
            )
        )
    return out


def _ready(endpoint: JSON) -> bool:
    conditions = endpoint.get("conditions") or {}
    return conditions.get("ready") is not False  # kube: unset means ready


def _backends(frontends: list[Frontend], slices: Iterable[JSON]) -> list[Backend]:
    by_name = {fe.name: fe for fe in frontends}
    seen: set[tuple[str, IPv4Address, int]] = set()
    out: list[Backend] = []
    for obj in slices:
        if obj.get("addressType") != "IPv4":
            continue
        ports: list[tuple[Frontend, int]] = []
        for port in obj.get("ports") or []:
            name = port.get("name") or ""
            fe = by_name.get(name)
            if fe is None and len(frontends) == 1 and not name:
                fe = frontends[0]
            number = port.get("port")
            protocol = SERVICE_PROTOCOLS.get(str(port.get("protocol") or "TCP"))
            if fe is None or number is None or protocol != fe.protocol:
                continue
            ports.append((fe, int(number)))
        for endpoint in obj.get("endpoints") or []:
            if not _ready(endpoint):
                continue
            node_name = endpoint.get("nodeName")
            node = NodeName(node_name) if isinstance(node_name, str) and node_name else None
            for address in endpoint["addresses"]:
                ip = parse_ip(address)
                if not isinstance(ip, IPv4Address):
                    raise InvalidRecord(f"address {address} in an IPv4 slice")
                for fe, number in ports:
                    key = (fe.name, ip, number)
                    if key in seen:
                        continue
                    seen.add(key)
                    out.append(Backend(ip=ip, port=number, node=node, frontend=fe.name))
    out.sort(key=lambda b: (b.frontend, b.ip, b.port))
    return out


def service_from(obj: JSON, slices: Iterable[JSON]) -> Service:
    """The model of a Service and its slices; :class:`Skip` for a service we do not
    balance; ModelError/ValueError/KeyError/TypeError when malformed."""
    meta = meta_of(obj)
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise InvalidRecord("spec is missing or not an object")
    if spec.get("type") == "ExternalName":
        raise Skip("external-name")
    cluster_ip = spec.get("clusterIP") or ""
    if cluster_ip in ("", "None"):
        raise Skip("headless")
    ip = parse_ip(cluster_ip)
    if not isinstance(ip, IPv4Address):
        raise Skip("ipv6")
    frontends = _frontends(spec)
    if not frontends:
        raise Skip("no-tcp-udp-ports")
    return Service(
        namespace=meta["namespace"],
        name=meta["name"],
        cluster_ip=ip,
        frontends=tuple(frontends),
        backends=tuple(_backends(frontends, slices)),
    )


def _key(obj: JSON) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _owner(slice_obj: JSON) -> str | None:
    """``namespace/service`` of a slice, from its service-name label."""
    meta = slice_obj.get("metadata") or {}
    service = (meta.get("labels") or {}).get(SERVICE_NAME)
    return f"{meta.get('namespace', '')}/{service}" if service else None


@dataclass
class _Join:
    """Services and slices as the two watches delivered them, joined per service."""

    services: dict[str, JSON] = field(default_factory=dict)
    slices: dict[str, dict[str, JSON]] = field(default_factory=dict)
    """service key -> {slice key: slice}."""
    slice_owner: dict[str, str] = field(default_factory=dict)

    def apply(self, source: str, event: KubeEvent, affected: set[str]) -> None:
        if source == "service":
            affected.add(event.key)
            if event.type is EventType.PUT and event.object is not None:
                self.services[event.key] = event.object
            else:
                self.services.pop(event.key, None)
            return
        old = self.slice_owner.pop(event.key, None)
        if old is not None:
            self.slices.get(old, {}).pop(event.key, None)
            affected.add(old)
        if event.type is EventType.PUT and event.object is not None:
            owner = _owner(event.object)
            if owner is not None:
                self.slice_owner[event.key] = owner
                self.slices.setdefault(owner, {})[event.key] = event.object
                affected.add(owner)

    def revision(self, key: str) -> int:
        revisions = [object_revision(s) for s in self.slices.get(key, {}).values()]
        return max([object_revision(self.services[key]), *revisions])


class CrdServiceStore:
    """The CRD :class:`~controlplane.store.ServiceStore` (see the module docstring)."""

    def __init__(self, client: KubeClient, metrics: StoreMetrics) -> None:
        self.client = client
        self.metrics = metrics
        self.skipped: Counter[str] = Counter()
        """Services left out, by reason (counted each time a change leaves one out)."""
        self._skipping: dict[str, str] = {}

    # -- reading ----------------------------------------------------------------------------

    def _decode(self, key: str, obj: JSON, slices: Iterable[JSON]) -> Service | None:
        try:
            return service_from(obj, slices)
        except Skip as skip:
            self.skipped[skip.reason] += 1
            if self._skipping.get(key) != skip.reason:
                self._skipping[key] = skip.reason
                log.info("service %s is not balanced: %s", key, skip.reason)
            return None
        except MALFORMED as exc:
            self.metrics.malformed.labels(RESOURCE).inc()
            log.warning("skipping malformed %s %r: %s", RESOURCE, key, exc)
            return None

    async def list(self) -> builtins.list[Versioned[Service]]:
        services = (await self.client.list(SERVICES)).items
        join = _Join()
        for obj in (await self.client.list(ENDPOINT_SLICES)).items:
            owner = _owner(obj)
            if owner is not None:
                join.slices.setdefault(owner, {})[_key(obj)] = obj
        out: builtins.list[Versioned[Service]] = []
        for obj in services:
            key = _key(obj)
            join.services[key] = obj
            service = self._decode(key, obj, join.slices.get(key, {}).values())
            if service is not None:
                out.append(Versioned(service, join.revision(key)))
        return out

    async def watch(self) -> AsyncIterator[StoreEvent[Service]]:
        async for batch in self.watch_batches():
            for event in batch:
                yield event

    async def watch_batches(self) -> AsyncIterator[builtins.list[StoreEvent[Service]]]:
        """Services and slices, list+watch, joined: an UPSERT when a service's model
        changes, a DELETE when it goes (or becomes malformed or skipped), SYNCED once both
        kinds are listed."""
        queue: asyncio.Queue[tuple[str, builtins.list[KubeEvent] | Exception]] = asyncio.Queue()
        watchers = {
            "service": KubeListWatcher(self.client, SERVICES),
            "slice": KubeListWatcher(self.client, ENDPOINT_SLICES),
        }

        async def pump(source: str, watcher: KubeListWatcher) -> None:
            try:
                async for events in watcher.batches():
                    await queue.put((source, events))
            except Exception as exc:  # Forbidden: the reader raises it
                await queue.put((source, exc))

        join = _Join()
        shown: dict[str, Service] = {}
        listed: set[str] = set()
        pending: set[str] = set()
        tasks = [
            asyncio.create_task(pump(source, watcher), name=f"watch {source}s")
            for source, watcher in watchers.items()
        ]
        try:
            while True:
                source, events = await queue.get()
                if isinstance(events, Exception):
                    raise events
                for event in events:
                    if event.type is EventType.LIST_DONE:
                        listed.add(source)
                    else:
                        join.apply(source, event, pending)
                if len(listed) < len(watchers):
                    continue
                out = self._changes(join, pending, shown)
                pending.clear()
                if "synced" not in listed:
                    listed.add("synced")
                    revision = max(revision_of(w.resource_version) for w in watchers.values())
                    out.append(StoreEvent(EventKind.SYNCED, "", None, revision))
                if out:
                    yield out
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _changes(
        self, join: _Join, keys: set[str], shown: dict[str, Service]
    ) -> builtins.list[StoreEvent[Service]]:
        out: builtins.list[StoreEvent[Service]] = []
        for key in sorted(keys):
            obj = join.services.get(key)
            service = None
            if obj is not None:
                service = self._decode(key, obj, join.slices.get(key, {}).values())
                if service is not None:
                    self._skipping.pop(key, None)
            else:
                self._skipping.pop(key, None)
            previous = shown.get(key)
            if service is None:
                if previous is not None:
                    del shown[key]
                    out.append(StoreEvent(EventKind.DELETE, key, previous, 0))
            elif service != previous:
                shown[key] = service
                out.append(StoreEvent(EventKind.UPSERT, key, service, join.revision(key)))
        return out

    # -- writing (cpctl service put) ------------------------------------------------------

    async def put(self, service: Service) -> None:
        spec = {
            "type": "ClusterIP",
            "clusterIP": str(service.cluster_ip),
            "ports": [
                {
                    **({"name": fe.name} if fe.name else {}),
                    "port": fe.port,
                    "protocol": fe.protocol_name,
                    "targetPort": fe.port,
                }
                for fe in service.frontends
            ],
        }

        async def write_service() -> None:
            current = await self.client.get_or_none(SERVICES, service.name, service.namespace)
            body: JSON = {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": service.name, "namespace": service.namespace},
                "spec": spec,
            }
            if current is not None:
                old = current.get("spec") or {}
                if old.get("clusterIP") != spec["clusterIP"]:
                    meta = meta_of(current)
                    await self.client.delete(
                        SERVICES,
                        service.name,
                        namespace=service.namespace,
                        resource_version=meta["resourceVersion"],
                    )
                    current = None
            if current is None:
                try:
                    await self.client.create(SERVICES, body)
                except AlreadyExists:
                    raise Conflict(f"service {service.id} was created meanwhile") from None
                return
            if all(old.get(k) == v for k, v in spec.items()) and not old.get("selector"):
                return
            body["metadata"] = meta_of(current)
            body["spec"] = {k: v for k, v in old.items() if k != "selector"} | spec
            await self.client.replace(SERVICES, body)

        await on_conflict(write_service, f"put service {service.id}")
        await self._put_slice(service)

    def _slice_name(self, service: Service) -> str:
        return f"{service.name}-cpctl"

    async def _put_slice(self, service: Service) -> None:
        slices = _split_slices(service)
        name = self._slice_name(service)

        async def write() -> None:
            existing = await self.client.list(
                ENDPOINT_SLICES,
                namespace=service.namespace,
                label_selector=f"{SERVICE_NAME}={service.name},{MANAGED_BY}={CPCTL_MANAGER}",
            )
            by_name = {meta_of(obj)["name"]: obj for obj in existing.items}
            for index, (slice_ports, slice_endpoints) in enumerate(slices):
                slice_name = name if index == 0 else f"{name}-{index}"
                body: JSON = {
                    "apiVersion": ENDPOINT_SLICES.api_version,
                    "kind": ENDPOINT_SLICES.kind,
                    "metadata": {
                        "name": slice_name,
                        "namespace": service.namespace,
                        "labels": {SERVICE_NAME: service.name, MANAGED_BY: CPCTL_MANAGER},
                    },
                    "addressType": "IPv4",
                    "ports": slice_ports,
                    "endpoints": slice_endpoints,
                }
                current = by_name.pop(slice_name, None)
                if current is None:
                    try:
                        await self.client.create(ENDPOINT_SLICES, body)
                    except AlreadyExists:
                        raise Conflict(f"slice {slice_name} was created meanwhile") from None
                elif (current.get("ports"), current.get("endpoints")) != (
                    slice_ports,
                    slice_endpoints,
                ):
                    body["metadata"] = meta_of(current)
                    await self.client.replace(ENDPOINT_SLICES, body)
            for stale in by_name.values():
                meta = meta_of(stale)
                await self.client.delete(
                    ENDPOINT_SLICES,
                    meta["name"],
                    namespace=service.namespace,
                    resource_version=meta["resourceVersion"],
                )

        await on_conflict(write, f"put endpoint slices of {service.id}")

    async def delete(self, namespace: str, name: str) -> bool:
        deleted = await self.client.delete(SERVICES, name, namespace=namespace)
        existing = await self.client.list(
            ENDPOINT_SLICES,
            namespace=namespace,
            label_selector=f"{SERVICE_NAME}={name},{MANAGED_BY}={CPCTL_MANAGER}",
        )
        for obj in existing.items:
            await self.client.delete(ENDPOINT_SLICES, meta_of(obj)["name"], namespace=namespace)
        return deleted


def _split_slices(
    service: Service,
) -> builtins.list[tuple[builtins.list[JSON], builtins.list[JSON]]]:
    """The slices of a service's backends: one per set of endpoints that serve the same
    (name -> port) map, as kube requires every endpoint of a slice to serve all its ports.
    Most services need one; a frontend whose backends listen on different ports, several.
    """
    protocol = {fe.name: fe.protocol_name for fe in service.frontends}
    nodes: dict[str, str] = {}
    ports_of: dict[str, dict[str, int]] = {}
    for be in service.backends:
        name = be.frontend or service.frontends[0].name
        ports_of.setdefault(str(be.ip), {})[name] = be.port
        if be.node is not None:
            nodes[str(be.ip)] = be.node
    groups: dict[tuple[tuple[str, int], ...], builtins.list[str]] = {}
    for ip, named in ports_of.items():
        groups.setdefault(tuple(sorted(named.items())), []).append(ip)
    out: builtins.list[tuple[builtins.list[JSON], builtins.list[JSON]]] = []
    for named_ports, ips in sorted(groups.items()):
        slice_ports: builtins.list[JSON] = [
            {"name": name, "port": port, "protocol": protocol[name]} for name, port in named_ports
        ]
        slice_endpoints: builtins.list[JSON] = []
        for ip in sorted(ips, key=parse_ip):
            entry: JSON = {"addresses": [ip], "conditions": {"ready": True}}
            if ip in nodes:
                entry["nodeName"] = nodes[ip]
            slice_endpoints.append(entry)
        out.append((slice_ports, slice_endpoints))
    return out


# -- the local cluster's EndpointSlice controller ------------------------------------------


def _pod_labels(labels: Iterable[str]) -> dict[str, str]:
    """``k8s:key=value`` security labels as the pod's labels."""
    out: dict[str, str] = {}
    for label in labels:
        source, _, rest = str(label).partition(":")
        key, eq, value = rest.partition("=")
        if source == "k8s" and eq:
            out[key] = value
    return out


def _is_ipv4(text: object) -> bool:
    try:
        return isinstance(parse_ip(str(text)), IPv4Address)
    except (ModelError, ValueError):
        return False


def desired_slice(service: JSON, pods: Iterable[tuple[JSON, dict[str, str]]]) -> JSON | None:
    """The slice kube's controller would write for ``service`` over ``pods`` (Endpoint
    objects of its namespace with their labels), or None when it gets none (no selector,
    ExternalName)."""
    meta, spec = meta_of(service), service.get("spec") or {}
    selector = spec.get("selector") or {}
    if not selector or spec.get("type") == "ExternalName":
        return None
    ports: builtins.list[JSON] = []
    for port in spec.get("ports") or []:
        target = port.get("targetPort", port.get("port"))
        if not isinstance(target, int):
            continue  # a named port: our pods declare no container ports
        ports.append(
            {
                "name": port.get("name") or "",
                "port": target,
                "protocol": port.get("protocol") or "TCP",
            }
        )
    endpoints: builtins.list[JSON] = []
    for pod, labels in pods:
        if any(labels.get(k) != v for k, v in selector.items()):
            continue
        pod_spec, pod_meta = pod.get("spec") or {}, pod.get("metadata") or {}
        for entry in pod_spec.get("addressing") or []:
            if entry.get("family") != "IPv4" or not _is_ipv4(entry.get("ip")):
                continue
            endpoint: JSON = {
                "addresses": [entry.get("ip")],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "targetRef": {
                    "apiVersion": ENDPOINTS.api_version,
                    "kind": ENDPOINTS.kind,
                    "namespace": pod_meta.get("namespace"),
                    "name": pod_meta.get("name"),
                },
            }
            if pod_spec.get("node"):
                endpoint["nodeName"] = pod_spec["node"]
            endpoints.append(endpoint)
    endpoints.sort(key=lambda e: str(e["addresses"][0]))
    return {
        "apiVersion": ENDPOINT_SLICES.api_version,
        "kind": ENDPOINT_SLICES.kind,
        "metadata": {
            "name": f"{meta['name']}-controlplane",
            "namespace": meta["namespace"],
            "labels": {SERVICE_NAME: meta["name"], MANAGED_BY: CONTROLLER_MANAGER},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": meta["name"],
                    "uid": meta.get("uid", ""),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints[:1000],
    }


class EndpointSliceController:
    """kube-controller-manager's EndpointSlice controller for a cluster without Pods.

    Watches Services, ``controlplane.io`` Endpoints and Identities (a pod's labels are its
    identity's ``k8s:`` labels) and the slices it manages (label ``managed-by:
    endpointslice-controller.controlplane.io``); for every Service with a selector it keeps
    one slice of the matching endpoints in the service's namespace (IPv4, every endpoint
    ready, the service ports' numeric target ports), and deletes the slices of services
    that are gone or lost their selector. Writes are guarded (create, replace and delete
    with the resourceVersion read); a failure is retried at the next change or after a
    backoff. Run only where nothing else writes slices from pods (not in a real cluster).
    """

    def __init__(self, client: KubeClient, *, debounce: float = 0.02) -> None:
        self.client = client
        self.debounce = debounce
        self.writes = 0
        self._objects: dict[str, dict[str, JSON]] = {
            "service": {},
            "endpoint": {},
            "identity": {},
            "slice": {},
        }
        self._dirty = asyncio.Event()

    async def run(self) -> None:
        sources: dict[str, tuple[ApiResource, str | None]] = {
            "service": (SERVICES, None),
            "endpoint": (ENDPOINTS, None),
            "identity": (IDENTITIES, None),
            "slice": (ENDPOINT_SLICES, f"{MANAGED_BY}={CONTROLLER_MANAGER}"),
        }
        listed: set[str] = set()

        async def follow(source: str, resource: ApiResource, selector: str | None) -> None:
            watcher = KubeListWatcher(self.client, resource, label_selector=selector)
            objects = self._objects[source]
            async for events in watcher.batches():
                for event in events:
                    if event.type is EventType.LIST_DONE:
                        listed.add(source)
                    elif event.type is EventType.PUT and event.object is not None:
                        objects[event.key] = event.object
                    else:
                        objects.pop(event.key, None)
                if len(listed) == len(sources):
                    self._dirty.set()

        async with asyncio.TaskGroup() as group:
            for source, (resource, selector) in sources.items():
                group.create_task(follow(source, resource, selector), name=f"slices: {source}")
            group.create_task(self._reconcile_loop(), name="slices: reconcile")

    async def _reconcile_loop(self) -> None:
        failures = 0
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.debounce)  # fold a burst of changes into one pass
            self._dirty.clear()
            try:
                await self.reconcile()
                failures = 0
            except CrdError as exc:
                failures += 1
                delay = random.uniform(0, min(2.0, 0.05 * 2**failures))
                log.info("endpoint slices: %s; retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                self._dirty.set()

    def _desired(self) -> dict[str, JSON]:
        labels_of: dict[int, dict[str, str]] = {}
        for identity in self._objects["identity"].values():
            with contextlib.suppress(*MALFORMED):
                labels_of[int(meta_of(identity)["name"])] = _pod_labels(
                    (identity.get("spec") or {}).get("labels") or []
                )
        pods: dict[str, builtins.list[tuple[JSON, dict[str, str]]]] = {}
        for pod in self._objects["endpoint"].values():
            with contextlib.suppress(*MALFORMED):
                ident = int(pod["spec"]["identity"]["id"])
                namespace = meta_of(pod)["namespace"]
                pods.setdefault(namespace, []).append((pod, labels_of.get(ident, {})))
        desired: dict[str, JSON] = {}
        for service in self._objects["service"].values():
            try:
                namespace = meta_of(service)["namespace"]
                wanted = desired_slice(service, pods.get(namespace, []))
            except MALFORMED as exc:
                log.warning("endpoint slices: skipping service %s: %s", _key(service), exc)
                continue
            if wanted is not None:
                desired[_key(wanted)] = wanted
        return desired

    async def reconcile(self) -> None:
        """One pass: write what differs from the watched slices (each write guarded).

        A 409 or 404 makes another pass (the watch brings the newer state); a 422 is
        logged and not retried until something changes; any other failure is raised at
        the end of the pass, after the other writes were tried (the loop backs off)."""
        desired = self._desired()
        current = dict(self._objects["slice"])
        failed: CrdError | None = None

        async def attempt(what: str, write: Callable[[], Awaitable[object]]) -> None:
            nonlocal failed
            try:
                await write()
                self.writes += 1
            except AlreadyExists:
                pass  # ours: the watch shows it; not ours: not ours to take
            except (Conflict, NotFound):
                self._dirty.set()
            except Invalid as exc:
                log.warning("endpoint slices: %s refused: %s", what, exc)
            except CrdError as exc:
                failed = exc

        for key, wanted in desired.items():
            held = current.pop(key, None)
            if held is None:
                await attempt(f"create {key}", partial(self.client.create, ENDPOINT_SLICES, wanted))
                continue
            held_meta = meta_of(held)
            if all(held.get(k) == wanted[k] for k in ("addressType", "ports", "endpoints")) and (
                held_meta.get("ownerReferences") == wanted["metadata"]["ownerReferences"]
            ):
                continue
            body = {**wanted, "metadata": {**held_meta, **wanted["metadata"]}}
            body["metadata"]["resourceVersion"] = held_meta.get("resourceVersion")
            await attempt(f"update {key}", partial(self.client.replace, ENDPOINT_SLICES, body))
        for key, stale in current.items():
            meta = meta_of(stale)
            delete = partial(
                self.client.delete,
                ENDPOINT_SLICES,
                meta["name"],
                namespace=meta.get("namespace"),
                resource_version=meta.get("resourceVersion"),
            )
            await attempt(f"delete {key}", delete)
        if failed is not None:
            raise failed
