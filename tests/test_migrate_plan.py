"""The plan of `cpctl migrate` as pure logic over two snapshots: what is copied, what is
already there, and every kind of conflict (each one line, naming both sides)."""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from typing import Any

from controlplane.migrate.plan import Snapshot, drift, make_plan
from controlplane.model import (
    Endpoint,
    EndpointID,
    Identity,
    IPLease,
    Labels,
    Node,
    NodeName,
    NumericIdentity,
)
from controlplane.store_types import CIDRClaim

WEB = Identity(NumericIdentity(1000), Labels.from_strings(["k8s:app=web"]))


class Target:
    """A target side that places every identity (what the plan asks of it)."""

    def placement_error(self, identity: Identity) -> str | None:
        return None if identity.id < 60000 else f"identity {identity.id} out of range"


def snap(mode: str, *, namespaces: set[str] | None = None, **records: Any) -> Snapshot:
    base: dict[str, Any] = {
        "identities": {},
        "nodes": {},
        "cidrs": {},
        "leases": {},
        "endpoints": {},
        "policies": {},
        "services": None,
    }
    base.update(records)
    return Snapshot(mode=mode, namespaces=namespaces, **base)


def ep(ip: str, name: str, node: str = "node-a", identity: int = 1000) -> Endpoint:
    return Endpoint(
        ip=ip_address(ip),
        identity=NumericIdentity(identity),
        node=NodeName(node),
        host_ip=ip_address("192.168.0.1"),
        name=name,
        namespace="default",
    )


def ident(number: int, label: str) -> Identity:
    return Identity(NumericIdentity(number), Labels.from_strings([label]))


def claim(cidr: str, node: str) -> CIDRClaim:
    return CIDRClaim("default", ip_network(cidr), NodeName(node))


def lease(node: str, ip: Any, owner: str) -> IPLease:
    return IPLease(node=NodeName(node), ip=ip, owner=EndpointID(owner))


def node(name: str, cidr: str | None) -> Node:
    return Node(
        name=NodeName(name),
        ips=(ip_address("192.168.0.1"),),
        pod_cidrs=(ip_network(cidr),) if cidr else (),
        boot_id="b",
    )


def test_copies_what_the_target_lacks_and_counts_what_it_has() -> None:
    a = ep("10.0.1.10", "web")
    source = snap(
        "crd",
        identities={"1000": WEB},
        endpoints={"10.0.1.10": a},
        nodes={"node-a": node("node-a", "10.0.1.0/24")},
        leases={"node-a/10.0.1.10": lease("node-a", a.ip, "default/web")},
    )
    target = snap("kvstore", identities={"1000": WEB})
    plan = make_plan(source, target, Target())  # type: ignore[arg-type]
    assert plan.conflicts == []
    assert plan.counts() == {
        "identities": 0, "cidrs": 0, "nodes": 1, "leases": 1, "endpoints": 1,
        "policies": 0, "services": 0,
    }  # fmt: skip
    assert plan.present["identities"] == 1
    assert plan.skipped == ["services: crd mode has no services store"]
    assert plan.users == {"1000": [NodeName("node-a")]}


def test_every_kind_of_conflict_is_one_line() -> None:
    other_labels = Identity(NumericIdentity(1000), Labels.from_strings(["k8s:app=other"]))
    web_elsewhere = Identity(NumericIdentity(2000), WEB.labels)
    source = snap(
        "crd",
        identities={"1000": WEB, "61000": ident(61000, "k8s:x=y")},
        endpoints={"10.0.1.10": ep("10.0.1.10", "web"), "10.0.1.11": ep("10.0.1.11", "db")},
        cidrs={"default/10.0.1.0/24": claim("10.0.1.0/24", "node-a")},
        namespaces=None,
    )
    target = snap(
        "kvstore",
        identities={"1000": other_labels, "2000": web_elsewhere},
        endpoints={
            "10.0.1.10": ep("10.0.1.10", "thief"),
            "10.0.1.99": ep("10.0.1.99", "db"),
        },
        cidrs={"default/10.0.9.0/24": claim("10.0.9.0/24", "node-a")},
    )
    plan = make_plan(source, target, Target())  # type: ignore[arg-type]
    text = "\n".join(plan.conflicts)
    assert "identity 1000: kvstore has labels k8s:app=other, not labels k8s:app=web" in text
    assert "identity 61000 out of range" in text
    assert "endpoint 10.0.1.10: kvstore has pod default/thief" in text
    assert "endpoint 10.0.1.11: kvstore has pod default/db at 10.0.1.99" in text
    assert "gives node node-a 10.0.9.0/24" in text
    assert all("\n" not in line for line in plan.conflicts)


def test_a_missing_namespace_is_a_conflict_in_crd_mode() -> None:
    source = snap(
        "kvstore", endpoints={"10.0.1.10": ep("10.0.1.10", "web")}, identities={"1000": WEB}
    )
    target = snap("crd", namespaces={"default"} - {"default"} | {"kube-system"})
    plan = make_plan(source, target, Target())  # type: ignore[arg-type]
    assert "namespace 'default' does not exist in crd: create it first" in plan.conflicts


def test_a_node_that_lacks_only_its_pod_cidrs_is_filled_in_not_a_conflict() -> None:
    source = snap("kvstore", nodes={"node-a": node("node-a", "10.0.1.0/24")})
    target = snap("crd", nodes={"node-a": node("node-a", None)}, namespaces=set())
    plan = make_plan(source, target, Target())  # type: ignore[arg-type]
    assert plan.conflicts == [] and plan.counts()["nodes"] == 1
    changed = snap("crd", nodes={"node-a": node("node-a", "10.0.2.0/24")}, namespaces=set())
    assert make_plan(source, changed, Target()).conflicts  # type: ignore[arg-type]


def test_drift_counts_per_side_in_either_order() -> None:
    crd = snap("crd", identities={"1000": WEB}, nodes={"node-a": node("node-a", None)})
    kv = snap("kvstore", identities={"2000": Identity(NumericIdentity(2000), WEB.labels)},
              nodes={"node-a": node("node-a", "10.0.1.0/24")})  # fmt: skip
    for found in (drift(crd, kv), drift(kv, crd)):
        assert found.counts["identities"] == {"only_crd": 1, "only_kvstore": 1, "different": 0}
        assert found.counts["nodes"] == {"only_crd": 0, "only_kvstore": 0, "different": 1}
        assert "services" not in found.counts
        assert found.total == 3
