"""A blocking client for the agent's local API (HTTP/1.1 + JSON on a unix socket).

The plugin is a short-lived process, so a plain socket is enough; it mirrors
``controlplane.agent.api.request`` without importing the agent (the ``cni`` and ``agent``
packages are independent siblings in the layers contract).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

__all__ = ["AgentUnavailable", "request"]

_MAX_RESPONSE = 16 * 1024 * 1024


class AgentUnavailable(OSError):
    """No agent answers on the socket (not running, wrong path, timed out)."""


def request(
    socket_path: Path | str, method: str, target: str, body: Any = None, *, timeout: float = 30.0
) -> tuple[int, Any]:
    """(status, decoded JSON body) of one request; :class:`AgentUnavailable` when no agent
    answers."""
    payload = b"" if body is None else json.dumps(body).encode()
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    chunks: list[bytes] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(socket_path))
            sock.sendall(head + payload)
            size = 0
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > _MAX_RESPONSE:
                    raise AgentUnavailable(f"agent response larger than {_MAX_RESPONSE} bytes")
    except TimeoutError:
        raise AgentUnavailable(f"agent at {socket_path} did not answer in {timeout}s") from None
    except OSError as e:
        if isinstance(e, AgentUnavailable):
            raise
        raise AgentUnavailable(f"agent at {socket_path}: {e.strerror or e}") from None
    raw = b"".join(chunks)
    status_line, _, data = raw.partition(b"\r\n\r\n")
    try:
        status = int(status_line.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise AgentUnavailable(f"agent at {socket_path} sent no HTTP response") from None
    try:
        return status, json.loads(data) if data.strip() else None
    except ValueError:
        return status, data.decode(errors="replace")
