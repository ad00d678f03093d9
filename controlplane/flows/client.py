"""A client of the Observer API (``cpctl observe``, tests): GetFlows and ServerStatus over
a unix socket (``unix:/path``) or TCP (``host:port``)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import grpc
import grpc.aio

from controlplane.flows.proto import observer_pb2 as obs

__all__ = ["DEFAULT_OBSERVER_SOCKET", "ObserverClient", "target_of"]

DEFAULT_OBSERVER_SOCKET: Final = Path("/var/run/cp/observer.sock")
_GET_FLOWS: Final = "/observer.Observer/GetFlows"
_SERVER_STATUS: Final = "/observer.Observer/ServerStatus"
_GET_NODES: Final = "/observer.Observer/GetNodes"


def target_of(server: str) -> str:
    """A grpc target from ``--server``: a path (unix socket), ``unix:PATH`` or HOST:PORT."""
    if server.startswith("unix:"):
        return server
    if "/" in server or server.endswith(".sock"):
        return f"unix:{os.path.abspath(server)}"
    return server


class ObserverClient:
    def __init__(
        self,
        server: str,
        options: list[tuple[str, Any]] | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target_of(server)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=options or [])
        else:
            self._channel = grpc.aio.secure_channel(self.target, credentials, options or [])
        self._get_flows = self._channel.unary_stream(
            _GET_FLOWS,
            request_serializer=obs.GetFlowsRequest.SerializeToString,
            response_deserializer=obs.GetFlowsResponse.FromString,
        )
        self._nodes = self._channel.unary_unary(
            _GET_NODES,
            request_serializer=obs.GetNodesRequest.SerializeToString,
            response_deserializer=obs.GetNodesResponse.FromString,
        )
        self._status = self._channel.unary_unary(
            _SERVER_STATUS,
            request_serializer=obs.ServerStatusRequest.SerializeToString,
            response_deserializer=obs.ServerStatusResponse.FromString,
        )

    async def __aenter__(self) -> ObserverClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def get_flows(
        self, request: obs.GetFlowsRequest, timeout: float | None = None
    ) -> AsyncIterator[obs.GetFlowsResponse]:
        """The stream (an async iterator of responses; ``grpc.aio.AioRpcError`` on failure)."""
        call: AsyncIterator[obs.GetFlowsResponse] = self._get_flows(request, timeout=timeout)
        return call

    async def server_status(self, timeout: float = 5.0) -> obs.ServerStatusResponse:
        response: obs.ServerStatusResponse = await self._status(
            obs.ServerStatusRequest(), timeout=timeout
        )
        return response

    async def get_nodes(self, timeout: float = 5.0) -> obs.GetNodesResponse:
        """The relay's nodes (an agent answers UNIMPLEMENTED)."""
        response: obs.GetNodesResponse = await self._nodes(obs.GetNodesRequest(), timeout=timeout)
        return response
