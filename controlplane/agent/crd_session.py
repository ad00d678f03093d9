"""The agent's store session in CRD mode: the Kubernetes API, no leases, no heartbeat.

One :class:`CrdSession` per generation holds its own client (connection pool) to the API
server, the CRD implementations of every store bound to this node, their self-repair
loops (an object of this node, or an identity it uses, deleted or edited by hand comes
back) and the status check:
every ``status_check_interval`` a cheap list feeds a
:class:`~controlplane.agent.health.ShardHealth` named ``apiserver``.

CRD mode never restarts the session: there is no lease to lose and no heartbeat to go
stale, and the watches resume (or re-list, marking and sweeping) by themselves when the
API server comes back, so an outage empties no map and needs no restart. The restart arm
is therefore never set; the health only reports reachability and makes new endpoints
fail fast (503) while the last check failed.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping

from controlplane.agent.health import Failure, Observation, RestartArm, ShardHealth
from controlplane.agent.metrics import AgentMetrics
from controlplane.agent.settings import AgentSettings
from controlplane.agent.store_session import Stores
from controlplane.config import CrdConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.copier import CrdCopier
from controlplane.crd.errors import CrdError
from controlplane.crd.kubeconfig import KubeConnection, load_connection
from controlplane.crd.resources import NODES
from controlplane.crd.stores import node_stores
from controlplane.model import Identity, Labels

log = logging.getLogger(__name__)
APISERVER = "apiserver"


def check_connection(config: CrdConfig) -> None:
    """Raise ConfigError (one line) when the kubeconfig rules give no usable connection."""
    load_connection(config.kubeconfig, config.context)


class CrdConnector:
    """Opens CRD sessions for one node; keeps the health across them."""

    def __init__(self, config: CrdConfig, settings: AgentSettings, metrics: AgentMetrics) -> None:
        self.config = config
        self.settings = settings
        self.metrics = metrics
        self.connection: KubeConnection = load_connection(config.kubeconfig, config.context)
        self.arm = RestartArm()
        """Never set: nothing in CRD mode is mended by a restart."""
        self.last_health: ShardHealth | None = None

    @property
    def describe(self) -> str:
        return f"crd: Kubernetes API {self.connection.server}"

    def open(self, generation: int) -> CrdSession:
        return CrdSession(self, generation)


class CrdSession:
    """One generation of the API client, the stores and the status check."""

    def __init__(self, connector: CrdConnector, generation: int) -> None:
        self.connector = connector
        self.generation = generation
        s = connector.settings
        metrics = connector.metrics.store
        self.client = KubeClient(
            connector.connection,
            request_timeout=connector.config.request_timeout,
            user_agent=f"cp-agent/{s.node}",
        )
        self.crd = node_stores(self.client, metrics, s.node)
        self.copier = CrdCopier(self.client, metrics)
        """Writes identities under a given number (the double-write modes' other store)."""
        self._stores = Stores(
            identities=self.crd.identities,
            endpoints=self.crd.endpoints,
            nodes=self.crd.nodes,
            cidrs=self.crd.cidrs,
            leases=self.crd.leases,
            policies=self.crd.policies,
            services=self.crd.services,
        )
        self._health = ShardHealth(APISERVER, s.max_consecutive_quorum_errors, connector.arm).carry(
            connector.last_health
        )
        connector.last_health = self._health
        self._started = False

    @property
    def stores(self) -> Stores:
        return self._stores

    async def connect(self) -> None:
        """Nothing to open ahead: the client connects on its first request."""

    def tasks(self) -> Mapping[str, Callable[[], Awaitable[None]]]:
        return {"checks": self._checks, **self.crd.tasks()}

    def health(self) -> list[ShardHealth]:
        return [self._health]

    def started(self) -> None:
        self._started = True

    def unavailable(self, labels: Labels) -> str | None:
        if self._health.failing:
            return f"Kubernetes API: {self._health.reason}"
        return None

    def on_identity_changed(self, callback: Callable[[Identity, Identity], None]) -> None:
        self.crd.identities.changed.append(callback)

    async def release_all(self) -> None:
        """``--cleanup-on-exit``: the endpoints and the node record are withdrawn by the
        session's cleanup; nothing else is held (no leases in CRD mode)."""

    async def close(self) -> None:
        await self.client.close()

    # -- status checks ---------------------------------------------------------------

    async def _checks(self) -> None:
        interval = self.connector.settings.status_check_interval
        while True:
            await asyncio.sleep(interval)
            await self._check()

    async def _check(self) -> None:
        s = self.connector.settings
        error: Failure | None = None
        detail = ""
        try:
            async with asyncio.timeout(s.quorum_check_timeout):
                await self.client.list_page(NODES, limit=1)
        except TimeoutError:
            error, detail = Failure.UNREACHABLE, f"no answer in {s.quorum_check_timeout:g}s"
        except CrdError as exc:
            error, detail = Failure.UNREACHABLE, str(exc)
        obs = Observation(
            quorum_error=error,
            error_detail=detail,
            heartbeat_age=0.0,
            heartbeat_threshold=math.inf,
            heartbeat_stale=False,
            read_revision=None,  # never arms a restart (see the module docstring)
            beat_revision=None,
        )
        health = self._health
        health.record(obs, ready=self._started)
        if error is not None:
            log.warning("%s: Kubernetes API unhealthy: %s", s.node, health.reason)
        m = self.connector.metrics
        m.kvstore_healthy.labels(APISERVER).set(1 if health.healthy else 0)
        m.kvstore_errors.labels(APISERVER).set(health.consecutive_errors)
