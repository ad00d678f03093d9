from __future__ import annotations

import asyncio
import secrets
import time
import warnings
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, settings
from pki import TestPKI, make_test_pki

from controlplane.datapath.bpf_syscall import BPFFS_ROOT
from controlplane.kvstore.embedded import EmbeddedEtcd, ServerTLS
from tests.helpers import apply_requires, etcd_tool

_TASK_GRACE_S = 1.0
_FAILED = pytest.StashKey[bool]()

# Hypothesis's timing checks fail on a loaded machine (the suite shares two cores), not on
# a wrong property: no per-example deadline, no "input generation is slow" health check.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(unmet): skip (or under CI=true fail) unless unmet is None"
    )


def pytest_report_header() -> list[str]:
    lines = []
    for tool in ("etcd", "etcdctl"):
        path, unmet = etcd_tool(tool)
        lines.append(f"{tool}: {path if unmet is None else unmet.reason}")
    return lines


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    apply_requires(item)  # (before the skipping plugin's hook, which reads the skip mark)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # an expected failure (xfail) failed too: its leftovers are a warning, not a 2nd error
    failed = report.failed or hasattr(report, "wasxfail")
    if failed and report.when in ("setup", "call"):
        item.stash[_FAILED] = True
    return report


def _is_grpc_internal(task: asyncio.Task[object]) -> bool:
    # grpc.aio finishes some call bookkeeping (e.g. _AioCall._handle_status_once_received)
    # in its own tasks shortly after a channel closes; they are not ours to await.
    code = getattr(task.get_coro(), "cr_code", None)
    filename: str = getattr(code, "co_filename", "")
    return "grpc" in Path(filename).parts


def _describe(task: asyncio.Task[object]) -> str:
    coro = task.get_coro()
    return f"{task.get_name()} ({getattr(coro, '__qualname__', coro)!r})"


@pytest_asyncio.fixture(autouse=True)
async def _no_leaked_tasks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running after it (and its fixtures) finished.

    The leftovers are cancelled either way; after a test that already failed they are only
    a warning (a second error would hide which failure came first)."""
    before = set(asyncio.all_tasks())
    yield
    current = asyncio.current_task()

    def leaked() -> list[asyncio.Task[object]]:
        return [
            t
            for t in asyncio.all_tasks()
            if t is not current and t not in before and not t.done() and not _is_grpc_internal(t)
        ]

    deadline = time.monotonic() + _TASK_GRACE_S
    tasks = leaked()
    while tasks and (remaining := deadline - time.monotonic()) > 0:
        await asyncio.wait(tasks, timeout=remaining)
        tasks = leaked()
    if tasks:
        names = ", ".join(_describe(t) for t in tasks)
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=_TASK_GRACE_S)
        message = f"test leaked {len(tasks)} asyncio task(s): {names}"
        if request.node.stash.get(_FAILED, False):
            warnings.warn(f"{message} (cancelled; the test had failed)", stacklevel=1)
        else:
            pytest.fail(message)


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    """A CA, a loopback server certificate and a client certificate (CN=root)."""
    return make_test_pki(tmp_path / "pki")


@pytest_asyncio.fixture
async def etcd1() -> AsyncIterator[EmbeddedEtcd]:
    async with EmbeddedEtcd(1) as etcd:
        yield etcd


@pytest_asyncio.fixture
async def etcd3() -> AsyncIterator[EmbeddedEtcd]:
    async with EmbeddedEtcd(3) as etcd:
        yield etcd


@pytest_asyncio.fixture
async def etcd_tls(pki: TestPKI) -> AsyncIterator[EmbeddedEtcd]:
    """One member serving TLS only and requiring client certificates (use `pki`'s)."""
    tls = ServerTLS(pki.ca_file, pki.server_cert, pki.server_key)
    async with EmbeddedEtcd(1, tls=tls) as etcd:
        yield etcd


@pytest.fixture
def bpf_pin_dir() -> Iterator[Path]:
    """A fresh path on the bpffs (not created); pins under it are removed afterwards."""
    path = Path(BPFFS_ROOT, f"cp-test-{secrets.token_hex(4)}")
    try:
        yield path
    finally:
        if path.exists():
            for child in path.iterdir():
                child.unlink()
            path.rmdir()


@pytest_asyncio.fixture
async def second_etcd() -> AsyncIterator[EmbeddedEtcd]:
    """A second cluster (one member, named "b") for sharding tests."""
    async with EmbeddedEtcd(1, name="b") as etcd:
        yield etcd
