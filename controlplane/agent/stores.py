"""Which store the agent runs on: the one place that maps a store configuration to the
:class:`~controlplane.agent.store_session.StoreConnector` that serves it.

CRD mode (:mod:`.crd_session`, the default) and kvstore mode (:mod:`.kvstore_session`),
and the double-write modes of a migration (:mod:`.doublewrite_session`, one of each);
nothing else in the agent knows which one it runs on.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TypeAlias

from controlplane.agent.crd_session import CrdConnector, check_connection
from controlplane.agent.doublewrite_session import DoubleWriteConnector
from controlplane.agent.kvstore_session import KvstoreConnector
from controlplane.agent.metrics import AgentMetrics
from controlplane.agent.settings import AgentSettings
from controlplane.agent.store_session import StoreConnector
from controlplane.config import CrdConfig, DoubleWriteConfig, KvstoreConfig

StoreConfig: TypeAlias = KvstoreConfig | CrdConfig | DoubleWriteConfig
"""Every store configuration the agent accepts."""


def check_store(config: StoreConfig) -> None:
    """Fail at start, with one line (ConfigError), when the store cannot be configured."""
    if isinstance(config, DoubleWriteConfig):
        check_store(config.read)
        check_store(config.other)
    elif isinstance(config, CrdConfig):
        check_connection(config)


def store_connector(
    config: StoreConfig, settings: AgentSettings, metrics: AgentMetrics
) -> StoreConnector:
    if isinstance(config, DoubleWriteConfig):
        other_settings = settings
        if isinstance(config.other, KvstoreConfig):
            # no kvstore-mode operator need run while the kvstore is only written: its
            # heartbeat is not judged (quorum checks still are)
            other_settings = replace(settings, heartbeat_interval=math.inf)
        return DoubleWriteConnector(
            store_connector(config.read, settings, metrics),
            store_connector(config.other, other_settings, metrics),
            metrics,
            settings.node,
        )
    if isinstance(config, CrdConfig):
        return CrdConnector(config, settings, metrics)
    return KvstoreConnector(config, settings, metrics)
