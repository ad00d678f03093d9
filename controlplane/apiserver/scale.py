"""The ``scale`` subresource of custom resources: an ``autoscaling/v1`` Scale view.

A CRD version with ``subresources.scale`` names where its replicas live
(``specReplicasPath``, ``statusReplicasPath``, ``labelSelectorPath``). Reading ``/scale``
renders those fields as a Scale; writing it (PUT or patch, as ``kubectl scale`` does)
changes only the spec replicas field of the object, through the object's own update path,
so validation, optimistic concurrency and generation apply as to any other write.
"""

from __future__ import annotations

import copy
from typing import Any

from controlplane.apiserver.errors import Cause, bad_request, invalid
from controlplane.apiserver.resources import Resource
from controlplane.apiserver.storage import Obj

SCALE_VERBS = ["get", "patch", "update"]


def _path(text: str) -> list[str]:
    return [p for p in text.strip().lstrip(".").split(".") if p]


def _get(obj: Any, path: list[str]) -> Any:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def to_scale(resource: Resource, obj: Obj) -> Obj:
    """The Scale of ``obj`` (replicas 0 where the object has none)."""
    config = resource.scale or {}
    metadata = obj.get("metadata") or {}
    status: dict[str, Any] = {
        "replicas": _get(obj, _path(str(config.get("statusReplicasPath", "")))) or 0
    }
    selector_path = config.get("labelSelectorPath")
    if selector_path:
        selector = _get(obj, _path(str(selector_path)))
        if isinstance(selector, str):
            status["selector"] = selector
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            key: metadata[key]
            for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
            if key in metadata
        },
        "spec": {"replicas": _get(obj, _path(str(config.get("specReplicasPath", "")))) or 0},
        "status": status,
    }


def apply_scale(resource: Resource, obj: Obj, scale: Any) -> Obj:
    """``obj`` with the Scale's spec.replicas written to its spec replicas path."""
    if not isinstance(scale, dict):
        raise bad_request("the body of a scale request must be a Scale object")
    replicas = (scale.get("spec") or {}).get("replicas", 0)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        cause = Cause(
            "FieldValueInvalid",
            f"Invalid value: {replicas!r}: must be greater than or equal to 0",
            "spec.replicas",
        )
        raise invalid("Scale", "autoscaling", (obj.get("metadata") or {}).get("name", ""), [cause])
    path = _path(str((resource.scale or {}).get("specReplicasPath", "")))
    if not path:
        raise bad_request("the custom resource has no specReplicasPath")
    new = copy.deepcopy(obj)
    node = new
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = replicas
    wanted = (scale.get("metadata") or {}).get("resourceVersion")
    if wanted:
        new["metadata"]["resourceVersion"] = wanted
    return new
