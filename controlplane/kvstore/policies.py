"""Network policies in kvstore mode: ``cp/state/policies/v1/<namespace>/<name>``.

Values are ``policy`` envelopes of :meth:`NetworkPolicy.to_dict`; the key's namespace and
name must match the value's. Cluster-wide configuration on the first configured cluster,
never leased (see :mod:`controlplane.kvstore.namespaced`).
"""

from __future__ import annotations

from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.namespaced import NamespacedStore
from controlplane.kvstore.records import RecordCodec
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import NetworkPolicy

__all__ = ["POLICY_KIND", "POLICY_RESOURCE", "KvPolicyStore"]

POLICY_KIND = "policy"
"""The envelope kind of policy values."""
POLICY_RESOURCE = "policy"
"""The ``resource`` label of the malformed-values metric."""


class KvPolicyStore(NamespacedStore[NetworkPolicy]):
    """The kvstore :class:`~controlplane.store.PolicyStore`."""

    def __init__(self, shards: ShardMap, layout: KeyLayout, metrics: StoreMetrics) -> None:
        super().__init__(
            shards,
            layout.policy_prefix,
            layout.policy,
            RecordCodec(POLICY_RESOURCE, POLICY_KIND, metrics),
            NetworkPolicy.from_dict,
        )
        self.layout = layout
