"""Request bodies to JSON values: JSON, YAML, or the protobuf kubectl sends for Namespaces.

A body that cannot be read is a 400 (malformed, invalid UTF-8, nested more than
``MAX_DEPTH`` levels, YAML with aliases) or a 415 (a media type the server does not
read); it never reaches a handler half-decoded.
"""

from __future__ import annotations

from typing import Any

import yaml
from aiohttp import web

from controlplane.apiserver import protobuf
from controlplane.apiserver.errors import bad_request, unsupported_media
from controlplane.apiserver.protobuf import ProtobufError
from controlplane.apiserver.storage import JSONError, from_json


async def read_body(request: web.Request, *, optional: bool = False) -> Any:
    """The request's body as a JSON value (None for an empty optional body)."""
    raw = await request.read()
    if not raw.strip():
        if optional:
            return None
        raise bad_request("the request body is empty")
    content_type = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
    if content_type == "application/vnd.kubernetes.protobuf":
        try:
            return protobuf.decode(raw)
        except ProtobufError:
            raise unsupported_media("application/json, application/yaml") from None
    if "protobuf" in content_type or "cbor" in content_type:
        raise unsupported_media("application/json, application/yaml")
    try:
        body = yaml.load(raw, Loader=_BodyLoader) if "yaml" in content_type else from_json(raw)
    except RecursionError:
        raise bad_request(f"the object is nested more than {MAX_DEPTH} levels deep") from None
    except (ValueError, JSONError, yaml.YAMLError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise bad_request(f"couldn't get version/kind; json parse error: {message}") from None
    if _depth(body) > MAX_DEPTH:
        raise bad_request(f"the object is nested more than {MAX_DEPTH} levels deep")
    return body


MAX_DEPTH = 100
"""Deepest nesting of a request body (kube's objects are far shallower; recursion in the
server's checks stays bounded)."""


class _BodyLoader(yaml.SafeLoader):
    """SafeLoader without aliases: an alias shares a node, and a few nested ones make a
    document that expands exponentially when encoded ("billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("YAML aliases are not supported in request bodies")
        return super().compose_node(parent, index)


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        if isinstance(node, dict):
            stack.extend((v, level + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, level + 1) for v in node)
    return deepest
