"""The relay's web UI (issue 14): one page (``ui/index.html``, plain HTML and JavaScript,
nothing to build) with a live flow list, filters and a service map (workloads as nodes,
flows as edges coloured by verdict), and the JSON it reads, over aiohttp:

- ``GET /api/flows?last=N&namespace=&pod=&verdict=&protocol=&port=``: the last N flows of
  every node (the relay's GetFlows, merged), as Hubble's JSON (proto field names);
- ``GET /api/flows/stream?...``: the same filters, followed, as server-sent events;
- ``GET /api/status``, ``GET /api/nodes``: ServerStatus and GetNodes.

A bad filter is 400 with ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from importlib import resources
from typing import Any

from aiohttp import web
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from controlplane.flows.filters import FilterError, compile_filters
from controlplane.flows.observer import check_request
from controlplane.flows.proto import flow_pb2 as pb
from controlplane.flows.proto import observer_pb2 as obs
from controlplane.relay.observer import RelayObserver

__all__ = ["FlowUI", "request_of"]

_MAX_LAST = 10_000


def _json(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def request_of(query: Any, *, follow: bool) -> obs.GetFlowsRequest:
    """The GetFlows request of the UI's query parameters; raises FilterError."""
    common = pb.FlowFilter()
    if verdict := query.get("verdict"):
        if verdict not in pb.Verdict.keys():  # noqa: SIM118
            raise FilterError(f"verdict: {verdict!r} is not a verdict")
        common.verdict.append(pb.Verdict.Value(verdict))  # type: ignore[arg-type]
    if protocol := query.get("protocol"):
        common.protocol.append(protocol)
    filters = [common]
    pod = query.get("pod") or (f"{query['namespace']}/" if query.get("namespace") else "")
    port = query.get("port", "")
    if pod or port:  # either side: a source and a destination filter
        filters = []
        for side in ("source", "destination"):
            f = pb.FlowFilter()
            f.CopyFrom(common)
            if pod:
                getattr(f, f"{side}_pod").append(pod)
            if port:
                getattr(f, f"{side}_port").append(port)
            filters.append(f)
    request = obs.GetFlowsRequest(follow=follow, whitelist=filters)
    if not follow:
        try:
            request.number = min(int(query.get("last", "100")), _MAX_LAST)
        except ValueError:
            raise FilterError(f"last: {query.get('last')!r} is not a number") from None
    check_request(request)
    compile_filters(request.whitelist, request.blacklist)
    return request


class FlowUI:
    def __init__(self, observer: RelayObserver) -> None:
        self.observer = observer
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task[Any]] = set()
        self.port: int | None = None
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/api/flows", self.flows)
        app.router.add_get("/api/flows/stream", self.stream)
        app.router.add_get("/api/status", self.status)
        app.router.add_get("/api/nodes", self.nodes)
        self.app = app

    async def start(self, host: str, port: int) -> None:
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def close(self) -> None:
        """Stop the server; the open event streams end at once (aiohttp would wait)."""
        for task in list(self._streams):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def index(self, request: web.Request) -> web.Response:
        page = resources.files("controlplane.relay").joinpath("ui/index.html").read_text()
        return web.Response(text=page, content_type="text/html")

    async def flows(self, request: web.Request) -> web.Response:
        try:
            req = request_of(request.query, follow=False)
        except FilterError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        out = [_json(r) async for r in self.observer.flows(req)]
        return web.json_response(out)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        try:
            req = request_of(request.query, follow=True)
        except FilterError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            with contextlib.suppress(ConnectionResetError):  # the page went away
                async for r in self.observer.flows(req):
                    await response.write(f"data: {json.dumps(_json(r))}\n\n".encode())
        finally:
            self._streams.discard(task)
        return response

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(_json(await self.observer.status()))

    async def nodes(self, request: web.Request) -> web.Response:
        return web.json_response(_json(await self.observer.nodes()))
