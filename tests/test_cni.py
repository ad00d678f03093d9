"""``cp-cni`` run as the runtime runs it: a subprocess with ``CNI_*`` env and JSON on stdin.

The plugin talks to a real in-process agent (kernel datapath, maps pinned in a per-test
directory under /sys/fs/bpf) and works in network namespaces this test creates: a "node"
namespace (the plugin is started inside it with ``nsenter --net``, which changes only the
network namespace, so the bpffs pins are the real ones) and pod namespaces.

The argument/config error cases run anywhere; the rest need root, clang, libbpf, ``ip``
and ``nsenter`` (skipped with the reason printed otherwise). pyroute2's synchronous
``IPRoute`` refuses to start inside a running event loop, so the test's own netlink checks
go through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from controlplane.agent.agent import Agent
from controlplane.agent.settings import DatapathMode
from controlplane.cni import netlink
from controlplane.cni.main import SUPPORTED_VERSIONS, endpoint_offset
from controlplane.datapath import loader
from controlplane.datapath.lbmap import (
    LB_METRICS_MAP_NAME,
    LB_SERVICES_MAP_NAME,
    LB_SLOTS_MAP_NAME,
)
from controlplane.kvstore.embedded import EmbeddedEtcd
from tests.helpers import ip, kernel_tests_unmet, requires, running
from tests.test_agent import agent_settings, api, give_cidrs, kv_config

REPO = Path(__file__).resolve().parents[1]
needs_kernel = requires(kernel_tests_unmet("ip", "nsenter"))


@dataclass
class Ran:
    rc: int
    out: Any
    stderr: str


async def cni(
    command: str,
    conf: Mapping[str, Any] | str | bytes | None,
    *,
    node: str | None = None,
    env: Mapping[str, str] | None = None,
    plugin: Sequence[str] = (sys.executable, "-m", "controlplane.cni.main"),
) -> Ran:
    """Run the plugin like a runtime (inside ``node``'s network namespace if given);
    ``plugin`` is the command (default: the Python plugin)."""
    argv = list(plugin)
    if node is not None:
        argv = ["nsenter", f"--net=/run/netns/{node}", *argv]
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "CNI_COMMAND": command,
        "CNI_PATH": "/opt/cni/bin",
        **(env or {}),
    }
    text = conf if isinstance(conf, str | bytes) else "" if conf is None else json.dumps(conf)
    stdin = text if isinstance(text, bytes) else text.encode()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
        cwd=str(REPO),
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    text = out.decode()
    try:
        parsed: Any = json.loads(text) if text.strip() else None
    except ValueError:
        raise AssertionError(f"plugin stdout is not JSON: {text!r} (stderr: {err!r})") from None
    return Ran(proc.returncode, parsed, err.decode())


def assert_cni_error(ran: Ran, code: int | None = None) -> dict[str, Any]:
    assert ran.rc == 1, ran
    assert isinstance(ran.out, dict) and set(ran.out) == {"cniVersion", "code", "msg", "details"}
    assert isinstance(ran.out["code"], int) and isinstance(ran.out["msg"], str), ran.out
    assert "Traceback" not in ran.stderr + json.dumps(ran.out)
    if code is not None:
        assert ran.out["code"] == code, ran.out
    result: dict[str, Any] = ran.out
    return result


# -- no kernel needed ------------------------------------------------------------------


async def test_version() -> None:
    ran = await cni("VERSION", {"cniVersion": "1.0.0"})
    assert ran.rc == 0
    assert ran.out == {"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
    assert (await cni("VERSION", None)).out["supportedVersions"] == ["0.4.0", "1.0.0"]


async def test_bad_input_is_a_cni_error(tmp_path: Path) -> None:
    env = {"CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/none", "CNI_IFNAME": "eth0"}
    assert_cni_error(await cni("ADD", "{not json", env=env), 6)
    assert_cni_error(await cni("ADD", "[1]", env=env), 6)
    base = {"cniVersion": "1.0.0", "name": "cp", "type": "cp-cni"}
    assert_cni_error(await cni("ADD", {**base, "cniVersion": "0.1.0"}, env=env), 1)
    assert_cni_error(await cni("ADD", {**base, "mtu": "big"}, env=env), 7)
    assert_cni_error(await cni("ADD", {**base, "labels": "app=web"}, env=env), 7)
    assert_cni_error(await cni("ADD", base, env={**env, "CNI_IFNAME": ""}), 4)
    assert_cni_error(await cni("FROB", base, env=env), 4)
    assert_cni_error(await cni("ADD", base, env={**env, "CNI_ARGS": "junk"}), 4)
    # no agent listening: "try again later"
    sock = str(tmp_path / "nobody.sock")
    err = assert_cni_error(await cni("DEL", {**base, "agentSocket": sock}, env=env), 11)
    assert err["cniVersion"] == "1.0.0" and sock in err["details"]


def test_endpoint_offset() -> None:
    assert endpoint_offset(ip_address("10.20.3.7"), "10.20.3.0/24") == 7
    assert endpoint_offset(ip_address("fd00::1:2"), "fd00::/64") == 0x10002


def test_host_veth_names() -> None:
    name = netlink.host_veth_name("a" * 64)
    assert name.startswith("cp") and len(name) == 13 and int(name[2:], 16) >= 0
    assert name != netlink.host_veth_name("b" * 64)


# -- kernel ---------------------------------------------------------------------------


@dataclass
class Env:
    node: str
    pods: dict[str, str]  # pod name -> netns name
    pin_dir: Path
    agent: Agent
    conf: dict[str, Any]

    def cni_env(self, pod: str, **extra: str) -> dict[str, str]:
        return {
            "CNI_CONTAINERID": f"ctr-{pod}-{self.node}",
            "CNI_NETNS": f"/run/netns/{self.pods[pod]}",
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME={pod}",
            **extra,
        }

    async def run(self, command: str, pod: str, **extra: str) -> Ran:
        return await cni(command, self.conf, node=self.node, env=self.cni_env(pod, **extra))


@pytest.fixture
def namespaces() -> Iterator[tuple[str, dict[str, str], Path]]:
    with cni_namespaces() as made:
        yield made


@contextlib.contextmanager
def cni_namespaces() -> Iterator[tuple[str, dict[str, str], Path]]:
    """A node namespace (forwarding on), two pod namespaces, a bpffs pin directory."""
    tok = secrets.token_hex(3)
    node = f"cpcni-{tok}-node"
    pods = {p: f"cpcni-{tok}-{p}" for p in ("web", "db")}
    pin_dir = Path(f"/sys/fs/bpf/cp-cni-test-{tok}")

    def cleanup() -> None:
        for ns in (node, *pods.values()):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        if pin_dir.exists():
            for pin in pin_dir.iterdir():
                pin.unlink()
            pin_dir.rmdir()

    try:
        for ns in (node, *pods.values()):
            ip("netns", "add", ns)
        ip("-n", node, "link", "set", "lo", "up")
        # the node's own address (as a host has one): the source of its ARP requests
        ip("-n", node, "addr", "add", "10.20.255.254/32", "dev", "lo")
        with loader.in_netns(node):
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        yield node, pods, pin_dir
    finally:
        cleanup()


@pytest_asyncio.fixture
async def env(
    etcd1: EmbeddedEtcd, tmp_path: Path, namespaces: tuple[str, dict[str, str], Path]
) -> AsyncIterator[Env]:
    async with cni_agent(etcd1, tmp_path, namespaces) as made:
        yield made


@contextlib.asynccontextmanager
async def cni_agent(
    etcd1: EmbeddedEtcd,
    tmp_path: Path,
    namespaces: tuple[str, dict[str, str], Path],
    **overrides: Any,
) -> AsyncIterator[Env]:
    """A ready kernel-mode agent for node-a (settings ``overrides``) and the netconf."""
    node, pods, pin_dir = namespaces
    await give_cidrs(etcd1, "node-a")
    settings = agent_settings(
        tmp_path,
        "node-a",
        "127.0.0.11",
        datapath=DatapathMode.KERNEL,
        bpf_pin_dir=pin_dir,
        **overrides,
    )
    agent = Agent(settings, kv_config(etcd1))
    conf = {
        "cniVersion": "1.0.0",
        "name": "cp",
        "type": "cp-cni",
        "agentSocket": str(settings.api_socket),
        "pinDir": str(pin_dir),
        "mtu": 1400,
        "labels": ["k8s:team=a"],
    }
    async with running(agent):
        await asyncio.wait_for(agent.wait_ready(), 20)
        yield Env(node, pods, pin_dir, agent, conf)


def _addresses(netns: str, ifname: str) -> set[str]:
    out = json.loads(ip("-n", netns, "-j", "-4", "addr", "show", "dev", ifname))
    return {f"{a['local']}/{a['prefixlen']}" for link in out for a in link["addr_info"]}


def _mtu(netns: str, ifname: str) -> int:
    return int(json.loads(ip("-n", netns, "-j", "link", "show", "dev", ifname))[0]["mtu"])


async def _tcp_roundtrip(src_ns: str, dst_ns: str, dst_ip: str) -> bool:
    def go() -> bool:
        with loader.in_netns(dst_ns):
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with srv:
            srv.bind((dst_ip, 0))
            srv.listen(1)
            srv.settimeout(5)
            port = srv.getsockname()[1]
            with loader.in_netns(src_ns):
                cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with cli:
                cli.settimeout(5)
                try:
                    cli.connect((dst_ip, port))
                except OSError:
                    return False
                conn, _ = srv.accept()
                with conn:
                    cli.sendall(b"ping")
                    conn.settimeout(5)
                    return conn.recv(4) == b"ping"

    return await asyncio.to_thread(go)


@needs_kernel
async def test_add_check_del(env: Env) -> None:
    ran = await env.run("ADD", "web", CNI_ARGS="K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web;"
                        "CP_LABELS=k8s:app=web,k8s:tier=front")  # fmt: skip
    assert ran.rc == 0, ran
    result = ran.out
    host = netlink.host_veth_name(env.cni_env("web")["CNI_CONTAINERID"])
    assert result["cniVersion"] == "1.0.0"
    assert [i["name"] for i in result["interfaces"]] == [host, "eth0"]
    assert result["interfaces"][1]["sandbox"] == env.cni_env("web")["CNI_NETNS"]
    [ipconf] = result["ips"]
    assert ipconf["interface"] == 1 and ipconf["gateway"] == "169.254.1.1"
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    pod_ip = ipconf["address"].split("/")[0]

    # the agent has the endpoint, with the labels from the config and CNI_ARGS
    status, listed = await api(env.agent, "GET", "/v1/endpoints")
    assert status == 200
    [ep] = [e for e in listed if e["name"] == "web"]
    assert ep["namespace"] == "ns" and ep["ip"] == pod_ip
    assert sorted(ep["labels"]) == ["k8s:app=web", "k8s:team=a", "k8s:tier=front"]

    # pod side: eth0 with the /32, default via the link-local gateway; host side: veth up
    # with the program attached and the /32 route
    assert _addresses(env.pods["web"], "eth0") == {f"{pod_ip}/32"}
    assert _mtu(env.pods["web"], "eth0") == 1400 and _mtu(env.node, host) == 1400
    routes = ip("-n", env.pods["web"], "route", "show")
    assert "default via 169.254.1.1 dev eth0" in routes
    assert await asyncio.to_thread(loader.is_attached, host, env.node)
    assert f"{pod_ip} dev {host}" in ip("-n", env.node, "route", "show")
    # the program's shared maps, and the agent's load-balancer maps beside them
    agent_lb = (LB_SERVICES_MAP_NAME, LB_SLOTS_MAP_NAME, LB_METRICS_MAP_NAME)
    assert sorted(p.name for p in env.pin_dir.iterdir()) == sorted((*loader.SHARED_MAPS, *agent_lb))

    # ADD again for the same container (a retried ADD): same endpoint, same address
    again = await env.run("ADD", "web", CNI_ARGS="K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web;"
                          "CP_LABELS=k8s:app=web,k8s:tier=front")  # fmt: skip
    assert again.rc == 0, again
    assert again.out["ips"] == result["ips"]

    # CHECK passes, with and without prevResult
    assert (await env.run("CHECK", "web")).rc == 0
    conf_prev = {**env.conf, "prevResult": result}
    checked = await cni("CHECK", conf_prev, node=env.node, env=env.cni_env("web"))
    assert checked.rc == 0 and checked.out is None, checked

    # a second pod on the node: traffic between the two goes through the node (and the tc
    # program, which allows by default without a policy) in both directions
    conf_04 = {**env.conf, "cniVersion": "0.4.0"}
    db = await cni("ADD", conf_04, node=env.node, env=env.cni_env("db"))
    assert db.rc == 0, db
    assert db.out["cniVersion"] == "0.4.0" and db.out["ips"][0]["version"] == "4"
    db_ip = db.out["ips"][0]["address"].split("/")[0]
    assert db_ip != ip
    assert await _tcp_roundtrip(env.pods["web"], env.pods["db"], db_ip)
    assert await _tcp_roundtrip(env.pods["db"], env.pods["web"], pod_ip)

    # DEL, twice; then CHECK fails with an error JSON
    for _ in range(2):
        deleted = await env.run("DEL", "web")
        assert deleted.rc == 0 and deleted.out is None, deleted
    assert not await asyncio.to_thread(netlink.link_exists, host, env.node)
    assert "eth0" not in ip("-n", env.pods["web"], "link", "show")
    _, listed = await api(env.agent, "GET", "/v1/endpoints")
    assert [e["name"] for e in listed] == ["db"]
    assert_cni_error(await env.run("CHECK", "web"), 103)

    # DEL without a netns (the runtime already removed it), and with one that is gone
    assert (await env.run("DEL", "db", CNI_NETNS="")).rc == 0
    ip("netns", "del", env.pods["db"])
    assert (await env.run("DEL", "db")).rc == 0
    _, listed = await api(env.agent, "GET", "/v1/endpoints")
    assert listed == []


@needs_kernel
async def test_add_into_a_missing_netns_fails_and_leaves_nothing(env: Env) -> None:
    ran = await env.run("ADD", "web", CNI_NETNS="/run/netns/cpcni-does-not-exist")
    assert_cni_error(ran, 3)
    _, listed = await api(env.agent, "GET", "/v1/endpoints")
    assert listed == []
    host = netlink.host_veth_name(env.cni_env("web")["CNI_CONTAINERID"])
    assert not await asyncio.to_thread(netlink.link_exists, host, env.node)


@needs_kernel
async def test_check_notices_a_detached_program(env: Env) -> None:
    assert (await env.run("ADD", "web")).rc == 0
    host = netlink.host_veth_name(env.cni_env("web")["CNI_CONTAINERID"])
    assert await asyncio.to_thread(loader.detach, host, env.node)
    err = assert_cni_error(await env.run("CHECK", "web"), 103)
    assert "attached" in err["msg"]
    assert (await env.run("DEL", "web")).rc == 0


def test_help_prints_usage_and_arguments_are_refused() -> None:
    cmd = [sys.executable, "-m", "controlplane.cni.main"]
    shown = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=False)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: cp-cni"), shown
    assert "agentSocket" in shown.stdout and shown.stderr == ""
    bad = subprocess.run([*cmd, "ADD"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "--help" in bad.stderr
