"""``POST /v1/cni``: the agent runs the CNI plugin for the node's ``cp-cni`` launcher.

The launcher on the host (``cni/cp-cni-shim.c``) forwards what the container runtime gave
it, the ``CNI_*`` environment and the network configuration; this runs
``python -m controlplane.cni.main`` with exactly that (on top of the agent's own
environment, whose ``CNI_*`` variables are dropped) and returns its exit status and stdout.
The agent holds what the plugin needs (the package, the datapath object, the host's
network namespace and ``/var/run/netns``, bpffs), the host nothing.

The plugin calls back into the agent's local API (``POST /v1/endpoints``...) while it
runs: the API serves that concurrently, since a run only awaits its subprocess. At most
``concurrency`` runs at a time; a run (waiting for a slot included) is bounded by
``timeout``: then the plugin is killed and the answer is CNI error 11 (try again later),
as is a failure to start it. Stderr of a failed run is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

log = logging.getLogger(__name__)

__all__ = ["CNI_ENV", "CNIRun", "CNIRunner"]

CNI_ENV: Final = (
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
)
COMMANDS: Final = ("ADD", "DEL", "CHECK", "VERSION")
_VERSIONS: Final = ("0.4.0", "1.0.0")
_E_TRY_AGAIN: Final = 11
_LOGGED_STDERR: Final = 4000


@dataclass(frozen=True, slots=True)
class CNIRun:
    """What the launcher relays: the plugin's exit status and stdout."""

    exit_code: int
    stdout: bytes


class CNICounter(Protocol):
    def __call__(self, command: str, result: str) -> None:
        """``result``: ok, error (the plugin failed), timeout, failed (did not start)."""
        ...


class CNIRunner:
    def __init__(
        self,
        *,
        netns: str | None = None,
        timeout: float = 60.0,
        concurrency: int = 4,
        count: CNICounter | None = None,
        argv: Sequence[str] = (sys.executable, "-m", "controlplane.cni.main"),
    ) -> None:
        self.argv = list(argv)
        if netns is not None:  # the node's network lives there (tests, local clusters)
            path = netns if "/" in netns else f"/run/netns/{netns}"
            self.argv = ["nsenter", f"--net={path}", *self.argv]
        self.timeout = timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._count = count

    async def run(self, env: Mapping[str, str], stdin: str) -> CNIRun:
        command = env.get("CNI_COMMAND", "")
        label = command if command in COMMANDS else "other"
        what = f"CNI {command or '-'} {env.get('CNI_CONTAINERID', '-')}"
        try:
            async with asyncio.timeout(self.timeout):
                async with self._slots:
                    code, out, err = await self._exec(env, stdin)
        except TimeoutError:
            log.warning("%s: not done in %ss (a slot wait included); stopped", what, self.timeout)
            return self._failed(label, "timeout", stdin, f"{what} ran over {self.timeout}s")
        except OSError as e:
            log.error("%s: cannot start the plugin: %s", what, e)
            return self._failed(label, "failed", stdin, f"cannot start the plugin: {e}")
        if code != 0:
            log.warning(
                "%s failed (exit %d): %s%s",
                what,
                code,
                out.decode(errors="replace").strip(),
                f"; stderr: {err.decode(errors='replace').strip()[-_LOGGED_STDERR:]}"
                if err.strip()
                else "",
            )
        if self._count is not None:
            self._count(label, "ok" if code == 0 else "error")
        return CNIRun(code, out)

    async def _exec(self, env: Mapping[str, str], stdin: str) -> tuple[int, bytes, bytes]:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        full_env.update({k: v for k, v in env.items() if k in CNI_ENV})
        proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
            cwd="/",
        )
        try:
            out, err = await proc.communicate(stdin.encode())
        finally:
            if proc.returncode is None:  # timed out or cancelled: leave no plugin behind
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        code = proc.returncode
        return (code if code is not None and code >= 0 else 1), out, err  # killed: 1

    def _failed(self, label: str, result: str, stdin: str, details: str) -> CNIRun:
        if self._count is not None:
            self._count(label, result)
        version = "1.0.0"
        with contextlib.suppress(ValueError, AttributeError):
            asked = json.loads(stdin).get("cniVersion")
            version = asked if asked in _VERSIONS else version
        error = {
            "cniVersion": version,
            "code": _E_TRY_AGAIN,
            "msg": "the cp agent could not run the CNI plugin",
            "details": details,
        }
        return CNIRun(1, (json.dumps(error) + "\n").encode())
