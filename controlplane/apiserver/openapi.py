"""/openapi/v3: the root index and one document per group-version, made from the registry.

A custom resource's schema is its CRD version's ``openAPIV3Schema`` with apiVersion, kind
and metadata added, tagged with ``x-kubernetes-group-version-kind``; its paths carry the
operations kube publishes, the PATCH one with the ``fieldValidation`` parameter and the
JSON, merge and apply patch types (so kubectl validates on the server, sends JSON merge
patches to custom resources, and computes strategic ones for built-in kinds from its own
type information). Documents are rebuilt on request: they cannot go stale after a CRD
changes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from controlplane.apiserver.discovery import GIT_VERSION
from controlplane.apiserver.resources import Registry, Resource

META = "io.k8s.apimachinery.pkg.apis.meta.v1"
_OBJECT_META = {
    "description": "ObjectMeta is metadata that all persisted resources must have, which "
    "includes all objects users must create.",
    "type": "object",
    "properties": {
        "name": {"description": "Name must be unique within a namespace.", "type": "string"},
        "generateName": {"description": "A prefix for a server-generated name.", "type": "string"},
        "namespace": {"description": "The namespace of the object.", "type": "string"},
        "uid": {"description": "The unique id of the object.", "type": "string"},
        "resourceVersion": {"description": "The object's version.", "type": "string"},
        "generation": {
            "description": "The generation of the desired state.",
            "type": "integer",
            "format": "int64",
        },
        "creationTimestamp": {
            "description": "When the object was created.",
            "type": "string",
            "format": "date-time",
        },
        "deletionTimestamp": {
            "description": "When the object will be deleted.",
            "type": "string",
            "format": "date-time",
        },
        "labels": {
            "description": "Map of string keys and values.",
            "type": "object",
            "additionalProperties": {"type": "string", "default": ""},
        },
        "annotations": {
            "description": "Unstructured key value map.",
            "type": "object",
            "additionalProperties": {"type": "string", "default": ""},
        },
        "finalizers": {
            "description": "Must be empty before the object is deleted.",
            "type": "array",
            "items": {"type": "string", "default": ""},
        },
        "ownerReferences": {
            "description": "Objects this object depends on.",
            "type": "array",
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
        "managedFields": {
            "description": "Field managers.",
            "type": "array",
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    },
}
_PATCH_TYPES = (
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/apply-patch+yaml",
)


def _schema_name(resource: Resource) -> str:
    group = ".".join(reversed(resource.group.split("."))) if resource.group else "io.k8s.api.core"
    return f"{group}.{resource.version}.{resource.kind}"


def _gvk(resource: Resource) -> list[dict[str, str]]:
    return [{"group": resource.group, "version": resource.version, "kind": resource.kind}]


def _object_schema(resource: Resource) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        resource.schema or {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    )
    properties = dict(base.get("properties") or {})
    properties["apiVersion"] = {
        "description": "APIVersion defines the versioned schema of "
        "this representation of an object.",
        "type": "string",
    }
    properties["kind"] = {
        "description": "Kind is a string value representing the REST "
        "resource this object represents.",
        "type": "string",
    }
    properties["metadata"] = {
        "allOf": [{"$ref": f"#/components/schemas/{META}.ObjectMeta"}],
        "description": "Standard object's metadata.",
    }
    base["properties"] = properties
    base.setdefault("type", "object")
    base["x-kubernetes-group-version-kind"] = _gvk(resource)
    return base


def _list_schema(resource: Resource) -> dict[str, Any]:
    return {
        "description": f"{resource.kind}List is a list of {resource.kind}",
        "type": "object",
        "required": ["items"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "items": {
                "type": "array",
                "items": {"$ref": f"#/components/schemas/{_schema_name(resource)}"},
            },
            "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
        "x-kubernetes-group-version-kind": [
            {"group": resource.group, "version": resource.version, "kind": resource.list_kind}
        ],
    }


def _param(name: str, where: str = "query", schema_type: str = "string") -> dict[str, Any]:
    return {"name": name, "in": where, "schema": {"type": schema_type, "uniqueItems": True}}


def _body_op(resource: Resource, action: str, content_types: tuple[str, ...]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{_schema_name(resource)}"}
    params = [_param("dryRun"), _param("fieldManager"), _param("fieldValidation")]
    if action == "patch":
        params.append(_param("force", schema_type="boolean"))
    return {
        "operationId": f"{action}{resource.kind}",
        "parameters": params,
        "requestBody": {
            "content": {
                t: {"schema": {"type": "object"} if action == "patch" else ref}
                for t in content_types
            },
            "required": True,
        },
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": ref}}}
        },
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": _gvk(resource)[0],
    }


def _simple_op(resource: Resource, action: str, list_kind: bool = False) -> dict[str, Any]:
    name = f"{_schema_name(resource)}List" if list_kind else _schema_name(resource)
    return {
        "operationId": f"{action}{resource.kind}",
        "responses": {
            "200": {
                "description": "OK",
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}
                },
            }
        },
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": _gvk(resource)[0],
    }


def _paths(resource: Resource) -> dict[str, Any]:
    root = f"/apis/{resource.group}/{resource.version}" if resource.group else "/api/v1"
    base = (
        f"{root}/namespaces/{{namespace}}/{resource.plural}"
        if resource.namespaced
        else (f"{root}/{resource.plural}")
    )
    # Strategic merge patches are accepted for built-in kinds, but not advertised: the
    # schemas here are too thin for kubectl to compute one from, and without the content
    # type it uses its compiled-in type information instead (as with an old server).
    patch_types = _PATCH_TYPES
    ns_param = [_param("namespace", "path")] if resource.namespaced else []
    paths: dict[str, Any] = {
        base: {
            "get": _simple_op(resource, "list", list_kind=True),
            "post": _body_op(resource, "post", ("*/*",)),
            "delete": _simple_op(resource, "deletecollection"),
            "parameters": ns_param,
        },
        f"{base}/{{name}}": {
            "get": _simple_op(resource, "get"),
            "put": _body_op(resource, "put", ("*/*",)),
            "patch": _body_op(resource, "patch", patch_types),
            "delete": _simple_op(resource, "delete"),
            "parameters": [_param("name", "path"), *ns_param],
        },
    }
    if resource.status_subresource:
        paths[f"{base}/{{name}}/status"] = {
            "get": _simple_op(resource, "get"),
            "put": _body_op(resource, "put", ("*/*",)),
            "patch": _body_op(resource, "patch", patch_types),
            "parameters": [_param("name", "path"), *ns_param],
        }
    if resource.namespaced:
        paths[f"{root}/{resource.plural}"] = {"get": _simple_op(resource, "list", True)}
    return paths


def group_version_document(registry: Registry, group: str, version: str) -> dict[str, Any] | None:
    resources = registry.in_group_version(group, version)
    if not resources:
        return None
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {f"{META}.ObjectMeta": _OBJECT_META}
    for resource in sorted(resources, key=lambda r: r.plural):
        paths.update(_paths(resource))
        schemas[_schema_name(resource)] = _object_schema(resource)
        schemas[f"{_schema_name(resource)}List"] = _list_schema(resource)
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _path_of(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def document_hash(document: dict[str, Any]) -> str:
    raw = json.dumps(document, sort_keys=True).encode()
    return hashlib.sha512(raw).hexdigest().upper()[:128]


def root(registry: Registry) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for group, versions in sorted(registry.group_versions().items()):
        for version in versions:
            document = group_version_document(registry, group, version)
            if document is None:
                continue
            path = _path_of(group, version)
            paths[path] = {
                "serverRelativeURL": f"/openapi/v3/{path}?hash={document_hash(document)}"
            }
    return {"paths": paths}
