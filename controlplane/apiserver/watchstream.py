"""A client watch: newline-delimited JSON events over one chunked HTTP response.

Without a resourceVersion (or with "0", or with ``sendInitialEvents``) the current state
comes first as ADDED events, read from etcd at one revision, and changes follow from that
revision; with one, changes after it. Changes come from the resource's watch cache, so
each is sent once, in revision order, with nothing skipped between the initial state and
the first change. A revision etcd has compacted, or older than the cache, gets one ERROR
event (Status 410 Expired) and the stream ends. Label and field selectors apply to the
object before and after each change, so an object that stops matching is sent as DELETED.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from controlplane.apiserver.errors import (
    ApiError,
    bad_request,
    status_body,
    too_large_resource_version,
    too_old,
)
from controlplane.apiserver.rest import Rest, Target, as_version
from controlplane.apiserver.selectors import Selector
from controlplane.apiserver.storage import Obj, to_json
from controlplane.apiserver.watchcache import Change, Subscription, TooOld, WatchCache

INITIAL_EVENTS_END = "k8s.io/initial-events-end"
_TICK_S = 1.0


@dataclass(frozen=True)
class WatchParams:
    resource_version: str = ""
    bookmarks: bool = False
    timeout: float = 1800.0
    send_initial: bool = False
    bookmark_interval: float = 60.0


Render = Callable[[Obj], Any]


def _line(kind: str, obj: Any) -> bytes:
    return to_json({"type": kind, "object": obj}) + b"\n"


def _visible(change: Change, selector: Selector) -> tuple[str, Obj] | None:
    """What a client with ``selector`` sees of ``change``."""
    if selector.everything:
        return change.type, change.obj
    if change.type == "DELETED":
        return ("DELETED", change.obj) if selector.matches(change.obj) else None
    now = selector.matches(change.obj)
    before = change.prev is not None and selector.matches(change.prev)
    if now and before:
        return change.type, change.obj
    if now:
        return "ADDED", change.obj
    if before:
        return "DELETED", change.obj
    return None


class WatchStream:
    """Serves one watch request; see the module docstring."""

    def __init__(
        self,
        rest: Rest,
        cache: WatchCache,
        target: Target,
        selector: Selector,
        params: WatchParams,
        render: Render | None,
    ) -> None:
        self.rest = rest
        self.cache = cache
        self.target = target
        self.selector = selector
        self.params = params
        self.render = render
        self._sent_revision = 0

    async def _start(self) -> tuple[list[Obj], int, ApiError | None]:
        """Initial objects, the revision changes start after, and an error to send."""
        rv = self.params.resource_version
        if self.params.send_initial or rv in ("", "0"):
            items, revision, _ = await self.rest.list_objects(self.target, self.selector)
            return items, revision, None
        try:
            after = int(rv)
        except ValueError:
            raise bad_request(f'invalid resource version "{rv}"') from None
        current = await self.cache.backend.current_revision()
        if after > current:
            raise too_large_resource_version(after, current)
        if after < self.cache.floor:
            return [], after, too_old(after, self.cache.floor)
        if after < current and not await self.rest.storage.revision_kept(after + 1):
            return [], after, too_old(after, after + 1)
        return [], after, None

    async def serve(self, request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
        initial, after, error = await self._start()
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = "application/json"
        response.enable_chunked_encoding()
        await response.prepare(request)
        if error is not None:
            with contextlib.suppress(ConnectionError):
                await response.write(_line("ERROR", status_body(error)))
            return response
        try:
            sub = self.cache.subscribe(
                after, self.target.resource.list_prefix(self.target.namespace)
            )
        except TooOld as exc:
            with contextlib.suppress(ConnectionError):
                await response.write(
                    _line("ERROR", status_body(too_old(exc.requested, exc.oldest)))
                )
            return response
        self._sent_revision = after
        try:
            for obj in initial:
                rendered = self.render(obj) if self.render is not None else obj
                await response.write(_line("ADDED", rendered))
            if self.params.send_initial:
                await self._bookmark(response, end_of_initial=True)
            await self._follow(request, response, sub, after)
        except ConnectionError:
            pass
        finally:
            self.cache.unsubscribe(sub)
        return response

    async def _follow(
        self, request: web.Request, response: web.StreamResponse, sub: Subscription, after: int
    ) -> None:
        deadline = time.monotonic() + self.params.timeout
        next_bookmark = time.monotonic() + self.params.bookmark_interval
        while (left := deadline - time.monotonic()) > 0:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            wait = min(left, _TICK_S, max(0.0, next_bookmark - time.monotonic()) or _TICK_S)
            try:
                change = await asyncio.wait_for(sub.queue.get(), wait)
            except TimeoutError:
                if self.params.bookmarks and time.monotonic() >= next_bookmark:
                    await self._bookmark(response)
                    next_bookmark = time.monotonic() + self.params.bookmark_interval
                continue
            if change is None:
                return  # the cache closed us: the client re-lists
            if change.revision <= after:
                continue
            seen = _visible(change, self.selector)
            self._sent_revision = change.revision
            if seen is None:
                continue
            kind, obj = seen
            await response.write(self._encode(change, kind, obj))

    def _encode(self, change: Change, kind: str, obj: Obj) -> bytes:
        resource = self.target.resource
        if self.render is not None:
            return _line(kind, self.render(as_version(obj, resource)))
        key = (kind, resource.api_version)
        line = change.lines.get(key)
        if line is None:
            line = change.lines[key] = _line(kind, as_version(obj, resource))
        return line

    async def _bookmark(
        self, response: web.StreamResponse, *, end_of_initial: bool = False
    ) -> None:
        revision = max(self._sent_revision, self.cache.revision)
        metadata: dict[str, Any] = {"resourceVersion": str(revision), "creationTimestamp": None}
        if end_of_initial:
            metadata["annotations"] = {INITIAL_EVENTS_END: "true"}
        resource = self.target.resource
        obj = {"kind": resource.kind, "apiVersion": resource.api_version, "metadata": metadata}
        await response.write(_line("BOOKMARK", obj))
