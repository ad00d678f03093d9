"""The harness side of the worker processes: spawn, kill, restart, read their reports.

Each worker's stdout is a stream of JSON lines (see :mod:`controlplane.scale.worker`); the
fleet keeps the latest state of every agent, the restarts seen in any of a worker's
incarnations, and answers the runner's questions (all ready? all converged to a digest?).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class FleetError(Exception):
    """A worker died or did not come up (one line)."""


@dataclass
class Restart:
    at: float
    """When the agent restarted its control plane (monotonic)."""
    reason: str
    ready_at: float | None
    """When it was ready again (after its per-node delay), None while it is not."""


@dataclass
class AgentView:
    """The latest report of one agent, plus what the harness accumulates about it."""

    node: str
    worker: int
    state: dict[str, Any] = field(default_factory=dict)
    restarts: list[Restart] = field(default_factory=list)
    """Every restart seen, over every incarnation of its worker."""
    incarnation: int = 0
    group: int = -1
    """Its proxy group (-1: it reaches etcd directly)."""

    @property
    def ready(self) -> bool:
        return bool(self.state.get("ready"))

    @property
    def healthy(self) -> bool:
        return bool(self.state.get("healthy"))


@dataclass
class WorkerProcess:
    index: int
    spec: dict[str, Any]
    log_file: Path
    process: asyncio.subprocess.Process | None = None
    reader: asyncio.Task[None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    acks: dict[int, asyncio.Event] = field(default_factory=dict)
    results: dict[int, Any] = field(default_factory=dict)
    """Command id -> the result its ack carried."""
    rss: int = 0
    """The process's resident set size (bytes), from its last report."""
    compactions: int = 0
    """Watches of this incarnation that re-listed after a compaction."""
    churn: dict[str, Any] = field(default_factory=dict)
    """This incarnation's churn counters (from its last report)."""
    churn_before: dict[str, Any] = field(default_factory=dict)
    """The sum of the previous incarnations' counters."""
    incarnation: int = 0
    exited: int | None = None


class Fleet:
    def __init__(self, specs: list[dict[str, Any]], log_dir: Path) -> None:
        self.workers = [
            WorkerProcess(i, spec, log_dir / f"worker-{i}.log") for i, spec in enumerate(specs)
        ]
        self.agents: dict[str, AgentView] = {
            node: AgentView(node, i, group=spec.get("groups", {}).get(node, -1))
            for i, spec in enumerate(specs)
            for node, _ in spec["nodes"]
        }
        self._command_id = 0
        self.on_state: Callable[[], None] = lambda: None

    # -- processes ----------------------------------------------------------------------

    async def start(self, worker: WorkerProcess) -> None:
        worker.incarnation += 1
        worker.churn_before = _add(worker.churn_before, worker.churn)
        worker.churn = {}
        worker.ready = asyncio.Event()
        worker.exited = None
        for view in self.agents.values():
            if view.worker == worker.index:
                view.incarnation = worker.incarnation
                view.state = {}
        with worker.log_file.open("ab") as log:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "controlplane.scale.worker",
                json.dumps(worker.spec),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                limit=64 * 1024 * 1024,
            )
        worker.reader = asyncio.create_task(self._read(worker), name=f"worker-{worker.index}")

    async def start_all(self) -> None:
        for worker in self.workers:
            await self.start(worker)

    async def _read(self, worker: WorkerProcess) -> None:
        process = worker.process
        assert process is not None and process.stdout is not None
        incarnation = worker.incarnation
        while line := await process.stdout.readline():
            record = json.loads(line)
            kind = record["type"]
            if kind == "state":
                worker.churn = record["churn"]
                worker.rss = int(record.get("rss", 0))
                worker.compactions = int(record.get("compactions", 0))
                for state in record["agents"]:
                    view = self.agents[state["node"]]
                    if view.incarnation != incarnation:
                        continue
                    view.state = state
                    known = {(r.at, r.reason): r for r in view.restarts}
                    for at, reason, ready_at in state["restarts"]:
                        seen = known.get((at, reason))
                        if seen is None:
                            view.restarts.append(Restart(at, reason, ready_at))
                        else:
                            seen.ready_at = ready_at
                self.on_state()
            elif kind == "ready":
                worker.ready.set()
            elif kind == "ack":
                event = worker.acks.get(record["id"])
                if "result" in record:
                    worker.results[record["id"]] = record["result"]
                if event is not None:
                    event.set()
        worker.exited = await process.wait()

    async def kill(self, worker: WorkerProcess) -> None:
        """SIGKILL: the agents die without a word, as on a node crash."""
        if worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGKILL)
            await worker.process.wait()
        if worker.reader is not None:
            await asyncio.gather(worker.reader, return_exceptions=True)
        for view in self.agents.values():
            if view.worker == worker.index:
                view.state = {}

    async def stop_all(self, timeout: float = 20.0) -> None:
        for worker in self.workers:
            process = worker.process
            if process is None or process.returncode is not None:
                continue
            with contextlib.suppress(BrokenPipeError, ConnectionResetError, AttributeError):
                assert process.stdin is not None
                process.stdin.write(b'{"op": "stop"}\n')
                await process.stdin.drain()
        await asyncio.gather(*(self._reap(worker, timeout) for worker in self.workers))

    async def _reap(self, worker: WorkerProcess, timeout: float) -> None:
        process = worker.process
        if process is None:
            return
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        if worker.reader is not None:
            await asyncio.gather(worker.reader, return_exceptions=True)

    def check_alive(self) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is not None:
                raise FleetError(
                    f"worker {worker.index} exited with status {worker.process.returncode}; "
                    f"see {worker.log_file}"
                )

    # -- commands -----------------------------------------------------------------------

    async def set_churn(self, total_rate: float, timeout: float = 60.0) -> None:
        """Set the churn rate over all workers; with 0, return once nothing is in flight."""
        await self._command({"op": "churn", "rate": total_rate / len(self.workers)}, timeout)

    async def set_digests(self, on: bool, timeout: float = 60.0) -> None:
        """Turn the ipcache digests on (returns after a report with them) or off."""
        await self._command({"op": "digest", "on": on}, timeout)

    async def identity_burst(self, per_worker: int, timeout: float = 300.0) -> list[Any]:
        """Each worker allocates ``per_worker`` fresh identities at once; their results."""
        return await self._command({"op": "identity-burst", "count": per_worker}, timeout)

    async def _command(self, command: dict[str, Any], timeout: float) -> list[Any]:
        self._command_id += 1
        command_id = self._command_id
        waits = []
        for worker in self.workers:
            process = worker.process
            if process is None or process.returncode is not None or process.stdin is None:
                continue
            event = worker.acks[self._command_id] = asyncio.Event()
            line = json.dumps({**command, "id": self._command_id})
            process.stdin.write(line.encode() + b"\n")
            await process.stdin.drain()
            waits.append(event.wait())
        await asyncio.wait_for(asyncio.gather(*waits), timeout)
        return [w.results.pop(command_id) for w in self.workers if command_id in w.results]

    # -- questions ----------------------------------------------------------------------

    def count(self, check: Callable[[AgentView], bool]) -> int:
        return sum(1 for view in self.agents.values() if check(view))

    def churn_totals(self) -> dict[str, Any]:
        total: dict[str, Any] = {}
        for worker in self.workers:
            total = _add(_add(total, worker.churn_before), worker.churn)
        return total

    def rss_total(self) -> int:
        return sum(w.rss for w in self.workers if w.process and w.process.returncode is None)

    def compactions(self) -> int:
        return sum(w.compactions for w in self.workers)

    def restarts_between(self, node: str, start: float, end: float) -> list[Restart]:
        return [r for r in self.agents[node].restarts if start <= r.at <= end]


def _add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Churn counters summed: ops, ok, failed and errors by kind."""
    total: dict[str, Any] = {k: a.get(k, 0) + b.get(k, 0) for k in ("ops", "ok", "failed")}
    errors = dict(a.get("errors", {}))
    for name, n in b.get("errors", {}).items():
        errors[name] = errors.get(name, 0) + n
    total["errors"] = errors
    return total


async def wait_for(
    check: Callable[[], tuple[int, int]],
    what: str | Callable[[], str],
    timeout: float,
    on_progress: Callable[[str], None],
    fleet: Fleet | None = None,
) -> float:
    """Poll ``check`` (done, total) until done; progress as it goes; the time it took."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if fleet is not None:
            fleet.check_alive()
        done, total = check()
        label = what() if callable(what) else what
        on_progress(f"{label}: {done}/{total}")
        if done >= total:
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise FleetError(f"{label}: only {done}/{total} after {timeout:.0f}s")
        await asyncio.sleep(0.1)
