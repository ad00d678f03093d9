"""The node's ``cp-cni`` launcher (``cni/cp-cni-shim.c``): a static binary that hands each
CNI call to the agent (``POST /v1/cni``), which runs the Python plugin.

The binary is built with the wheel build's command (``make -C cni OUT=...``). It runs as
the runtime runs it, in the test's own network namespace: it only talks to the agent's
unix socket; the agent runs the plugin inside the test's "node" namespace
(``cni_netns``), against pod namespaces and pins the fixtures of test_cni.py make. The
answers are compared with what the Python plugin prints when run directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from controlplane.agent.agent import Agent
from controlplane.cni import netlink
from controlplane.kvstore.embedded import EmbeddedEtcd
from tests.helpers import eventually, requires, running, tools_unmet
from tests.test_agent import agent_settings, api, kv_config
from tests.test_cni import (
    Env,
    Ran,
    _addresses,
    assert_cni_error,
    cni,
    cni_agent,
    cni_namespaces,
    needs_kernel,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = requires(tools_unmet("cc", "make"))

BASE = {"cniVersion": "1.0.0", "name": "cp", "type": "cp-cni"}
ENV = {"CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/none", "CNI_IFNAME": "eth0"}


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shim") / "cp-cni"
    built = subprocess.run(
        ["make", "-s", "-C", str(REPO / "cni"), f"OUT={out}"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    return out


async def via_shim(shim: Path, command: str, conf: Any, **env: str) -> Ran:
    """Run the launcher as the runtime would, with ``ENV`` and ``env`` (no agent needed
    for what it answers itself)."""
    return await cni(command, conf, env={**ENV, **env}, plugin=[str(shim)])


def _interpreter(binary: Path) -> bool:
    """Whether the ELF file has a PT_INTERP program header (is dynamically linked)."""
    data = binary.read_bytes()
    assert data[:5] == b"\x7fELF\x02"  # 64-bit
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return 3 in types


def test_help_arguments_and_a_static_binary(shim: Path) -> None:
    shown = subprocess.run([shim, "--help"], capture_output=True, text=True, env={})
    assert shown.returncode == 0 and shown.stdout.startswith("usage: cp-cni"), shown
    assert "agentSocket" in shown.stdout and "/v1/cni" in shown.stdout and shown.stderr == ""
    bad = subprocess.run([shim, "ADD"], capture_output=True, text=True, env={})
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "--help" in bad.stderr
    assert not _interpreter(shim)  # nothing of the host's userland needed


@pytest.mark.parametrize(
    ("command", "stdin"),
    [
        ("VERSION", json.dumps({"cniVersion": "0.4.0"})),
        ("VERSION", ""),
        ("VERSION", "{not json"),
        ("ADD", "{not json"),
        ("ADD", ""),
        ("ADD", "[1]"),
        ("ADD", '{"cniVersion": "1.0.0", "x": [1, 2.5e3, {"y": null}], "z": "\\u00e9'),
        ("FROB", json.dumps({**BASE, "cniVersion": "0.4.0"})),
        ("DEL", json.dumps({**BASE, "agentSocket": 5})),
        ("CHECK", json.dumps({**BASE, "agentSocket": ""})),
    ],
)
async def test_answered_without_the_agent_as_the_python_plugin_answers(
    shim: Path, command: str, stdin: str
) -> None:
    """VERSION and bad input: the same exit status, error code and version as the
    Python plugin (the messages may differ), no agent needed."""
    ran, ref = await via_shim(shim, command, stdin), await cni(command, stdin, env=ENV)
    assert ran.rc == ref.rc, (ran, ref)
    if ref.rc == 0:
        assert ran.out == ref.out
        return
    err, want = assert_cni_error(ran), assert_cni_error(ref)
    assert (err["code"], err["cniVersion"]) == (want["code"], want["cniVersion"]), (err, want)


@pytest.mark.parametrize("command", ["ADD", "VERSION"])
async def test_stdin_that_is_not_utf8_is_an_io_error(shim: Path, command: str) -> None:
    """JSON text is UTF-8 (RFC 8259): anything else is refused before the agent is asked
    (the Python plugin's own reading depends on the locale: strict, or surrogateescape)."""
    err = assert_cni_error(await via_shim(shim, command, b'{"name": "\xc3\x28"}'), 5)
    assert err["details"] == "not UTF-8 at byte 10", err


async def test_no_agent_is_try_again_later(shim: Path, tmp_path: Path) -> None:
    sock = tmp_path / "nobody.sock"
    conf = {**BASE, "cniVersion": "0.4.0", "agentSocket": str(sock)}
    err = assert_cni_error(await via_shim(shim, "ADD", conf), 11)
    assert err["cniVersion"] == "0.4.0" and str(sock) in err["details"]

    # something listens there but closes without an answer (an agent going away)
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_unix_server(hang_up, path=str(sock))
    async with server:
        err = assert_cni_error(await via_shim(shim, "DEL", conf), 11)
        assert str(sock) in err["details"]


async def test_a_bad_request_body_is_refused_by_the_agent(
    etcd1: EmbeddedEtcd, tmp_path: Path
) -> None:
    """The API side of /v1/cni: only the CNI_* variables, a string stdin (400 else)."""
    agent = Agent(agent_settings(tmp_path, "node-b", "127.0.0.12"), kv_config(etcd1))
    async with running(agent):
        for body in (
            {"env": {"PATH": "/tmp"}, "stdin": "{}"},
            {"env": {"CNI_COMMAND": 1}, "stdin": "{}"},
            {"env": {}, "stdin": 5},
            [1],
        ):
            status, answer = await api(agent, "POST", "/v1/cni", body)
            assert status == 400 and "error" in answer, (body, answer)
        status, _ = await api(agent, "GET", "/v1/cni")
        assert status == 405


# -- kernel ---------------------------------------------------------------------------


@pytest.fixture
def namespaces() -> Iterator[tuple[str, dict[str, str], Path]]:
    with cni_namespaces() as made:
        yield made


@pytest_asyncio.fixture
async def env(
    etcd1: EmbeddedEtcd, tmp_path: Path, namespaces: tuple[str, dict[str, str], Path]
) -> AsyncIterator[Env]:
    async with cni_agent(etcd1, tmp_path, namespaces, cni_netns=namespaces[0]) as made:
        yield made


def _count(env: Env, command: str, result: str) -> float:
    labels = {"command": command, "result": result}
    return env.agent.metrics.registry.get_sample_value("cp_agent_cni_requests_total", labels) or 0


def _macs_masked(result: dict[str, Any]) -> dict[str, Any]:
    interfaces = [{**i, "mac": "MAC"} for i in result["interfaces"]]
    return {**result, "interfaces": interfaces}


@needs_kernel
async def test_add_check_del_through_the_agent(shim: Path, env: Env) -> None:
    web = env.cni_env("web")
    # two pods at once, as a runtime does (the second with 0.4.0 results)
    ran, db = await asyncio.gather(
        via_shim(shim, "ADD", env.conf, **web),
        via_shim(shim, "ADD", {**env.conf, "cniVersion": "0.4.0"}, **env.cni_env("db")),
    )
    assert ran.rc == 0, ran
    assert db.rc == 0 and db.out["ips"][0]["version"] == "4", db
    result = ran.out
    host = netlink.host_veth_name(web["CNI_CONTAINERID"])
    [ipconf] = result["ips"]
    pod_ip = ipconf["address"].split("/")[0]
    assert [i["name"] for i in result["interfaces"]] == [host, "eth0"]
    # the plugin ran in the node's namespace: the pod got its address and MTU there
    assert _addresses(env.pods["web"], "eth0") == {f"{pod_ip}/32"}
    assert f"{pod_ip} dev {host}" in (await asyncio.to_thread(
        subprocess.run, ["ip", "-n", env.node, "route", "show"], capture_output=True, text=True
    )).stdout  # fmt: skip

    # the Python plugin, run directly (a retried ADD of the same container), prints the
    # same result (the veth pair is made anew: new MAC addresses)
    ref = await cni("ADD", env.conf, node=env.node, env=web)
    assert ref.rc == 0, ref
    assert _macs_masked(ref.out) == _macs_masked(result)

    # CHECK, with and without prevResult: nothing on stdout, exit 0
    for conf in (env.conf, {**env.conf, "prevResult": ref.out}):
        checked = await via_shim(shim, "CHECK", conf, **web)
        assert checked.rc == 0 and checked.out is None, checked

    # DEL twice, then CHECK fails with the plugin's error, relayed with its exit status
    for _ in range(2):
        deleted = await via_shim(shim, "DEL", env.conf, **web)
        assert deleted.rc == 0 and deleted.out is None, deleted
    assert not await asyncio.to_thread(netlink.link_exists, host, env.node)
    assert_cni_error(await via_shim(shim, "CHECK", env.conf, **web), 103)
    assert (await via_shim(shim, "DEL", env.conf, **env.cni_env("db"))).rc == 0
    _, listed = await api(env.agent, "GET", "/v1/endpoints")
    assert listed == []

    assert _count(env, "ADD", "ok") == 2 and _count(env, "DEL", "ok") == 3
    assert _count(env, "CHECK", "ok") == 2 and _count(env, "CHECK", "error") == 1


@pytest_asyncio.fixture
async def impatient(
    etcd1: EmbeddedEtcd, tmp_path: Path, namespaces: tuple[str, dict[str, str], Path]
) -> AsyncIterator[Env]:
    overrides = {"cni_netns": namespaces[0], "cni_timeout": 10.0}
    async with cni_agent(etcd1, tmp_path, namespaces, **overrides) as made:
        yield made


@needs_kernel
async def test_a_hung_plugin_is_killed_and_the_api_serves_meanwhile(
    shim: Path, impatient: Env, tmp_path: Path
) -> None:
    """A plugin stuck in a syscall (its CNI_NETNS a FIFO without writer: opening it blocks
    after the endpoint is created) holds neither the API nor the agent: the plugin's own
    call back (POST /v1/endpoints) and ours are served while it hangs; after cni_timeout
    it is killed and the launcher reports error 11."""
    env = impatient
    fifo = tmp_path / "netns-fifo"
    os.mkfifo(fifo)
    stuck = asyncio.create_task(
        via_shim(shim, "ADD", env.conf, **env.cni_env("web", CNI_NETNS=str(fifo)))
    )

    async def created() -> bool:
        _, listed = await api(env.agent, "GET", "/v1/endpoints")
        return any(e["name"] == "web" for e in listed)

    await eventually(created, timeout=30, message="the plugin's endpoint")
    assert not stuck.done(), stuck.result()
    status, _ = await api(env.agent, "GET", "/v1/status")
    assert status == 200 and not stuck.done()  # served while the CNI request is pending

    err = assert_cni_error(await asyncio.wait_for(stuck, 60), 11)
    assert "10.0s" in err["details"], err
    assert _count(env, "ADD", "timeout") == 1
    # no plugin left running
    assert await asyncio.to_thread(_processes_with, f"CNI_NETNS={fifo}") == []
    # the runtime's DEL after a failed ADD cleans up (no netns any more)
    assert (await via_shim(shim, "DEL", env.conf, **env.cni_env("web", CNI_NETNS=""))).rc == 0
    _, listed = await api(env.agent, "GET", "/v1/endpoints")
    assert listed == []


def _processes_with(variable: str) -> list[int]:
    """The processes whose environment holds ``variable`` (NAME=value)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if variable.encode() in environ:
            found.append(int(proc.name))
    return found
