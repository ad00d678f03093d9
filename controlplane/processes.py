"""Child daemons for `cpctl up` and the benchmarks: start, signal, stop, collect output."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def dying_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that the kernel sends it SIGTERM when the process (strictly: the
    thread) that started it dies, even of SIGKILL, so a killed ``cpctl`` leaves no orphan.
    util-linux's ``setpriv`` sets PR_SET_PDEATHSIG and execs ``argv`` (same PID); without it
    ``argv`` is returned as it is. Start such children from a thread that lives as long as
    they should (the event loop's)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return list(argv)
    return [setpriv, "--pdeathsig", "TERM", "--", *argv]


@dataclass
class Daemon:
    """One child process running ``python -m <module> <args>``, its output in a log file."""

    name: str
    module: str
    args: Sequence[str]
    log_file: Path
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)
    die_with_parent: bool = True

    async def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", self.module, *self.args]
        if self.die_with_parent:
            argv = dying_with_parent(argv)
        with self.log_file.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def signal(self, sig: signal.Signals) -> None:
        if self.running and self.process is not None:
            self.process.send_signal(sig)

    async def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.signal(signal.SIGCONT)  # a paused child cannot handle SIGTERM
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    def log_tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return ""


async def stop_all(daemons: Sequence[Daemon], timeout: float = 10.0) -> None:
    await asyncio.gather(*(d.stop(timeout) for d in daemons))
