"""Services: the model, the kvstore store, cpctl service, the LB maps, the agent (userspace).

The datapath itself (the socket load balancer on real sockets) is tested in
``tests/test_e2e_lb.py``.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import subprocess
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from controlplane import codec
from controlplane.agent.agent import Agent
from controlplane.agent.services import ServiceFlusher, desired_frontends
from controlplane.agent.settings import AgentSettings, DatapathMode, settings_from_args
from controlplane.agent.settings import build_parser as agent_parser
from controlplane.bench.lb import connection_unavailable
from controlplane.cli import status_cmd
from controlplane.cli.common import CommandError
from controlplane.datapath import lbmap
from controlplane.datapath.bpf_syscall import (
    BPF_F_NO_PREALLOC,
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_PERCPU_ARRAY,
)
from controlplane.datapath.kernel import KernelMap
from controlplane.datapath.lbmap import (
    BackendAddr,
    FrontendAddr,
    LbMaps,
    LbServiceValue,
    userspace_lb_maps,
)
from controlplane.datapath.maps import UserspaceMap
from controlplane.datapath.sock_lb import cgroup2_mount, link_pin, sock_lb_attached
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.services import KvServiceStore
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import InvalidRecord, ModelError, NodeName, Service
from controlplane.store_types import EventKind
from tests.helpers import (
    cpctl_in_process,
    eventually,
    kernel_tests_unmet,
    missing_tool,
    requires,
    running,
    tools_unmet,
)
from tests.test_agent import agent_settings, give_cidrs, kv_config

LAYOUT = KeyLayout()
TCP, UDP = 6, 17
VIP = IPv4Address("10.96.0.10")


def service(
    name: str = "web",
    backends: list[dict[str, Any]] | None = None,
    *,
    frontends: list[dict[str, Any]] | None = None,
    ip: str = "10.96.0.10",
) -> Service:
    return Service.from_dict({
        "namespace": "default",
        "name": name,
        "cluster_ip": ip,
        "frontends": frontends or [{"port": 80, "protocol": "TCP"}],
        "backends": backends or [],
    })  # fmt: skip


def be(ip: str, port: int = 8080, **extra: Any) -> dict[str, Any]:
    return {"ip": ip, "port": port, **extra}


# -- model ----------------------------------------------------------------------------


def test_service_round_trip_and_frontends() -> None:
    svc = service(
        frontends=[{"port": 80, "name": "http"}, {"port": 53, "protocol": "udp", "name": "dns"}],
        backends=[
            be("10.0.1.5", frontend="http", node="node-a"),
            be("10.0.2.7", 53, frontend="dns"),
        ],
    )
    assert Service.from_dict(svc.to_dict()) == svc
    assert Service.from_dict(json.loads(json.dumps(svc.to_dict()))) == svc
    http, dns = svc.frontends
    assert (http.port, http.protocol, dns.protocol) == (80, TCP, UDP)
    assert [str(b) for b in svc.backends_of(http)] == ["10.0.1.5:8080"]
    assert [str(b) for b in svc.backends_of(dns)] == ["10.0.2.7:53"]
    assert svc.backends_of(http)[0].node == "node-a" and svc.id == "default/web"
    # one frontend: backends need not name it; no backends is valid (refused at once)
    assert len(service(backends=[be("10.0.1.5")]).backends) == 1
    assert service().backends == ()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"cluster_ip": "fd00::10"}, "only IPv4"),
        ({"cluster_ip": "10.96.0.300"}, "invalid IP address"),
        ({"name": "Web"}, "service name"),
        ({"frontends": []}, "at least one frontend"),
        ({"frontends": [{"port": 0}]}, "port must be 1..65535"),
        ({"frontends": [{"port": 80, "protocol": "SCTP"}]}, "TCP or UDP"),
        ({"frontends": [{"port": 80, "name": "a"}, {"port": 80, "name": "b"}]}, "given twice"),
        ({"frontends": [{"port": 80, "name": "a"}, {"port": 81, "name": "a"}]}, "name 'a'"),
        ({"frontends": [{"port": 80}, {"port": 81}]}, "needs a name"),
        ({"backends": [{"ip": "10.0.1.5"}]}, "missing field 'port'"),
        ({"backends": [be("10.0.1.5"), be("10.0.1.5")]}, "given twice"),
        ({"backends": [be("10.0.1.5", frontend="nope")]}, "does not have"),
        ({"backends": [be("10.0.1.5", node="Bad_Node")]}, "node"),
        (
            {
                "frontends": [{"port": 80, "name": "a"}, {"port": 81, "name": "b"}],
                "backends": [be("10.0.1.5")],
            },
            "must name its frontend",
        ),
        ({"frontends": "80"}, "expected list"),
    ],
)
def test_service_validation_is_one_clear_line(data: dict[str, Any], message: str) -> None:
    base = {"namespace": "default", "name": "web", "cluster_ip": "10.96.0.10",
            "frontends": [{"port": 80}]}  # fmt: skip
    with pytest.raises(InvalidRecord, match=message) as info:
        Service.from_dict({**base, **data})
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ModelError)


# -- the LB maps ------------------------------------------------------------------------


def fe(port: int = 80, proto: int = TCP) -> FrontendAddr:
    return FrontendAddr(VIP, port, proto)


def bk(*last: int) -> list[BackendAddr]:
    return [BackendAddr(IPv4Address(f"10.0.1.{n}"), 8080) for n in last]


class _Recorder(UserspaceMap):
    """A userspace map that logs every write, shared by two maps (the write order)."""

    def __init__(self, log: list[str], *args: Any) -> None:
        super().__init__(*args)
        self.log = log

    def batch_update(self, entries: Any) -> int:
        self.log.extend(f"{self.name}:update" for _ in entries)
        return super().batch_update(entries)

    def batch_delete(self, keys: Any) -> int:
        self.log.extend(f"{self.name}:delete" for _ in keys)
        return super().batch_delete(keys)


def test_lb_maps_versioned_sets_and_sweep() -> None:
    order: list[str] = []
    base = userspace_lb_maps()
    maps = LbMaps(
        _Recorder(order, "svc", base.services.key_size, base.services.value_size, 100),
        _Recorder(order, "slots", base.slots.key_size, base.slots.value_size, 1000),
    )
    assert maps.sync({fe(): bk(1, 2), fe(53, UDP): []})
    # slots first, then the frontend entries that point at them
    assert order == ["slots:update"] * 2 + ["svc:update"] * 2
    [dns, web] = maps.entries()
    assert web.frontend == fe() and web.revision == 1 and list(web.backends) == bk(1, 2)
    assert dns.backends == () and {web.frontend_id, dns.frontend_id} == {1, 2}
    # unchanged: nothing is written
    order.clear()
    assert maps.sync({fe(): bk(1, 2), fe(53, UDP): []}) and order == []
    # a new set: new revision's slots, the flip, then the old revision's slots go
    assert maps.sync({fe(): bk(2, 3), fe(53, UDP): []})
    assert order == ["slots:update"] * 2 + ["svc:update"] + ["slots:delete"] * 2
    [_, web2] = maps.entries()
    assert (web2.frontend_id, web2.revision) == (web.frontend_id, 2)
    assert list(web2.backends) == bk(2, 3) and len(maps.slots) == 2
    # a frontend removed: its entry, then its slots; ids are not reused at once
    order.clear()
    assert maps.sync({fe(53, UDP): [], fe(443): bk(9)})
    assert order == ["slots:update", "svc:update", "svc:delete", "slots:delete", "slots:delete"]
    ids = {e.frontend.port: e.frontend_id for e in maps.entries()}
    assert ids[53] == dns.frontend_id and ids[443] not in (web.frontend_id, dns.frontend_id)
    # a new process on the same maps adopts ids and revisions: nothing rewritten
    again = LbMaps(maps.services, maps.slots)
    order.clear()
    assert again.sync({fe(53, UDP): [], fe(443): bk(9)}) and order == []
    assert again.frontend_ids == maps.frontend_ids
    # and sweeps what the store no longer has
    assert again.sync({}) and len(again.services) == 0 and len(again.slots) == 0


def test_lb_maps_a_failed_write_keeps_a_consistent_set() -> None:
    maps = userspace_lb_maps()
    assert maps.sync({fe(): bk(1)})
    small = LbMaps(maps.services, UserspaceMap("slots", 12, 8, 2))
    small.slots.batch_update(list(maps.slots.items()))  # the same content, a tiny map
    assert not small.sync({fe(): bk(1, 2, 3)})  # the new set does not fit
    [entry] = small.entries()
    assert list(entry.backends) == bk(1) and entry.revision == 1  # the old set, whole
    value = LbServiceValue.from_buffer_copy(next(iter(dict(small.services.items()).values())))
    assert value.count == 1


def test_desired_frontends_sorted_and_conflicts() -> None:
    a = service("a", [be("10.0.1.9"), be("10.0.1.2")])
    b = service("b", [be("10.0.2.1")])  # the same VIP and port: a conflict
    desired, owners, conflicts = desired_frontends({"default/b": b, "default/a": a})
    assert desired == {fe(): [BackendAddr(IPv4Address("10.0.1.2"), 8080),
                              BackendAddr(IPv4Address("10.0.1.9"), 8080)]}  # fmt: skip
    assert owners[fe()].service == "default/a"
    assert conflicts == ["default/b: frontend 10.96.0.10:80/TCP already belongs to default/a"]


def test_flusher_writes_nothing_before_the_list() -> None:
    maps = userspace_lb_maps()
    assert maps.sync({fe(): bk(1)})  # what a previous process left in pinned maps
    listed = False
    flusher = ServiceFlusher({}, maps, lambda: listed)
    assert flusher.flush() is False and len(maps.services) == 1  # kept while unknown
    listed = True
    assert flusher.flush() is True and len(maps.services) == 0  # swept once listed


def test_lb_maps_partial_updates_agree_with_a_full_sync() -> None:
    maps = userspace_lb_maps()
    assert maps.sync({fe(): bk(1, 2), fe(81): bk(3)})
    writes = maps.stats.updates
    assert maps.update({fe(82): bk(4)})  # a new frontend only
    assert maps.stats.updates == writes + 2 and maps.stats.deletes == 0
    assert maps.update({fe(): bk(1, 2, 5), fe(81): None})  # one changed, one removed
    got = {e.frontend: list(e.backends) for e in maps.entries()}
    assert got == {fe(): bk(1, 2, 5), fe(82): bk(4)}
    assert len(maps.slots) == 4  # the old set and the removed frontend's slot are gone
    assert maps.update({fe(999): None})  # removing an unknown frontend is nothing
    # what the updates left is exactly what a full sync wants: nothing to write
    again = LbMaps(maps.services, maps.slots)  # a fresh shadow, read from the maps
    updates, deletes = again.stats.updates, again.stats.deletes
    assert again.sync({fe(): bk(1, 2, 5), fe(82): bk(4)})
    assert (again.stats.updates, again.stats.deletes) == (updates, deletes)


def test_flusher_writes_only_what_changed_and_resolves_conflicts() -> None:
    maps = userspace_lb_maps()
    services: dict[str, Service] = {"default/a": service("a", [be("10.0.1.1")])}
    flusher = ServiceFlusher(services, maps, lambda: True)
    assert flusher.flush() and flusher.full_syncs == 1
    services["default/b"] = service("b", [be("10.0.1.2")])  # the same frontend as a
    services["default/c"] = service("c", [be("10.0.1.3")], ip="10.96.0.30")
    flusher.changed("default/b")
    flusher.changed("default/c")
    updates = maps.stats.updates
    assert flusher.flush() and flusher.full_syncs == 1  # a partial update
    assert maps.stats.updates == updates + 2  # c's slot and entry; a's set unchanged
    assert flusher.conflicts == [
        "default/b: frontend 10.96.0.10:80/TCP already belongs to default/a"
    ]
    assert flusher.owners[fe()].service == "default/a"
    # a goes: b's backends take the frontend over, under a new revision
    del services["default/a"]
    flusher.changed("default/a")
    assert flusher.flush() and flusher.conflicts == []
    got = {e.frontend: list(e.backends) for e in maps.entries()}
    assert got[fe()] == [BackendAddr(IPv4Address("10.0.1.2"), 8080)]
    assert flusher.owners[fe()].service == "default/b" and fe() in flusher.written_at
    # a re-list (None) is a full mark-and-sweep again
    services.clear()
    flusher.changed(None)
    assert flusher.flush() and flusher.full_syncs == 2 and len(maps.services) == 0


# -- store, cpctl and the agent against etcd ----------------------------------------------


async def test_service_store_put_list_watch_delete(etcd1: EmbeddedEtcd) -> None:
    metrics = StoreMetrics.create()
    async with ShardMap(kv_config(etcd1), own_connection=True) as shards:
        store = KvServiceStore(shards, LAYOUT, metrics)
        svc = service(backends=[be("10.0.1.5")])
        await store.put(svc)
        backend = shards.all()[0]
        await backend.put(LAYOUT.service("default", "junk"), b"\xc1")
        other = service("other").to_dict()
        await backend.put(LAYOUT.service("default", "mismatch"), codec.encode("service", other))
        await backend.put(LAYOUT.service("default", "bad"), codec.encode("service", {"x": 1}))
        await backend.put(LAYOUT.service_prefix + b"a/b/c", codec.encode("service", other))
        listed = await store.list()
        assert [v.value for v in listed] == [svc]
        malformed = metrics.registry.get_sample_value(
            "cp_store_malformed_values_total", {"resource": "service"}
        )
        assert malformed == 4
        events = store.watch()
        first = await anext(events)
        assert (first.kind, first.name, first.value) == (EventKind.UPSERT, "default/web", svc)
        assert (await anext(events)).kind is EventKind.SYNCED
        assert await store.delete("default", "web") and not await store.delete("default", "web")
        gone = await anext(events)
        assert (gone.kind, gone.name, gone.value) == (EventKind.DELETE, "default/web", svc)
        await events.aclose()  # type: ignore[attr-defined]


async def test_cpctl_service_put_list_delete(
    etcd1: EmbeddedEtcd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    yaml_file = tmp_path / "web.yaml"
    yaml_file.write_text(
        "namespace: default\nname: web\ncluster_ip: 10.96.0.10\n"
        "frontends: [{port: 80, protocol: TCP}]\n"
        "backends: [{ip: 10.0.1.5, port: 8080, node: node-a}]\n"
    )
    json_file = tmp_path / "dns.json"
    json_file.write_text(json.dumps([service("dns", frontends=[{"port": 53, "protocol": "UDP"}],
                                             ip="10.96.0.53").to_dict()]))  # fmt: skip
    assert await cpctl_in_process(etcd1, "service", "put", str(yaml_file)) == 0
    assert await cpctl_in_process(etcd1, "service", "put", str(json_file)) == 0
    assert "service default/web stored" in capsys.readouterr().out
    assert await cpctl_in_process(etcd1, "service", "list") == 0
    out, err = capsys.readouterr()
    assert "10.96.0.10:80/TCP" in out and "10.0.1.5:8080@node-a (no endpoint)" in out
    assert "(none: connections refused)" in out and "2 services" in err
    assert await cpctl_in_process(etcd1, "service", "list", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in data["services"]] == ["dns", "web"] and data["malformed"] == 0
    assert data["services"][1]["backend_endpoints"] == {"10.0.1.5:8080": None}
    assert Service.from_dict(data["services"][1]) == service(
        backends=[be("10.0.1.5", node="node-a")]
    )
    assert await cpctl_in_process(etcd1, "service", "delete", "default/dns", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": "default/dns"}
    with pytest.raises(CommandError, match="not found"):
        await cpctl_in_process(etcd1, "service", "delete", "default/dns")
    with pytest.raises(CommandError, match="NS/NAME"):
        await cpctl_in_process(etcd1, "service", "delete", "dns")
    bad = tmp_path / "bad.yaml"
    for text, message in (
        ("namespace: default\nname: x\ncluster_ip: 10.96.0.1\nfrontends: [{port: 99999}]\n",
         "port must be 1..65535"),
        ("{", "not YAML/JSON"),
        ("- 1\n", "expected a dict"),
    ):  # fmt: skip
        bad.write_text(text)
        with pytest.raises(CommandError, match=message) as info:
            await cpctl_in_process(etcd1, "service", "put", str(bad))
        assert info.value.status == 2 and "\n" not in str(info.value)
    with pytest.raises(CommandError, match="No such file") as info:
        await cpctl_in_process(etcd1, "service", "put", str(tmp_path / "missing.yaml"))
    assert info.value.status == 2
    assert await cpctl_in_process(etcd1, "service", "list", "--json") == 0
    assert [s["name"] for s in json.loads(capsys.readouterr().out)["services"]] == ["web"]


async def test_agent_programs_services_and_follows_changes(
    etcd1: EmbeddedEtcd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await give_cidrs(etcd1, "node-a")
    config = kv_config(etcd1)
    a = Agent(agent_settings(tmp_path, "node-a", "127.0.0.11"), config)  # userspace maps

    def backends() -> dict[FrontendAddr, list[BackendAddr | None]]:
        return {e.frontend: list(e.backends) for e in a.lb_maps.entries()}

    async with ShardMap(config, own_connection=True) as shards:
        store = KvServiceStore(shards, LAYOUT, StoreMetrics.create())
        # listed before the agent is ready (nothing written until then), programmed after
        await store.put(service("early", [be("10.0.9.9")], ip="10.96.0.9"))
        async with running(a):
            await asyncio.wait_for(a.wait_ready(), 20)
            early = FrontendAddr(IPv4Address("10.96.0.9"), 80, TCP)
            await eventually(lambda: early in backends(), message="a listed service programmed")
            await _follows_changes(a, store, shards, backends, capsys)


async def _follows_changes(
    a: Agent,
    store: KvServiceStore,
    shards: ShardMap,
    backends: Callable[[], dict[FrontendAddr, list[BackendAddr | None]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Programmed, replaced, a malformed record skipped, an empty service, a delete."""
    await store.put(service(backends=[be("10.0.1.2"), be("10.0.1.1")]))
    await eventually(lambda: backends().get(fe()) == bk(1, 2), message="service programmed")
    await store.put(service(backends=[be("10.0.1.3")]))
    await eventually(lambda: backends().get(fe()) == bk(3), message="backends replaced")
    # a malformed record is counted and skipped; the agent carries on
    await shards.all()[0].put(LAYOUT.service("default", "junk"), b"\xc1")
    await store.put(service("empty", ip="10.96.0.11"))
    empty = FrontendAddr(IPv4Address("10.96.0.11"), 80, TCP)
    await eventually(lambda: backends().get(empty) == [], message="no-backend frontend")
    skipped = a.metrics.registry.get_sample_value(
        "cp_store_malformed_values_total", {"resource": "service"}
    )
    assert skipped == 1
    assert a.status()["services"]["frontends"] == 3
    assert await status_cmd.show(a.settings.api_socket, as_json=False) == 0
    shown = capsys.readouterr().out
    assert "services:   3 services, 3 frontends; socket LB not attached (userspace" in shown
    await store.delete("default", "web")
    await eventually(lambda: fe() not in backends(), message="service removed")


# -- bpf/cp_lb.h against the ctypes mirrors -----------------------------------------------

_LB_LAYOUTS: dict[str, type[ctypes.Structure]] = {
    "cp_lb_service_key": lbmap.LbServiceKey,
    "cp_lb_service_value": lbmap.LbServiceValue,
    "cp_lb_slot_key": lbmap.LbSlotKey,
    "cp_lb_backend": lbmap.LbBackend,
    "cp_lb_revnat_key": lbmap.LbRevnatKey,
    "cp_lb_revnat_value": lbmap.LbRevnatValue,
    "cp_lb_metrics_value": lbmap.LbMetricsValue,
}
_LB_CONSTANTS = {
    "CP_LB_SERVICES_MAX_ENTRIES": lbmap.LB_SERVICES_MAX_ENTRIES,
    "CP_LB_SLOTS_MAX_ENTRIES": lbmap.LB_SLOTS_MAX_ENTRIES,
    "CP_LB_METRICS_MAX_ENTRIES": lbmap.LB_METRICS_MAX_ENTRIES,
}


@requires(tools_unmet("clang"))
def test_lb_c_and_python_layouts_agree(tmp_path: Path) -> None:
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "cp_lb.h"', "int main(void){"]
    for cname, py in _LB_LAYOUTS.items():
        lines.append(f'printf("{cname} - %zu\\n", sizeof(struct {cname}));')
        for fname, *_ in py._fields_:
            lines.append(
                f'printf("{cname} {fname} %zu %zu\\n", offsetof(struct {cname}, {fname}), '
                f"sizeof(((struct {cname} *)0)->{fname}));"
            )
    for name in _LB_CONSTANTS:
        lines.append(f'printf("const {name} %d\\n", {name});')
    src = tmp_path / "probe.c"
    src.write_text("\n".join([*lines, "return 0;}"]) + "\n")
    exe = tmp_path / "probe"
    bpf_dir = Path(__file__).resolve().parents[1] / "bpf"
    cc = subprocess.run(
        ["clang", "-Wall", "-Werror", f"-I{bpf_dir}", str(src), "-o", str(exe)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    c = {
        tuple(line.split()[:2]): tuple(int(n) for n in line.split()[2:])
        for line in out.splitlines()
    }
    for cname, py in _LB_LAYOUTS.items():
        assert c[(cname, "-")] == (ctypes.sizeof(py),), cname
        for fname, *_ in py._fields_:
            field = getattr(py, fname)
            assert c[(cname, fname)] == (field.offset, field.size), f"{cname}.{fname}"
    for name, value in _LB_CONSTANTS.items():
        assert c[("const", name)] == (value,), name


async def test_cpctl_bench_lb_measures_both_halves(
    etcd1: EmbeddedEtcd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lb.json"
    argv = ["bench", "lb", "--connections", "200", "--rounds", "1", "--changes", "10"]
    assert await cpctl_in_process(etcd1, *argv, "--output", str(out), "--json") == 0
    record = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == record
    lat = record["store_to_map"]
    assert lat["changes"] == 10 and 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"] < 10_000
    conns = record["connections"]
    if connection_unavailable() is None:  # root, eBPF, cgroup v2: the real comparison
        assert conns["direct_per_s"] > 0 and conns["vip_per_s"] > 0 and conns["ratio"] > 0
    else:
        assert conns == {"skipped": connection_unavailable()}


# -- kernel mode: pins, links and their cleanup -------------------------------------------


@requires(kernel_tests_unmet() or (None if cgroup2_mount() else missing_tool("no cgroup v2")))
async def test_kernel_lb_maps_and_links_pinned_then_cleaned_up(
    etcd1: EmbeddedEtcd, tmp_path: Path, bpf_pin_dir: Path
) -> None:
    root = cgroup2_mount()
    assert root is not None
    cgroup = root / f"cp-test-{bpf_pin_dir.name}"
    cgroup.mkdir()
    try:
        await give_cidrs(etcd1, "node-a")
        settings = agent_settings(
            tmp_path,
            "node-a",
            "127.0.0.11",
            datapath=DatapathMode.KERNEL,
            bpf_pin_dir=bpf_pin_dir,
            lb_cgroup=cgroup,
            cleanup_on_exit=True,
        )
        # something else pinned where a link belongs (a broken earlier run): replaced
        os.mkdir(bpf_pin_dir)
        with KernelMap.create("junk", BPF_MAP_TYPE_HASH, 4, 4, 1) as junk:
            junk.pin(link_pin(bpf_pin_dir, "connect4"))
        a = Agent(settings, kv_config(etcd1))
        assert a.sock_lb.attached and "connect4: attached" in a.sock_lb.detail
        for name, kind, sizes, flags in (
            (lbmap.LB_SERVICES_MAP_NAME, BPF_MAP_TYPE_HASH, (8, 12), BPF_F_NO_PREALLOC),
            (lbmap.LB_SLOTS_MAP_NAME, BPF_MAP_TYPE_HASH, (12, 8), 0),
            (lbmap.LB_METRICS_MAP_NAME, BPF_MAP_TYPE_PERCPU_ARRAY, (4, 32), 0),
        ):
            with KernelMap.open_pinned(bpf_pin_dir / name) as kmap:  # as bpf/cp_lb.h says
                assert (kmap.map_type, kmap.key_size, kmap.value_size, kmap.flags) == (
                    kind, *sizes, flags,
                )  # fmt: skip
        assert sock_lb_attached(bpf_pin_dir)
        async with running(a), ShardMap(kv_config(etcd1), own_connection=True) as shards:
            await asyncio.wait_for(a.wait_ready(), 20)
            await KvServiceStore(shards, LAYOUT, StoreMetrics.create()).put(
                service(backends=[be("10.0.1.1")])
            )
            await eventually(lambda: len(a.lb_maps.entries()) == 1, message="programmed")
        # --cleanup-on-exit: the links (so the programs) and the maps are gone
        assert not sock_lb_attached(bpf_pin_dir)
        left = _lb_pins(bpf_pin_dir)
        assert not left, left
    finally:
        cgroup.rmdir()


def _lb_pins(pin_dir: Path) -> set[str]:
    names = os.listdir(pin_dir) if pin_dir.exists() else []
    return {name for name in names if name.startswith("cp_lb")}


def test_lb_cgroup_flag() -> None:
    base = ["--kvstore-endpoints", "http://127.0.0.1:2379"]
    assert settings_from_args(agent_parser().parse_args(base)).lb_cgroup == cgroup2_mount()
    none = agent_parser().parse_args([*base, "--lb-cgroup", "none"])
    assert settings_from_args(none).lb_cgroup is None
    path = agent_parser().parse_args([*base, "--lb-cgroup", "/sys/fs/cgroup/pods"])
    assert settings_from_args(path).lb_cgroup == Path("/sys/fs/cgroup/pods")
    assert AgentSettings(node=NodeName("n")).lb_cgroup is None  # embedded: never by default
