"""The `meta.k8s.io/v1` Table rendering of objects, for `kubectl get`.

Columns are Name, then the version's ``additionalPrinterColumns`` (or Age when none are
defined), each cell computed as the apiextensions server does: a simple JSONPath, ``date``
cells as a human duration, ``string`` cells printed, other types as JSON values. Rows
carry the object's metadata (PartialObjectMetadata), the whole object, or nothing, as
``includeObject`` asks. Rendering never fails a request: a path that finds nothing is an
empty cell.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

from controlplane.apiserver.resources import Resource
from controlplane.apiserver.storage import Obj

NAME_DESCRIPTION = (
    "Name must be unique within a namespace. Is required when creating resources, although "
    "some resources may allow a client to request the generation of an appropriate name "
    "automatically. Name is primarily intended for creation idempotence and configuration "
    "definition. Cannot be updated. More info: "
    "https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names"
)
AGE = {
    "name": "Age",
    "type": "date",
    "jsonPath": ".metadata.creationTimestamp",
    "description": "CreationTimestamp is a timestamp representing the server time when this "
    "object was created.",
}
_BUILTIN_COLUMNS: dict[str, list[dict[str, Any]]] = {
    "Namespace": [{"name": "Status", "type": "string", "jsonPath": ".status.phase"}, AGE],
    "Lease": [{"name": "Holder", "type": "string", "jsonPath": ".spec.holderIdentity"}, AGE],
    "Service": [
        {"name": "Type", "type": "string", "jsonPath": ".spec.type"},
        {"name": "Cluster-IP", "type": "string", "jsonPath": ".spec.clusterIP"},
        {"name": "Selector", "type": "string", "jsonPath": ".spec.selector", "priority": 1},
        AGE,
    ],
    "EndpointSlice": [
        {"name": "AddressType", "type": "string", "jsonPath": ".addressType"},
        AGE,
    ],
    "CustomResourceDefinition": [
        {
            "name": "Created At",
            "type": "date",
            "jsonPath": ".metadata.creationTimestamp",
            "raw": True,
        }
    ],
}
_TOKEN = re.compile(
    r"\.([A-Za-z0-9_\-]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_]+)==[\"']([^\"']*)[\"']\)\]"
)


def columns_of(resource: Resource) -> list[dict[str, Any]]:
    if resource.printer_columns:
        return list(resource.printer_columns)
    return _BUILTIN_COLUMNS.get(resource.kind, [AGE])


def find(obj: Any, path: str) -> Any:
    """A simple JSONPath (``.a.b``, ``[0]``, ``[?(@.k=="v")]``); None when nothing matches."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    if path.startswith("$"):
        path = path[1:]
    node = obj
    position = 0
    while position < len(path):
        match = _TOKEN.match(path, position)
        if match is None:
            return None
        position = match.end()
        key, index, filter_key, filter_value = match.groups()
        if key is not None:
            node = node.get(key) if isinstance(node, dict) else None
        elif index is not None:
            node = node[int(index)] if isinstance(node, list) and int(index) < len(node) else None
        else:
            if not isinstance(node, list):
                return None
            node = next(
                (i for i in node if isinstance(i, dict) and str(i.get(filter_key)) == filter_value),
                None,
            )
        if node is None:
            return None
    return node


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery's HumanDuration."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d" if hours % 24 == 0 else f"{hours // 24}d{hours % 24}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    years, days = hours // 24 // 365, (hours // 24) % 365
    if hours < 24 * 365 * 8:
        return f"{years}y" if days == 0 else f"{years}y{days}d"
    return f"{years}y"


def _cell(column: dict[str, Any], obj: Obj) -> Any:
    value = find(obj, str(column.get("jsonPath", "")))
    if value is None:
        return None
    kind = column.get("type", "string")
    if kind == "date":
        if column.get("raw"):
            return value
        try:
            then = datetime.datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=datetime.UTC
            )
        except ValueError:
            return "<invalid>"
        return human_duration((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    if kind == "string":
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if kind == "integer" and isinstance(value, int | float):
        return int(value)
    return value


def column_definitions(resource: Resource) -> list[dict[str, Any]]:
    definitions = [
        {
            "name": "Name",
            "type": "string",
            "format": "name",
            "description": NAME_DESCRIPTION,
            "priority": 0,
        }
    ]
    for column in columns_of(resource):
        definitions.append(
            {
                "name": column.get("name", ""),
                "type": "string" if column.get("raw") else column.get("type", "string"),
                "format": column.get("format", ""),
                "description": column.get("description", ""),
                "priority": int(column.get("priority", 0)),
            }
        )
    return definitions


def row(resource: Resource, obj: Obj, include: str = "Metadata") -> dict[str, Any]:
    cells = [(obj.get("metadata") or {}).get("name", "")]
    cells.extend(_cell(column, obj) for column in columns_of(resource))
    out: dict[str, Any] = {"cells": cells}
    if include == "Object":
        out["object"] = obj
    elif include != "None":
        out["object"] = {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata") or {},
        }
    return out


def table(
    resource: Resource,
    objects: list[Obj],
    metadata: dict[str, Any],
    include: str = "Metadata",
    *,
    with_columns: bool = True,
) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": metadata}
    if with_columns:
        out["columnDefinitions"] = column_definitions(resource)
    out["rows"] = [row(resource, obj, include) for obj in objects]
    return out
