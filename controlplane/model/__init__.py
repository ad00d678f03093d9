"""Domain model: labels, identities, ID ranges, endpoints, nodes, CIDR pools, IP leases,
network policy and services.

Pure data and validation; no store code, no I/O, no global mutable state.

Conventions
-----------
* Every type is a frozen, slotted dataclass and validates itself on construction, raising a
  :class:`ModelError` (a ``ValueError``) with a one-line message. Label problems raise the
  subclass :class:`InvalidLabel`.
* Every type has ``to_dict()`` producing plain msgpack-friendly data (``str``, ``int``,
  ``list``, ``dict``) and ``from_dict(data)`` consuming it. ``from_dict`` accepts *any*
  object and raises only :class:`InvalidRecord` (a ``ValueError``) with a one-line message
  when the data is malformed: stored data can be corrupt, callers log, count and skip.
  Unknown extra fields are ignored (a newer writer may add fields); lists may also arrive
  as tuples. Addresses are written in Python's canonical text form (``str(ip)``).

Modules
-------
Each module imports only from the modules listed before it:

* ``errors``: :class:`ModelError`, :class:`InvalidLabel`, :class:`InvalidRecord`.
* ``_checks``: checks shared by the types and the field extraction of ``from_dict``.
* ``names``: DNS-1123 names, :data:`NodeName`, :data:`EndpointID` and their parsers.
* ``addresses``: :data:`IPAddress`, :data:`IPNetwork`, :func:`parse_ip` and the other
  address parsers.
* ``labels``: :class:`Label`, :class:`Labels` (the label syntax and canonical form).
* ``identity``: numeric and reserved identities, :class:`IdentityRange`, :class:`Identity`.
* ``endpoint``: :class:`Endpoint`, :class:`IPIdentity` and the strict and fast paths that
  read stored endpoint records.
* ``node``, ``ipam``, ``policy`` and ``service`` (independent of each other):
  :class:`Node`; :class:`IPLease`, :class:`CIDRPool` and usable addresses; network
  policy; services (:class:`Service`, :class:`Frontend`, :class:`Backend`).

This package re-exports every public name; import from ``controlplane.model``.
"""

from __future__ import annotations

from controlplane.model.addresses import (
    IPAddress,
    IPNetwork,
    parse_canonical_ip,
    parse_cidr,
    parse_ip,
)
from controlplane.model.endpoint import (
    Endpoint,
    EndpointRecord,
    IPIdentity,
    NodeFields,
    ip_identity_from_dict,
    ip_identity_from_record,
)
from controlplane.model.errors import InvalidLabel, InvalidRecord, ModelError
from controlplane.model.identity import (
    IDENTITY_HEALTH,
    IDENTITY_HOST,
    IDENTITY_INGRESS,
    IDENTITY_INIT,
    IDENTITY_KUBE_APISERVER,
    IDENTITY_REMOTE_NODE,
    IDENTITY_UNKNOWN,
    IDENTITY_UNMANAGED,
    IDENTITY_WORLD,
    MAX_NUMERIC_IDENTITY,
    RESERVED_IDENTITIES,
    RESERVED_IDENTITY_RANGE,
    Identity,
    IdentityRange,
    NumericIdentity,
    cluster_identity_range,
    is_reserved_identity,
    parse_numeric_identity,
    reserved_identity_for,
    reserved_labels,
    shard_identity_ranges,
)
from controlplane.model.ipam import (
    DEFAULT_CLUSTER_POOL,
    DEFAULT_CLUSTER_POOL_MASK_SIZE,
    CIDRPool,
    IPLease,
    is_usable_ip,
    router_ip,
    usable_ip_count,
    usable_ips,
)
from controlplane.model.labels import (
    KEY_COMPONENT_MAX_BYTES,
    SOURCE_ANY,
    SOURCE_CIDR,
    SOURCE_CONTAINER,
    SOURCE_K8S,
    SOURCE_RESERVED,
    SOURCE_UNSPEC,
    Label,
    Labels,
)
from controlplane.model.names import EndpointID, NodeName, parse_endpoint_id, parse_node_name
from controlplane.model.node import Node
from controlplane.model.policy import (
    PROTOCOLS,
    IngressRule,
    NetworkPolicy,
    PortProtocol,
    selector_matches,
)
from controlplane.model.service import (
    MAX_SERVICE_BACKENDS,
    SERVICE_PROTOCOLS,
    Backend,
    Frontend,
    Service,
)

__all__ = [
    "DEFAULT_CLUSTER_POOL",
    "DEFAULT_CLUSTER_POOL_MASK_SIZE",
    "IDENTITY_HEALTH",
    "IDENTITY_HOST",
    "IDENTITY_INGRESS",
    "IDENTITY_INIT",
    "IDENTITY_KUBE_APISERVER",
    "IDENTITY_REMOTE_NODE",
    "IDENTITY_UNKNOWN",
    "IDENTITY_UNMANAGED",
    "IDENTITY_WORLD",
    "KEY_COMPONENT_MAX_BYTES",
    "MAX_NUMERIC_IDENTITY",
    "MAX_SERVICE_BACKENDS",
    "PROTOCOLS",
    "RESERVED_IDENTITIES",
    "RESERVED_IDENTITY_RANGE",
    "SERVICE_PROTOCOLS",
    "SOURCE_ANY",
    "SOURCE_CIDR",
    "SOURCE_CONTAINER",
    "SOURCE_K8S",
    "SOURCE_RESERVED",
    "SOURCE_UNSPEC",
    "Backend",
    "CIDRPool",
    "Endpoint",
    "EndpointID",
    "EndpointRecord",
    "Frontend",
    "IPAddress",
    "IPIdentity",
    "IPLease",
    "IPNetwork",
    "Identity",
    "IdentityRange",
    "IngressRule",
    "InvalidLabel",
    "InvalidRecord",
    "Label",
    "Labels",
    "ModelError",
    "NetworkPolicy",
    "Node",
    "NodeFields",
    "NodeName",
    "NumericIdentity",
    "PortProtocol",
    "Service",
    "cluster_identity_range",
    "ip_identity_from_dict",
    "ip_identity_from_record",
    "is_reserved_identity",
    "is_usable_ip",
    "parse_canonical_ip",
    "parse_cidr",
    "parse_endpoint_id",
    "parse_ip",
    "parse_node_name",
    "parse_numeric_identity",
    "reserved_identity_for",
    "reserved_labels",
    "router_ip",
    "selector_matches",
    "shard_identity_ranges",
    "usable_ip_count",
    "usable_ips",
]
