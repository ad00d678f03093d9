"""What the server does to an object before it is stored: the kube "strategies".

Pure functions over JSON objects; nothing here reads or writes etcd. On create: uid,
creationTimestamp, generation 1, status dropped when the status subresource is on. On
update: identity fields (uid, creationTimestamp, name, namespace, deletionTimestamp) are
kept from the stored object, status or everything-but-status is kept depending on which
endpoint wrote, and generation is bumped only when the object changed outside metadata
(and status, with the subresource). Custom resources are defaulted, pruned and validated
against their schema; a failure is an :class:`ApiError` and nothing is written.
"""

from __future__ import annotations

import copy
import datetime
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from controlplane.apiserver import schema as structural
from controlplane.apiserver.errors import ApiError, Cause, bad_request, invalid
from controlplane.apiserver.metadata import immutable_uid, validate_metadata, validate_name
from controlplane.apiserver.resources import Resource
from controlplane.apiserver.storage import Obj

_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_SERVER_SET = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds")


_last_stamp: tuple[int, str] = (0, "")


def now() -> str:
    """The current time as kube writes timestamps (RFC 3339, seconds, UTC)."""
    global _last_stamp
    second = int(time.time())
    if _last_stamp[0] != second:  # one strftime per second, however many writes
        stamp = datetime.datetime.fromtimestamp(second, datetime.UTC)
        _last_stamp = (second, stamp.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return _last_stamp[1]


def generate_name(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_GENERATE_ALPHABET) for _ in range(5))


@dataclass
class Checked:
    """An object ready to store, and the unknown fields that were pruned from it."""

    obj: Obj
    unknown: list[str] = field(default_factory=list)


def check_type(resource: Resource, obj: Any) -> Obj:
    """The body is an object of this resource's apiVersion and kind (400 otherwise)."""
    if not isinstance(obj, dict):
        raise bad_request("the body of the request must be a JSON or YAML object")
    if not resource.custom:
        # Built-in kinds decode with the endpoint's version and kind as defaults.
        obj.setdefault("apiVersion", resource.api_version)
        obj.setdefault("kind", resource.kind)
        obj["apiVersion"] = obj["apiVersion"] or resource.api_version
        obj["kind"] = obj["kind"] or resource.kind
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not kind:
        raise bad_request("Object 'Kind' is missing in the request body")
    if api_version != resource.api_version:
        raise bad_request(
            f"the API version in the data ({api_version}) does not match the expected API "
            f"version ({resource.api_version})"
        )
    if kind != resource.kind:
        raise bad_request(
            f"the kind in the data ({kind}) does not match the expected kind ({resource.kind})"
        )
    metadata = obj.get("metadata")
    if metadata is None:
        obj["metadata"] = {}
    elif not isinstance(metadata, dict):
        raise bad_request("metadata must be an object")
    return obj


def check_namespace(resource: Resource, obj: Obj, namespace: str) -> None:
    metadata = obj["metadata"]
    if resource.namespaced:
        given = metadata.get("namespace")
        if given and given != namespace:
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"
            )
        metadata["namespace"] = namespace
    else:
        metadata.pop("namespace", None)


def _check_schema(resource: Resource, obj: Obj, name: str) -> list[str]:
    """Default, prune and validate a custom resource; returns the pruned field paths."""
    schema = resource.schema
    if not resource.custom or schema is None:
        return []
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    structural.apply_defaults(body, schema)
    unknown = structural.prune(body, schema)
    causes = structural.validate(body, schema)
    if causes:
        raise invalid(resource.kind, resource.group, name, causes)
    for key in [k for k in obj if k not in ("apiVersion", "kind", "metadata")]:
        del obj[key]
    obj.update(body)
    return unknown


def prepare_create(resource: Resource, obj: Obj, *, status_write: bool = False) -> Checked:
    """Stamp a new object (uid, creationTimestamp, generation) and check it."""
    metadata = obj["metadata"]
    for server_field in (*_SERVER_SET, "resourceVersion", "generation", "managedFields"):
        metadata.pop(server_field, None)
    name = metadata.get("name")
    if not name:
        prefix = metadata.get("generateName")
        if not prefix:
            raise invalid(
                resource.kind,
                resource.group,
                "",
                [
                    Cause(
                        "FieldValueRequired",
                        "Required value: name or generateName is required",
                        "metadata.name",
                    )
                ],
            )
        name = metadata["name"] = generate_name(prefix)
    causes = validate_name(resource.kind, name) + validate_metadata(metadata)
    if causes:
        raise invalid(resource.kind, resource.group, name, causes)
    if resource.status_subresource and resource.custom and not status_write:
        obj.pop("status", None)
    metadata["uid"] = str(uuid.uuid4())
    metadata["creationTimestamp"] = now()
    if resource.custom or resource.kind == "CustomResourceDefinition":
        metadata["generation"] = 1
    unknown = _check_schema(resource, obj, name)
    return Checked(obj, unknown)


def _spec_part(resource: Resource, obj: Obj) -> dict[str, Any]:
    """What counts for generation: everything but metadata (and status, with the subresource)."""
    skip = {"metadata", "apiVersion", "kind"}
    if resource.status_subresource:
        skip.add("status")
    return {k: v for k, v in obj.items() if k not in skip}


def prepare_update(resource: Resource, new: Obj, old: Obj, *, subresource: str = "") -> Checked:
    """Merge a client's replacement with the stored object, as kube's update strategies do."""
    new = copy.deepcopy(new)
    new_meta = new.setdefault("metadata", {})
    old_meta = old.get("metadata") or {}
    uid_causes = immutable_uid(new_meta, old_meta)
    if subresource == "status":
        status = new.get("status")
        new = copy.deepcopy(old)
        if status is None:
            new.pop("status", None)
        else:
            new["status"] = status
        new_meta = new["metadata"]
    elif resource.status_subresource:
        if "status" in old:
            new["status"] = copy.deepcopy(old["status"])
        else:
            new.pop("status", None)
    for kept in (
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "name",
        "namespace",
        "generation",
    ):
        if kept in old_meta:
            new_meta[kept] = old_meta[kept]
        else:
            new_meta.pop(kept, None)
    new_meta.pop("managedFields", None)
    new["apiVersion"] = new.get("apiVersion") or old.get("apiVersion")
    new["kind"] = old.get("kind", resource.kind)
    causes = uid_causes + validate_metadata(new_meta)
    if causes:
        raise invalid(resource.kind, resource.group, new_meta.get("name", ""), causes)
    if old_meta.get("deletionTimestamp"):
        added = set(new_meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
        if added:
            raise ApiError(
                422,
                "Invalid",
                f'{resource.kind}.{resource.group} "{new_meta.get("name")}" is invalid: '
                "metadata.finalizers: Forbidden: no new finalizers can be added if the object "
                "is being deleted",
                new_meta.get("name", ""),
                resource.group,
                resource.kind,
                [
                    Cause(
                        "FieldValueForbidden",
                        "Forbidden: no new finalizers can be added if the object is being deleted",
                        "metadata.finalizers",
                    )
                ],
            )
    unknown = _check_schema(resource, new, new_meta.get("name", ""))
    if "generation" in old_meta and _spec_part(resource, new) != _spec_part(resource, old):
        new_meta["generation"] = int(old_meta["generation"]) + 1
    return Checked(new, unknown)


def unchanged(new: Obj, old: Obj) -> bool:
    """Equal but for resourceVersion: an update that would write nothing."""

    def strip(obj: Obj) -> Obj:
        meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "resourceVersion"}
        return {**obj, "metadata": meta}

    return strip(new) == strip(old)


def mark_deleted(obj: Obj) -> Obj:
    """The object with deletionTimestamp set: deletion waits for its finalizers."""
    obj = copy.deepcopy(obj)
    metadata = obj["metadata"]
    if not metadata.get("deletionTimestamp"):
        metadata["deletionTimestamp"] = now()
        metadata["deletionGracePeriodSeconds"] = 0
        if "generation" in metadata:
            metadata["generation"] = int(metadata["generation"]) + 1
    return obj


def unknown_field_error(resource: Resource, unknown: list[str]) -> ApiError:
    fields = ", ".join(f'unknown field "{path}"' for path in unknown)
    return bad_request(
        f'{resource.kind} in version "{resource.version}" cannot be handled as a '
        f"{resource.kind}: strict decoding error: {fields}"
    )
