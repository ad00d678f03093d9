"""Network policies as namespaced ``NetworkPolicy`` objects (group ``controlplane.io``).

Spec: ``endpointSelector`` (labels) and ``ingress`` rules (``fromSelector`` and ``ports``
of ``{port, protocol}``), the model of kvstore mode's policies. Written by tools
(``cpctl policy put``: create, or an update guarded by the resourceVersion just read, 409
retried), read by every agent; store events are named ``namespace/name``. The namespace
must exist, as for any namespaced object.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from typing import Any

from controlplane.crd.client import JSON, KubeClient
from controlplane.crd.errors import AlreadyExists, Conflict
from controlplane.crd.listwatch import KubeListWatcher
from controlplane.crd.records import ObjectCodec, meta_of, spec_of
from controlplane.crd.resources import NETWORK_POLICIES
from controlplane.crd.retry import on_conflict
from controlplane.metrics import StoreMetrics
from controlplane.model import NetworkPolicy
from controlplane.store_types import StoreEvent, Versioned

__all__ = ["RESOURCE", "CrdPolicyStore", "policy_spec"]

RESOURCE = "policy"


def policy_spec(policy: NetworkPolicy) -> JSON:
    rules: list[JSON] = []
    for rule in policy.ingress:
        ports = [{"port": p["port"], "protocol": p["proto"]} for p in rule.to_dict()["ports"]]
        rules.append({"fromSelector": rule.from_selector.to_strings(), "ports": ports})
    return {"endpointSelector": policy.endpoint_selector.to_strings(), "ingress": rules}


def _expand(obj: JSON) -> list[tuple[str, NetworkPolicy]]:
    meta, spec = meta_of(obj), spec_of(obj)
    ingress: list[Any] = spec.get("ingress") or []
    policy = NetworkPolicy.from_dict(
        {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "endpoint_selector": spec["endpointSelector"],
            "ingress": [
                {"from_selector": rule["fromSelector"], "ports": rule.get("ports") or []}
                for rule in ingress
            ],
        }
    )
    return [(policy.id, policy)]


class CrdPolicyStore:
    """The CRD :class:`~controlplane.store.PolicyStore`."""

    def __init__(self, client: KubeClient, metrics: StoreMetrics) -> None:
        self.client = client
        self.codec = ObjectCodec(RESOURCE, metrics, _expand)

    async def put(self, policy: NetworkPolicy) -> None:
        spec = policy_spec(policy)

        async def step() -> None:
            current = await self.client.get_or_none(NETWORK_POLICIES, policy.name, policy.namespace)
            body: JSON = {
                "apiVersion": NETWORK_POLICIES.api_version,
                "kind": NETWORK_POLICIES.kind,
                "metadata": {"name": policy.name, "namespace": policy.namespace},
                "spec": spec,
            }
            if current is None:
                try:
                    await self.client.create(NETWORK_POLICIES, body)
                except AlreadyExists:
                    raise Conflict(f"policy {policy.id} was created meanwhile") from None
                return
            if current.get("spec") == spec:
                return  # unchanged: no write, no event for every agent
            body["metadata"] = meta_of(current)
            await self.client.replace(NETWORK_POLICIES, body)

        await on_conflict(step, f"put policy {policy.id}")

    async def delete(self, namespace: str, name: str) -> bool:
        return await self.client.delete(NETWORK_POLICIES, name, namespace=namespace)

    async def list(self) -> builtins.list[Versioned[NetworkPolicy]]:
        return self.codec.decode_all((await self.client.list(NETWORK_POLICIES)).items)

    def watch(self) -> AsyncIterator[StoreEvent[NetworkPolicy]]:
        return self.codec.watch(KubeListWatcher(self.client, NETWORK_POLICIES))
