"""Which store the agent runs on: the one place that maps a store configuration to the
:class:`~controlplane.agent.store_session.StoreConnector` that serves it.

CRD mode (:mod:`.crd_session`, the default) and kvstore mode (:mod:`.kvstore_session`);
nothing else in the agent knows which one it runs on.
"""

from __future__ import annotations

from typing import TypeAlias

from controlplane.agent.crd_session import CrdConnector, check_connection
from controlplane.agent.kvstore_session import KvstoreConnector
from controlplane.agent.metrics import AgentMetrics
from controlplane.agent.settings import AgentSettings
from controlplane.agent.store_session import StoreConnector
from controlplane.config import CrdConfig, KvstoreConfig

StoreConfig: TypeAlias = KvstoreConfig | CrdConfig
"""Every store configuration the agent accepts."""


def check_store(config: StoreConfig) -> None:
    """Fail at start, with one line (ConfigError), when the store cannot be configured."""
    if isinstance(config, CrdConfig):
        check_connection(config)


def store_connector(
    config: StoreConfig, settings: AgentSettings, metrics: AgentMetrics
) -> StoreConnector:
    if isinstance(config, CrdConfig):
        return CrdConnector(config, settings, metrics)
    return KvstoreConnector(config, settings, metrics)
