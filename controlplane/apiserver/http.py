"""The HTTP API: one handler for every path, routed to discovery, OpenAPI or objects.

Every response is JSON (or a Table when asked for one). Paths and query parameters are
read with kube's rules (list windows, watch options, fieldValidation, dryRun); an unknown
path or resource is a 404 Status and a verb a path does not take a 405 Status, raised as
:class:`ApiError` for the middleware (middleware.py) to answer.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from controlplane.apiserver import discovery, openapi, table
from controlplane.apiserver.decoding import read_body
from controlplane.apiserver.errors import (
    ApiError,
    bad_request,
    too_large_resource_version,
    unsupported_media,
)
from controlplane.apiserver.fieldmanager import manager_from_user_agent
from controlplane.apiserver.middleware import READ_VERBS, json_response
from controlplane.apiserver.patch import PatchError, json_patch, merge_patch, strip_directives
from controlplane.apiserver.resources import Registry, Resource
from controlplane.apiserver.rest import (
    JSON_PATCH,
    MERGE,
    STRATEGIC,
    Rest,
    Result,
    Target,
    WriteOptions,
    names_version,
)
from controlplane.apiserver.routes import Route
from controlplane.apiserver.scale import apply_scale, to_scale
from controlplane.apiserver.selectors import EVENT_FIELDS, FIELDS, Selector
from controlplane.apiserver.storage import Obj, to_json
from controlplane.apiserver.watchcache import WatchCache
from controlplane.apiserver.watchstream import WatchParams, WatchStream

_FIELD_VALIDATION = ("Strict", "Warn", "Ignore")
OPENAPI_V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"


def _field_labels(resource: Resource) -> tuple[str, ...]:
    if resource.kind == "Event":
        return EVENT_FIELDS
    return (*FIELDS, *resource.selectable_fields)


def _warning(text: str) -> str:
    """One RFC 7234 warning value, as kube-apiserver writes them."""
    return '299 - "' + text.replace('"', '\\"') + '"'


def _warning_headers(warnings: list[str]) -> dict[str, str]:
    # kube sends one Warning header per message; clients accept them comma-separated in
    # one header too.
    if not warnings:
        return {}
    return {"Warning": ", ".join(_warning(w) for w in warnings)}


def _wants_table(accept: str) -> bool:
    return any("as=Table" in part and "g=meta.k8s.io" in part for part in accept.split(","))


class Api:
    """Routes a request to discovery, OpenAPI or the object verbs."""

    def __init__(
        self,
        registry: Registry,
        rest: Rest,
        caches: dict[str, WatchCache],
        bookmark_interval: float = 60.0,
    ) -> None:
        self.registry = registry
        self.rest = rest
        self.caches = caches
        self.bookmark_interval = bookmark_interval

    async def handle(self, request: web.Request, route: Route | None) -> web.StreamResponse:
        """Answer ``request``, whose path parsed to ``route`` (None: no such path)."""
        if route is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if route.kind == "objects":
            return await self._objects(request, route)
        if request.method not in READ_VERBS:
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        body = self._document(request, route)
        if body is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if isinstance(body, web.StreamResponse):
            return body
        return json_response(body)

    def _document(self, request: web.Request, route: Route) -> Any:
        registry = self.registry
        accept = request.headers.get("Accept", "")
        if route.kind == "version":
            return discovery.version()
        if route.kind == "health":
            return web.Response(text="ok")
        if route.kind in ("api", "apis"):
            media = discovery.aggregated_wanted(accept)
            if media:
                body = discovery.aggregated(registry, core=route.kind == "api", media_type=media)
                return web.Response(body=to_json(body), headers={"Content-Type": media})
            if route.kind == "api":
                return discovery.api_versions()
            return discovery.api_group_list(registry)
        if route.kind == "group":
            return discovery.api_group(registry, route.group)
        if route.kind == "resources":
            return discovery.resource_list(registry, route.group, route.version)
        if route.kind == "openapi":
            return openapi.root(registry)
        if route.kind == "openapi-v2":
            # An empty gnostic Document: old kubectl fetches it, finds nothing, and goes on.
            return web.Response(body=b"", headers={"Content-Type": OPENAPI_V2_PROTOBUF})
        if route.kind == "openapi-doc":
            return openapi.group_version_document(registry, route.group, route.version)
        return None

    # -- objects --------------------------------------------------------------------------

    def _target(self, route: Route) -> Target:
        resource = self.registry.get(route.group, route.version, route.plural)
        if resource is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if route.namespace and not resource.namespaced:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        served = {"status": resource.status_subresource, "scale": resource.scale is not None}
        if route.subresource and not served.get(route.subresource):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return Target(resource, route.namespace, route.name, route.subresource)

    async def _objects(self, request: web.Request, route: Route) -> web.StreamResponse:
        target = self._target(route)
        response = await self._verb(request, route, target)
        warning = target.resource.deprecation
        if warning and not response.prepared:  # a watch sent its own headers already
            response.headers.add("Warning", _warning(warning))
        return response

    async def _verb(self, request: web.Request, route: Route, target: Target) -> web.StreamResponse:
        if target.subresource == "scale":
            return await self._scale(request, target)
        query = request.query
        method = request.method
        watch = route.legacy_watch or query.get("watch") in ("true", "1")
        if method in READ_VERBS and (watch or not target.name):
            return await self._collection(request, target, watch)
        if method in READ_VERBS:
            obj = await self.rest.get(target)
            return self._render_one(request, target.resource, obj)
        if target.name == "" and method == "DELETE":
            return await self._delete_collection(request, target)
        if target.name == "" and method != "POST":
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        options = self._write_options(query, request.headers.get("User-Agent", ""))
        if method == "POST":
            if target.name:
                raise ApiError(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                )
            result = await self.rest.create(target, await read_body(request), options)
        elif method == "PUT":
            result = await self.rest.update(target, await read_body(request), options)
        elif method == "PATCH":
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            result = await self.rest.patch(target, content_type, await read_body(request), options)
        elif method == "DELETE":
            raw = await read_body(request, optional=True)
            delete_options = raw if isinstance(raw, dict) else {}
            dry = options.dry_run or bool(delete_options.get("dryRun"))
            result = await self.rest.delete(target, delete_options, dry)
        else:
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        return self._result(result)

    async def _scale(self, request: web.Request, target: Target) -> web.Response:
        """GET, PUT or patch the Scale view; writes go through the object's update."""
        resource = target.resource
        main = Target(resource, target.namespace, target.name)
        if request.method in READ_VERBS:
            return json_response(to_scale(resource, await self.rest.get(main)))
        if request.method not in ("PUT", "PATCH"):
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        options = self._write_options(request.query, request.headers.get("User-Agent", ""))
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        body = await read_body(request)
        for _ in range(16):
            current = await self.rest.get(main)
            scale = (
                body
                if request.method == "PUT"
                else _patched_scale(to_scale(resource, current), content_type, body)
            )
            if request.method == "PUT":
                pinned = bool(((scale or {}).get("metadata") or {}).get("resourceVersion"))
            else:
                pinned = names_version(content_type, body)
            try:
                result = await self.rest.update(
                    main, apply_scale(resource, current, scale), options
                )
            except ApiError as exc:
                if exc.reason == "Conflict" and not pinned:
                    continue  # someone wrote in between: apply the patch to the new object
                raise
            return json_response(to_scale(resource, result.body))
        raise ApiError(409, "Conflict", "too many concurrent writes to the scale subresource")

    async def _delete_collection(self, request: web.Request, target: Target) -> web.Response:
        """DELETE on a collection: delete (or mark, with finalizers) each selected object."""
        query = request.query
        supported = _field_labels(target.resource)
        selector = Selector(query.get("labelSelector"), query.get("fieldSelector"), supported)
        raw = await read_body(request, optional=True)
        options = raw if isinstance(raw, dict) else {}
        dry_run = "All" in query.getall("dryRun", []) or bool(options.get("dryRun"))
        items, read_at, _ = await self.rest.list_objects(target, selector)
        deleted: list[Obj] = []
        for obj in items:
            metadata = obj["metadata"]
            one = Target(target.resource, metadata.get("namespace", ""), metadata["name"])
            try:
                await self.rest.delete(one, {}, dry_run)
            except ApiError as exc:
                if exc.code != 404:  # gone meanwhile: nothing left to delete
                    raise
                continue
            deleted.append(obj)
        resource = target.resource
        return json_response(
            {
                "apiVersion": resource.api_version,
                "kind": resource.list_kind,
                "metadata": {"resourceVersion": str(read_at)},
                "items": deleted,
            }
        )

    def _result(self, result: Result) -> web.Response:
        return json_response(result.body, result.code, _warning_headers(result.warnings))

    def _write_options(self, query: Any, user_agent: str) -> WriteOptions:
        validation = query.get("fieldValidation", "Warn") or "Warn"
        if validation not in _FIELD_VALIDATION:
            raise bad_request(
                f'fieldValidation must be one of "Ignore", "Warn", "Strict", got "{validation}"'
            )
        return WriteOptions(
            field_validation=validation,
            dry_run="All" in query.getall("dryRun", []),
            field_manager=query.get("fieldManager", ""),
            default_manager=manager_from_user_agent(user_agent),
            force=query.get("force") == "true",
        )

    def _render_one(self, request: web.Request, resource: Resource, obj: Obj) -> web.Response:
        if _wants_table(request.headers.get("Accept", "")):
            include = request.query.get("includeObject", "Metadata")
            return json_response(
                table.table(
                    resource,
                    [obj],
                    {"resourceVersion": obj["metadata"].get("resourceVersion", "")},
                    include,
                )
            )
        return json_response(obj)

    async def _collection(
        self, request: web.Request, target: Target, watch: bool
    ) -> web.StreamResponse:
        query = request.query
        if target.name:
            fields = f"metadata.name={target.name}"
            if query.get("fieldSelector"):
                fields += "," + query["fieldSelector"]
            target = Target(target.resource, target.namespace)
        else:
            fields = query.get("fieldSelector", "")
        supported = _field_labels(target.resource)
        selector = Selector(query.get("labelSelector"), fields, supported)
        resource = target.resource
        as_table = _wants_table(request.headers.get("Accept", ""))
        include = query.get("includeObject", "Metadata")
        if watch:
            cache = self.caches.get(resource.storage_prefix)
            if cache is None:
                raise ApiError(503, "ServiceUnavailable", "the watch cache is not ready")
            params = WatchParams(
                resource_version=query.get("resourceVersion", ""),
                bookmarks=query.get("allowWatchBookmarks") in ("true", "1"),
                timeout=_float(query.get("timeoutSeconds"), 1800.0),
                send_initial=query.get("sendInitialEvents") == "true",
                bookmark_interval=self.bookmark_interval,
            )
            if params.send_initial and query.get("resourceVersionMatch") != "NotOlderThan":
                raise bad_request(
                    "sendInitialEvents is forbidden for watch unless resourceVersionMatch is "
                    "set to NotOlderThan"
                )

            headers_sent = False

            def render(obj: Obj) -> Any:
                # As kube does: a Table's column definitions go with the first event only.
                nonlocal headers_sent
                if not as_table:
                    return obj
                metadata = {"resourceVersion": obj.get("metadata", {}).get("resourceVersion", "")}
                rendered = table.table(
                    resource, [obj], metadata, include, with_columns=not headers_sent
                )
                headers_sent = True
                return rendered

            stream = WatchStream(
                self.rest, cache, target, selector, params, render if as_table else None
            )
            headers = {"Cache-Control": "no-cache, private"}
            if resource.deprecation:
                headers["Warning"] = _warning(resource.deprecation)
            return await stream.serve(request, headers)
        limit, token, revision, oldest = _list_window(query)
        if oldest:
            current = await self.rest.storage.backend.current_revision()
            if oldest > current:
                raise too_large_resource_version(oldest, current)
        items, read_at, next_token = await self.rest.list_objects(
            target, selector, limit=limit, token=token, revision=revision
        )
        metadata: dict[str, Any] = {"resourceVersion": str(read_at)}
        if next_token:
            metadata["continue"] = next_token
        if as_table:
            return json_response(table.table(resource, items, metadata, include))
        return json_response(
            {
                "apiVersion": resource.api_version,
                "kind": resource.list_kind,
                "metadata": metadata,
                "items": items,
            }
        )


def _float(text: str | None, default: float) -> float:
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise bad_request(f"invalid timeoutSeconds {text!r}") from None


def _list_window(query: Any) -> tuple[int, str, int, int]:
    """(limit, continue token, revision to read at, oldest acceptable revision) of a list,
    with kube's rules."""
    rv = query.get("resourceVersion", "")
    match = query.get("resourceVersionMatch", "")
    token = query.get("continue", "")
    try:
        limit = int(query.get("limit") or 0)
    except ValueError:
        raise bad_request("limit must be an integer") from None
    if token and rv not in ("", "0"):
        raise bad_request("specifying resource version is not allowed when using continue")
    if match and not rv:
        raise bad_request("resourceVersionMatch is forbidden unless resourceVersion is provided")
    if match and match not in ("Exact", "NotOlderThan"):
        raise bad_request(f'resourceVersionMatch "{match}" is not supported')
    if rv in ("", "0"):
        if match == "Exact":
            raise bad_request('resourceVersionMatch "exact" is forbidden for resourceVersion "0"')
        # "0" means any state: kube serves it from its cache and ignores limit.
        return (0 if rv == "0" else limit), token, 0, 0
    try:
        revision = int(rv)
    except ValueError:
        raise bad_request(f'invalid resource version "{rv}"') from None
    exact = match == "Exact" or (not match and limit > 0)
    return limit, token, revision if exact else 0, revision


def _patched_scale(scale: Obj, content_type: str, patch: Any) -> Any:
    """A Scale after a patch (Scale is a built-in kind: a strategic patch merges)."""
    try:
        if content_type == JSON_PATCH:
            return json_patch(scale, patch)
        if content_type == MERGE:
            return merge_patch(scale, patch)
        if content_type == STRATEGIC:
            return merge_patch(scale, strip_directives(patch))
    except PatchError as exc:
        raise ApiError(422, "Invalid", str(exc)) from None
    raise unsupported_media(f"{JSON_PATCH}, {MERGE}, {STRATEGIC}")
