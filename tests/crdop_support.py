"""Test support for the CRD-mode operator and its Lease election: clients of our own
KubeClient on the local API server, a clock that can stand still, a client whose
requests can be held back (a paused or partitioned process), and object builders."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from controlplane.apiserver import KubeServer
from controlplane.crd.client import JSON, KubeClient
from controlplane.crd.kubeconfig import load_connection
from controlplane.crd.resources import ENDPOINTS, IDENTITIES, NODES


class StoppableClock:
    """The monotonic clock, which can be frozen (a paused process sees no time pass) and
    thawed (it then reads the real time again: the pause is over, time moved on)."""

    def __init__(self) -> None:
        self._frozen: float | None = None

    def __call__(self) -> float:
        return self._frozen if self._frozen is not None else time.monotonic()

    def freeze(self) -> None:
        self._frozen = time.monotonic()

    def thaw(self) -> None:
        self._frozen = None


class GatedClient(KubeClient):
    """A KubeClient whose requests wait while ``gate`` is closed; ``sent`` records every
    request that actually went out (method, path)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.gate.set()
        self.sent: list[tuple[str, str]] = []

    async def _call(self, method: str, path: str, what: str, **kwargs: Any) -> JSON:
        await self.gate.wait()
        self.sent.append((method, path))
        return await super()._call(method, path, what, **kwargs)


@asynccontextmanager
async def kube_client(server: KubeServer, cls: type[KubeClient] = KubeClient) -> AsyncIterator[Any]:
    client = cls(load_connection(str(server.kubeconfig)), request_timeout=5.0)
    try:
        yield client
    finally:
        await client.close()


def node_object(name: str, ip: str = "192.0.2.1", **spec: Any) -> JSON:
    return {
        "apiVersion": NODES.api_version,
        "kind": NODES.kind,
        "metadata": {"name": name},
        "spec": {"addresses": [{"type": "InternalIP", "ip": ip}], **spec},
    }


def identity_object(ident: int | str, *labels: str) -> JSON:
    return {
        "apiVersion": IDENTITIES.api_version,
        "kind": IDENTITIES.kind,
        "metadata": {"name": str(ident)},
        "spec": {"labels": sorted(labels or (f"k8s:app=a{ident}",))},
    }


def endpoint_object(name: str, ip: str, ident: int, node: str, namespace: str = "default") -> JSON:
    return {
        "apiVersion": ENDPOINTS.api_version,
        "kind": ENDPOINTS.kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "addressing": [{"family": "IPv4", "ip": ip, "prefixLen": 32}],
            "identity": {"id": ident},
            "node": node,
            "hostIP": "192.0.2.1",
        },
    }
