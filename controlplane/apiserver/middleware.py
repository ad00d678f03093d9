"""Every request's frame: bearer-token authentication and errors as Kubernetes Statuses.

Handlers raise :class:`ApiError`; this turns it, an oversized body (413) and anything
unexpected (500, logged) into the Status body kube-apiserver sends, so a client never sees
a traceback or a dropped connection. Requests need a known bearer token (401 otherwise); a
read-only token may only read (403 otherwise). Health paths need no token.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from controlplane.apiserver.errors import ApiError, internal, qualified, status_body
from controlplane.apiserver.routes import Route, parse
from controlplane.apiserver.storage import to_json
from controlplane.kvstore.errors import KvstoreError

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 3 * 1024 * 1024
READ_VERBS = ("GET", "HEAD")


@dataclass(frozen=True)
class User:
    name: str
    read_only: bool = False


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=to_json(body),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(error: ApiError) -> web.Response:
    return json_response(status_body(error), error.code)


RouteHandler = Callable[[web.Request, Route | None], Awaitable[web.StreamResponse]]


def framed(tokens: dict[str, User], handler: RouteHandler) -> Handler:
    """The one handler aiohttp calls: the route parsed once, the token checked, then
    ``handler``, with its errors answered as Statuses.

    A plain wrapper rather than aiohttp middlewares: no middleware chain per request.
    """

    async def frame(request: web.Request) -> web.StreamResponse:
        try:
            route = parse(request.path)
            if route is None or route.kind != "health":
                header = request.headers.get("Authorization", "")
                token = header[7:].strip() if header.lower().startswith("bearer ") else ""
                user = tokens.get(token) if token else None
                if user is None:
                    return error_response(ApiError(401, "Unauthorized", "Unauthorized"))
                if user.read_only and request.method not in READ_VERBS:
                    return error_response(_forbidden(user, request, route))
            return await handler(request, route)
        except ApiError as exc:
            return error_response(exc)
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                ApiError(
                    413,
                    "RequestEntityTooLarge",
                    f"Request entity too large: limit is {MAX_BODY_BYTES}",
                )
            )
        except KvstoreError as exc:
            log.warning("%s %s: storage error: %s", request.method, request.path, exc)
            return error_response(internal(f"storage: {exc}"))
        except web.HTTPException:
            raise
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            return error_response(internal(type(exc).__name__))

    return frame


def _forbidden(user: User, request: web.Request, route: Route | None) -> ApiError:
    verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        request.method, request.method.lower()
    )
    if route is None or route.kind != "objects":
        return ApiError(
            403, "Forbidden", f'forbidden: User "{user.name}" cannot {verb} path "{request.path}"'
        )
    where = f' in the namespace "{route.namespace}"' if route.namespace else ""
    subject = qualified(route.plural, route.group)
    if route.name:
        subject += f' "{route.name}"'
    return ApiError(
        403,
        "Forbidden",
        f'{subject} is forbidden: User "{user.name}" cannot {verb} resource "{route.plural}" '
        f'in API group "{route.group}"{where}',
        route.name,
        route.group,
        route.plural,
    )
