"""Network policy: the model, compute(), endpoint ids, the policy maps, the agent, cpctl."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest

from controlplane import codec
from controlplane.agent.agent import Agent
from controlplane.agent.settings import DatapathMode
from controlplane.cli.common import CommandError
from controlplane.cli.main import build_parser
from controlplane.datapath.bpf_syscall import BPF_MAP_TYPE_HASH
from controlplane.datapath.kernel import KernelMap
from controlplane.datapath.layouts import (
    ENDPOINTS_MAP_NAME,
    ENDPOINTS_MAX_ENTRIES,
    EP_F_INGRESS_ENFORCED,
    POLICY_MAP_NAME,
    POLICY_MAX_ENTRIES,
)
from controlplane.datapath.policymap import PolicyRow, userspace_policy_maps
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.policies import KvPolicyStore
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import InvalidRecord, Labels, NetworkPolicy
from controlplane.policy.compute import Subject, compute
from controlplane.policy.endpoint_id import EndpointIDError, endpoint_id
from controlplane.store_types import EventKind
from tests.helpers import cpctl_in_process, eventually, kernel_maps_unmet, requires, running
from tests.test_agent import agent_settings, api, create, give_cidrs, kv_config

LAYOUT = KeyLayout()
TCP, UDP = 6, 17


def policy(
    name: str, selector: list[str], *rules: tuple[list[str], list[Any]], ns: str = "default"
) -> NetworkPolicy:
    return NetworkPolicy.from_dict({
        "name": name,
        "namespace": ns,
        "endpoint_selector": selector,
        "ingress": [{"from_selector": src, "ports": ports} for src, ports in rules],
    })  # fmt: skip


def labels(*texts: str) -> Labels:
    return Labels.from_strings(texts)


# -- model ----------------------------------------------------------------------------


def test_policy_round_trip_and_bad_input() -> None:
    p = policy("db", ["app=db"], (["k8s:app=web"], [{"port": 5432, "proto": "TCP"}, {"proto": 1}]))
    assert NetworkPolicy.from_dict(p.to_dict()) == p
    assert p.to_dict()["ingress"][0]["ports"] == [
        {"port": 5432, "proto": "TCP"},
        {"port": 0, "proto": "ICMP"},
    ]
    assert p.endpoint_selector.to_strings() == ["any:app=db"]
    good = p.to_dict()
    for bad in (
        None,
        "policy",
        {**good, "name": "Not A Name"},
        {**good, "namespace": 5},
        {**good, "endpoint_selector": "app=db"},
        {**good, "endpoint_selector": ["=bad"]},
        {**good, "ingress": [{"from_selector": [], "ports": [{"port": 70000, "proto": "TCP"}]}]},
        {**good, "ingress": [{"from_selector": [], "ports": [{"port": 80, "proto": "NOPE"}]}]},
        {**good, "ingress": [{"from_selector": [], "ports": [{"port": 80, "proto": 0}]}]},
        {**good, "ingress": [{"ports": []}]},
        {**good, "ingress": "all"},
    ):
        with pytest.raises(InvalidRecord):
            NetworkPolicy.from_dict(bad)


# -- compute ----------------------------------------------------------------------------

IDS = {
    1: labels("reserved:host"),
    1000: labels("k8s:app=web", "k8s:tier=front"),
    1001: labels("k8s:app=db"),
    1002: labels("k8s:app=other"),
    1003: labels("container:app=web"),
}
EPS = {
    "web": Subject("default", labels("k8s:app=web", "k8s:tier=front")),
    "db": Subject("default", labels("k8s:app=db")),
    "other": Subject("default", labels("k8s:app=other")),
    "db-prod": Subject("prod", labels("k8s:app=db")),
}


def test_compute_default_allow_without_policies() -> None:
    result = compute(EPS, IDS, [])
    assert all(not r.enforced and not r.allowed for r in result.values())


def test_compute_selection_ports_and_sources() -> None:
    p = policy("db", ["app=db"], (["app=web"], [{"port": 5432, "proto": "TCP"}]))
    result = compute(EPS, IDS, [p])
    assert result["db"].enforced and result["db"].selected_by == ("default/db",)
    # "app=web" (any source) matches both web identities; tier is not required
    assert result["db"].allowed == {(1000, 5432, TCP), (1003, 5432, TCP)}
    assert not result["web"].enforced and not result["other"].enforced
    assert not result["db-prod"].enforced  # another namespace: not selected
    # a source with its own label source only matches that source
    p2 = policy(
        "db", ["app=db"], (["k8s:app=web", "k8s:tier=front"], [{"port": 53, "proto": "UDP"}])
    )
    assert compute(EPS, IDS, [p2])["db"].allowed == {(1000, 53, UDP)}


def test_compute_default_deny_wildcards_and_union() -> None:
    deny_all = policy("lock", ["app=web"])
    result = compute(EPS, IDS, [deny_all])
    assert result["web"].enforced and result["web"].allowed == frozenset()
    # no ports: every port and protocol (0, 0); a wider entry absorbs narrower ones
    p1 = policy("a", ["app=db"], (["app=other"], []), (["reserved:host"], [{"proto": "ICMP"}]))
    p2 = policy("b", [], (["app=other"], [{"port": 80, "proto": "TCP"}]))  # every endpoint
    p3 = policy("c", ["app=db"], (["reserved:host"], [{"port": 7, "proto": "ICMP"}]))
    result = compute(EPS, IDS, [p1, p2, p3])
    assert result["db"].allowed == {(1002, 0, 0), (1, 0, 1)}
    assert result["db"].selected_by == ("default/a", "default/b", "default/c")
    assert result["web"].enforced and result["web"].allowed == {(1002, 80, TCP)}
    # a rule whose source matches no identity allows nothing but still enforces
    nobody = policy("n", ["app=other"], (["app=nobody"], []))
    result = compute(EPS, IDS, [nobody])
    assert result["other"].enforced and not result["other"].allowed


def test_endpoint_ids() -> None:
    cidr = ip_network("10.20.3.0/24")
    assert endpoint_id(cidr, ip_address("10.20.3.2")) == 2
    assert endpoint_id(ip_network("fd00::/96"), ip_address("fd00::1:2")) == 0x10002
    with pytest.raises(EndpointIDError, match="not in"):
        endpoint_id(cidr, ip_address("10.20.4.2"))
    with pytest.raises(EndpointIDError, match="at most 2\\*\\*32"):
        endpoint_id(ip_network("fd00::/64"), ip_address("fd00::2"))


def test_policy_maps_mark_and_sweep() -> None:
    maps = userspace_policy_maps()
    assert maps.sync({2: (True, [(1000, 5432, TCP)]), 3: (False, [])})
    assert maps.flags() == {2: EP_F_INGRESS_ENFORCED, 3: 0}
    assert maps.rows() == [PolicyRow(2, 1000, 5432, TCP, True)]
    writes = maps.stats.updates
    assert maps.sync({2: (True, [(1000, 5432, TCP)]), 3: (False, [])})
    assert maps.stats.updates == writes and maps.stats.deletes == 0  # nothing rewritten
    assert maps.sync({2: (True, [(1000, 5432, TCP), (1001, 0, 0)])})
    assert maps.stats.updates == writes + 1 and maps.stats.deletes == 1  # only the diff
    assert maps.flags() == {2: EP_F_INGRESS_ENFORCED}
    assert maps.sync({2: (False, [])})
    assert maps.rows() == [] and maps.flags() == {2: 0}


# -- store and agents against etcd --------------------------------------------------------


async def test_policy_store_put_list_watch_delete(etcd1: EmbeddedEtcd) -> None:
    metrics = StoreMetrics.create()
    async with ShardMap(kv_config(etcd1), own_connection=True) as shards:
        store = KvPolicyStore(shards, LAYOUT, metrics)
        p = policy("db", ["app=db"], (["app=web"], [{"port": 5432, "proto": "TCP"}]))
        await store.put(p)
        backend = shards.all()[0]
        await backend.put(LAYOUT.policy("default", "junk"), b"\xc1")
        wrong = policy("other", ["app=x"]).to_dict()
        await backend.put(LAYOUT.policy("default", "mismatch"), codec.encode("policy", wrong))
        await backend.put(
            LAYOUT.policy_prefix + b"three/levels/deep", codec.encode("policy", wrong)
        )
        listed = await store.list()
        assert [v.value for v in listed] == [p]
        malformed = metrics.registry.get_sample_value(
            "cp_store_malformed_values_total", {"resource": "policy"}
        )
        assert malformed == 3
        events = store.watch()
        first = await anext(events)
        assert (first.kind, first.name, first.value) == (EventKind.UPSERT, "default/db", p)
        assert (await anext(events)).kind is EventKind.SYNCED
        assert await store.delete("default", "db") and not await store.delete("default", "db")
        gone = await anext(events)
        assert (gone.kind, gone.name, gone.value) == (EventKind.DELETE, "default/db", p)
        await events.aclose()  # type: ignore[attr-defined]


def _entries(agent: Agent, ep: int) -> set[tuple[int, int, int]]:
    return {(r.identity, r.port, r.proto) for r in agent.policy_maps.rows(ep) if r.allow}


def _flags(agent: Agent, ep: int) -> int | None:
    return agent.policy_maps.flags().get(ep)


def _unenforced(agent: Agent, ep: int) -> Callable[[], bool]:
    return lambda: _flags(agent, ep) == 0


async def test_agents_enforce_policy_and_follow_changes(
    etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    await give_cidrs(etcd1, "node-a", "node-b")
    config = kv_config(etcd1)
    a = Agent(agent_settings(tmp_path, "node-a", "127.0.0.11"), config)
    b = Agent(agent_settings(tmp_path, "node-b", "127.0.0.12"), config)
    async with (
        running(a),
        running(b),
        ShardMap(config, own_connection=True) as shards,
    ):
        store = KvPolicyStore(shards, LAYOUT, StoreMetrics.create())
        await asyncio.wait_for(asyncio.gather(a.wait_ready(), b.wait_ready()), 20)
        web = await create(a, "default", "web", ["k8s:app=web"])
        other = await create(a, "default", "other", ["k8s:app=other"])
        db = await create(b, "default", "db", ["k8s:app=db"])
        for ep, agent in ((web, a), (other, a), (db, b)):
            assert agent.cidr is not None
            offset = int(ip_address(ep["ip"])) - int(agent.cidr.network_address)
            assert ep["endpoint_id"] == offset
            await eventually(_unenforced(agent, offset), message="endpoint entry written")
        status, got = await api(a, "GET", "/v1/endpoints/default/web")
        assert status == 200 and got["endpoint_id"] == web["endpoint_id"]

        p = policy("db", ["app=db"], (["app=web"], [{"port": 5432, "proto": "TCP"}]))
        await store.put(p)
        db_ep = db["endpoint_id"]
        want = {(web["identity"], 5432, TCP)}
        await eventually(
            lambda: _flags(b, db_ep) == EP_F_INGRESS_ENFORCED and _entries(b, db_ep) == want,
            timeout=10,
            message="db enforced with web on 5432",
        )
        assert len(b.policy_maps.policy) == 1
        assert _flags(a, web["endpoint_id"]) == 0 and _flags(a, other["endpoint_id"]) == 0
        assert len(a.policy_maps.policy) == 0
        status, view = await api(b, "GET", "/v1/policy/default/db")
        assert status == 200 and view["enforced"] and view["selected_by"] == ["default/db"]
        assert view["allowed"] == [{"identity": web["identity"], "port": 5432, "proto": TCP}]
        assert view["map"]["flags"] == EP_F_INGRESS_ENFORCED and len(view["map"]["entries"]) == 1
        status, view = await api(a, "GET", "/v1/policy/default/web")
        assert status == 200 and not view["enforced"] and view["allowed"] == []
        status, _ = await api(a, "GET", "/v1/policy/default/nope")
        assert status == 404
        status, st = await api(b, "GET", "/v1/status")
        assert st["datapath"]["maps"]["cp_policy"]["entries"] == 1
        assert st["datapath"]["maps"]["cp_endpoints"]["entries"] == 1
        assert st["policy"]["policies"] == 1 and st["policy"]["enforced_endpoints"] == 1

        # web gets new labels: a new identity, which the policy's app=web also selects
        status, _ = await api(a, "DELETE", "/v1/endpoints/default/web")
        assert status == 200
        web2 = await create(a, "default", "web", ["k8s:app=web", "k8s:version=2"])
        assert web2["identity"] != web["identity"]
        want2 = {(web["identity"], 5432, TCP), (web2["identity"], 5432, TCP)}
        await eventually(lambda: _entries(b, db_ep) == want2, timeout=10, message="new identity")

        # edit the policy: only version=2, on another port
        p2 = policy("db", ["app=db"], (["version=2"], [{"port": 6432, "proto": "TCP"}]))
        await store.put(p2)
        await eventually(
            lambda: _entries(b, db_ep) == {(web2["identity"], 6432, TCP)},
            timeout=10,
            message="edited policy",
        )
        # a malformed policy is skipped and counted; the agents carry on
        backend = shards.all()[0]
        await backend.put(LAYOUT.policy("default", "junk"), b"\xc1")
        await backend.put(LAYOUT.policy("default", "bad"), codec.encode("policy", {"name": 1}))

        def malformed() -> float:
            value = b.metrics.registry.get_sample_value(
                "cp_store_malformed_values_total", {"resource": "policy"}
            )
            return value or 0.0

        await eventually(lambda: malformed() >= 2, message="malformed policies counted")
        assert _entries(b, db_ep) == {(web2["identity"], 6432, TCP)} and b.ready
        # delete the policy: db is back to default allow, its entries swept
        assert await store.delete("default", "db")
        await eventually(
            lambda: _flags(b, db_ep) == 0 and len(b.policy_maps.policy) == 0,
            timeout=10,
            message="policy removed",
        )


# -- cpctl --------------------------------------------------------------------------------


async def test_cpctl_policy_put_list_delete(
    etcd1: EmbeddedEtcd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    yaml_file = tmp_path / "db.yaml"
    yaml_file.write_text(
        "name: db\nnamespace: default\nendpoint_selector: [app=db]\n"
        "ingress:\n  - from_selector: [app=web]\n    ports: [{port: 5432, proto: TCP}]\n"
    )
    json_file = tmp_path / "more.json"
    json_file.write_text(json.dumps([policy("lock", ["app=x"], ns="prod").to_dict()]))
    assert await cpctl_in_process(etcd1, "policy", "put", str(yaml_file)) == 0
    assert await cpctl_in_process(etcd1, "policy", "put", str(json_file)) == 0
    assert "policy default/db stored" in capsys.readouterr().out
    assert await cpctl_in_process(etcd1, "policy", "list") == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["NAMESPACE/NAME", "SELECTOR", "INGRESS"]
    assert lines[1].split() == ["default/db", "any:app=db", "any:app=web", "->", "5432/TCP"]
    assert lines[2].split()[0] == "prod/lock" and "2 policies" in err
    assert await cpctl_in_process(etcd1, "policy", "list", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in data["policies"]] == ["db", "lock"] and data["malformed"] == 0
    assert NetworkPolicy.from_dict(data["policies"][0]) == policy(
        "db", ["app=db"], (["app=web"], [{"port": 5432, "proto": "TCP"}])
    )
    assert await cpctl_in_process(etcd1, "policy", "delete", "prod/lock") == 0
    with pytest.raises(CommandError, match="not found"):
        await cpctl_in_process(etcd1, "policy", "delete", "prod/lock")
    with pytest.raises(CommandError, match="NS/NAME"):
        await cpctl_in_process(etcd1, "policy", "delete", "lock")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: db\nnamespace: default\nendpoint_selector: app=db\ningress: []\n")
    with pytest.raises(CommandError, match="endpoint_selector") as info:
        await cpctl_in_process(etcd1, "policy", "put", str(bad))
    assert info.value.status == 2
    capsys.readouterr()
    assert await cpctl_in_process(etcd1, "policy", "list", "--json") == 0
    assert [p["name"] for p in json.loads(capsys.readouterr().out)["policies"]] == ["db"]


async def test_cpctl_bpf_reports_a_missing_pin(tmp_path: Path) -> None:
    for argv in (
        ["ipcache", "list"],
        ["policy", "list", "2"],
        ["metrics", "--json"],
        ["ct", "list", "--json"],
    ):
        args = build_parser().parse_args(["bpf", *argv, "--pin-dir", str(tmp_path / "none")])
        with pytest.raises(CommandError) as info:
            await args.run(args)
        message = str(info.value)
        assert info.value.status == 1 and "\n" not in message
        assert "not pinned" in message or "needs root" in message


# -- kernel mode (root, eBPF) -------------------------------------------------------------

needs_kernel = requires(kernel_maps_unmet())


@needs_kernel
async def test_kernel_policy_maps_pinned_and_read_by_cpctl(
    etcd1: EmbeddedEtcd, tmp_path: Path, bpf_pin_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await give_cidrs(etcd1, "node-a")
    config = kv_config(etcd1)
    settings = agent_settings(
        tmp_path, "node-a", "127.0.0.11", datapath=DatapathMode.KERNEL, bpf_pin_dir=bpf_pin_dir
    )
    a = Agent(settings, config)
    for name, sizes, entries in (
        (POLICY_MAP_NAME, (12, 4), POLICY_MAX_ENTRIES),
        (ENDPOINTS_MAP_NAME, (4, 4), ENDPOINTS_MAX_ENTRIES),
    ):
        with KernelMap.open_pinned(bpf_pin_dir / name) as kmap:  # as bpf/cp_maps.h declares
            info = kmap.info()
        got = (info["type"], info["key_size"], info["value_size"], info["max_entries"])
        assert got == (BPF_MAP_TYPE_HASH, *sizes, entries) and info["flags"] == 0
    async with running(a), ShardMap(config, own_connection=True) as shards:
        await asyncio.wait_for(a.wait_ready(), 20)
        web = await create(a, "default", "web", ["k8s:app=web"])
        db = await create(a, "default", "db", ["k8s:app=db"])
        await KvPolicyStore(shards, LAYOUT, StoreMetrics.create()).put(
            policy("db", ["app=db"], (["app=web"], [{"port": 5432, "proto": "TCP"}]))
        )
        ep = db["endpoint_id"]
        await eventually(lambda: _entries(a, ep) == {(web["identity"], 5432, TCP)}, timeout=10)
        args = build_parser().parse_args(
            ["bpf", "policy", "list", str(ep), "--pin-dir", str(bpf_pin_dir), "--json"]
        )
        assert await args.run(args) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["enforced"] and shown["entries"] == [
            {"identity": web["identity"], "port": 5432, "proto": TCP, "allow": True}
        ]
        args = build_parser().parse_args(
            ["bpf", "ipcache", "list", "--pin-dir", str(bpf_pin_dir), "--json"]
        )

        async def ipcache_shows_web() -> bool:
            # the ipcache follows the endpoint watch, the policy map the identities and
            # policies: one may lead the other
            assert await args.run(args) == 0
            rows = json.loads(capsys.readouterr().out)
            return f"{web['ip']}/32" in {row["prefix"] for row in rows}

        await eventually(ipcache_shows_web, timeout=10, message="web in the ipcache")
    # the pins outlive the agent, with their entries
    with KernelMap.open_pinned(bpf_pin_dir / POLICY_MAP_NAME) as kmap:
        assert len(kmap) == 1
