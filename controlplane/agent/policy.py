"""The node's network policy: computed from the cache, written to the policy maps.

Any change of an input (the cluster's identities and policies, the owned endpoints, the
node's CIDR) wakes :meth:`PolicyFlusher.run`, which recomputes every local endpoint's
ingress policy (:func:`controlplane.policy.compute.compute`) and writes only the
differences to ``cp_policy``/``cp_endpoints``. Changes that arrive during a computation
form the next batch. Nothing is written before every input was listed once: a new process
on pinned maps keeps what they hold rather than a half-known truth.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from controlplane.agent.api import APIError
from controlplane.agent.endpoints import OwnedEndpoints
from controlplane.agent.flushing import Flusher
from controlplane.datapath.policymap import PolicyMaps
from controlplane.model import RESERVED_IDENTITIES, EndpointID, Identity, Labels, NetworkPolicy
from controlplane.policy.compute import NOT_ENFORCED, EndpointPolicy, Subject, compute
from controlplane.policy.endpoint_id import EndpointIDError, check_cidr

log = logging.getLogger(__name__)


class PolicyFlusher(Flusher):
    """Keeps the policy maps equal to the policy of the node's endpoints."""

    def __init__(
        self,
        owned: OwnedEndpoints,
        identities: Mapping[str, Identity],
        policies: Mapping[str, NetworkPolicy],
        maps: PolicyMaps,
        inputs_listed: Callable[[], bool],
    ) -> None:
        super().__init__()
        self.owned = owned
        self.identities = identities
        self.policies = policies
        self.maps = maps
        self._inputs_listed = inputs_listed
        self.policy: dict[EndpointID, EndpointPolicy] = {}
        """Each local endpoint's computed ingress policy (what the policy maps hold)."""
        self.error: str | None = None
        self.computes = 0
        self._listed_once = False

    def _inputs_ready(self) -> bool:
        if not self._listed_once:
            self._listed_once = self._inputs_listed()
        return self._listed_once

    def flush(self) -> bool | None:
        """Recompute every local endpoint's policy and write the differences to the maps.

        False when the inputs are not known yet (nothing written), None when a map write
        failed (the caller retries)."""
        if not self._inputs_ready():
            return False
        owned = self.owned
        subjects = {
            eid: Subject(local.namespace, local.labels)
            for eid, local in owned.items.items()
            if local.ip is not None
        }
        identities: dict[int, Labels] = {int(i): lbls for i, lbls in RESERVED_IDENTITIES.items()}
        for identity in self.identities.values():
            identities[int(identity.id)] = identity.labels
        self.policy = compute(subjects, identities, self.policies.values())
        self.computes += 1
        desired: dict[int, tuple[bool, frozenset[tuple[int, int, int]]]] = {}
        if owned.cidr is not None:
            try:
                check_cidr(owned.cidr)
            except EndpointIDError as exc:
                if self.error is None:
                    log.error("%s: policy not programmed: %s", owned.node, exc)
                self.error = str(exc)
                return False
        for eid, result in self.policy.items():
            ep = owned.items[eid].endpoint_id(owned.cidr)
            if ep is not None:
                desired[ep] = (result.enforced, result.allowed)
        if not self.maps.sync(desired):
            return None
        return True

    def endpoint_policy(self, namespace: str, name: str) -> dict[str, Any]:
        """``GET /v1/policy/<namespace>/<name>``: the endpoint's computed policy and what
        the maps hold for it."""
        local = self.owned.items.get(EndpointID(f"{namespace}/{name}"))
        if local is None:
            raise APIError(404, f"no endpoint {namespace}/{name}")
        ep = local.endpoint_id(self.owned.cidr)
        result = self.policy.get(local.id, NOT_ENFORCED)
        flags = None if ep is None else self.maps.flags().get(ep)
        rows = [] if ep is None else self.maps.rows(ep)
        return {
            "endpoint": str(local.id),
            "endpoint_id": ep,
            "identity": None if local.identity is None else int(local.identity.id),
            "enforced": result.enforced,
            "selected_by": list(result.selected_by),
            "allowed": [
                {"identity": i, "port": port, "proto": proto}
                for i, port, proto in sorted(result.allowed)
            ],
            "map": {
                "flags": flags,
                "entries": [
                    {"identity": r.identity, "port": r.port, "proto": r.proto, "allow": r.allow}
                    for r in rows
                ],
            },
        }

    def status(self) -> dict[str, Any]:
        return {
            "policies": len(self.policies),
            "enforced_endpoints": sum(1 for p in self.policy.values() if p.enforced),
            "computes": self.computes,
            "map_updates": self.maps.stats.updates,
            "map_deletes": self.maps.stats.deletes,
            "error": self.error,
        }
