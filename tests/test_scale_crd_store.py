"""The scale harness's CRD-mode invariants (controlplane/scale/crd_store.py) on the local API
server: a consistent store passes, and each kind of violation the invariants name is
found: an IP held by two endpoints, an IP outside its node's CIDR, a label set with two
identities, overlapping CIDRs; and the truth the ipcaches must converge to is the
endpoints' (prefix, identity)."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.apiserver import KubeServer
from controlplane.crd.install import install_crds
from controlplane.crd.resources import ENDPOINTS, IDENTITIES, POD_CIDRS
from controlplane.scale.crd_store import read_crd_store
from controlplane.scale.worker import endpoint_digest, entry_bytes
from tests.crdop_support import endpoint_object, identity_object, kube_client

pytest_plugins = ["tests.kube_fixtures"]


def pod_cidr(name: str, cidr: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": POD_CIDRS.api_version,
        "kind": POD_CIDRS.kind,
        "metadata": {"name": name},
        "spec": {"pool": "default", "cidr": cidr, "node": node},
    }


@pytest.mark.timeout(120)
async def test_crd_invariants_pass_a_consistent_store_and_name_each_violation(
    kube: KubeServer,
) -> None:
    async with kube_client(kube) as client:
        await install_crds(client)
        await client.create(POD_CIDRS, pod_cidr("a", "10.1.0.0/24", "n1"))
        await client.create(POD_CIDRS, pod_cidr("b", "10.2.0.0/24", "n2"))
        await client.create(IDENTITIES, identity_object(1000, "k8s:app=x"))
        await client.create(ENDPOINTS, endpoint_object("e1", "10.1.0.5", 1000, "n1"))
        await client.create(ENDPOINTS, endpoint_object("e2", "10.2.0.7", 1000, "n2"))

        view = await read_crd_store(kube.kubeconfig)
        assert dict(view.violations) == {}
        assert view.counts == {"identities": 1, "cidrs": 2, "endpoints": 2}
        assert view.endpoints == {"10.1.0.5/32": ("n1", 1000), "10.2.0.7/32": ("n2", 1000)}
        assert view.truth == endpoint_digest(
            [entry_bytes("10.1.0.5/32", 1000), entry_bytes("10.2.0.7/32", 1000)]
        )
        assert view.owned_digest("n1") != view.owned_digest("n2")

        await client.create(ENDPOINTS, endpoint_object("dup", "10.1.0.5", 1000, "n1"))
        await client.create(ENDPOINTS, endpoint_object("away", "10.9.0.1", 1000, "n2"))
        await client.create(IDENTITIES, identity_object(1001, "k8s:app=x"))
        await client.create(POD_CIDRS, pod_cidr("c", "10.1.0.128/25", "n3"))
        view = await read_crd_store(kube.kubeconfig)
        assert sorted(view.violations["ip"]) == [
            "10.9.0.1/32 of n2 outside its node's CIDR",
            "IP 10.1.0.5/32 held by two endpoint objects",
        ]
        assert view.violations["identity"] == ["labels k8s:app=x have IDs 1000, 1001"]
        assert view.violations["cidr"] == ["CIDRs 10.1.0.0/24 and 10.1.0.128/25 overlap"]
