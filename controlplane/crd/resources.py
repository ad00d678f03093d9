"""The custom resources of CRD mode (group ``controlplane.io``, version ``v1``) and the
built-in kinds the CRD store uses; their definitions are ``definitions/*.yaml``."""

from __future__ import annotations

from controlplane.crd.client import ApiResource

GROUP = "controlplane.io"
VERSION = "v1"

IDENTITIES = ApiResource(GROUP, VERSION, "identities", "Identity", namespaced=False)
ENDPOINTS = ApiResource(GROUP, VERSION, "endpoints", "Endpoint", namespaced=True)
NODES = ApiResource(GROUP, VERSION, "nodes", "Node", namespaced=False)
POD_CIDRS = ApiResource(GROUP, VERSION, "podcidrs", "PodCIDR", namespaced=False)
NETWORK_POLICIES = ApiResource(GROUP, VERSION, "networkpolicies", "NetworkPolicy", namespaced=True)

CUSTOM = (IDENTITIES, ENDPOINTS, NODES, POD_CIDRS, NETWORK_POLICIES)

CRDS = ApiResource(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False
)
LEASES = ApiResource("coordination.k8s.io", "v1", "leases", "Lease", namespaced=True)
NAMESPACES = ApiResource("", "v1", "namespaces", "Namespace", namespaced=False)

LABELS_HASH = f"{GROUP}/labels-sha256"
"""Identity label: the first 63 hex digits of SHA-256 of the canonical label string."""
GC_MARK = f"{GROUP}/gc-unused-since"
"""Identity annotation: the operator found no endpoint using it at this time (RFC 3339)."""
OPERATOR_LEASE = "cp-operator"
"""The operators' election Lease (in the operator's namespace, kube-system by default)."""
