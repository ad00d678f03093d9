"""Long-running cpctl commands stop their children on SIGTERM and SIGHUP as on Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

import pytest
from helpers import eventually, ip


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def _cpctl(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controlplane.cli.main",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _stop_and_check(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    """cpctl exits with 128 + the signal and stops its children first; SIGKILL it cannot
    handle, yet its children go too (the kernel's parent-death signal, set on every child
    it starts) and stop as on SIGTERM."""
    children = _descendants(proc.pid)
    assert children, "the command started no child process"
    proc.send_signal(sig)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    killed = sig == signal.SIGKILL
    assert proc.returncode == (-sig if killed else 128 + sig), err.decode()[-2000:]
    await eventually(
        lambda: not any(_alive(pid) for pid in children),
        timeout=60 if killed else 10,
        message=f"children of cpctl gone after {sig.name}",
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
async def test_etcd_up_stops_its_members(sig: signal.Signals, tmp_path: Path) -> None:
    proc = await _cpctl("etcd", "up", "--members", "3", "--json", "--data-dir", str(tmp_path))
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert len(json.loads(line)["endpoints"]) == 3
    await _stop_and_check(proc, sig)


def _routes() -> str:
    return ip("route", "show", "table", "all")


def _host() -> dict[str, object]:
    """What a local cluster must leave as it found it: routes, links, the bpffs."""
    bpffs = Path("/sys/fs/bpf")
    pins = sorted(str(p.relative_to(bpffs)) for p in bpffs.rglob("*")) if bpffs.is_dir() else []
    links = sorted(line.split(":")[1].strip() for line in ip("-o", "link", "show").splitlines())
    return {"routes": _routes(), "links": links, "pins": pins}


async def _up_with_two_agents(tmp_path: Path) -> asyncio.subprocess.Process:
    proc = await _cpctl(
        "up", "--agents", "2", "--json", "--refresh", "0.5", "--workdir", str(tmp_path)
    )
    assert proc.stdout is not None
    while True:  # a status view with both agents ready, and each other's CIDR known
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        assert line, "cpctl up ended early"
        if line.startswith(b"{"):
            view = json.loads(line)
            agents = view["agents"].values()
            if len(agents) == 2 and all(a["ready"] for a in agents):
                break
    assert len(_descendants(proc.pid)) >= 1 + 2 + 2, "etcd, two operators, two agents"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_up_leaves_the_host_alone_and_stops_everything(
    sig: signal.Signals, tmp_path: Path
) -> None:
    """`make run` (cpctl up) as root: no route, link or pin added to the host while it runs
    (two agents that know each other's pod CIDRs), and SIGTERM, or even SIGKILL mid-run,
    stops every daemon and etcd, leaving the host as it was."""
    before = _host()
    proc = await _up_with_two_agents(tmp_path)
    assert _host() == before
    await _stop_and_check(proc, sig)
    assert _host() == before
