"""An asyncio client for the few Kubernetes API verbs the CRD store needs.

Why our own, on aiohttp (already a dependency for the local API server), rather than
``kubernetes_asyncio``, kopf's internal client or the official client in a thread pool:
the store needs seven verbs on plain JSON objects (get, list with pages, watch with
bookmarks, create, update, merge patch (also of a status subresource), delete with
preconditions), and it decodes tens of thousands of objects on an agent's cold sync.
Generated model classes cost
several times the decode itself; a thread pool would put blocking calls and threads into
every agent; kopf's client is not public API. Here a response is one ``msgspec`` decode
into dicts, every call is a coroutine on the daemon's loop, and each failure is one
:mod:`controlplane.crd.errors` type.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec

from controlplane.crd.errors import ApiUnreachable, CrdError, NotFound, from_response
from controlplane.crd.kubeconfig import KubeConnection

JSON = dict[str, Any]
LIST_PAGE_SIZE = 500
WATCH_TIMEOUT = 290
"""Seconds a watch asks the server to keep the stream (kube caps it at ~5-10 min)."""

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class ApiResource:
    """One resource of one group-version, as the URL paths name it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{quote(name, safe='')}"
        return base


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One line of a watch stream: ADDED, MODIFIED, DELETED, BOOKMARK or ERROR."""

    type: str
    object: JSON


@dataclass(frozen=True, slots=True)
class ObjectList:
    items: list[JSON]
    resource_version: str


class KubeClient:
    """One connection pool to one API server; ``async with`` or :meth:`close`."""

    def __init__(
        self,
        connection: KubeConnection,
        *,
        request_timeout: float = 10.0,
        user_agent: str = "controlplane",
    ) -> None:
        self.connection = connection
        self.request_timeout = request_timeout
        self.user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _ssl(self) -> ssl.SSLContext | bool:
        conn = self.connection
        if not conn.server.startswith("https"):
            return False
        context = ssl.create_default_context(cafile=conn.ca_file)
        if conn.cert_file:
            context.load_cert_chain(conn.cert_file, conn.key_file)
        if not conn.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"User-Agent": self.user_agent, "Accept": "application/json"}
            if self.connection.token:
                headers["Authorization"] = f"Bearer {self.connection.token}"
            try:
                context = self._ssl()
            except (OSError, ssl.SSLError) as exc:
                raise CrdError(f"TLS settings of {self.connection.source}: {exc}") from None
            self._session = aiohttp.ClientSession(
                base_url=self.connection.server,
                headers=headers,
                connector=aiohttp.TCPConnector(ssl=context, limit=64),
            )
        return self._session

    async def _call(
        self,
        method: str,
        path: str,
        what: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> JSON:
        data = None if body is None else _encoder.encode(body)
        headers = {"Content-Type": content_type} if data is not None else None
        try:
            async with asyncio.timeout(self.request_timeout):
                async with self._http().request(
                    method, path, params=params, data=data, headers=headers
                ) as response:
                    raw = await response.read()
                    status = response.status
        except TimeoutError:
            raise ApiUnreachable(
                f"{what}: no answer from {self.connection.server} in {self.request_timeout:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise ApiUnreachable(f"{what}: {self.connection.server}: {exc}") from None
        try:
            decoded = _decoder.decode(raw) if raw else {}
        except msgspec.DecodeError:
            decoded = {"message": raw[:200].decode("utf-8", "replace")}
        if status >= 300:
            raise from_response(status, decoded, what)
        if not isinstance(decoded, dict):
            raise CrdError(f"{what}: the answer is not a JSON object")
        return decoded

    # -- verbs -----------------------------------------------------------------------

    async def get(self, resource: ApiResource, name: str, namespace: str | None = None) -> JSON:
        return await self._call(
            "GET", resource.path(namespace, name), f"get {resource.plural}/{name}"
        )

    async def get_or_none(
        self, resource: ApiResource, name: str, namespace: str | None = None
    ) -> JSON | None:
        try:
            return await self.get(resource, name, namespace)
        except NotFound:
            return None

    async def list_page(
        self,
        resource: ApiResource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int = LIST_PAGE_SIZE,
        continue_: str | None = None,
    ) -> tuple[ObjectList, str | None]:
        """One page; the continue token of the next, or None."""
        params = {"limit": str(limit)}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        if continue_:
            params["continue"] = continue_
        body = await self._call(
            "GET", resource.path(namespace), f"list {resource.plural}", params=params
        )
        meta = body.get("metadata") or {}
        items = body.get("items") or []
        return (
            ObjectList(list(items), str(meta.get("resourceVersion") or "")),
            meta.get("continue") or None,
        )

    async def list_pages(
        self,
        resource: ApiResource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int = LIST_PAGE_SIZE,
    ) -> AsyncIterator[ObjectList]:
        """Every page of one consistent list (all at the first page's resourceVersion)."""
        token: str | None = None
        first_version = ""
        while True:
            page, token = await self.list_page(
                resource,
                namespace=namespace,
                label_selector=label_selector,
                field_selector=field_selector,
                limit=limit,
                continue_=token,
            )
            first_version = first_version or page.resource_version
            yield ObjectList(page.items, first_version)
            if not token:
                return

    async def list(
        self,
        resource: ApiResource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> ObjectList:
        items: list[JSON] = []
        version = ""
        async for page in self.list_pages(
            resource,
            namespace=namespace,
            label_selector=label_selector,
            field_selector=field_selector,
        ):
            items.extend(page.items)
            version = page.resource_version
        return ObjectList(items, version)

    async def create(self, resource: ApiResource, body: JSON) -> JSON:
        meta = body.get("metadata") or {}
        return await self._call(
            "POST",
            resource.path(meta.get("namespace")),
            f"create {resource.plural}/{meta.get('name', '')}",
            body=body,
        )

    async def replace(self, resource: ApiResource, body: JSON) -> JSON:
        """PUT: an update guarded by the body's ``metadata.resourceVersion`` (409 if stale)."""
        meta = body["metadata"]
        return await self._call(
            "PUT",
            resource.path(meta.get("namespace"), meta["name"]),
            f"update {resource.plural}/{meta['name']}",
            body=body,
        )

    async def patch(
        self,
        resource: ApiResource,
        name: str,
        patch: JSON,
        *,
        namespace: str | None = None,
        subresource: str = "",
    ) -> JSON:
        """A JSON merge patch (a ``metadata.resourceVersion`` in it makes it conditional)."""
        path = resource.path(namespace, name) + (f"/{subresource}" if subresource else "")
        return await self._call(
            "PATCH",
            path,
            f"patch {resource.plural}/{name}",
            body=patch,
            content_type="application/merge-patch+json",
        )

    async def delete(
        self,
        resource: ApiResource,
        name: str,
        *,
        namespace: str | None = None,
        uid: str | None = None,
        resource_version: str | None = None,
    ) -> bool:
        """Delete, guarded by uid and/or resourceVersion (409 :class:`Conflict` when either
        changed); False when it did not exist."""
        body: JSON = {"kind": "DeleteOptions", "apiVersion": "v1"}
        preconditions = {}
        if uid:
            preconditions["uid"] = uid
        if resource_version:
            preconditions["resourceVersion"] = resource_version
        if preconditions:
            body["preconditions"] = preconditions
        try:
            await self._call(
                "DELETE",
                resource.path(namespace, name),
                f"delete {resource.plural}/{name}",
                body=body,
            )
        except NotFound:
            return False
        return True

    async def watch(
        self,
        resource: ApiResource,
        resource_version: str,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int = WATCH_TIMEOUT,
        idle_timeout: float | None = None,
    ) -> AsyncGenerator[WatchEvent, None]:
        """Changes after ``resource_version``, with bookmarks, until the server ends the
        stream (normal: the caller resumes from the last version it saw). ``idle_timeout``:
        give up (:class:`ApiUnreachable`) when nothing at all arrives for that long; the
        server's bookmarks keep a healthy idle stream alive."""
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        what = f"watch {resource.plural}"
        idle = idle_timeout if idle_timeout is not None else timeout_seconds + 30
        try:
            async with asyncio.timeout(self.request_timeout):
                response = await self._http().get(
                    resource.path(namespace),
                    params=params,
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=idle),
                )
        except TimeoutError:
            raise ApiUnreachable(f"{what}: no answer from {self.connection.server}") from None
        except aiohttp.ClientError as exc:
            raise ApiUnreachable(f"{what}: {self.connection.server}: {exc}") from None
        try:
            if response.status >= 300:
                raw = await response.read()
                try:
                    body = _decoder.decode(raw) if raw else {}
                except msgspec.DecodeError:
                    body = {}
                raise from_response(response.status, body, what)
            buffer = b""
            try:
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    while (end := buffer.find(b"\n")) >= 0:
                        line, buffer = buffer[:end], buffer[end + 1 :]
                        if line.strip():
                            yield _watch_event(line, what)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise ApiUnreachable(f"{what}: stream broke: {exc or type(exc).__name__}") from None
        finally:
            response.release()


def _watch_event(line: bytes, what: str) -> WatchEvent:
    try:
        decoded = _decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise CrdError(f"{what}: malformed watch line: {exc}") from None
    if not isinstance(decoded, dict) or not isinstance(decoded.get("object"), dict):
        raise CrdError(f"{what}: malformed watch event")
    return WatchEvent(str(decoded.get("type", "")), decoded["object"])
