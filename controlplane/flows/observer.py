"""The Observer API over gRPC: Hubble's ``observer.Observer`` ``GetFlows`` and
``ServerStatus`` on a :class:`~controlplane.flows.server.FlowServer`.

The service is registered with grpc's generic handlers and the generated message classes
(no generated service stubs), so the method paths are Hubble's
(``/observer.Observer/GetFlows``) and a Hubble client can call them.

``GetFlows``: ``number`` the last (or with ``first`` the first) N matching flows, 0 = all
kept; ``follow`` then streams new ones (``first`` with ``follow`` is refused); ``since`` /
``until`` bound the flows' times (``until`` ends a followed stream once a later flow
arrives); ``whitelist`` / ``blacklist`` as in :mod:`.filters`. Lost-event records pass
every filter. A reader the ring lapped gets a ``HUBBLE_RING_BUFFER`` lost event with the
count and goes on from the oldest entry kept: a slow reader never holds the server up.
Invalid requests end with ``INVALID_ARGUMENT`` and a one-line message.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import grpc
import grpc.aio

from controlplane.flows.filters import FilterError, compile_filters
from controlplane.flows.proto import flow_pb2 as pb
from controlplane.flows.proto import observer_pb2 as obs
from controlplane.flows.ring import Lapped
from controlplane.flows.server import FlowServer

__all__ = ["SERVICE", "VERSION", "ObserverServer", "check_request"]

SERVICE: Final = "observer.Observer"
VERSION: Final = "controlplane-0.1.0"


def _ns(ts: Any) -> int:
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)


def check_request(request: obs.GetFlowsRequest) -> None:
    """Raise :class:`FilterError` for what a request cannot mean (filters included)."""
    if request.first and request.follow:
        raise FilterError("first and follow cannot be combined")
    both = request.HasField("since") and request.HasField("until")
    if both and _ns(request.since) > _ns(request.until):
        raise FilterError("since is after until")
    for name in ("since", "until"):
        if request.HasField(name) and not 0 <= getattr(request, name).nanos < 1_000_000_000:
            raise FilterError(f"{name}: nanos out of range")


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _prepare_socket(socket: Path) -> str:
    socket.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        socket.unlink()
    return os.fspath(socket.absolute())


class ObserverServer:
    """Serves one :class:`FlowServer` on a unix socket and/or a TCP address."""

    def __init__(self, flows: FlowServer) -> None:
        self.flows = flows
        self._server: grpc.aio.Server | None = None
        self.socket: Path | None = None
        self.port: int | None = None

    async def start(
        self,
        socket: Path | None = None,
        listen: str | None = None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        """Listen on ``socket`` (a unix socket path, replaced if present) and/or ``listen``
        (HOST:PORT; port 0 picks one, see :attr:`port`; TLS with ``credentials``)."""
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetFlows": grpc.unary_stream_rpc_method_handler(
                    self.get_flows,
                    request_deserializer=obs.GetFlowsRequest.FromString,
                    response_serializer=obs.GetFlowsResponse.SerializeToString,
                ),
                "ServerStatus": grpc.unary_unary_rpc_method_handler(
                    self.server_status,
                    request_deserializer=obs.ServerStatusRequest.FromString,
                    response_serializer=obs.ServerStatusResponse.SerializeToString,
                ),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        if socket is not None:
            server.add_insecure_port(f"unix:{_prepare_socket(socket)}")
            self.socket = socket
        if listen is not None:
            if credentials is not None:
                self.port = server.add_secure_port(listen, credentials)
            else:
                self.port = server.add_insecure_port(listen)
        await server.start()
        self._server = server

    async def close(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None
        if self.socket is not None:
            _unlink(self.socket)

    async def server_status(
        self, request: obs.ServerStatusRequest, context: grpc.aio.ServicerContext
    ) -> obs.ServerStatusResponse:
        s = self.flows.status()
        response = obs.ServerStatusResponse(
            num_flows=s.num_flows,
            max_flows=s.max_flows,
            seen_flows=s.seen_flows,
            uptime_ns=s.uptime_ns,
            version=VERSION,
            flows_rate=s.flows_rate,
            lost_ring_buffer=s.lost_ring_buffer,
            lost_rate_limit=s.lost_rate_limit,
        )
        response.num_connected_nodes.value = 1
        response.num_unavailable_nodes.value = 0
        return response

    async def get_flows(
        self, request: obs.GetFlowsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[obs.GetFlowsResponse]:
        try:
            check_request(request)
            predicate = compile_filters(request.whitelist, request.blacklist)
        except FilterError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        self.flows.readers += 1
        try:
            async for response in self._flows(request, predicate):
                yield response
        finally:
            self.flows.readers -= 1

    async def _flows(
        self, request: obs.GetFlowsRequest, predicate: Callable[[pb.Flow], bool]
    ) -> AsyncIterator[obs.GetFlowsResponse]:
        since = _ns(request.since) if request.HasField("since") else None  # (0: not set)
        until = _ns(request.until) if request.HasField("until") else None
        number = request.number
        ring = self.flows.ring

        def wanted(entry: obs.GetFlowsResponse) -> bool:
            if not entry.HasField("flow"):
                return False
            t = _ns(entry.flow.time)
            if since is not None and t < since:
                return False
            if until is not None and t > until:
                return False
            return predicate(entry.flow)

        # where to start: the last N (walking back), the first N, or everything kept
        if request.first or since is not None or (number == 0 and not request.follow):
            seq = ring.oldest_seq
        elif number == 0:
            seq = ring.next_seq
        else:
            seq, found = ring.next_seq, 0
            for at, entry in ring.newest_first():
                if entry.HasField("flow") and wanted(entry):
                    seq, found = at, found + 1
                    if found >= number:
                        break
                elif not entry.HasField("flow"):
                    seq = at
        end = ring.next_seq  # without follow: what was kept when the request came
        sent = 0
        while True:
            if seq >= ring.next_seq or (not request.follow and seq >= end):
                if not request.follow:
                    return
                await ring.wait_beyond(seq)
            try:
                entry = ring.get(seq)
            except Lapped as lap:
                self.flows.metrics.lost_events("reader_lapped", lap.missed)
                lost = pb.LostEvent(source=pb.HUBBLE_RING_BUFFER, num_events_lost=lap.missed)
                yield obs.GetFlowsResponse(lost_events=lost, node_name=self.flows.node)
                seq = lap.resume
                continue
            seq += 1
            if not entry.HasField("flow"):
                yield entry
                continue
            if until is not None and _ns(entry.flow.time) > until:
                if request.follow:
                    return
                continue
            if not wanted(entry):
                continue
            yield entry
            sent += 1
            if number and sent >= number and (request.first or (since and not request.follow)):
                return  # (the last N: their start bounds them; a follow goes on)
