"""Services in kvstore mode: ``cp/state/services/v1/<namespace>/<name>``.

Values are ``service`` envelopes of :meth:`Service.to_dict` (virtual IP, frontends,
backends); the key's namespace and name must match the value's. Cluster-wide
configuration on the first configured cluster, never leased (see
:mod:`controlplane.kvstore.namespaced`): a malformed record is logged, counted
(``cp_store_malformed_values_total{resource="service"}``) and skipped.
"""

from __future__ import annotations

from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.namespaced import NamespacedStore
from controlplane.kvstore.records import RecordCodec
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import Service

__all__ = ["SERVICE_KIND", "SERVICE_RESOURCE", "KvServiceStore"]

SERVICE_KIND = "service"
"""The envelope kind of service values."""
SERVICE_RESOURCE = "service"
"""The ``resource`` label of the malformed-values metric."""


class KvServiceStore(NamespacedStore[Service]):
    """The kvstore :class:`~controlplane.store.ServiceStore`."""

    def __init__(self, shards: ShardMap, layout: KeyLayout, metrics: StoreMetrics) -> None:
        super().__init__(
            shards,
            layout.service_prefix,
            layout.service,
            RecordCodec(SERVICE_RESOURCE, SERVICE_KIND, metrics),
            Service.from_dict,
        )
        self.layout = layout
