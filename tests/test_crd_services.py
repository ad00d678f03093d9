"""Services in CRD mode: the local API server's v1 Service and discovery.k8s.io/v1
EndpointSlice, the CRD service store (Services + EndpointSlices -> the model), the
EndpointSlice controller (selectors over the controlplane.io Endpoints), and an agent
that programs its LB maps from a Service made with kubectl."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from controlplane.agent.agent import Agent
from controlplane.apiserver import KubeServer, KubeServerSettings
from controlplane.apiserver.patch import MERGE_KEYS, strategic_merge
from controlplane.config import CrdConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.errors import CrdError, Invalid
from controlplane.crd.install import install_crds
from controlplane.crd.ipam import CrdCIDRStore
from controlplane.crd.kubeconfig import load_connection
from controlplane.crd.resources import ENDPOINTS, IDENTITIES, NAMESPACES
from controlplane.crd.services import (
    ENDPOINT_SLICES,
    MANAGED_BY,
    SERVICE_NAME,
    SERVICES,
    CrdServiceStore,
    EndpointSliceController,
    Skip,
    desired_slice,
    service_from,
)
from controlplane.datapath.lbmap import BackendAddr, FrontendAddr
from controlplane.ipam.cidr import ClusterPoolAllocator
from controlplane.metrics import StoreMetrics
from controlplane.model import Backend, Frontend, NodeName, Service
from controlplane.store_types import EventKind, StoreEvent
from tests.helpers import eventually, holds_for, requires, running, tools_unmet
from tests.kube_fixtures import kubectl
from tests.test_agent import agent_settings, create
from tests.test_agent import api as agent_api
from tests.test_agent_crd import POOL

TCP, UDP = 6, 17


# -- objects ---------------------------------------------------------------------------


def svc(
    name: str = "web",
    ip: str | None = "10.96.0.10",
    ports: list[dict[str, Any]] | None = None,
    namespace: str = "shop",
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "ports": ports if ports is not None else [{"port": 80, "targetPort": 8080}],
            **spec,
        },
    }
    if ip is not None:
        body["spec"]["clusterIP"] = ip
    return body


def eps(
    name: str,
    service: str,
    endpoints: list[dict[str, Any]],
    ports: list[dict[str, Any]] | None = None,
    namespace: str = "shop",
    address_type: str = "IPv4",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": {SERVICE_NAME: service}},
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports if ports is not None else [{"name": "", "port": 8080, "protocol": "TCP"}],
    }


def ep(ip: str, node: str | None = "node-a", ready: bool | None = True) -> dict[str, Any]:
    out: dict[str, Any] = {"addresses": [ip]}
    if ready is not None:
        out["conditions"] = {"ready": ready}
    if node:
        out["nodeName"] = node
    return out


def stored(obj: dict[str, Any], rv: int = 1) -> dict[str, Any]:
    """As the server returns it (a resourceVersion)."""
    return {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(rv)}}


# -- the mapping (pure) -------------------------------------------------------------------


def test_a_service_and_its_slices_make_the_model_service() -> None:
    ports = [
        {"name": "http", "port": 80, "targetPort": 8080},
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
        {"name": "sig", "port": 9, "protocol": "SCTP"},
    ]
    one = eps(
        "web-a",
        "web",
        [ep("10.0.1.2"), ep("10.0.1.1", node="node-b"), ep("10.0.1.9", ready=False)],
        [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
    )
    # a second slice: one endpoint again (counted once), one without conditions (ready)
    again = [ep("10.0.1.1", node="node-b"), ep("10.0.2.1", node=None, ready=None)]
    two = eps("web-b", "web", again, [{"name": "http", "port": 8080}])
    ipv6 = eps("web-c", "web", [ep("fd00::1")], address_type="IPv6")
    got = service_from(stored(svc(ports=ports)), [stored(one), stored(two), stored(ipv6)])
    http = Frontend(80, TCP, "http")
    dns = Frontend(53, UDP, "dns")
    assert got.frontends == (http, dns)  # SCTP is left out
    assert got.cluster_ip == IPv4Address("10.96.0.10") and got.id == "shop/web"
    node_a, node_b = NodeName("node-a"), NodeName("node-b")

    def be(ip: str, port: int, node: NodeName | None, fe: str) -> Backend:
        return Backend(IPv4Address(ip), port, node, fe)

    assert set(got.backends) == {
        be("10.0.1.1", 8080, node_b, "http"),
        be("10.0.1.2", 8080, node_a, "http"),
        be("10.0.2.1", 8080, None, "http"),
        be("10.0.1.1", 5353, node_b, "dns"),
        be("10.0.1.2", 5353, node_a, "dns"),
    }
    # one port: a slice port without a name serves it, whatever the service port's name
    single = svc(ports=[{"name": "80-8080", "port": 80, "targetPort": 8080}])
    got = service_from(stored(single), [stored(eps("s", "web", [ep("10.0.1.1")]))])
    assert [str(b) for b in got.backends] == ["10.0.1.1:8080"]


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"clusterIP": "None"}, "headless"),
        ({"type": "ExternalName", "externalName": "example.com", "clusterIP": ""}, "external-name"),
        ({"clusterIP": "fd00::10"}, "ipv6"),
        ({"ports": [{"port": 9, "protocol": "SCTP"}]}, "no-tcp-udp-ports"),
    ],
)
def test_services_the_datapath_does_not_balance_are_skipped_with_a_reason(
    spec: dict[str, Any], reason: str
) -> None:
    body = svc()
    body["spec"].update(spec)
    with pytest.raises(Skip) as info:
        service_from(stored(body), [])
    assert info.value.reason == reason


def test_desired_slice_selects_pods_by_their_identity_labels() -> None:
    service = stored(svc(selector={"app": "web"}))
    service["metadata"]["uid"] = "u-1"

    def pod(name: str, ip: str, namespace: str = "shop") -> dict[str, Any]:
        return {
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"addressing": [{"family": "IPv4", "ip": ip}], "node": "node-a"},
        }

    pods = [
        (pod("web-2", "10.0.1.7"), {"app": "web", "tier": "frontend"}),
        (pod("web-1", "10.0.1.3"), {"app": "web"}),
        (pod("db-1", "10.0.1.4"), {"app": "db"}),
    ]
    got = desired_slice(service, pods)
    assert got is not None
    assert got["metadata"]["name"] == "web-controlplane"
    assert got["metadata"]["labels"] == {
        SERVICE_NAME: "web",
        MANAGED_BY: "endpointslice-controller.controlplane.io",
    }
    assert got["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert got["ports"] == [{"name": "", "port": 8080, "protocol": "TCP"}]
    assert [e["addresses"] for e in got["endpoints"]] == [["10.0.1.3"], ["10.0.1.7"]]
    assert got["endpoints"][0]["targetRef"]["name"] == "web-1"
    # and what the store makes of it
    model = service_from(stored(service), [stored(got)])
    assert [str(b) for b in model.backends] == ["10.0.1.3:8080", "10.0.1.7:8080"]
    # no selector (backends by hand), ExternalName: no slice of ours
    assert desired_slice(stored(svc()), pods) is None
    named = svc(selector={"app": "web"}, ports=[{"port": 80, "targetPort": "http"}])
    assert (desired_slice(stored(named), pods) or {}).get("ports") == []


# -- the API server's kinds -------------------------------------------------------------


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[KubeServer]:
    settings = KubeServerSettings(
        data_dir=tmp_path / "kube", bookmark_interval=0.3, service_cidr="10.96.0.0/24"
    )
    async with KubeServer(settings) as kube:
        yield kube


@pytest_asyncio.fixture
async def api(server: KubeServer) -> AsyncIterator[KubeClient]:
    async with KubeClient(load_connection(str(server.kubeconfig))) as client:
        await client.create(
            NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}
        )
        yield client


async def test_cluster_ip_allocated_checked_immutable_and_released(api: KubeClient) -> None:
    created = await api.create(SERVICES, svc("auto", ip=None))
    ip = created["spec"]["clusterIP"]
    assert ip.startswith("10.96.0.") and ip not in ("10.96.0.0", "10.96.0.1", "10.96.0.255")
    assert created["spec"]["clusterIPs"] == [ip]
    assert created["spec"]["type"] == "ClusterIP"
    assert created["spec"]["sessionAffinity"] == "None"
    assert created["spec"]["ports"] == [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]
    assert created["status"] == {"loadBalancer": {}}
    # a given one: kept; taken, out of range, not an IP -> 422
    fixed = await api.create(SERVICES, svc("fixed", ip="10.96.0.10"))
    assert fixed["spec"]["clusterIP"] == "10.96.0.10"
    with pytest.raises(Invalid, match="provided IP is already allocated"):
        await api.create(SERVICES, svc("dup", ip="10.96.0.10"))
    with pytest.raises(Invalid, match=r"not in the valid range. The range of valid IPs is 10\.96"):
        await api.create(SERVICES, svc("out", ip="10.97.0.10"))
    with pytest.raises(Invalid, match="must be a valid IP address"):
        await api.create(SERVICES, svc("junk", ip="ten"))
    # headless: no IP, no ports needed
    headless = await api.create(SERVICES, svc("hl", ip="None", ports=[]))
    assert headless["spec"]["clusterIP"] == "None"
    # immutable: a change is 422; an update without one keeps it (kubectl apply)
    changed = {**fixed, "spec": {**fixed["spec"], "clusterIP": "10.96.0.11", "clusterIPs": []}}
    with pytest.raises(
        Invalid, match=r"spec.clusterIP: Invalid value: \"10.96.0.11\": field is immutable"
    ):
        await api.replace(SERVICES, changed)
    bare = {**fixed, "spec": {"ports": [{"port": 81}]}}
    updated = await api.replace(SERVICES, bare)
    assert updated["spec"]["clusterIP"] == "10.96.0.10"
    assert updated["spec"]["ports"] == [{"port": 81, "targetPort": 81, "protocol": "TCP"}]
    # a delete releases the IP (also a namespace delete does)
    assert await api.delete(SERVICES, "fixed", namespace="shop")
    again = await api.create(SERVICES, svc("fixed-again", ip="10.96.0.10"))
    assert again["spec"]["clusterIP"] == "10.96.0.10"
    await api.delete(NAMESPACES, "shop")
    await api.create(
        NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}}
    )
    reused = await api.create(SERVICES, svc("x", ip="10.96.0.10", namespace="other"))
    assert reused["spec"]["clusterIP"] == "10.96.0.10"


async def test_a_small_range_is_used_up_then_refused(tmp_path: Path) -> None:
    """10.96.0.0/29: .2 to .6 (not the network, .1, the broadcast); then 500, as kube."""
    settings = KubeServerSettings(data_dir=tmp_path / "kube", service_cidr="10.96.0.0/29")
    async with (
        KubeServer(settings) as server,
        KubeClient(load_connection(str(server.kubeconfig))) as client,
    ):
        ips: dict[str, str] = {}
        for i in range(5):
            created = await client.create(SERVICES, svc(f"s{i}", ip=None, namespace="default"))
            ips[f"s{i}"] = created["spec"]["clusterIP"]
        assert set(ips.values()) == {f"10.96.0.{n}" for n in range(2, 7)}
        with pytest.raises(CrdError, match=r"range 10\.96\.0\.0/29 is full"):
            await client.create(SERVICES, svc("s5", ip=None, namespace="default"))
        assert await client.delete(SERVICES, "s3", namespace="default")
        again = await client.create(SERVICES, svc("s6", ip=None, namespace="default"))
        assert again["spec"]["clusterIP"] == ips["s3"]  # the one address freed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"ports": []}, "spec.ports: Required value"),
        ({"ports": [{"port": 0}]}, "spec.ports[0].port: Invalid value: 0: must be between 1"),
        ({"ports": [{"port": 80, "protocol": "ICMP"}]}, 'Unsupported value: "ICMP"'),
        ({"ports": [{"port": 80}, {"port": 81, "name": "b"}]}, "spec.ports[0].name: Required"),
        (
            {"ports": [{"port": 80, "name": "a"}, {"port": 80, "name": "b"}]},
            "spec.ports[1]: Duplicate value",
        ),
        ({"ports": [{"port": 80, "targetPort": "Not_A_Name"}]}, "spec.ports[0].targetPort"),
        ({"type": "Magic"}, 'spec.type: Unsupported value: "Magic"'),
        ({"type": "ExternalName"}, "spec.externalName: Required value"),
        ({"type": "NodePort", "clusterIP": "None"}, "may not be set to 'None' for NodePort"),
        ({"selector": {"app": 7}}, "spec.selector"),
    ],
)
async def test_service_validation(api: KubeClient, spec: dict[str, Any], message: str) -> None:
    body = svc("bad", ip=None)
    body["spec"].update(spec)
    with pytest.raises(Invalid) as info:
        await api.create(SERVICES, body)
    assert message in str(info.value)
    assert (await api.list(SERVICES, namespace="shop")).items == []


async def test_endpoint_slice_crud_and_validation(api: KubeClient) -> None:
    body = eps("web-1", "web", [ep("10.0.1.1")])
    created = await api.create(ENDPOINT_SLICES, body)
    assert created["endpoints"] == body["endpoints"] and created["addressType"] == "IPv4"
    created["endpoints"].append(ep("10.0.1.2"))
    updated = await api.replace(ENDPOINT_SLICES, created)
    assert [e["addresses"] for e in updated["endpoints"]] == [["10.0.1.1"], ["10.0.1.2"]]
    listed = await api.list(ENDPOINT_SLICES, namespace="shop", label_selector=f"{SERVICE_NAME}=web")
    assert [o["metadata"]["name"] for o in listed.items] == ["web-1"]
    with pytest.raises(Invalid, match='addressType: Invalid value: "IPv6": field is immutable'):
        await api.replace(ENDPOINT_SLICES, {**updated, "addressType": "IPv6", "endpoints": []})
    bad: list[tuple[dict[str, Any], str]] = [
        ({"addressType": None}, "addressType: Required value"),
        ({"addressType": "IPX"}, 'Unsupported value: "IPX"'),
        ({"endpoints": [ep("fd00::1")]}, "endpoints[0].addresses[0]: Invalid value"),
        ({"endpoints": [{"addresses": []}]}, "endpoints[0].addresses: Required value"),
        ({"ports": [{"name": "a", "port": 70000}]}, "ports[0].port: Invalid value: 70000"),
    ]
    for change, message in bad:
        with pytest.raises(Invalid) as info:
            await api.create(ENDPOINT_SLICES, {**eps("bad", "web", [ep("10.0.1.1")]), **change})
        assert message in str(info.value)
    assert await api.delete(ENDPOINT_SLICES, "web-1", namespace="shop")
    assert not await api.delete(ENDPOINT_SLICES, "web-1", namespace="shop")


@requires(tools_unmet("kubectl"))
async def test_kubectl_create_expose_apply_and_get(
    server: KubeServer, api: KubeClient, tmp_path: Path
) -> None:
    config = server.kubeconfig

    async def run(*args: str, stdin: str | None = None, check: bool = True) -> Any:
        return await asyncio.to_thread(kubectl, config, *args, stdin=stdin, check=check)

    await run("-n", "shop", "create", "service", "clusterip", "web", "--tcp=80:8080")
    web = await api.get(SERVICES, "web", "shop")
    assert web["spec"]["selector"] == {"app": "web"}  # what kubectl create service sets
    assert web["spec"]["ports"][0]["targetPort"] == 8080
    assert web["spec"]["clusterIP"].startswith("10.96.0.")
    await run("-n", "shop", "expose", "service", "web", "--name", "web2", "--port", "8080")
    web2 = await api.get(SERVICES, "web2", "shop")
    assert web2["spec"]["selector"] == {"app": "web"}
    assert web2["spec"]["clusterIP"] not in ("", web["spec"]["clusterIP"])
    await run("-n", "shop", "create", "service", "clusterip", "hl", "--clusterip=None")
    manifest = (
        "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\n"
        "spec:\n  selector: {app: api}\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n"
        "  - {name: dns, port: 53, protocol: UDP}\n"
    )
    await run("apply", "-f", "-", stdin=manifest)
    first = await api.get(SERVICES, "api", "shop")
    await run("apply", "-f", "-", stdin=manifest.replace("port: 80,", "port: 81,"))
    second = await api.get(SERVICES, "api", "shop")
    assert second["spec"]["clusterIP"] == first["spec"]["clusterIP"]
    assert second["spec"]["ports"][0]["port"] == 81
    refused = await run(
        "-n", "shop", "patch", "svc", "api", "-p", '{"spec":{"clusterIP":"10.96.0.200"}}',
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "field is immutable" in refused.stderr
    got = (await run("-n", "shop", "get", "svc")).stdout
    assert "CLUSTER-IP" in got and first["spec"]["clusterIP"] in got and "None" in got
    await api.create(ENDPOINT_SLICES, eps("api-1", "api", [ep("10.0.1.1")]))
    slices = (await run("-n", "shop", "get", "endpointslices")).stdout
    assert "api-1" in slices and "IPv4" in slices


# -- the store --------------------------------------------------------------------------


async def test_store_lists_and_watches_services_with_their_slices(api: KubeClient) -> None:
    metrics = StoreMetrics.create()
    store = CrdServiceStore(api, metrics)
    await api.create(SERVICES, svc("web", ports=[{"name": "http", "port": 80, "targetPort": 8080}]))
    await api.create(
        ENDPOINT_SLICES, eps("web-1", "web", [ep("10.0.1.1")], [{"name": "http", "port": 8080}])
    )
    await api.create(SERVICES, svc("hl", ip="None", ports=[]))
    [listed] = await store.list()
    assert [str(b) for b in listed.value.backends] == ["10.0.1.1:8080"]
    assert store.skipped["headless"] == 1
    events: list[StoreEvent[Service]] = []

    async def pump() -> None:
        async for event in store.watch():
            events.append(event)

    def state() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for e in events:
            if e.kind is EventKind.UPSERT and e.value is not None:
                out[e.name] = [str(b) for b in e.value.backends]
            elif e.kind is EventKind.DELETE:
                out.pop(e.name, None)
        return out

    task = asyncio.create_task(pump())
    try:
        await eventually(lambda: any(e.kind is EventKind.SYNCED for e in events))
        assert state() == {"shop/web": ["10.0.1.1:8080"]}
        # a second slice, a not-ready endpoint: followed
        await api.create(
            ENDPOINT_SLICES,
            eps("web-2", "web", [ep("10.0.2.1"), ep("10.0.2.2", ready=False)],
                [{"name": "http", "port": 8080}]),
        )  # fmt: skip
        await eventually(lambda: state() == {"shop/web": ["10.0.1.1:8080", "10.0.2.1:8080"]})
        # a malformed slice (an address the model refuses): counted, the service skipped
        # until it is fixed, then back
        bad = eps(
            "web-3", "web", [ep("10.0.3.1", node="Not_A_Node")], [{"name": "http", "port": 8080}]
        )
        created = await api.create(ENDPOINT_SLICES, bad)
        await eventually(lambda: state() == {})
        assert (
            metrics.registry.get_sample_value(
                "cp_store_malformed_values_total", {"resource": "service"}
            )
            == 1
        )
        created["endpoints"] = [ep("10.0.3.1")]
        await api.replace(ENDPOINT_SLICES, created)
        await eventually(lambda: len(state().get("shop/web", [])) == 3)
        # a service turned headless... cannot be (immutable); deleted: a DELETE
        assert await api.delete(SERVICES, "web", namespace="shop")
        await eventually(lambda: state() == {})
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_store_put_and_delete_write_a_service_and_its_slice(api: KubeClient) -> None:
    store = CrdServiceStore(api, StoreMetrics.create())
    service = Service(
        "shop",
        "db",
        IPv4Address("10.96.0.20"),
        (Frontend(5432, TCP, "pg"), Frontend(53, UDP, "dns")),
        (
            Backend(IPv4Address("10.0.1.1"), 5432, NodeName("node-a"), "pg"),
            Backend(IPv4Address("10.0.1.1"), 5353, NodeName("node-a"), "dns"),
            Backend(IPv4Address("10.0.1.2"), 5433, None, "pg"),
        ),
    )
    await store.put(service)
    [got] = await store.list()
    assert got.value == Service(
        service.namespace,
        service.name,
        service.cluster_ip,
        service.frontends,
        tuple(sorted(service.backends, key=lambda b: (b.frontend, b.ip, b.port))),
    )
    slices = await api.list(ENDPOINT_SLICES, namespace="shop")
    assert len(slices.items) == 2  # 10.0.1.2 serves pg on another port: its own slice
    # a new cluster IP: the Service is made again (it is immutable)
    moved = Service("shop", "db", IPv4Address("10.96.0.21"), (Frontend(5432, TCP, "pg"),))
    await store.put(moved)
    assert [v.value for v in await store.list()] == [moved]
    assert (await api.list(ENDPOINT_SLICES, namespace="shop")).items == []
    assert await store.delete("shop", "db")
    assert not await store.delete("shop", "db")
    assert await store.list() == []


# -- the EndpointSlice controller and the agent -------------------------------------------


@requires(tools_unmet("kubectl"))
async def test_kubectl_made_service_reaches_the_agents_lb_maps(tmp_path: Path) -> None:
    """`kubectl create service clusterip web` in namespace shop, with the agent's web pods
    there: the controller writes the slice, the agent's store joins it, the LB maps get
    the VIP with the pods as backends; a new pod is added, a deleted one goes, the
    service's delete empties the maps."""
    settings = KubeServerSettings(
        data_dir=tmp_path / "kube", bookmark_interval=0.3, endpointslice_controller=True
    )
    async with (
        KubeServer(settings) as server,
        KubeClient(load_connection(str(server.kubeconfig))) as client,
    ):
        await install_crds(client)
        await client.create(
            NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}
        )
        allocator = ClusterPoolAllocator(CrdCIDRStore(client, StoreMetrics.create()), POOL)
        await allocator.allocate(NodeName("node-a"))  # the operator's part
        agent = Agent(
            agent_settings(tmp_path, "node-a", "127.0.0.11", pool=POOL.name),
            CrdConfig(kubeconfig=str(server.kubeconfig), request_timeout=2.0),
        )  # userspace maps

        def lb() -> dict[FrontendAddr, list[BackendAddr | None]]:
            return {e.frontend: list(e.backends) for e in agent.lb_maps.entries()}

        async with running(agent):
            await asyncio.wait_for(agent.wait_ready(), 30)
            web1 = await create(agent, "shop", "web-1", ["k8s:app=web"])
            await create(agent, "shop", "db-1", ["k8s:app=db"])
            await asyncio.to_thread(
                kubectl, server.kubeconfig, "-n", "shop", "create", "service", "clusterip",
                "web", "--tcp=80:8080",
            )  # fmt: skip
            vip = (await client.get(SERVICES, "web", "shop"))["spec"]["clusterIP"]
            frontend = FrontendAddr(IPv4Address(vip), 80, TCP)

            def backends() -> list[str]:
                return sorted(f"{b.ip}:{b.port}" for b in lb().get(frontend, []) if b)

            await eventually(
                lambda: backends() == [f"{web1['ip']}:8080"], message="web-1 behind the VIP"
            )
            web2 = await create(agent, "shop", "web-2", ["k8s:app=web", "k8s:tier=a"])
            await eventually(
                lambda: backends() == sorted([f"{web1['ip']}:8080", f"{web2['ip']}:8080"]),
                message="web-2 added",
            )
            status, _ = await agent_api(agent, "DELETE", "/v1/endpoints/shop/web-1")
            assert status in (200, 204)
            await eventually(lambda: backends() == [f"{web2['ip']}:8080"], message="web-1 gone")
            slices = await client.list(ENDPOINT_SLICES, namespace="shop")
            assert [s["metadata"]["name"] for s in slices.items] == ["web-controlplane"]
            assert await client.delete(SERVICES, "web", namespace="shop")
            await eventually(lambda: frontend not in lb(), message="service removed")

            async def no_slices() -> bool:
                return not (await client.list(ENDPOINT_SLICES, namespace="shop")).items

            await eventually(no_slices, message="the controller deletes the slice")


def test_strategic_merge_of_service_ports_by_their_port() -> None:
    current = {
        "spec": {
            "ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ],
            "selector": {"app": "web"},
        }
    }
    # what kubectl apply sends when port 80 became 81 in the manifest
    patch = {
        "spec": {
            "$setElementOrder/ports": [{"port": 81}, {"port": 53}],
            "ports": [
                {"name": "http", "port": 81, "targetPort": 8080},
                {"$patch": "delete", "port": 80},
            ],
            "selector": {"tier": "a", "app": None},
        }
    }
    got = strategic_merge(current, patch, MERGE_KEYS["Service"])
    assert got["spec"]["ports"] == [
        {"name": "http", "port": 81, "targetPort": 8080},
        {"name": "dns", "port": 53, "protocol": "UDP"},
    ]
    assert got["spec"]["selector"] == {"tier": "a"}
    patch = {"spec": {"ports": [{"port": 53, "targetPort": 5353}]}}
    got = strategic_merge(got, patch, MERGE_KEYS["Service"])
    assert got["spec"]["ports"][1] == {
        "name": "dns",
        "port": 53,
        "protocol": "UDP",
        "targetPort": 5353,
    }
    replaced = strategic_merge(got, {"spec": {"$patch": "replace", "ports": []}}, {})
    assert replaced == {"spec": {"ports": []}}


async def test_controller_keeps_slices_of_selected_endpoints(api: KubeClient) -> None:
    """The controller on its own: pods are Endpoint objects labelled by their identity;
    an address that is not IPv4 is left out; a slice of its name it does not manage is
    left alone (no write loop); a selector change and a removed selector are followed."""
    await install_crds(api)

    def identity(ident: int, *labels: str) -> dict[str, Any]:
        return {
            "apiVersion": "controlplane.io/v1",
            "kind": "Identity",
            "metadata": {"name": str(ident)},
            "spec": {"labels": list(labels)},
        }

    def pod(name: str, ip: str, ident: int) -> dict[str, Any]:
        return {
            "apiVersion": "controlplane.io/v1",
            "kind": "Endpoint",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {
                "addressing": [{"family": "IPv4", "ip": ip}],
                "identity": {"id": ident},
                "node": "node-a",
                "hostIP": "192.168.0.1",
            },
        }

    await api.create(IDENTITIES, identity(1001, "k8s:app=web"))
    await api.create(IDENTITIES, identity(1002, "k8s:app=db"))
    await api.create(ENDPOINTS, pod("web-1", "10.0.1.1", 1001))
    await api.create(ENDPOINTS, pod("web-bad", "not-an-ip", 1001))
    await api.create(ENDPOINTS, pod("db-1", "10.0.1.2", 1002))
    foreign = eps("api-controlplane", "api", [ep("10.0.9.9")])  # someone else's, same name
    await api.create(ENDPOINT_SLICES, foreign)
    await api.create(SERVICES, svc("web", selector={"app": "web"}))
    await api.create(SERVICES, svc("api", ip="10.96.0.11", selector={"app": "web"}))
    controller = EndpointSliceController(api)
    task = asyncio.create_task(controller.run())

    async def addresses(name: str) -> list[str] | None:
        got = await api.get_or_none(ENDPOINT_SLICES, name, "shop")
        return None if got is None else [e["addresses"][0] for e in got["endpoints"]]

    try:
        await eventually(lambda: addresses("web-controlplane"), message="web's slice")
        assert await addresses("web-controlplane") == ["10.0.1.1"]
        assert await addresses("api-controlplane") == ["10.0.9.9"]  # not taken over
        writes = controller.writes
        await holds_for(lambda: controller.writes == writes, 0.3, "no write loop")
        web = await api.get(SERVICES, "web", "shop")
        web["spec"]["selector"] = {"app": "db"}
        await api.replace(SERVICES, web)

        async def db_selected() -> bool:
            return await addresses("web-controlplane") == ["10.0.1.2"]

        await eventually(db_selected, message="the new selector")
        web = await api.get(SERVICES, "web", "shop")
        del web["spec"]["selector"]
        await api.replace(SERVICES, web)

        async def gone() -> bool:
            return await addresses("web-controlplane") is None

        await eventually(gone, message="no selector: no slice of ours")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
