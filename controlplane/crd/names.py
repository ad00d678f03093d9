"""Every object name, label and annotation the CRD store writes, built in one place.

Nobody assembles a name or a label by hand: an Identity is named by its numeric ID and
labelled with the hash of its label set; a PodCIDR is named by its pool and CIDR (IPv6 as
32 hex digits, since ``:`` is not allowed in a name); Endpoint and PodCIDR objects carry
labels that let a reader select them without a full list (the node, each address, the
pool). Label values are at most 63 characters of ``[A-Za-z0-9._-]``, alphanumeric at both
ends: a value that does not fit (a long node name) is replaced by a hash.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from controlplane.crd.resources import GC_MARK, GROUP, LABELS_HASH
from controlplane.model import IPAddress, IPNetwork, Labels

__all__ = [
    "CREATED_REVISION",
    "ENDPOINT_IPV4",
    "ENDPOINT_IPV6",
    "ENDPOINT_NODE",
    "GC_MARK",
    "LABELS_HASH",
    "POD_CIDR_POOL",
    "address_label",
    "address_selector",
    "cidr_name",
    "identity_name",
    "label_value",
    "labels_hash",
    "labels_selector",
    "node_selector",
]

ENDPOINT_NODE: Final = f"{GROUP}/node"
"""Endpoint label: the node that publishes it (:func:`label_value` of the node name)."""
ENDPOINT_IPV4: Final = f"{GROUP}/ipv4"
"""Endpoint label: its IPv4 address (dotted), to find who publishes an address."""
ENDPOINT_IPV6: Final = f"{GROUP}/ipv6"
"""Endpoint label: its IPv6 address as 32 hex digits."""
POD_CIDR_POOL: Final = f"{GROUP}/pool"
"""PodCIDR label: the pool (:func:`label_value`)."""
CREATED_REVISION: Final = f"{GROUP}/created-revision"
"""Identity annotation: the resourceVersion the object was created with. Written with the
first update of the object (the GC's mark); while it is absent the object was never
updated, so its resourceVersion *is* its creation revision. Orders racing identities."""

_LABEL_VALUE_RE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")


def labels_hash(labels: Labels) -> str:
    """The value of the :data:`LABELS_HASH` label: 63 hex digits of SHA-256 of the
    canonical label string."""
    return hashlib.sha256(labels.canonical().encode()).hexdigest()[:63]


def labels_selector(labels: Labels) -> str:
    return f"{LABELS_HASH}={labels_hash(labels)}"


def identity_name(ident: int) -> str:
    return str(int(ident))


def label_value(text: str) -> str:
    """``text`` when it is a valid label value, else ``h-`` + 56 hex digits of its SHA-256."""
    if _LABEL_VALUE_RE.fullmatch(text):
        return text
    return "h-" + hashlib.sha256(text.encode()).hexdigest()[:56]


def address_label(ip: IPAddress) -> tuple[str, str]:
    """The (label, value) that marks an Endpoint as publishing ``ip``."""
    if ip.version == 4:
        return ENDPOINT_IPV4, str(ip)
    return ENDPOINT_IPV6, ip.packed.hex()


def address_selector(ip: IPAddress) -> str:
    key, value = address_label(ip)
    return f"{key}={value}"


def node_selector(node: str) -> str:
    return f"{ENDPOINT_NODE}={label_value(node)}"


def cidr_name(pool: str, cidr: IPNetwork) -> str:
    """The PodCIDR object of ``cidr`` in ``pool``: ``default.10.0.1.0-24``, and for IPv6
    ``default.fd000000000000000000000000000000-64``."""
    net = cidr.network_address
    address = str(net) if cidr.version == 4 else net.packed.hex()
    return f"{pool}.{address}-{cidr.prefixlen}"
