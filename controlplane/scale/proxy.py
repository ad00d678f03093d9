"""A fault-injecting TCP proxy: the network faults these kernels cannot make with netem.

One :class:`FaultProxy` listens on a loopback port and forwards every connection to one
upstream (an etcd member). The harness puts proxies between the agents and etcd; what they
do to the bytes is their :class:`Mode` and their added latency, changed at any time:

- ``PASS``: bytes flow (after the added latency, if any);
- ``BLACKHOLE``: a partition that drops nothing and answers nothing: bytes of existing
  connections are held (not read any more, so the sender's buffers fill), new connections
  are accepted and hang; on the heal both carry on where they stopped (as TCP does after
  a partition the peers' timers outlived);
- ``RESET``: a partition that refuses: existing connections are reset (RST on both
  sides), new ones are accepted and reset at once.

:meth:`FaultProxy.sever` resets the existing connections once and leaves the mode as it
is (a blip: clients reconnect at once). Latency is per direction and per chunk: each chunk
read is written ``latency`` seconds after it was read, in order, so the delay does not
limit throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import time
from dataclasses import dataclass, field

CHUNK = 64 * 1024


class Mode(enum.Enum):
    PASS = "pass"
    BLACKHOLE = "blackhole"
    RESET = "reset"


@dataclass
class ProxyStats:
    accepted: int = 0
    reset: int = 0
    """Connections reset (by a RESET mode or a sever)."""
    bytes_up: int = 0
    """Client to upstream."""
    bytes_down: int = 0


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (linger 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    generation: int = 0
    """The proxy's reset generation when it was accepted: a later reset ends it."""

    def reset(self) -> None:
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)


@dataclass(eq=False)
class FaultProxy:
    upstream_host: str
    upstream_port: int
    host: str = "127.0.0.1"
    name: str = ""
    latency_up: float = 0.0
    """Seconds added to every chunk from the client to the upstream."""
    latency_down: float = 0.0
    stats: ProxyStats = field(default_factory=ProxyStats)
    _mode: Mode = Mode.PASS
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _server: asyncio.Server | None = None
    _connections: set[_Connection] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _generation: int = 0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.reset()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def set_mode(self, mode: Mode) -> None:
        async with self._changed:
            self._mode = mode
            if mode is Mode.RESET:
                self._reset_all()
            self._changed.notify_all()

    def set_latency(self, up: float, down: float) -> None:
        """Applies to chunks read from now on."""
        self.latency_up, self.latency_down = up, down

    async def sever(self) -> None:
        """Reset every existing connection once; the mode stays as it is."""
        async with self._changed:
            self._reset_all()
            self._changed.notify_all()

    def _reset_all(self) -> None:
        self._generation += 1
        for conn in list(self._connections):
            self.stats.reset += 1
            conn.reset()
        self._connections.clear()

    async def _gate(self, conn: _Connection) -> bool:
        """Wait while the proxy blackholes; False once the connection is to end (reset)."""
        if self._mode is Mode.PASS and conn.generation == self._generation:
            return True
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._mode is not Mode.BLACKHOLE or conn.generation != self._generation
            )
            return self._mode is Mode.PASS and conn.generation == self._generation

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.stats.accepted += 1
        conn = _Connection(writer, generation=self._generation)
        self._connections.add(conn)
        try:
            if not await self._gate(conn):
                self.stats.reset += 1
                conn.reset()
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                conn.reset()  # the member is down: the client sees a reset
                return
            conn.upstream = up_writer
            if conn not in self._connections:  # reset while connecting
                conn.reset()
                return
            await asyncio.gather(
                self._pipe(conn, reader, up_writer, up=True),
                self._pipe(conn, up_reader, writer, up=False),
                return_exceptions=True,  # a reset side ends its pipe; the other sees EOF
            )
        finally:
            self._connections.discard(conn)
            for side in (conn.client, conn.upstream):
                if side is not None and not side.transport.is_closing():
                    side.close()

    async def _pipe(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        up: bool,
    ) -> None:
        """One direction: read, hold while blackholed, delay, write; in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not await self._gate(conn):
                    conn.reset()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    data = b""
                if data and not await self._gate(conn):
                    conn.reset()
                    return
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                latency = self.latency_up if up else self.latency_down
                queue.put_nowait((time.monotonic() + latency, data))
                if not data:
                    break
            await sender
        finally:
            if not sender.done():
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await sender
