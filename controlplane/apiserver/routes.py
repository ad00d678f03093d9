"""Request paths to what they name: a discovery document, an OpenAPI document, or objects.

Pure parsing; whether the named resource is served is the caller's question. Paths follow
kube-apiserver: ``/api/v1/...`` for the core group, ``/apis/<group>/<version>/...`` for the
others, ``namespaces/<ns>/`` before namespaced resources, an optional ``/status``, and the
deprecated ``/watch/`` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

_NAMESPACE_SUBRESOURCES = ("status", "finalize")


@dataclass(frozen=True)
class Route:
    kind: str
    """version, health, api, apis, group, resources, openapi, openapi-doc, objects."""
    group: str = ""
    version: str = ""
    namespace: str = ""
    plural: str = ""
    name: str = ""
    subresource: str = ""
    legacy_watch: bool = False


def parse(path: str) -> Route | None:
    segments = [s for s in path.split("/") if s]
    if not segments:
        return None
    head = segments[0]
    if head == "version" and len(segments) == 1:
        return Route("version")
    if head in ("healthz", "livez", "readyz"):
        return Route("health")
    if head == "openapi" and segments[1:] == ["v2"]:
        return Route("openapi-v2")
    if head == "openapi" and len(segments) >= 2 and segments[1] == "v3":
        if len(segments) == 2:
            return Route("openapi")
        if segments[2] == "api" and len(segments) == 4:
            return Route("openapi-doc", "", segments[3])
        if segments[2] == "apis" and len(segments) == 5:
            return Route("openapi-doc", segments[3], segments[4])
        return None
    if head == "api":
        if len(segments) == 1:
            return Route("api")
        return _objects("", segments[1], segments[2:])
    if head == "apis":
        if len(segments) == 1:
            return Route("apis")
        if len(segments) == 2:
            return Route("group", segments[1])
        return _objects(segments[1], segments[2], segments[3:])
    return None


def _objects(group: str, version: str, rest: list[str]) -> Route | None:
    if not rest:
        return Route("resources", group, version)
    legacy_watch = rest[0] == "watch"
    if legacy_watch:
        rest = rest[1:]
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in _NAMESPACE_SUBRESOURCES:
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        return None
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    return Route("objects", group, version, namespace, plural, name, subresource, legacy_watch)
