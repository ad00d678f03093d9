"""The datapath's sysctls: checked and set under a fake /proc/sys (a tmp_path tree), read
only against the real one, and reported by the agent's status."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from controlplane.agent.agent import Agent
from controlplane.agent.settings import build_parser, settings_from_args
from controlplane.datapath import sysctls
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.model import parse_ip
from tests.helpers import no_privilege, requires
from tests.test_agent import agent_settings, api, kv_config, running


def _root(tmp_path: Path, forward: str = "0", rp: str = "1", forward6: str = "0") -> Path:
    root = tmp_path / "proc-sys"
    for name, value in (
        ("net.ipv4.ip_forward", forward),
        ("net.ipv6.conf.all.forwarding", forward6),
        ("net.ipv4.conf.all.rp_filter", rp),
        ("net.ipv4.conf.default.rp_filter", rp),
    ):
        path = root.joinpath(*name.split("."))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return root


def test_check_only_reports_and_warns_in_one_line(tmp_path: Path) -> None:
    root = _root(tmp_path)
    (state,) = sysctls.apply(set_values=False, root=root)
    assert state.name == "net.ipv4.ip_forward" and state.value == "0" and not state.ok
    assert not state.changed and state.error is not None and "--set-sysctls" in state.error
    assert (root / "net/ipv4/ip_forward").read_text() == "0\n"  # untouched
    line = sysctls.warning([state])
    assert line is not None and "\n" not in line and "net.ipv4.ip_forward=0" in line
    summary = sysctls.summary([state], root)
    assert summary["ok"] is False and summary["required"][0]["want"] == "1"
    assert summary["reported"] == {
        "net.ipv4.conf.all.rp_filter": "1",
        "net.ipv4.conf.default.rp_filter": "1",
    }


def test_set_writes_what_differs_only(tmp_path: Path) -> None:
    root = _root(tmp_path)
    (state,) = sysctls.apply(set_values=True, root=root)
    assert state.ok and state.changed and state.error is None
    assert (root / "net/ipv4/ip_forward").read_text().strip() == "1"
    assert (root / "net/ipv4/conf/all/rp_filter").read_text() == "1\n"  # reported, not set
    (again,) = sysctls.apply(set_values=True, root=root)
    assert again.ok and not again.changed and sysctls.warning([again]) is None


def test_ipv6_forwarding_is_wanted_only_with_ipv6(tmp_path: Path) -> None:
    assert [w.name for w in sysctls.wanted(ipv6=False)] == ["net.ipv4.ip_forward"]
    root = _root(tmp_path, forward="1")
    v4, v6 = sysctls.apply(set_values=False, root=root, wants=sysctls.wanted(ipv6=True))
    assert v4.ok and not v6.ok and v6.name == "net.ipv6.conf.all.forwarding"
    line = sysctls.warning([v4, v6])
    assert line is not None and "net.ipv6.conf.all.forwarding=0 (want 1" in line
    _, v6 = sysctls.apply(set_values=True, root=root, wants=sysctls.wanted(ipv6=True))
    assert v6.ok and v6.changed
    assert (root / "net/ipv6/conf/all/forwarding").read_text().strip() == "1"


async def test_an_ipv6_node_agent_sets_ipv6_forwarding(etcd1: EmbeddedEtcd, tmp_path: Path) -> None:
    root = _root(tmp_path)
    settings = agent_settings(tmp_path, "node-6", "127.0.0.32", set_sysctls=True,
                              sysctl_root=root)  # fmt: skip
    settings = replace(settings, node_ips=(*settings.node_ips, parse_ip("fd00::32")))
    agent = Agent(settings, kv_config(etcd1))
    assert (root / "net/ipv6/conf/all/forwarding").read_text().strip() == "1"
    names = [s.name for s in agent.sysctls]
    assert names == ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]


def test_not_settable_is_reported(tmp_path: Path) -> None:
    root = _root(tmp_path)
    missing = tmp_path / "empty"
    missing.mkdir()
    (state,) = sysctls.apply(set_values=True, root=missing)
    assert state.value is None and not state.ok and state.error is not None
    assert "cannot set" in state.error
    line = sysctls.warning([state])
    assert line is not None and "net.ipv4.ip_forward=?" in line
    assert sysctls.read("net.ipv4.ip_forward", root) == "0"
    with pytest.raises(ValueError):
        sysctls.read("net..ipv4", root)


@requires(None if Path("/proc/sys/net/ipv4/ip_forward").exists() else no_privilege("no /proc/sys"))
def test_the_real_proc_sys_read_only() -> None:
    before = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    (state,) = sysctls.apply(set_values=False)
    assert state.value == before.strip() and state.ok == (before.strip() == "1")
    assert not state.changed
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == before
    summary = sysctls.summary([state])
    assert set(summary["reported"]) == set(sysctls.REPORTED)
    assert all(v is not None for v in summary["reported"].values())


def test_the_agent_flag() -> None:
    parse = build_parser().parse_args
    assert settings_from_args(parse([])).set_sysctls is False
    assert settings_from_args(parse(["--set-sysctls"])).set_sysctls is True
    assert settings_from_args(parse(["--no-set-sysctls"])).set_sysctls is False
    bad = subprocess.run(
        [sys.executable, "-m", "controlplane.agent.main", "--set-sysctls=yes"],
        capture_output=True, text=True, check=False, timeout=30,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


async def test_the_agent_sets_and_reports_them(
    etcd1: EmbeddedEtcd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _root(tmp_path)
    settings = agent_settings(tmp_path, "node-s", "127.0.0.31", set_sysctls=True,
                              sysctl_root=root)  # fmt: skip
    agent = Agent(settings, kv_config(etcd1))
    assert (root / "net/ipv4/ip_forward").read_text().strip() == "1"
    async with running(agent):
        status, st = await api(agent, "GET", "/v1/status")
    assert status == 200
    got = st["datapath"]["sysctls"]
    assert got["ok"] is True and got["reported"]["net.ipv4.conf.all.rp_filter"] == "1"
    (forward,) = got["required"]
    assert forward["name"] == "net.ipv4.ip_forward" and forward["value"] == "1"
    assert forward["changed"] is True and forward["error"] is None
    # cpctl status prints one line per required sysctl
    from controlplane.cli.status_cmd import _print

    _print(st)
    out = capsys.readouterr().out
    assert "sysctl:     net.ipv4.ip_forward=1 ok (set at start)" in out.splitlines()
    unset = sysctls.apply(set_values=False, root=_root(tmp_path / "w"))
    _print({"datapath": {"sysctls": sysctls.summary(unset)}})
    wrong = [line for line in capsys.readouterr().out.splitlines() if "sysctl" in line]
    assert len(wrong) == 1 and "net.ipv4.ip_forward=0 WRONG, want 1" in wrong[0]
