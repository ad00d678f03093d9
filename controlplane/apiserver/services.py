"""`v1` Service and `discovery.k8s.io/v1` EndpointSlice: defaults, validation, cluster IPs.

What kube-apiserver's Service and EndpointSlice strategies do, for the fields we use:

- A Service is defaulted (``type: ClusterIP``, ``sessionAffinity: None``, each port's
  ``protocol: TCP`` and ``targetPort`` = ``port``, ``ipFamilies``/``ipFamilyPolicy``,
  ``internalTrafficPolicy``, ``status.loadBalancer``) and validated (ports: 1..65535,
  TCP/UDP/SCTP, a name on each when there are several, names and (port, protocol) unique,
  ``targetPort`` a port number or an IANA service name; the type; ``None`` only for a
  ClusterIP service; an ExternalName service needs ``externalName`` and has no cluster
  IP). Errors are kube's 422 Invalid with its field paths.
- A cluster IP is allocated on create from the service CIDR (default ``10.96.0.0/12``,
  kube's) unless the client gave one (then it must be in the range and free, else 422 as
  kube words it) or ``None`` (headless). It is immutable: an update that leaves it empty
  keeps it (as kube does, so ``kubectl apply`` of a manifest without one works); one that
  changes it is 422 "field is immutable". The allocation is one create-only etcd key per
  IP (``/registry/ranges/serviceips/<ip>``, naming its service): two creates can never
  get one IP. It is released when the service is deleted (also with its namespace).
- An EndpointSlice needs ``addressType`` (IPv4, IPv6, FQDN; immutable); each endpoint
  1..100 addresses of that type; at most 1000 endpoints and 100 ports; port names unique
  DNS labels (or empty), numbers 0..65535, protocols as above.

Not done (see docs/apiserver.md): node ports and load balancer addresses are not
allocated, IPv6 and dual-stack service IPs, ``type`` changes that need an IP released or
allocated, the ``kubernetes`` service in ``default``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Final

from controlplane.apiserver.errors import ApiError, Cause, invalid
from controlplane.apiserver.resources import SERVICES
from controlplane.apiserver.storage import Obj, ObjectStorage, WriteConflict

DEFAULT_SERVICE_CIDR: Final = "10.96.0.0/12"
CLAIMS_PREFIX: Final = "/registry/ranges/serviceips/"
PROTOCOLS: Final = ("SCTP", "TCP", "UDP")
TYPES: Final = ("ClusterIP", "ExternalName", "LoadBalancer", "NodePort")
ADDRESS_TYPES: Final = ("FQDN", "IPv4", "IPv6")
STALE_CLAIM_S: Final = 60.0
"""A claim whose service does not exist is taken over only once it is this old (a create
between its claim and its write is never robbed)."""
_DNS_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_IANA_SVC: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?")
_ALLOCATE_TRIES: Final = 64


def _quote(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def _not_supported(value: Any, allowed: tuple[str, ...], path: str) -> Cause:
    supported = ", ".join(f'"{a}"' for a in allowed)
    return Cause(
        "FieldValueNotSupported",
        f"Unsupported value: {_quote(value)}: supported values: {supported}",
        path,
    )


def _port_number(value: Any, path: str, causes: list[Cause], *, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        causes.append(
            Cause(
                "FieldValueInvalid",
                f"Invalid value: {_quote(value)}: must be between {low} and 65535, inclusive",
                path,
            )
        )


def _protocol(port: dict[str, Any], path: str, causes: list[Cause]) -> None:
    protocol = port.setdefault("protocol", "TCP")
    if protocol not in PROTOCOLS:
        causes.append(_not_supported(protocol, PROTOCOLS, path))


def _ports(spec: dict[str, Any], causes: list[Cause], *, required: bool) -> None:
    ports = spec.get("ports")
    if ports is None:
        ports = []
    if not isinstance(ports, list):
        causes.append(Cause("FieldValueInvalid", "Invalid value: must be a list", "spec.ports"))
        return
    if not ports and required:
        causes.append(Cause("FieldValueRequired", "Required value", "spec.ports"))
        return
    names: set[str] = set()
    seen: set[tuple[Any, Any]] = set()
    for i, port in enumerate(ports):
        path = f"spec.ports[{i}]"
        if not isinstance(port, dict):
            causes.append(Cause("FieldValueInvalid", "Invalid value: must be an object", path))
            continue
        name = port.get("name") or ""
        if len(ports) > 1 and not name:
            causes.append(Cause("FieldValueRequired", "Required value", f"{path}.name"))
        elif name and (not isinstance(name, str) or not _DNS_LABEL.fullmatch(name)):
            causes.append(
                Cause(
                    "FieldValueInvalid",
                    f"Invalid value: {_quote(name)}: a lowercase RFC 1123 label must consist "
                    "of lower case alphanumeric characters or '-', and must start and end with "
                    "an alphanumeric character",
                    f"{path}.name",
                )
            )
        elif name in names:
            causes.append(
                Cause("FieldValueDuplicate", f"Duplicate value: {_quote(name)}", f"{path}.name")
            )
        names.add(name)
        _port_number(port.get("port"), f"{path}.port", causes)
        _protocol(port, f"{path}.protocol", causes)
        target = port.setdefault("targetPort", port.get("port"))
        if isinstance(target, str):
            if not (_IANA_SVC.fullmatch(target) and re.search("[a-z]", target)) or "--" in target:
                causes.append(
                    Cause(
                        "FieldValueInvalid",
                        f"Invalid value: {_quote(target)}: must be a valid port name (an IANA "
                        "service name) or number",
                        f"{path}.targetPort",
                    )
                )
        else:
            _port_number(target, f"{path}.targetPort", causes)
        key = (port.get("port"), port.get("protocol"))
        if key in seen:
            causes.append(
                Cause(
                    "FieldValueDuplicate",
                    f"Duplicate value: {{Port:{key[0]}, Protocol:{key[1]}}}",
                    path,
                )
            )
        seen.add(key)


def _selector(spec: dict[str, Any], causes: list[Cause]) -> None:
    selector = spec.get("selector")
    if selector is None:
        return
    if not isinstance(selector, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
    ):
        causes.append(
            Cause(
                "FieldValueInvalid",
                "Invalid value: must be a map of strings to strings",
                "spec.selector",
            )
        )


def complete_service(obj: Obj, old: Obj | None) -> None:
    """Default and validate a Service (422 on a problem); on update keep the cluster IP.

    Leaves ``spec.clusterIP`` empty when one must be allocated (:class:`ClusterIPs`)."""
    name = obj["metadata"].get("name", "")
    spec = obj.get("spec")
    if spec is None:
        spec = obj["spec"] = {}
    if not isinstance(spec, dict):
        raise invalid("Service", "", name, [Cause("FieldValueInvalid", "Invalid value", "spec")])
    causes: list[Cause] = []
    kind = spec.setdefault("type", "ClusterIP")
    if kind not in TYPES:
        causes.append(_not_supported(kind, TYPES, "spec.type"))
    old_spec = (old or {}).get("spec") or {}
    ip = spec.get("clusterIP") or ""
    ips = spec.get("clusterIPs") or []
    if not ip and ips and isinstance(ips, list):
        ip = spec["clusterIP"] = ips[0]
    if old is not None and not ip and old_spec.get("clusterIP"):
        ip = spec["clusterIP"] = old_spec["clusterIP"]  # kube: an empty one keeps the old
    if old is not None and ip != (old_spec.get("clusterIP") or ""):
        causes.append(
            Cause(
                "FieldValueInvalid",
                f"Invalid value: {_quote(ip)}: field is immutable",
                "spec.clusterIP",
            )
        )
    headless = ip == "None"
    if kind == "ExternalName":
        if not spec.get("externalName"):
            causes.append(Cause("FieldValueRequired", "Required value", "spec.externalName"))
        if ip:
            causes.append(
                Cause(
                    "FieldValueForbidden",
                    "Forbidden: may not be set for ExternalName services",
                    "spec.clusterIP",
                )
            )
    elif headless and kind != "ClusterIP":
        causes.append(
            Cause(
                "FieldValueInvalid",
                f"Invalid value: \"None\": may not be set to 'None' for {kind} services",
                "spec.clusterIP",
            )
        )
    elif ip and not headless:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            causes.append(
                Cause(
                    "FieldValueInvalid",
                    f"Invalid value: {_quote(ip)}: must be a valid IP address, (e.g. 10.9.8.7 "
                    "or 2001:db8::ffff)",
                    "spec.clusterIP",
                )
            )
    _ports(spec, causes, required=kind != "ExternalName" and not headless)
    _selector(spec, causes)
    if causes:
        raise invalid("Service", "", name, causes)
    spec.setdefault("sessionAffinity", "None")
    if kind != "ExternalName":
        spec.setdefault("internalTrafficPolicy", "Cluster")
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("ipFamilies", ["IPv4"])
    if ip:
        spec["clusterIPs"] = [ip]
    if old is None:
        obj["status"] = {"loadBalancer": {}}  # kube drops the status a create sends


def needs_ip(obj: Obj) -> bool:
    spec = obj.get("spec") or {}
    return spec.get("type") != "ExternalName" and spec.get("clusterIP") != "None"


@dataclass
class ClusterIPs:
    """The service CIDR's addresses, one create-only claim key per IP in use."""

    storage: ObjectStorage
    cidr: str = DEFAULT_SERVICE_CIDR

    def __post_init__(self) -> None:
        self.network = ipaddress.ip_network(self.cidr)

    def _range_error(self, name: str, ip: str, why: str) -> ApiError:
        return invalid(
            "Service",
            "",
            name,
            [Cause("FieldValueInvalid", f"Invalid value: {_quote(ip)}: {why}", "spec.clusterIPs")],
        )

    def _candidates(self) -> list[str]:
        # The network address, the broadcast address and .1 (kube's "kubernetes" service).
        first, size = int(self.network.network_address), self.network.num_addresses
        return [
            str(ipaddress.ip_address(first + random.randrange(2, size - 1)))
            for _ in range(_ALLOCATE_TRIES)
        ]

    async def allocate(self, service: Obj, *, dry_run: bool = False) -> None:
        """Claim ``spec.clusterIP`` (or a free one, written into the object): 422 when the
        given IP is out of range or in use. Nothing to do for headless/ExternalName."""
        if not needs_ip(service):
            return
        meta, spec = service["metadata"], service["spec"]
        owner = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        given = spec.get("clusterIP") or ""
        if given:
            address = ipaddress.ip_address(given)
            if address not in self.network or address in (
                self.network.network_address,
                self.network.broadcast_address,
            ):
                raise self._range_error(
                    meta.get("name", ""),
                    given,
                    f"failed to allocate IP {given}: the provided IP ({given}) is not in the "
                    f"valid range. The range of valid IPs is {self.network}",
                )
            if not dry_run and not await self._claim(given, owner):
                raise self._range_error(
                    meta.get("name", ""),
                    given,
                    f"failed to allocate IP {given}: provided IP is already allocated",
                )
            return
        for attempt in range(2):
            candidates = self._candidates() if attempt == 0 else await self._free()
            for candidate in candidates:
                if dry_run or await self._claim(candidate, owner):
                    spec["clusterIP"] = candidate
                    spec["clusterIPs"] = [candidate]
                    return
        raise ApiError(
            500,
            "InternalError",
            f"failed to allocate a serviceIP: range {self.network} is full",
        )

    async def _free(self) -> list[str]:
        """Every unclaimed address, in order (for when random picks kept hitting claims:
        the range is nearly full)."""
        claimed = {str(obj.get("ip")) for obj in (await self.storage.list(CLAIMS_PREFIX)).items}
        first, size = int(self.network.network_address), self.network.num_addresses
        every = (str(ipaddress.ip_address(first + offset)) for offset in range(2, size - 1))
        return [ip for ip in every if ip not in claimed]

    async def _claim(self, ip: str, owner: str) -> bool:
        key = CLAIMS_PREFIX + ip
        claim = {"ip": ip, "service": owner, "claimedAt": time.time()}
        try:
            await self.storage.create(key, claim)
            return True
        except WriteConflict:
            pass
        held = await self.storage.get(key)
        if held is None:
            return await self._claim_once(key, claim)
        if not await self._stale(held, ip):
            return False
        try:
            await self.storage.update(key, claim, int(held["metadata"]["resourceVersion"]))
        except WriteConflict:
            return False
        return True

    async def _claim_once(self, key: str, claim: Obj) -> bool:
        try:
            await self.storage.create(key, claim)
        except WriteConflict:
            return False
        return True

    async def _stale(self, held: Obj, ip: str) -> bool:
        """A claim left by a create that never wrote its service (a crash between the two)."""
        if time.time() - float(held.get("claimedAt") or 0) < STALE_CLAIM_S:
            return False
        namespace, _, name = str(held.get("service", "")).partition("/")
        current = await self.storage.get(SERVICES.key(namespace, name))
        return current is None or (current.get("spec") or {}).get("clusterIP") != ip

    async def release(self, service: Obj | None) -> None:
        """Free the service's IP (if the claim is still its own)."""
        if service is None or not needs_ip(service):
            return
        ip = (service.get("spec") or {}).get("clusterIP")
        if not ip:
            return
        meta = service.get("metadata") or {}
        owner = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        key = CLAIMS_PREFIX + str(ip)
        held = await self.storage.get(key)
        if held is None or held.get("service") != owner:
            return
        with contextlib.suppress(WriteConflict):
            await self.storage.delete(key, int(held["metadata"]["resourceVersion"]))


def complete_endpoint_slice(obj: Obj, old: Obj | None) -> None:
    """Default and validate an EndpointSlice (422 on a problem)."""
    name = obj["metadata"].get("name", "")
    causes: list[Cause] = []
    address_type = obj.get("addressType")
    if not address_type:
        causes.append(Cause("FieldValueRequired", "Required value", "addressType"))
    elif address_type not in ADDRESS_TYPES:
        causes.append(_not_supported(address_type, ADDRESS_TYPES, "addressType"))
    if old is not None and old.get("addressType") != address_type:
        causes.append(
            Cause(
                "FieldValueInvalid",
                f"Invalid value: {_quote(address_type)}: field is immutable",
                "addressType",
            )
        )
    endpoints = obj.get("endpoints")
    if endpoints is None:
        endpoints = obj["endpoints"] = []
    if not isinstance(endpoints, list):
        causes.append(Cause("FieldValueInvalid", "Invalid value: must be a list", "endpoints"))
        endpoints = []
    if len(endpoints) > 1000:
        causes.append(
            Cause(
                "FieldValueTooMany",
                f"Too many: {len(endpoints)}: must have at most 1000 items",
                "endpoints",
            )
        )
    for i, endpoint in enumerate(endpoints):
        _endpoint(endpoint, f"endpoints[{i}]", address_type, causes)
    ports = obj.get("ports")
    if ports is not None:
        if not isinstance(ports, list):
            causes.append(Cause("FieldValueInvalid", "Invalid value: must be a list", "ports"))
        else:
            _slice_ports(ports, causes)
    if causes:
        raise invalid("EndpointSlice", "discovery.k8s.io", name, causes)


def _endpoint(endpoint: Any, path: str, address_type: Any, causes: list[Cause]) -> None:
    if not isinstance(endpoint, dict):
        causes.append(Cause("FieldValueInvalid", "Invalid value: must be an object", path))
        return
    addresses = endpoint.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        causes.append(
            Cause(
                "FieldValueRequired",
                "Required value: must contain at least 1 address",
                f"{path}.addresses",
            )
        )
        return
    if len(addresses) > 100:
        causes.append(
            Cause(
                "FieldValueTooMany",
                f"Too many: {len(addresses)}: must have at most 100 items",
                f"{path}.addresses",
            )
        )
    for j, address in enumerate(addresses):
        where = f"{path}.addresses[{j}]"
        if address_type in ("IPv4", "IPv6"):
            try:
                parsed = ipaddress.ip_address(str(address))
            except ValueError:
                parsed = None
            if parsed is None or f"IPv{parsed.version}" != address_type:
                causes.append(
                    Cause(
                        "FieldValueInvalid",
                        f"Invalid value: {_quote(address)}: must be a valid {address_type} address",
                        where,
                    )
                )
    conditions = endpoint.get("conditions")
    if conditions is not None and not isinstance(conditions, dict):
        causes.append(
            Cause("FieldValueInvalid", "Invalid value: must be an object", f"{path}.conditions")
        )
    node = endpoint.get("nodeName")
    if node is not None and not isinstance(node, str):
        causes.append(
            Cause("FieldValueInvalid", "Invalid value: must be a string", f"{path}.nodeName")
        )


def _slice_ports(ports: list[Any], causes: list[Cause]) -> None:
    if len(ports) > 100:
        causes.append(
            Cause(
                "FieldValueTooMany", f"Too many: {len(ports)}: must have at most 100 items", "ports"
            )
        )
    names: set[str] = set()
    for i, port in enumerate(ports):
        path = f"ports[{i}]"
        if not isinstance(port, dict):
            causes.append(Cause("FieldValueInvalid", "Invalid value: must be an object", path))
            continue
        name = port.get("name") or ""
        if name and (not isinstance(name, str) or not _DNS_LABEL.fullmatch(name)):
            causes.append(
                Cause(
                    "FieldValueInvalid",
                    f"Invalid value: {_quote(name)}: must be a DNS label",
                    f"{path}.name",
                )
            )
        if name in names:
            causes.append(
                Cause("FieldValueDuplicate", f"Duplicate value: {_quote(name)}", f"{path}.name")
            )
        names.add(name)
        if port.get("port") is not None:
            _port_number(port.get("port"), f"{path}.port", causes, low=0)
        _protocol(port, f"{path}.protocol", causes)
