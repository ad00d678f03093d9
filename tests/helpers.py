"""Helpers shared by the tests: polling with a deadline, backends for fixture clusters."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from controlplane.cli.main import build_parser
from controlplane.config import ClientSettings, EtcdClusterConfig, TLSConfig
from controlplane.datapath import loader
from controlplane.datapath.capabilities import detect_datapath
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.errors import KvstoreError
from controlplane.kvstore.etcd_tools import EtcdNotFound, EtcdTool, find_etcd_tool
from controlplane.store_types import EventKind, StoreEvent

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


# -- what a test needs from the machine -------------------------------------------------

IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
INSTALL_COMMAND = "sudo scripts/install-deps"


@dataclass(frozen=True)
class Unmet:
    """Why some tests cannot run here. A missing privilege (not root, eBPF refused by the
    kernel) is a skip everywhere; a missing ``tool`` is a skip, and a failure under CI=true."""

    reason: str
    tool: bool


def missing_tool(reason: str) -> Unmet:
    return Unmet(f"{reason} (install: {INSTALL_COMMAND})", tool=True)


def no_privilege(reason: str) -> Unmet:
    return Unmet(reason, tool=False)


def requires(unmet: Unmet | None) -> pytest.MarkDecorator:
    """A mark (for tests or ``pytestmark``): the test runs only when ``unmet`` is None.
    Else conftest calls :func:`apply_requires` before the test's fixtures are set up."""
    return pytest.mark.requires(unmet)


def apply_requires(item: pytest.Item) -> None:
    """The one place that decides about an unmet requirement: under CI=true a missing tool
    fails the test; anything else unmet skips it (with the reason; ``pytest -rs``)."""
    for mark in item.iter_markers("requires"):
        unmet: Unmet | None = mark.args[0]
        if unmet is None:
            continue
        if unmet.tool and IN_CI:
            pytest.fail(f"CI=true, and a tool is missing: {unmet.reason}", pytrace=False)
        item.add_marker(pytest.mark.skip(reason=unmet.reason))


def etcd_tool(tool: EtcdTool) -> tuple[Path | None, Unmet | None]:
    """``etcd``/``etcdctl`` as the product finds it, or None and why."""
    try:
        return find_etcd_tool(tool), None
    except EtcdNotFound as exc:  # (its message names the install command)
        return None, Unmet(str(exc), tool=True)


def kernel_maps_unmet() -> Unmet | None:
    """Why kernel eBPF maps (not the tc program) cannot be used here, or None."""
    support = detect_datapath()
    return None if support else no_privilege(f"kernel eBPF maps unusable: {support.reason}")


def kernel_tests_unmet(*tools: str) -> Unmet | None:
    """Why the tests that build and attach the datapath cannot run here (no root or eBPF;
    no libbpf or clang; one of ``tools`` not on PATH), or None when they can."""
    unmet = kernel_maps_unmet()
    if unmet is not None:
        return unmet
    reason = loader.datapath_unavailable_reason(need_build=True)
    if reason is not None:
        return missing_tool(reason)
    return tools_unmet(*tools)


def tools_unmet(*tools: str) -> Unmet | None:
    """The first of ``tools`` not on PATH, as a missing tool, or None."""
    for tool in tools:
        if shutil.which(tool) is None:
            return missing_tool(f"`{tool}` not found")
    return None


# -- running agents and other services ----------------------------------------------------


class Runnable(Protocol):
    """What :func:`running` drives: the agent's run/stop/started (structurally)."""

    started: asyncio.Event

    async def run(self) -> None: ...

    def stop(self) -> None: ...


@contextlib.asynccontextmanager
async def running(
    service: Runnable, *, name: str | None = None, start_timeout: float = 10.0
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``service`` in a task for the block, started (its ``started`` set); yield the task
    (a test may cancel it, as a crash would). On the way out always stop it, cancel it if it
    does not stop in time, and await it, so a failing test leaves no task behind; after a
    block that passed, re-raise what the service raised."""
    node = getattr(getattr(service, "settings", None), "node", "")
    name = name or f"test-{type(service).__name__.lower()}:{node}"
    task = asyncio.create_task(service.run(), name=name)
    try:
        started = asyncio.ensure_future(service.started.wait())
        try:
            await asyncio.wait(
                {started, task}, timeout=start_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            started.cancel()
            await asyncio.gather(started, return_exceptions=True)
        if task.done():
            task.result()  # raises what run() raised
            raise AssertionError(f"{name}: run() returned before it started")
        assert service.started.is_set(), f"{name} did not start within {start_timeout}s"
        yield task
    finally:
        if not task.done():
            service.stop()
            await asyncio.wait({task}, timeout=20)
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if not task.cancelled() and (error := task.exception()) is not None:
        raise error


@contextlib.asynccontextmanager
async def collecting(stream: AsyncIterator[T]) -> AsyncIterator[list[T]]:
    """Collect a watch's events in the background while the block runs."""
    events: list[T] = []

    async def pump() -> None:
        async for event in stream:
            events.append(event)

    task = asyncio.create_task(pump(), name="collect-watch")
    try:
        yield events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def synced(events: list[StoreEvent[Any]]) -> bool:
    """The watch delivered its SYNCED event."""
    return any(e.kind is EventKind.SYNCED for e in events)
