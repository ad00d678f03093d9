"""The relay's Observer API: every node's flows in one stream, merged by time.

``GetFlows`` sends the request to every connected node and merges what comes back:

- without ``follow``: each node's answer in full, then sorted by time (the last ``number``
  of the merged flows, or the first with ``first``);
- with ``follow``: through a sort buffer bounded to ``sort_buffer`` responses, from which
  the oldest goes out when it is full or has waited ``drain_timeout`` seconds, so flows
  from nodes whose clocks and latencies differ come out in time order without holding
  the stream back; nodes that connect later join the stream.

The stream starts with ``node_status`` events (NODE_CONNECTED for the nodes taking part,
NODE_UNAVAILABLE with the reason for the others) and tells each change: a node whose
stream breaks is NODE_UNAVAILABLE (and is re-checked at once), one that comes back
NODE_CONNECTED, one whose record went away NODE_GONE. A node's lost events pass through.
``ServerStatus`` sums the connected nodes' status; ``GetNodes`` lists every node with its
state. Filters are checked here first, so a bad one is INVALID_ARGUMENT from the relay.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import grpc.aio
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.flows.filters import FilterError, compile_filters
from controlplane.flows.observer import SERVICE, VERSION, check_request
from controlplane.flows.proto import observer_pb2 as obs
from controlplane.flows.proto import relay_pb2 as rpb
from controlplane.relay.peers import Peer, PeerManager

__all__ = ["MergeSettings", "RelayObserver"]

_END: Final = object()


@dataclass(frozen=True, slots=True)
class MergeSettings:
    sort_buffer: int = 100
    """Responses the follow merge holds to order them by time."""
    drain_timeout: float = 1.0
    """The longest a response waits in the sort buffer (s)."""
    queue_size: int = 10_000
    """Responses in flight from the nodes to the merge; a full queue holds the node
    streams back (their servers' rings then lap them: counted, told as lost events)."""


def _ns(ts: Timestamp) -> int:
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)


def _now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def _status(state: int, names: list[str], message: str = "") -> obs.GetFlowsResponse:
    event = rpb.NodeStatusEvent(state_change=state, node_names=names, message=message)  # type: ignore[arg-type]
    return obs.GetFlowsResponse(node_status=event, time=_now())


def _when(response: obs.GetFlowsResponse) -> int:
    if response.HasField("flow"):
        return _ns(response.flow.time)
    return _ns(response.time) if response.HasField("time") else time.time_ns()


class RelayObserver:
    def __init__(self, peers: PeerManager, merge: MergeSettings) -> None:
        self.peers = peers
        self.merge = merge
        self.started = time.monotonic_ns()
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.streams = 0
        """GetFlows calls being served."""

    # -- serving --------------------------------------------------------------------------

    async def start(
        self,
        listen: str | None,
        socket: Path | None = None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetFlows": grpc.unary_stream_rpc_method_handler(
                    self.get_flows,
                    request_deserializer=obs.GetFlowsRequest.FromString,
                    response_serializer=obs.GetFlowsResponse.SerializeToString,
                ),
                "GetNodes": grpc.unary_unary_rpc_method_handler(
                    self.get_nodes,
                    request_deserializer=obs.GetNodesRequest.FromString,
                    response_serializer=obs.GetNodesResponse.SerializeToString,
                ),
                "ServerStatus": grpc.unary_unary_rpc_method_handler(
                    self.server_status,
                    request_deserializer=obs.ServerStatusRequest.FromString,
                    response_serializer=obs.ServerStatusResponse.SerializeToString,
                ),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        if listen is not None:
            if credentials is not None:
                self.port = server.add_secure_port(listen, credentials)
            else:
                self.port = server.add_insecure_port(listen)
        if socket is not None:
            server.add_insecure_port(f"unix:{socket}")
        await server.start()
        self._server = server

    async def close(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None

    # -- ServerStatus, GetNodes --------------------------------------------------------------

    async def _statuses(self) -> list[tuple[Peer, obs.ServerStatusResponse | None]]:
        peers = list(self.peers.peers.values())

        async def one(peer: Peer) -> tuple[Peer, obs.ServerStatusResponse | None]:
            if peer.state != rpb.NODE_CONNECTED:
                return peer, None
            try:
                status = await peer.client.server_status(timeout=self.peers.settings.timeout)
            except grpc.aio.AioRpcError as exc:
                self.peers.mark(peer, rpb.NODE_UNAVAILABLE, exc.details() or exc.code().name)
                return peer, None
            peer.status = status
            return peer, status

        return list(await asyncio.gather(*(one(p) for p in peers)))

    async def server_status(
        self, request: obs.ServerStatusRequest, context: grpc.aio.ServicerContext
    ) -> obs.ServerStatusResponse:
        return await self.status()

    async def status(self) -> obs.ServerStatusResponse:
        """The connected nodes' status, summed (ServerStatus)."""
        out = obs.ServerStatusResponse(version=VERSION)
        unavailable = []
        connected = 0
        for peer, status in await self._statuses():
            if status is None:
                unavailable.append(peer.name)
                continue
            connected += 1
            out.num_flows += status.num_flows
            out.max_flows += status.max_flows
            out.seen_flows += status.seen_flows
            out.uptime_ns = max(out.uptime_ns, status.uptime_ns)
            out.flows_rate += status.flows_rate
            out.lost_ring_buffer += status.lost_ring_buffer
            out.lost_rate_limit += status.lost_rate_limit
        out.num_connected_nodes.value = connected
        out.num_unavailable_nodes.value = len(unavailable)
        out.unavailable_nodes.extend(sorted(unavailable))
        return out

    async def get_nodes(
        self, request: obs.GetNodesRequest, context: grpc.aio.ServicerContext
    ) -> obs.GetNodesResponse:
        return await self.nodes()

    async def nodes(self) -> obs.GetNodesResponse:
        """Every node and its state (GetNodes)."""
        nodes: list[obs.Node] = []
        for peer, status in await self._statuses():
            node = obs.Node(name=peer.name, address=peer.address, state=peer.state)  # type: ignore[arg-type]
            node.tls.enabled = self.peers.settings.credentials is not None
            if status is not None:
                node.version = status.version
                node.uptime_ns = status.uptime_ns
                node.num_flows = status.num_flows
                node.max_flows = status.max_flows
                node.seen_flows = status.seen_flows
            nodes.append(node)
        nodes.sort(key=lambda n: str(n.name))
        return obs.GetNodesResponse(nodes=nodes)

    # -- GetFlows ------------------------------------------------------------------------------

    async def get_flows(
        self, request: obs.GetFlowsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[obs.GetFlowsResponse]:
        try:
            check_request(request)
            compile_filters(request.whitelist, request.blacklist)
        except FilterError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        async for response in self.flows(request):
            yield response

    async def flows(self, request: obs.GetFlowsRequest) -> AsyncIterator[obs.GetFlowsResponse]:
        """GetFlows' stream for a checked request (the UI's too)."""
        self.streams += 1
        try:
            stream = self._follow(request) if request.follow else self._collect(request)
            async for response in stream:
                yield response
        finally:
            self.streams -= 1

    def _opening(self) -> list[obs.GetFlowsResponse]:
        peers = list(self.peers.peers.values())
        out = []
        connected = sorted(p.name for p in peers if p.state == rpb.NODE_CONNECTED)
        if connected:
            out.append(_status(rpb.NODE_CONNECTED, connected))
        for peer in sorted(peers, key=lambda p: p.name):
            if peer.state != rpb.NODE_CONNECTED:
                out.append(_status(peer.state, [peer.name], peer.message))
        return out

    async def _collect(self, request: obs.GetFlowsRequest) -> AsyncIterator[obs.GetFlowsResponse]:
        for status in self._opening():
            yield status
        peers = self.peers.connected()

        async def fetch(peer: Peer) -> tuple[Peer, list[obs.GetFlowsResponse], str | None]:
            got: list[obs.GetFlowsResponse] = []
            try:
                async for r in peer.client.get_flows(request, timeout=30):
                    got.append(r)
            except grpc.aio.AioRpcError as exc:
                return peer, got, exc.details() or exc.code().name
            return peer, got, None

        merged: list[obs.GetFlowsResponse] = []
        errors: list[obs.GetFlowsResponse] = []
        for peer, got, error in await asyncio.gather(*(fetch(p) for p in peers)):
            merged.extend(got)
            if error is not None:
                self.peers.mark(peer, rpb.NODE_UNAVAILABLE, error)
                self.peers.recheck(peer)
                errors.append(_status(rpb.NODE_UNAVAILABLE, [peer.name], error))
        merged.sort(key=_when)
        if request.number:
            flows = [i for i, r in enumerate(merged) if r.HasField("flow")]
            if len(flows) > request.number:
                if request.first:
                    merged = merged[: flows[request.number - 1] + 1]
                else:
                    merged = merged[flows[-request.number] :]
        for response in itertools.chain(errors, merged):
            yield response

    async def _follow(self, request: obs.GetFlowsRequest) -> AsyncIterator[obs.GetFlowsResponse]:
        queue: asyncio.Queue[tuple[Peer, Any]] = asyncio.Queue(self.merge.queue_size)
        streams: dict[str, tuple[Peer, asyncio.Task[None]]] = {}
        told: dict[str, int] = {}
        heap: list[tuple[int, int, float, obs.GetFlowsResponse]] = []
        order = itertools.count()

        async def pump(peer: Peer) -> None:
            try:
                async for r in peer.client.get_flows(request):
                    await queue.put((peer, r))
                await queue.put((peer, _END))
            except grpc.aio.AioRpcError as exc:
                await queue.put((peer, exc))

        for status in self._opening():
            yield status
        for peer in self.peers.peers.values():
            told[peer.name] = peer.state
        getter: asyncio.Future[tuple[Peer, Any]] | None = None
        changed: asyncio.Future[None] | None = None
        try:
            while True:
                # nodes that (re)connected join; the others' changes are told
                version = self.peers.version
                for name, peer in list(self.peers.peers.items()):
                    if peer.state == rpb.NODE_CONNECTED and name not in streams:
                        task = asyncio.create_task(pump(peer), name=f"relay-flows:{name}")
                        streams[name] = (peer, task)
                    if told.get(name) != peer.state:
                        told[name] = peer.state
                        yield _status(peer.state, [name], peer.message)
                for name in list(told):
                    if name not in self.peers.peers:
                        del told[name]
                        yield _status(rpb.NODE_GONE, [name], "node record removed")
                        if name in streams:
                            streams.pop(name)[1].cancel()
                # wait for a response, a peer change, or the oldest buffered one's time
                wait = self.merge.drain_timeout
                if heap:
                    wait = max(0.0, heap[0][2] + self.merge.drain_timeout - time.monotonic())
                if getter is None:
                    getter = asyncio.ensure_future(queue.get())
                changed = asyncio.ensure_future(self.peers.changed(version))
                waiting: set[asyncio.Future[Any]] = {getter, changed}
                done, _ = await asyncio.wait(
                    waiting, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                changed.cancel()
                await asyncio.gather(changed, return_exceptions=True)
                changed = None
                if getter in done:
                    peer, item = getter.result()
                    getter = None
                    if isinstance(item, obs.GetFlowsResponse):
                        arrival = time.monotonic()
                        heapq.heappush(heap, (_when(item), next(order), arrival, item))
                    else:  # the node's stream ended or broke
                        message = "stream ended" if item is _END else item.details() or ""
                        streams.pop(peer.name, None)
                        if self.peers.peers.get(peer.name) is peer:
                            self.peers.mark(peer, rpb.NODE_UNAVAILABLE, message)
                            self.peers.recheck(peer)
                # out of the sort buffer: beyond its size, or waited long enough
                now = time.monotonic()
                while heap and (
                    len(heap) > self.merge.sort_buffer
                    or now - heap[0][2] >= self.merge.drain_timeout
                ):
                    yield heapq.heappop(heap)[3]
        finally:
            pending: list[asyncio.Future[Any]] = [t for _, t in streams.values()]
            pending += [f for f in (getter, changed) if f is not None]
            for future in pending:
                future.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
