"""The daemons' HTTP endpoint: Prometheus metrics and health checks, on asyncio streams.

- ``GET /metrics``: the daemon's own registry in the Prometheus text format.
- ``GET /healthz``: liveness; 200 while the process serves, with every check in the body.
- ``GET /readyz``: readiness; 200 only when every check passes, else 503.

Each check is reported separately (for the agent: "etcd reachable" apart from "operator
heartbeat fresh"), so a probe or a human sees which part is failing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    detail: str = ""


HealthFn = Callable[[], Mapping[str, Check]]


class TelemetryServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        health: HealthFn,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.registry = registry
        self.health = health
        self.host = host
        self.requested_port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("telemetry server not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.requested_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            method, path = _request_line(request)
            status, content_type, body = self._respond(method, path)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            ValueError,
        ):
            pass  # a broken or slow client gets nothing
        finally:
            writer.close()

    def _respond(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path in ("/healthz", "/readyz"):
            checks = dict(self.health())
            ready = all(c.ok for c in checks.values())
            body = json.dumps(
                {"ready": ready, "checks": {name: asdict(c) for name, c in checks.items()}}
            ).encode()
            ok = ready or path == "/healthz"
            return ("200 OK" if ok else "503 Service Unavailable"), "application/json", body
        return "404 Not Found", "text/plain", b"not found\n"


def _request_line(request: bytes) -> tuple[str, str]:
    line = request.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3:
        raise ValueError("bad request line")
    return parts[0], parts[1]


async def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """A tiny client for our own endpoint (cpctl, tests): (status, decoded body)."""
    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(timeout):
            raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"application/json" in head:
        return status, json.loads(body)
    return status, body.decode()
