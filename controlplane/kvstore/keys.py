"""The key layout of kvstore mode: a stable interface that other tools read.

Every key starts with the configured prefix (``cp/`` by default). See
``docs/key-layout.md`` for the values stored under each key and their lifetimes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeyLayout:
    prefix: str = "cp/"

    def _key(self, *parts: str) -> bytes:
        return (self.prefix + "/".join(parts)).encode()

    @property
    def heartbeat(self) -> bytes:
        return self._key(".heartbeat")

    @property
    def leader_prefix(self) -> bytes:
        return self._key(".operator", "leader", "")

    @property
    def state_prefix(self) -> bytes:
        return self._key("state", "")

    # identities
    @property
    def identity_labels_prefix(self) -> bytes:
        return self._key("state", "identities", "v1", "labels", "")

    def identity_labels(self, labels_component: str) -> bytes:
        return self._key("state", "identities", "v1", "labels", labels_component)

    @property
    def identity_id_prefix(self) -> bytes:
        return self._key("state", "identities", "v1", "id", "")

    def identity_id(self, identity: int) -> bytes:
        return self._key("state", "identities", "v1", "id", str(identity))

    @property
    def identity_value_prefix(self) -> bytes:
        return self._key("state", "identities", "v1", "value", "")

    def identity_values(self, labels_component: str) -> bytes:
        return self._key("state", "identities", "v1", "value", labels_component, "")

    def identity_value(self, labels_component: str, node: str) -> bytes:
        return self._key("state", "identities", "v1", "value", labels_component, node)

    # endpoints (the ipcache source) and nodes
    def ip_prefix(self, cluster: str) -> bytes:
        return self._key("state", "ip", "v1", cluster, "")

    def ip(self, cluster: str, address: str) -> bytes:
        return self._key("state", "ip", "v1", cluster, address)

    def node_prefix(self, cluster: str) -> bytes:
        return self._key("state", "nodes", "v1", cluster, "")

    def node(self, cluster: str, name: str) -> bytes:
        return self._key("state", "nodes", "v1", cluster, name)

    # IPAM
    def ipam_cidr_prefix(self, pool: str) -> bytes:
        return self._key("state", "ipam", "v1", "cidrs", pool, "")

    def ipam_cidr(self, pool: str, cidr: str) -> bytes:
        # A CIDR's "/" would add a path level; keys use "_" instead (10.0.1.0_24).
        return self._key("state", "ipam", "v1", "cidrs", pool, cidr.replace("/", "_"))

    @property
    def ipam_leases_prefix(self) -> bytes:
        return self._key("state", "ipam", "v1", "leases", "")

    def ipam_node_leases(self, node: str) -> bytes:
        return self._key("state", "ipam", "v1", "leases", node, "")

    def ipam_lease(self, node: str, address: str) -> bytes:
        return self._key("state", "ipam", "v1", "leases", node, address)

    # operator HA (appended: keys above are a stable interface)
    @property
    def operator_epoch(self) -> bytes:
        """The fencing token of the current operator leader, on every cluster."""
        return self._key(".operator", "epoch")

    # network policies (appended: keys above are a stable interface)
    @property
    def policy_prefix(self) -> bytes:
        return self._key("state", "policies", "v1", "")

    def policy(self, namespace: str, name: str) -> bytes:
        return self._key("state", "policies", "v1", namespace, name)

    # services (appended: keys above are a stable interface)
    @property
    def service_prefix(self) -> bytes:
        return self._key("state", "services", "v1", "")

    def service(self, namespace: str, name: str) -> bytes:
        return self._key("state", "services", "v1", namespace, name)
