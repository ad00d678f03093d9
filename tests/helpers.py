"""Helpers shared by the tests: polling with a deadline, backends for fixture clusters."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from controlplane.cli.main import build_parser
from controlplane.config import ClientSettings, EtcdClusterConfig, TLSConfig
from controlplane.datapath import loader
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.errors import KvstoreError

T = TypeVar("T")

FAST = ClientSettings(request_timeout=5.0, keepalive_time=5.0, keepalive_timeout=2.0)


async def eventually(
    check: Callable[[], Awaitable[T] | T],
    *,
    timeout: float = 20.0,
    interval: float = 0.05,
    message: str = "condition not met",
) -> T:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        result = check()
        last = await result if asyncio.iscoroutine(result) else result  # type: ignore[assignment]
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)


def backend_for(
    endpoints: Sequence[str],
    *,
    name: str = "default",
    tls: TLSConfig | None = None,
    username: str | None = None,
    password: str | None = None,
    settings: ClientSettings = FAST,
) -> EtcdBackend:
    cluster = EtcdClusterConfig(name, tuple(endpoints), tls, username, password)
    return EtcdBackend(cluster, settings, own_connection=True)


async def retrying(call: Callable[[], Awaitable[T]], *, attempts: int = 100) -> T:
    """Repeat an idempotent request while the cluster elects a new leader."""
    for _ in range(attempts - 1):
        try:
            return await call()
        except KvstoreError:
            await asyncio.sleep(0.1)
    return await call()


async def holds_for(check: Callable[[], bool], seconds: float, message: str) -> None:
    """Assert ``check`` stays true for ``seconds`` (polled)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check(), message
        await asyncio.sleep(0.02)


def ip(*args: str) -> str:
    """Run ``ip ARGS``; fail the test with its stderr unless it succeeds; its stdout."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"ip {' '.join(args)}: {proc.stderr}"
    return proc.stdout


async def cpctl_in_process(etcd: EmbeddedEtcd, *argv: str) -> int:
    """Run ``cpctl ARGV`` in this process (its real parser) against ``etcd``; the status."""
    args = build_parser().parse_args([*argv, "--kvstore-endpoints", ",".join(etcd.client_urls)])
    status: int = await args.run(args)
    return status


def kernel_tests_skip_reason(*tools: str) -> str | None:
    """Why the tests that build and attach the datapath cannot run here (no root, eBPF or
    clang; or one of ``tools`` not on PATH), or None when they can."""
    reason = loader.datapath_unavailable_reason(need_build=True)
    for tool in tools:
        if reason is None and shutil.which(tool) is None:
            reason = f"`{tool}` not found"
    return reason
