"""The tc datapath program for real: C/Python layout agreement, and identity-based policy
enforced on TCP traffic between network namespaces.

Needs root, clang, libbpf.so.1 and ``ip`` (iproute2); the module is skipped with the reason
otherwise (``pytest -rs`` prints it). Topology, all in namespaces this test creates::

    web (10.213.1.2) --veth-- +
    other (10.213.2.2) --veth-- node netns (router, 10.213.N.1) --veth[tc egress]-- db
                                                                     (10.213.3.2:5432)

The program runs on db's host-side veth egress inside the "node" namespace; its maps are
pinned in the real bpffs (a per-test directory under /sys/fs/bpf), entered only through
setns on the network namespace.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from controlplane.cli.main import build_parser
from controlplane.datapath import layouts, loader
from controlplane.datapath.ipcache import IpcacheEntry, IpcacheKey, IpcacheValue, encode_key
from controlplane.datapath.kernel import KernelMap
from controlplane.model import NumericIdentity
from tests.helpers import ip, kernel_tests_unmet, requires, tools_unmet
from tests.icmp_echo import ping

pytestmark = requires(kernel_tests_unmet("ip"))

REPO = Path(__file__).resolve().parents[1]
BPF_DIR = REPO / "bpf"
DB_EP = 4242
WEB_ID, OTHER_ID = 1001, 1002
PORT = 5432
IPPROTO_TCP = 6


# --- pinned-map access through libbpf's low-level API (test-local; the agent will use ----
# --- controlplane.datapath.kernel) ---------------------------------------------------


class _Lib:
    def __init__(self) -> None:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
        lib.bpf_map_update_elem.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_uint64,
        ]
        lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
        self.lib = lib
        self.ncpus = int(lib.libbpf_num_possible_cpus())


@functools.cache
def _lib() -> _Lib:
    return _Lib()


@dataclass
class Pinned:
    fd: int
    value_size: int

    @classmethod
    def open(cls, path: Path, value_size: int) -> Pinned:
        fd = _lib().lib.bpf_obj_get(os.fsencode(path))
        assert fd >= 0, f"bpf_obj_get({path}): {os.strerror(ctypes.get_errno())}"
        return cls(fd, value_size)

    def update(self, key: bytes, value: bytes) -> None:
        rc = _lib().lib.bpf_map_update_elem(self.fd, key, value, 0)
        assert rc == 0, f"update: {os.strerror(-rc)}"

    def delete(self, key: bytes) -> None:
        _lib().lib.bpf_map_delete_elem(self.fd, key)

    def lookup(self, key: bytes, ncpus: int = 1) -> bytes | None:
        buf = ctypes.create_string_buffer(self.value_size * ncpus)
        rc = _lib().lib.bpf_map_lookup_elem(self.fd, key, buf)
        return buf.raw if rc == 0 else None

    def close(self) -> None:
        os.close(self.fd)


def metric(metrics: Pinned, reason: layouts.MetricReason) -> int:
    raw = metrics.lookup(ctypes.c_uint32(reason).value.to_bytes(4, "little"), _lib().ncpus)
    assert raw is not None
    return int(layouts.decode_percpu_metrics(raw, _lib().ncpus).packets)


# --- (a) layouts: the C structs against the ctypes ones -----------------------------------

_LAYOUTS: dict[str, type[ctypes.Structure]] = {
    "cp_ipcache_key": IpcacheKey,
    "cp_ipcache_value": IpcacheValue,
    "cp_policy_key": layouts.PolicyKey,
    "cp_policy_value": layouts.PolicyValue,
    "cp_endpoint_key": layouts.EndpointKey,
    "cp_endpoint_value": layouts.EndpointValue,
    "cp_metrics_value": layouts.MetricsValue,
    "cp_config": layouts.Config,
    "cp_ct_key": layouts.CtKey,
    "cp_ct_value": layouts.CtValue,
}


def _probe_source() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "cp_maps.h"', "int main(void){"]
    for cname, py in _LAYOUTS.items():
        lines.append(f'printf("{cname} - %zu\\n", sizeof(struct {cname}));')
        for fname, *_ in py._fields_:
            lines.append(
                f'printf("{cname} {fname} %zu %zu\\n", offsetof(struct {cname}, {fname}), '
                f"sizeof(((struct {cname} *)0)->{fname}));"
            )
    for reason in layouts.MetricReason:
        lines.append(f'printf("reason {reason.name} %d\\n", (int)CP_METRIC_{reason.name});')
    lines.append('printf("const CP_EP_F_INGRESS_ENFORCED %d\\n", CP_EP_F_INGRESS_ENFORCED);')
    lines.append('printf("const CP_IDENTITY_WORLD %d\\n", CP_IDENTITY_WORLD);')
    lines.append('printf("const CP_IPCACHE_MAX_ENTRIES %d\\n", CP_IPCACHE_MAX_ENTRIES);')
    lines.append('printf("const CP_POLICY_MAX_ENTRIES %d\\n", CP_POLICY_MAX_ENTRIES);')
    lines.append('printf("const CP_ENDPOINTS_MAX_ENTRIES %d\\n", CP_ENDPOINTS_MAX_ENTRIES);')
    lines.append('printf("const CP_METRICS_MAX_ENTRIES %d\\n", CP_METRICS_MAX_ENTRIES);')
    lines.append('printf("const CP_CT_MAX_ENTRIES %d\\n", CP_CT_MAX_ENTRIES);')
    lines.append('printf("const CP_CT_F_CLOSING %d\\n", CP_CT_F_CLOSING);')
    for name in ("CLOSING", "TCP", "ANY"):
        lines.append(f'printf("const CP_CT_LIFETIME_{name}_S %d\\n", CP_CT_LIFETIME_{name}_S);')
    lines.append("return 0;}")
    return "\n".join(lines) + "\n"


def test_c_and_python_layouts_agree(tmp_path: Path) -> None:
    src = tmp_path / "probe.c"
    src.write_text(_probe_source())
    exe = tmp_path / "probe"
    cc = subprocess.run(
        ["clang", "-Wall", "-Werror", f"-I{BPF_DIR}", str(src), "-o", str(exe)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    c: dict[tuple[str, str], tuple[int, ...]] = {}
    for line in out.splitlines():
        kind, name, *nums = line.split()
        c[(kind, name)] = tuple(int(n) for n in nums)
    for cname, py in _LAYOUTS.items():
        assert c[(cname, "-")] == (ctypes.sizeof(py),), cname
        for fname, *_ in py._fields_:
            field = getattr(py, fname)
            assert c[(cname, fname)] == (field.offset, field.size), f"{cname}.{fname}"
    for reason in layouts.MetricReason:
        assert c[("reason", reason.name)] == (int(reason),)
    from controlplane.datapath.ipcache import IPCACHE_MAX_ENTRIES

    assert c[("const", "CP_EP_F_INGRESS_ENFORCED")] == (layouts.EP_F_INGRESS_ENFORCED,)
    assert c[("const", "CP_IDENTITY_WORLD")] == (layouts.IDENTITY_WORLD,)
    assert c[("const", "CP_IPCACHE_MAX_ENTRIES")] == (IPCACHE_MAX_ENTRIES,)
    assert c[("const", "CP_POLICY_MAX_ENTRIES")] == (layouts.POLICY_MAX_ENTRIES,)
    assert c[("const", "CP_ENDPOINTS_MAX_ENTRIES")] == (layouts.ENDPOINTS_MAX_ENTRIES,)
    assert c[("const", "CP_METRICS_MAX_ENTRIES")] == (layouts.METRICS_MAX_ENTRIES,)
    assert c[("const", "CP_CT_MAX_ENTRIES")] == (layouts.CT_MAX_ENTRIES,)
    assert c[("const", "CP_CT_F_CLOSING")] == (layouts.CT_F_CLOSING,)
    assert c[("const", "CP_CT_LIFETIME_CLOSING_S")] == (layouts.CT_LIFETIME_CLOSING_S,)
    assert c[("const", "CP_CT_LIFETIME_TCP_S")] == (layouts.CT_LIFETIME_TCP_S,)
    assert c[("const", "CP_CT_LIFETIME_ANY_S")] == (layouts.CT_LIFETIME_ANY_S,)


@requires(tools_unmet("bpftool"))
def test_object_rodata_is_only_the_config() -> None:
    obj = loader.build_object(BPF_DIR)
    dump = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(obj)], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(
        r"DATASEC '\.rodata' size=\d+ vlen=(\d+)\n\s+type_id=\d+ offset=(\d+) "
        r"size=(\d+) \(VAR 'cp_cfg'\)",
        dump,
    )
    assert m is not None, dump
    assert m.groups() == ("1", "0", str(ctypes.sizeof(layouts.Config)))


# --- (b) real traffic ----------------------------------------------------------------


@dataclass
class Topology:
    node: str
    pods: dict[str, str]  # pod name -> netns
    ips: dict[str, str]
    ips6: dict[str, str]
    host_if: dict[str, str]
    pin_dir: Path


@pytest.fixture
def topology() -> Iterator[Topology]:
    tok = f"{os.getpid() % 100000}"
    node = f"cpt{tok}-node"
    names = ("web", "other", "db")
    pods = {p: f"cpt{tok}-{p}" for p in names}
    ips = {p: f"10.213.{i}.2" for i, p in enumerate(names, 1)}
    ips6 = {p: f"fd13:{i}::2" for i, p in enumerate(names, 1)}
    host_if = {p: f"cp{p[0]}{tok}" for p in names}
    pin_dir = Path(f"/sys/fs/bpf/cp-test-{tok}")
    all_ns = [node, *pods.values()]

    def cleanup() -> None:
        for ns in all_ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        if pin_dir.exists():
            for pin in pin_dir.iterdir():
                pin.unlink()
            pin_dir.rmdir()

    cleanup()
    try:
        for ns in all_ns:
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        with loader.in_netns(node):
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
            Path("/proc/sys/net/ipv6/conf/all/forwarding").write_text("1\n")
        for i, p in enumerate(names, 1):
            ip(
                "-n",
                node,
                "link",
                "add",
                host_if[p],
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pods[p],
            )
            ip("-n", node, "addr", "add", f"10.213.{i}.1/24", "dev", host_if[p])
            ip("-n", node, "link", "set", host_if[p], "up")
            ip("-n", pods[p], "addr", "add", f"{ips[p]}/24", "dev", "eth0")
            ip("-n", pods[p], "link", "set", "eth0", "up")
            ip("-n", pods[p], "route", "add", "default", "via", f"10.213.{i}.1")
            ip("-n", node, "addr", "add", f"fd13:{i}::1/64", "dev", host_if[p], "nodad")
            ip("-n", pods[p], "addr", "add", f"{ips6[p]}/64", "dev", "eth0", "nodad")
            ip("-n", pods[p], "-6", "route", "add", "default", "via", f"fd13:{i}::1")
        yield Topology(node, pods, ips, ips6, host_if, pin_dir)
    finally:
        cleanup()


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _tcp_listen(netns: str, ip: str) -> socket.socket:
    with loader.in_netns(netns):
        srv = socket.socket(_family(ip), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, PORT))
    srv.listen(16)
    return srv


def _try_connect(netns: str, ip: str, timeout: float) -> socket.socket | None:
    with loader.in_netns(netns):
        s = socket.socket(_family(ip), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((ip, PORT))
    except OSError:
        s.close()
        return None
    return s


def _connects_within(netns: str, ip: str, deadline_s: float, srv: socket.socket) -> bool:
    """Poll connects until one succeeds (and carries data both ways) or the deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        s = _try_connect(netns, ip, max(0.1, min(1.0, deadline - time.monotonic())))
        if s is None:
            continue
        with s:
            srv.settimeout(max(0.1, deadline - time.monotonic()))
            conn, _ = srv.accept()
            with conn:
                s.sendall(b"ping")
                conn.settimeout(2.0)
                assert conn.recv(4) == b"ping"
                conn.sendall(b"pong")
                assert s.recv(4) == b"pong"
        return True
    return False


@dataclass
class _Maps:
    ipcache: Pinned
    policy: Pinned
    endpoints: Pinned
    metrics: Pinned


@contextmanager
def _on_db(t: Topology, *, ipv6: bool = False) -> Iterator[_Maps]:
    """The programs on db's host veth, the node's pinned maps open, and web's and other's
    addresses (``ipv6``: their IPv6 ones) in the ipcache with their identities."""
    loader.load_and_attach(DB_EP, t.host_if["db"], netns=t.node, pin_dir=t.pin_dir)
    maps = _Maps(
        Pinned.open(t.pin_dir / "cp_ipcache", ctypes.sizeof(IpcacheValue)),
        Pinned.open(t.pin_dir / "cp_policy", ctypes.sizeof(layouts.PolicyValue)),
        Pinned.open(t.pin_dir / "cp_endpoints", ctypes.sizeof(layouts.EndpointValue)),
        Pinned.open(t.pin_dir / "cp_metrics", ctypes.sizeof(layouts.MetricsValue)),
    )
    try:
        for pod, ident in (("web", WEB_ID), ("other", OTHER_ID)):
            if ipv6:
                key = encode_key(IPv6Network(f"{t.ips6[pod]}/128"))
                entry = IpcacheEntry(NumericIdentity(ident), IPv6Address("fd13::1"))
            else:
                key = encode_key(IPv4Network(f"{t.ips[pod]}/32"))
                entry = IpcacheEntry(NumericIdentity(ident), IPv4Address("10.213.0.1"))
            maps.ipcache.update(key, entry.encode())
        yield maps
    finally:
        for m in (maps.ipcache, maps.policy, maps.endpoints, maps.metrics):
            m.close()


def test_policy_enforced_on_real_traffic(topology: Topology) -> None:
    t = topology
    with _on_db(t) as m:
        assert loader.is_attached(t.host_if["db"], netns=t.node)
        assert sorted(p.name for p in t.pin_dir.iterdir()) == sorted(loader.SHARED_MAPS)
        policy, endpoints, metrics = m.policy, m.endpoints, m.metrics
        web_rule = layouts.encode_policy_key(DB_EP, WEB_ID, PORT, IPPROTO_TCP)
        other_rule = layouts.encode_policy_key(DB_EP, OTHER_ID, PORT, IPPROTO_TCP)
        policy.update(web_rule, layouts.encode_policy_value(True))

        srv = _tcp_listen(t.pods["db"], t.ips["db"])
        with srv:
            db_ip = t.ips["db"]
            # No enforcement marker yet: default allow, even for "other".
            assert _connects_within(t.pods["other"], db_ip, 10.0, srv)
            assert metric(metrics, layouts.MetricReason.ALLOW_NOT_ENFORCED) > 0

            # A policy selects db: default deny except the policy's entries.
            endpoints.update(*layouts.encode_endpoint(DB_EP, layouts.EP_F_INGRESS_ENFORCED))
            allowed_before = metric(metrics, layouts.MetricReason.ALLOW_POLICY)
            assert _connects_within(t.pods["web"], db_ip, 10.0, srv)
            assert metric(metrics, layouts.MetricReason.ALLOW_POLICY) > allowed_before

            drops_before = metric(metrics, layouts.MetricReason.DROP_POLICY_DENY)
            assert _try_connect(t.pods["other"], db_ip, 1.5) is None
            assert metric(metrics, layouts.MetricReason.DROP_POLICY_DENY) > drops_before

            # Policy change in the map only: no reload, "other" now passes.
            policy.update(other_rule, layouts.encode_policy_value(True))
            assert _connects_within(t.pods["other"], db_ip, 10.0, srv)

            # Revoke again: "other" is dropped, "web" still passes.
            policy.delete(other_rule)
            assert _try_connect(t.pods["other"], db_ip, 1.5) is None
            assert _connects_within(t.pods["web"], db_ip, 10.0, srv)

            # Re-loading a new program instance reuses the pinned maps (state intact).
            loader.load_and_attach(DB_EP, t.host_if["db"], netns=t.node, pin_dir=t.pin_dir)
            assert policy.lookup(web_rule) == layouts.encode_policy_value(True)
            assert _connects_within(t.pods["web"], db_ip, 10.0, srv)
            assert _try_connect(t.pods["other"], db_ip, 1.5) is None

            assert loader.detach(t.host_if["db"], netns=t.node)
            assert not loader.detach(t.host_if["db"], netns=t.node)
            # Detached: nothing enforces any more; the pins survive.
            assert _connects_within(t.pods["other"], db_ip, 10.0, srv)
            assert (t.pin_dir / "cp_policy").exists()


def test_policy_enforced_on_ipv6_traffic(topology: Topology) -> None:
    """The same program and maps on IPv6: sources looked up by their /128 in the shared
    LPM trie, the policy decides TCP, and neighbour discovery toward an enforced pod
    passes (or no IPv6 packet would reach it at all)."""
    t = topology
    with _on_db(t, ipv6=True) as m:
        ipcache, policy, endpoints, metrics = m.ipcache, m.policy, m.endpoints, m.metrics
        policy.update(
            layouts.encode_policy_key(DB_EP, WEB_ID, PORT, IPPROTO_TCP),
            layouts.encode_policy_value(True),
        )
        endpoints.update(*layouts.encode_endpoint(DB_EP, layouts.EP_F_INGRESS_ENFORCED))
        srv = _tcp_listen(t.pods["db"], t.ips6["db"])
        with srv:
            db_ip = t.ips6["db"]
            allowed_before = metric(metrics, layouts.MetricReason.ALLOW_POLICY)
            assert _connects_within(t.pods["web"], db_ip, 10.0, srv)
            assert metric(metrics, layouts.MetricReason.ALLOW_POLICY) > allowed_before
            assert metric(metrics, layouts.MetricReason.ALLOW_ICMPV6_ND) > 0

            drops_before = metric(metrics, layouts.MetricReason.DROP_POLICY_DENY)
            assert _try_connect(t.pods["other"], db_ip, 1.5) is None
            assert metric(metrics, layouts.MetricReason.DROP_POLICY_DENY) > drops_before

            # An IPv6 source the ipcache does not know is denied as "world", not passed.
            ipcache.delete(encode_key(IPv6Network(f"{t.ips6['web']}/128")))
            assert _try_connect(t.pods["web"], db_ip, 1.5) is None


def test_replies_to_flows_the_pod_opened_pass_its_ingress_policy(topology: Topology) -> None:
    """An enforced pod whose policy admits nobody still gets the replies of the
    connections and pings it opens itself (cp_from_endpoint records them in cp_ct);
    whatever it did not open stays dropped."""
    t = topology
    with _on_db(t) as m, KernelMap.open_pinned(t.pin_dir / "cp_ct") as ct:
        assert loader.is_attached(t.host_if["db"], netns=t.node)
        endpoints, metrics = m.endpoints, m.metrics
        endpoints.update(*layouts.encode_endpoint(DB_EP, layouts.EP_F_INGRESS_ENFORCED))

        web_srv = _tcp_listen(t.pods["web"], t.ips["web"])
        db_srv = _tcp_listen(t.pods["db"], t.ips["db"])
        with web_srv, db_srv:
            drops_before = metric(metrics, layouts.MetricReason.DROP_POLICY_DENY)
            assert _try_connect(t.pods["web"], t.ips["db"], 1.5) is None
            assert metric(metrics, layouts.MetricReason.DROP_POLICY_DENY) > drops_before
            assert not ping(t.pods["web"], t.ips["db"], 1.0)

            replies_before = metric(metrics, layouts.MetricReason.ALLOW_REPLY)
            assert _connects_within(t.pods["db"], t.ips["web"], 10.0, web_srv)
            assert ping(t.pods["db"], t.ips["web"], 2.0)
            assert metric(metrics, layouts.MetricReason.ALLOW_REPLY) > replies_before
            mapped = b"\0" * 10 + b"\xff\xff"
            flows = {
                (bytes(f.endpoint_addr), bytes(f.peer_addr), f.peer_port, f.proto)
                for f in (layouts.CtKey.from_buffer_copy(k) for k, _ in ct.items())
            }
            db_addr = mapped + IPv4Address(t.ips["db"]).packed
            web_addr = mapped + IPv4Address(t.ips["web"]).packed
            assert (db_addr, web_addr, PORT, IPPROTO_TCP) in flows, "db's connection in cp_ct"

            # What the pod did not open is still subject to its policy.
            assert _try_connect(t.pods["other"], t.ips["db"], 1.5) is None
            assert not ping(t.pods["web"], t.ips["db"], 1.0)


def _ct_entry(ct: KernelMap, endpoint: str, peer: str, endpoint_port: int) -> tuple[bytes, int]:
    """(raw key, ``last_seen_ns``) of the TCP flow ``endpoint:endpoint_port -> peer:PORT``
    in cp_ct; (b"", -1) when it is not there."""
    mapped = b"\0" * 10 + b"\xff\xff"
    want = (
        mapped + IPv4Address(endpoint).packed,
        mapped + IPv4Address(peer).packed,
        endpoint_port,
        PORT,
        IPPROTO_TCP,
    )
    for k, v in ct.items():
        key = layouts.CtKey.from_buffer_copy(k)
        got = (
            bytes(key.endpoint_addr),
            bytes(key.peer_addr),
            key.endpoint_port,
            key.peer_port,
            key.proto,
        )
        if got == want:
            return k, int(layouts.CtValue.from_buffer_copy(v).last_seen_ns)
    return b"", -1


def _ct_stamp(ct: KernelMap, endpoint: str, peer: str, endpoint_port: int) -> int | None:
    stamp = _ct_entry(ct, endpoint, peer, endpoint_port)[1]
    return None if stamp < 0 else stamp


def _closing(stamp: int | None) -> bool:
    return stamp is not None and bool(stamp & layouts.CT_F_CLOSING)


def _connect_from(netns: str, ip: str, port: int) -> socket.socket:
    with loader.in_netns(netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port))
    s.settimeout(5.0)
    s.connect((ip, PORT))
    return s


def _poll(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@contextmanager
def _db_enforced_web_listening(t: Topology) -> Iterator[tuple[_Maps, KernelMap, socket.socket]]:
    """db's programs attached and its ingress enforced with no rule (only replies pass),
    cp_ct open, and a listener on web:PORT."""
    with _on_db(t) as m, KernelMap.open_pinned(t.pin_dir / "cp_ct") as ct:
        m.endpoints.update(*layouts.encode_endpoint(DB_EP, layouts.EP_F_INGRESS_ENFORCED))
        web_srv = _tcp_listen(t.pods["web"], t.ips["web"])
        web_srv.settimeout(5.0)
        with web_srv:
            yield m, ct, web_srv


def _cpctl_ct_flow(pin_dir: Path, db: str, port: int, capsys: pytest.CaptureFixture[str]) -> Any:
    """``cpctl bpf ct list --json``'s row for db's flow from ``port`` to web on PORT."""
    args = build_parser().parse_args(["bpf", "ct", "list", "--json", "--pin-dir", str(pin_dir)])
    capsys.readouterr()
    assert asyncio.run(args.run(args)) == 0
    rows = json.loads(capsys.readouterr().out)
    mine = [
        r for r in rows if (r["endpoint"], r["endpoint_port"], r["peer_port"]) == (db, port, PORT)
    ]
    assert len(mine) == 1, rows
    return mine[0]


def test_a_closed_connection_is_marked_closing_and_a_new_one_reopens(
    topology: Topology, capsys: pytest.CaptureFixture[str]
) -> None:
    """A FIN from either side marks the pod's cp_ct entry closing (it then lives
    CT_LIFETIME_CLOSING_S, not 6 h) while the rest of the close still passes the enforced
    ingress; a new connection on the same ports opens it again."""
    t = topology
    db, web = t.ips["db"], t.ips["web"]
    with _db_enforced_web_listening(t) as (_, ct, web_srv):
        port = 0
        for first_closer in ("peer", "pod", "peer"):
            s = _connect_from(t.pods["db"], web, port)  # port 0 first, then the same
            conn, _ = web_srv.accept()
            with s, conn:
                port = s.getsockname()[1]
                s.sendall(b"x")
                assert conn.recv(1) == b"x"
                conn.sendall(b"y")
                assert s.recv(1) == b"y"  # the reply passed the enforced ingress
                assert not _closing(_ct_stamp(ct, db, web, port)), "an open flow"
                row = _cpctl_ct_flow(t.pin_dir, db, port, capsys)
                assert (row["peer"], row["proto"], row["closing"]) == (web, IPPROTO_TCP, False)
                assert row["expires_in_s"] > layouts.CT_LIFETIME_CLOSING_S
                first, second = (conn, s) if first_closer == "peer" else (s, conn)
                first.shutdown(socket.SHUT_WR)
                _poll(
                    lambda port=port: _closing(_ct_stamp(ct, db, web, port)),
                    10,
                    f"{first_closer}'s FIN marks closing",
                )
                row = _cpctl_ct_flow(t.pin_dir, db, port, capsys)
                assert row["closing"] and row["expires_in_s"] <= layouts.CT_LIFETIME_CLOSING_S
                args = build_parser().parse_args(["bpf", "ct", "list", "--pin-dir", str(t.pin_dir)])
                assert asyncio.run(args.run(args)) == 0
                table = capsys.readouterr().out.splitlines()
                assert table[0].split() == [
                    "ENDPOINT",
                    "PEER",
                    "PROTO",
                    "STATE",
                    "AGE",
                    "EXPIRES",
                ]
                assert [f"{db}:{port}", f"{web}:{PORT}", "TCP", "closing"] in [
                    line.split()[:4] for line in table[1:]
                ]
                second.shutdown(socket.SHUT_WR)
                # both FINs arrived: the peer's passed the ingress of the closing flow
                assert s.recv(1) == b"" and conn.recv(1) == b""


def test_a_closing_flow_lives_its_short_lifetime(topology: Topology) -> None:
    """Replies pass an enforced ingress for 6 h after the pod's last TCP packet, but only
    CT_LIFETIME_CLOSING_S once the flow is closing: the entry's time is set back (as if the
    pod had been silent for longer) and the peer's next data passes or is dropped."""
    t = topology
    db, web = t.ips["db"], t.ips["web"]
    with _db_enforced_web_listening(t) as (m, ct, web_srv):
        s = _connect_from(t.pods["db"], web, 0)
        conn, _ = web_srv.accept()
        with s, conn:
            port = s.getsockname()[1]
            key, _ = _ct_entry(ct, db, web, port)
            assert key, "db's connection in cp_ct"
            silent_s = layouts.CT_LIFETIME_CLOSING_S + 5

            def set_back(flags: int) -> int:
                now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # bpf_ktime_get_ns
                stamp = (now - silent_s * 1_000_000_000) & ~layouts.CT_F_CLOSING | flags
                ct.update(key, bytes(layouts.CtValue(stamp)))
                return stamp

            # open, silent for longer than a closing flow lives: still a reply
            written = set_back(0)
            conn.sendall(b"a")
            assert s.recv(1) == b"a"
            # db's ACK refreshes the entry; set it back again only after that
            _poll(lambda: _ct_entry(ct, db, web, port)[1] != written, 5, "db's ACK")
            set_back(layouts.CT_F_CLOSING)
            drops = metric(m.metrics, layouts.MetricReason.DROP_POLICY_DENY)
            conn.sendall(b"b")
            _poll(
                lambda: metric(m.metrics, layouts.MetricReason.DROP_POLICY_DENY) > drops,
                5,
                "the peer's data to an expired closing flow is dropped",
            )
            s.settimeout(0.5)
            with pytest.raises(TimeoutError):
                s.recv(1)
