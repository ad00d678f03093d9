"""The agent's local API: HTTP/1.1 + JSON on a unix socket (one request per connection).

Routes:

- ``POST /v1/endpoints`` ``{"namespace", "name", "labels": ["k8s:app=web", ...]}``:
  lease an IP, acquire the identity, publish the endpoint. 201 with the endpoint; 200 when
  it exists already with the same labels; 409 when it exists with other labels.
- ``DELETE /v1/endpoints/<namespace>/<name>``: withdraw it, release IP and identity
  (200; 404 when unknown).
- ``GET /v1/endpoints``, ``GET /v1/endpoints/<namespace>/<name>``
- ``GET /v1/status``: node, CIDR, kvstore per shard, heartbeat, restarts, maps.
- ``GET /v1/ipcache``: the ipcache map's entries.
- ``GET /v1/policy/<namespace>/<name>``: an endpoint's policy (enforced flag, allowed set,
  what its policy map holds).
- ``POST /v1/cni`` ``{"env": {"CNI_COMMAND": ..., ...}, "stdin": "<netconf>"}``: run the
  CNI plugin with that (the node's ``cp-cni`` launcher calls it; see
  :mod:`controlplane.agent.cni_runner`). 200 with the plugin's stdout as the body and its
  exit status in the ``Cni-Exit-Code`` header.

A bad request gets 400 with ``{"error": "..."}``; the kvstore being unavailable (restart
in progress, not registered yet) gets 503. Nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from controlplane.agent.cni_runner import CNI_ENV, CNIRun

log = logging.getLogger(__name__)

MAX_HEADER = 64 * 1024
MAX_BODY = 1024 * 1024

_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class APIError(Exception):
    """A request that fails with ``status`` and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class EndpointService(Protocol):
    """What the API drives (the agent)."""

    async def create_endpoint(
        self, namespace: str, name: str, labels: Sequence[str]
    ) -> tuple[dict[str, Any], bool]:
        """The endpoint as JSON and whether it was created (False: it existed)."""
        ...

    async def delete_endpoint(self, namespace: str, name: str) -> bool: ...

    def list_endpoints(self) -> list[dict[str, Any]]: ...

    def status(self) -> dict[str, Any]: ...

    def ipcache_entries(self) -> list[dict[str, object]]: ...

    def endpoint_policy(self, namespace: str, name: str) -> dict[str, Any]:
        """Raises APIError(404) for an unknown endpoint."""
        ...


class CNIHandler(Protocol):
    """Runs the CNI plugin (:class:`controlplane.agent.cni_runner.CNIRunner`)."""

    @property
    def timeout(self) -> float: ...

    async def run(self, env: Mapping[str, str], stdin: str) -> CNIRun: ...


class Counter(Protocol):
    def __call__(self, route: str, code: int) -> None: ...


class LocalAPI:
    """Serves :class:`EndpointService` on a unix socket."""

    def __init__(
        self,
        service: EndpointService,
        path: Path,
        *,
        request_timeout: float = 30.0,
        count: Counter | None = None,
        cni: CNIHandler | None = None,
    ) -> None:
        self.service = service
        self.path = path
        self.request_timeout = request_timeout
        self.cni = cni
        self._count = count
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()  # left by a previous process (we are the only agent)
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_HEADER
        )
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        route = "invalid"
        try:
            try:
                async with asyncio.timeout(10):
                    method, target, body = await _read_request(reader)
                route = f"{method} {_route_name(target)}"
                timeout = self.request_timeout
                if route == "POST /v1/cni" and self.cni is not None:
                    timeout = max(timeout, self.cni.timeout + 5)  # it answers in time itself
                async with asyncio.timeout(timeout):
                    status, payload = await self._dispatch(method, target, body)
            except APIError as exc:
                status, payload = exc.status, {"error": str(exc)}
            except TimeoutError:
                status, payload = 503, {"error": "timed out; the kvstore may be unavailable"}
            except (ConnectionError, asyncio.IncompleteReadError):
                raise  # the client went away (closed before sending a request): no error
            except Exception as exc:  # never let a request take the agent down
                log.exception("local API %s failed", route)
                status, payload = 500, {"error": f"internal error: {exc}"}
            if self._count is not None:
                self._count(route, status)
            extra = ""
            if isinstance(payload, CNIRun):
                body_out, extra = payload.stdout, f"Cni-Exit-Code: {payload.exit_code}\r\n"
            else:
                body_out = json.dumps(payload, default=str).encode() + b"\n"
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body_out)}\r\n"
                f"{extra}Connection: close\r\n\r\n".encode()
                + body_out
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            writer.close()

    async def _dispatch(self, method: str, target: str, body: bytes) -> tuple[int, Any]:
        path = target.split("?", 1)[0].rstrip("/")
        parts = [p for p in path.split("/") if p]
        if len(parts) < 2 or parts[0] != "v1":
            raise APIError(404, f"no route {path or '/'}")
        resource, rest = parts[1], parts[2:]
        if resource == "status" and not rest:
            _want(method, "GET")
            return 200, self.service.status()
        if resource == "cni" and not rest:
            _want(method, "POST")
            if self.cni is None:
                raise APIError(404, "this agent runs no CNI plugin")
            env, stdin = _cni_request(body)
            return 200, await self.cni.run(env, stdin)
        if resource == "ipcache" and not rest:
            _want(method, "GET")
            return 200, self.service.ipcache_entries()
        if resource == "policy" and len(rest) == 2:
            _want(method, "GET")
            return 200, self.service.endpoint_policy(rest[0], rest[1])
        if resource == "endpoints" and not rest:
            if method == "GET":
                return 200, self.service.list_endpoints()
            _want(method, "POST")
            request = _json_object(body)
            namespace = _string(request, "namespace")
            name = _string(request, "name")
            labels = request.get("labels", [])
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise APIError(400, "labels: want a list of strings like 'k8s:app=web'")
            endpoint, created = await self.service.create_endpoint(namespace, name, labels)
            return (201 if created else 200), endpoint
        if resource == "endpoints" and len(rest) == 2:
            namespace, name = rest
            if method == "GET":
                for endpoint in self.service.list_endpoints():
                    if endpoint["namespace"] == namespace and endpoint["name"] == name:
                        return 200, endpoint
                raise APIError(404, f"no endpoint {namespace}/{name}")
            _want(method, "DELETE")
            if not await self.service.delete_endpoint(namespace, name):
                raise APIError(404, f"no endpoint {namespace}/{name}")
            return 200, {"deleted": f"{namespace}/{name}"}
        raise APIError(404, f"no route {path}")


def _want(method: str, allowed: str) -> None:
    if method != allowed:
        raise APIError(405, f"method {method} not allowed here (want {allowed})")


def _route_name(target: str) -> str:
    parts = [p for p in target.split("?", 1)[0].split("/") if p]
    if len(parts) > 2 and parts[1] == "endpoints":
        return "/v1/endpoints/{namespace}/{name}"
    return "/" + "/".join(parts[:2])


def _cni_request(body: bytes) -> tuple[dict[str, str], str]:
    request = _json_object(body)
    env, stdin = request.get("env"), request.get("stdin")
    if not isinstance(env, dict) or not all(
        k in CNI_ENV and isinstance(v, str) for k, v in env.items()
    ):
        raise APIError(400, f"env: want an object of strings, keys among {', '.join(CNI_ENV)}")
    if not isinstance(stdin, str):
        raise APIError(400, "stdin: want a string (the network configuration)")
    return env, stdin


def _json_object(body: bytes) -> Mapping[str, Any]:
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "body must be a JSON object")
    return data


def _string(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{key}: want a non-empty string")
    return value


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise APIError(413, "request head too large") from None
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise
        raise APIError(400, "incomplete request") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise APIError(400, "bad request line")
    method, target = parts[0].upper(), parts[1]
    length = 0
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "content-length":
            try:
                length = int(value.strip())
            except ValueError:
                raise APIError(400, "bad Content-Length") from None
            if length < 0:
                raise APIError(400, "bad Content-Length")
    if length > MAX_BODY:
        raise APIError(413, f"body larger than {MAX_BODY} bytes")
    try:
        body = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError:
        raise APIError(400, "body shorter than Content-Length") from None
    return method, target, body


async def request(
    socket_path: Path | str,
    method: str,
    target: str,
    body: Any = None,
    *,
    timeout: float = 30.0,
) -> tuple[int, Any]:
    """A client for the local API (cpctl, tests): (status, decoded JSON body).

    Raises ``OSError`` (e.g. ``FileNotFoundError``, ``ConnectionRefusedError``) when no
    agent listens, ``TimeoutError`` when it does not answer in time.
    """

    async def call() -> tuple[int, Any]:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            payload = b"" if body is None else json.dumps(body).encode()
            writer.write(
                f"{method} {target} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        head, _, data = raw.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise ConnectionError("the agent sent no HTTP response") from None
        try:
            return status, json.loads(data) if data.strip() else None
        except ValueError:
            return status, data.decode(errors="replace")

    # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that
    # arrives as the call completes, so a loop of requests could not be cancelled.
    async with asyncio.timeout(timeout):
        return await call()
