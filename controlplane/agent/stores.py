"""Which store the agent runs on: the one place that maps a store configuration to the
:class:`~controlplane.agent.store_session.StoreConnector` that serves it.

Only kvstore mode exists today; CRD mode adds its configuration type and connector here,
and nothing else in the agent changes.
"""

from __future__ import annotations

from typing import TypeAlias

from controlplane.agent.kvstore_session import KvstoreConnector
from controlplane.agent.metrics import AgentMetrics
from controlplane.agent.settings import AgentSettings
from controlplane.agent.store_session import StoreConnector
from controlplane.config import KvstoreConfig

StoreConfig: TypeAlias = KvstoreConfig
"""Every store configuration the agent accepts."""


def store_connector(
    config: StoreConfig, settings: AgentSettings, metrics: AgentMetrics
) -> StoreConnector:
    return KvstoreConnector(config, settings, metrics)
