"""The agent on the pinned kernel ipcache: the map outlives the agent, a restart adopts it.

The datapath-selection tests run anywhere; the kernel ones need root and usable eBPF maps
(skipped otherwise, with the reason printed). Each kernel test pins under its own
directory in /sys/fs/bpf, never the machine-wide /sys/fs/bpf/cp.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import replace
from ipaddress import ip_network
from pathlib import Path

import pytest

from controlplane.agent import datapath as agent_datapath
from controlplane.agent import main as agent_main
from controlplane.agent.agent import Agent
from controlplane.agent.datapath import DatapathUnavailable, choose_datapath
from controlplane.agent.settings import (
    DEFAULT_BPF_PIN_DIR,
    EXIT_USAGE,
    DatapathMode,
    build_parser,
    settings_from_args,
)
from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.datapath.bpf_syscall import BPF_F_NO_PREALLOC, BPF_MAP_TYPE_LPM_TRIE
from controlplane.datapath.capabilities import DatapathSupport
from controlplane.datapath.ipcache import (
    IPCACHE_MAP_NAME,
    IPCACHE_MAX_ENTRIES,
    IpcacheEntry,
    encode_key,
)
from controlplane.datapath.kernel import KernelMap
from controlplane.datapath.loader import load_program
from controlplane.kvstore.embedded import EmbeddedEtcd
from tests.helpers import eventually, kernel_maps_unmet, requires, running
from tests.test_agent import agent_settings, api, create, give_cidrs, kv_config

needs_kernel = requires(kernel_maps_unmet())

NOT_ROOT = DatapathSupport(False, "not root")
USABLE = DatapathSupport(True, "kernel eBPF maps usable (fake)")


def _never() -> DatapathSupport:
    raise AssertionError("userspace mode must not probe the kernel")


# -- selection (no root needed) ---------------------------------------------------------


def test_choose_datapath() -> None:
    userspace = choose_datapath(DatapathMode.USERSPACE, _never)
    assert (userspace.mode, userspace.reason) == ("userspace", "--datapath userspace")
    auto = choose_datapath(DatapathMode.AUTO, lambda: NOT_ROOT)
    assert (auto.mode, auto.reason) == ("userspace", "not root")  # falls back
    assert choose_datapath(DatapathMode.AUTO, lambda: USABLE).mode == "kernel"
    assert choose_datapath(DatapathMode.KERNEL, lambda: USABLE).mode == "kernel"
    with pytest.raises(DatapathUnavailable, match=r"--datapath kernel: .*: not root"):
        choose_datapath(DatapathMode.KERNEL, lambda: NOT_ROOT)


def test_flags() -> None:
    args = build_parser().parse_args(["--kvstore-endpoints", "http://127.0.0.1:2379"])
    settings = settings_from_args(args)
    assert settings.datapath is DatapathMode.AUTO
    assert settings.bpf_pin_dir == DEFAULT_BPF_PIN_DIR == Path("/sys/fs/bpf/cp")
    args = build_parser().parse_args(
        ["--kvstore-endpoints", "http://127.0.0.1:2379", "--datapath", "userspace",
         "--bpf-pin-dir", "/sys/fs/bpf/other"]
    )  # fmt: skip
    settings = settings_from_args(args)
    assert settings.datapath is DatapathMode.USERSPACE
    assert settings.bpf_pin_dir == Path("/sys/fs/bpf/other")


def test_auto_as_non_root_says_userspace_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(agent_datapath, "detect_datapath", lambda: NOT_ROOT)
    caplog.set_level(logging.INFO, logger="controlplane.agent.agent")
    settings = agent_settings(tmp_path, "node-a", "127.0.0.11", datapath=DatapathMode.AUTO)
    agent = Agent(settings, _dummy_kv())
    lines = [r.getMessage() for r in caplog.records if "datapath:" in r.getMessage()]
    assert lines == ["node-a: datapath: userspace maps (not root)"]
    assert agent.status()["datapath"]["mode"] == "userspace"
    assert agent.status()["datapath"]["reason"] == "not root"


def test_kernel_mode_unavailable_exits_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(agent_datapath, "detect_datapath", lambda: NOT_ROOT)
    argv = ["--kvstore-endpoints", "http://127.0.0.1:1", "--datapath", "kernel",
            "--api-socket", str(tmp_path / "a.sock"), "--metrics-address", "none"]  # fmt: skip
    assert agent_main.main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == "cp-agent: --datapath kernel: kernel eBPF maps unusable: not root\n"


def _dummy_kv() -> KvstoreConfig:
    return KvstoreConfig((EtcdClusterConfig("default", ("http://127.0.0.1:1",)),))


# -- kernel -----------------------------------------------------------------------------


@pytest.fixture
def pin_dir(bpf_pin_dir: Path) -> Path:
    return bpf_pin_dir


def _dump(pin: Path) -> dict[bytes, bytes]:
    with KernelMap.open_pinned(pin / IPCACHE_MAP_NAME) as kmap:
        return dict(kmap.items())


def _exists(path: Path) -> bool:
    return path.exists()


def _pins(pin_dir: Path) -> set[str]:
    return {p.name for p in pin_dir.iterdir()}


def _key(ip: str) -> bytes:
    return encode_key(ip_network(f"{ip}/32"))


class _Poller:
    """Samples the pinned map from a thread (concurrently with the agent's syscalls)."""

    def __init__(self, path: Path, must_keep: set[bytes]) -> None:
        self.path = path
        self.must_keep = must_keep
        self.samples = 0
        self.min_size: int | None = None
        self.lost: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="map-poller", daemon=True)

    def _run(self) -> None:
        with KernelMap.open_pinned(self.path) as kmap:
            while not self._stop.is_set():
                keys = set(kmap.keys())
                self.samples += 1
                self.min_size = (
                    len(keys) if self.min_size is None else min(self.min_size, len(keys))
                )
                self.lost |= self.must_keep - keys
                self._stop.wait(0.0005)

    def __enter__(self) -> _Poller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


@needs_kernel
async def test_pinned_ipcache_survives_the_agent_and_a_restart_adopts_it(
    etcd1: EmbeddedEtcd, tmp_path: Path, pin_dir: Path
) -> None:
    await give_cidrs(etcd1, "node-a", "node-b")
    config = kv_config(etcd1)
    settings = agent_settings(
        tmp_path, "node-a", "127.0.0.11", datapath=DatapathMode.KERNEL, bpf_pin_dir=pin_dir
    )
    b = Agent(agent_settings(tmp_path, "node-b", "127.0.0.12"), config)  # userspace
    a = Agent(settings, config)
    assert a.datapath.kernel and isinstance(a.ipcache.map, KernelMap)
    pinned = pin_dir / IPCACHE_MAP_NAME
    with KernelMap.open_pinned(pinned) as kmap:  # exactly as bpf/cp_maps.h declares it
        info = kmap.info()
    assert (info["name"], info["type"], info["key_size"], info["value_size"]) == (
        IPCACHE_MAP_NAME, BPF_MAP_TYPE_LPM_TRIE, 20, 24,
    )  # fmt: skip
    assert (info["max_entries"], info["flags"]) == (IPCACHE_MAX_ENTRIES, BPF_F_NO_PREALLOC)

    async with running(b), running(a, name="kernel-agent-1") as task:
        await asyncio.wait_for(a.wait_ready(), 20)
        await asyncio.wait_for(b.wait_ready(), 20)
        status, st = await api(a, "GET", "/v1/status")
        assert status == 200 and st["datapath"]["mode"] == "kernel"
        assert st["datapath"]["pin_dir"] == str(pin_dir)
        made = [await create(b, "ns", f"p{i}", [f"k8s:app=x{i % 2}"]) for i in range(5)]
        # b's endpoints with their identities, and both nodes' IPs: nothing more, nothing less
        want = {_key(ep["ip"]): ep["identity"] for ep in made}
        nodes = {_key("127.0.0.11"), _key("127.0.0.12")}

        def in_kernel() -> dict[bytes, bytes] | None:
            have = _dump(pin_dir)
            complete = set(have) == set(want) | nodes and all(
                int(IpcacheEntry.decode(have[k]).identity) == ident for k, ident in want.items()
            )
            return have if complete else None

        await eventually(lambda: a.reconciler.stats.resyncs >= 1, message="first sync")
        before = await eventually(in_kernel, message="b's endpoints and both nodes' IPs")
        assert len(before) == 5 + 2

        # "kill" the agent: cancel its task; the pinned map keeps every entry
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert isinstance(a.ipcache.map, KernelMap) and a.ipcache.map.closed
        assert _dump(pin_dir) == before

        # while it is down the store changes: one endpoint goes, one comes
        status, _ = await api(b, "DELETE", "/v1/endpoints/ns/p0")
        assert status == 200
        added = await create(b, "ns", "p-new", ["k8s:app=x0"])
        assert _dump(pin_dir) == before  # nobody drives the map now

        gone, new = _key(made[0]["ip"]), _key(added["ip"])
        unchanged = set(before) - {gone}
        a2 = Agent(settings, config)  # a new agent instance, same node and pin dir
        assert a2.reconciler.stats.adopted == len(before)
        with _Poller(pinned, unchanged) as poller:
            async with running(a2):
                await asyncio.wait_for(a2.wait_ready(), 20)
                await eventually(lambda: a2.reconciler.stats.resyncs >= 1, message="resync")
                after = _dump(pin_dir)
                await eventually(lambda: poller.samples > 10, message="poller ran")
        assert poller.lost == set(), "an unchanged entry vanished during the restart"
        assert poller.min_size is not None and poller.min_size >= len(unchanged)
        assert set(after) == unchanged | {new}
        assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}
        assert int(IpcacheEntry.decode(after[new]).identity) == added["identity"]
        stats = a2.reconciler.stats
        assert (stats.updates, stats.deletes, stats.swept) == (1, 1, 1), stats
        assert stats.unchanged >= len(unchanged)
        # a clean stop keeps the pin and its entries
        assert _dump(pin_dir) == after


@needs_kernel
async def test_cleanup_on_exit_unpins(etcd1: EmbeddedEtcd, tmp_path: Path, pin_dir: Path) -> None:
    await give_cidrs(etcd1, "node-a")
    settings = agent_settings(
        tmp_path, "node-a", "127.0.0.11", datapath=DatapathMode.AUTO, bpf_pin_dir=pin_dir
    )
    a = Agent(replace(settings, cleanup_on_exit=True), kv_config(etcd1))
    assert a.datapath_mode == "kernel"
    # cp-cni loaded the tc program here: its maps (cp_ct, cp_metrics too) are pinned beside
    load_program(1, pin_dir).close()
    assert _pins(pin_dir) >= {"cp_ipcache", "cp_ct", "cp_metrics"}
    async with running(a):
        await asyncio.wait_for(a.wait_ready(), 20)
        await eventually(lambda: _key("127.0.0.11") in _dump(pin_dir), message="own node IP")
    assert not _exists(pin_dir / IPCACHE_MAP_NAME)
    assert not _exists(pin_dir), _pins(pin_dir)  # every pin, then the dir


@needs_kernel
def test_kernel_mode_refuses_a_pin_dir_off_bpffs(tmp_path: Path) -> None:
    settings = agent_settings(
        tmp_path, "node-a", "127.0.0.11", datapath=DatapathMode.KERNEL,
        bpf_pin_dir=tmp_path / "not-bpffs",
    )  # fmt: skip
    with pytest.raises(DatapathUnavailable, match="kernel ipcache at"):
        Agent(settings, _dummy_kv())
    assert os.geteuid() == 0
