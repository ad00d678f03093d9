"""Structural-schema checks of custom resources: defaulting, pruning, validation.

A custom resource is checked against its CRD version's ``openAPIV3Schema`` the way the
apiextensions server does: defaults are applied, fields the schema does not declare are
pruned (unless ``x-kubernetes-preserve-unknown-fields``) and reported by path, and the
value is validated (type, required, enum, pattern, known string formats, bounds, lengths, items,
properties, ``x-kubernetes-list-type`` set and map uniqueness).
Failures come back as field causes with kube's messages; nothing here raises or stores.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from controlplane.apiserver import formats
from controlplane.apiserver.errors import Cause

Schema = dict[str, Any]
_META_KEYS = ("apiVersion", "kind", "metadata")


def _display(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    return str(value)


def _type_ok(value: Any, schema: Schema) -> bool:
    kind = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, int | str) and not isinstance(value, bool)
    if kind is None:
        return True
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return True


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def validate(value: Any, schema: Schema, path: str = "") -> list[Cause]:
    """Every violation of ``schema`` by ``value``; [] when it conforms."""
    causes: list[Cause] = []
    _validate(value, schema, path, causes)
    return causes


def _validate(value: Any, schema: Schema, path: str, causes: list[Cause]) -> None:
    if value is None:
        if not schema.get("nullable"):
            kind = schema.get("type")
            if kind:
                causes.append(_invalid(path, value, f"{path} in body must be of type {kind}"))
        return
    if not _type_ok(value, schema):
        kind = schema.get("type") or "int-or-string"
        causes.append(
            Cause(
                "FieldValueTypeInvalid",
                f"Invalid value: {_display(value)}: {path} in body must be of type {kind}: "
                f"{json.dumps(_type_name(value))}",
                path,
            )
        )
        return
    enum = schema.get("enum")
    if enum is not None and value not in enum:
        supported = ", ".join(json.dumps(e) for e in enum)
        causes.append(
            Cause(
                "FieldValueNotSupported",
                f"Unsupported value: {_display(value)}: supported values: {supported}",
                path,
            )
        )
    if isinstance(value, str):
        _check_string(value, schema, path, causes)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        _check_number(value, schema, path, causes)
    elif isinstance(value, list):
        _check_array(value, schema, path, causes)
    elif isinstance(value, dict):
        _check_object(value, schema, path, causes)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _invalid(path: str, value: Any, detail: str) -> Cause:
    return Cause("FieldValueInvalid", f"Invalid value: {_display(value)}: {detail}", path)


def _check_string(value: str, schema: Schema, path: str, causes: list[Cause]) -> None:
    if "minLength" in schema and len(value) < schema["minLength"]:
        causes.append(
            _invalid(
                path, value, f"{path} in body should be at least {schema['minLength']} chars long"
            )
        )
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        causes.append(
            Cause(
                "FieldValueTooLong",
                f"Too long: may not be more than {schema['maxLength']} bytes",
                path,
            )
        )
    format_name = schema.get("format")
    if isinstance(format_name, str) and not formats.conforms(format_name, value):
        causes.append(
            _invalid(
                path, value, f"{path} in body must be of type {format_name}: {_display(value)}"
            )
        )
    pattern = schema.get("pattern")
    if pattern is not None:
        try:
            matched = re.search(pattern, value) is not None
        except re.error:
            matched = True  # a pattern Python cannot compile is not the client's fault
        if not matched:
            causes.append(_invalid(path, value, f"{path} in body should match '{pattern}'"))


def _check_number(value: float, schema: Schema, path: str, causes: list[Cause]) -> None:
    if "minimum" in schema:
        low = schema["minimum"]
        if value < low or (schema.get("exclusiveMinimum") and value == low):
            op = "greater than" if schema.get("exclusiveMinimum") else "greater than or equal to"
            causes.append(_invalid(path, value, f"{path} in body should be {op} {low}"))
    if "maximum" in schema:
        high = schema["maximum"]
        if value > high or (schema.get("exclusiveMaximum") and value == high):
            op = "less than" if schema.get("exclusiveMaximum") else "less than or equal to"
            causes.append(_invalid(path, value, f"{path} in body should be {op} {high}"))


def _check_array(value: list[Any], schema: Schema, path: str, causes: list[Cause]) -> None:
    if "minItems" in schema and len(value) < schema["minItems"]:
        causes.append(
            _invalid(
                path, len(value), f"{path} in body should have at least {schema['minItems']} items"
            )
        )
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        causes.append(
            Cause(
                "FieldValueTooMany",
                f"Too many: {len(value)}: must have at most {schema['maxItems']} items",
                path,
            )
        )
    items = schema.get("items")
    if isinstance(items, dict):
        for i, item in enumerate(value):
            _validate(item, items, f"{path}[{i}]", causes)
    _check_list_type(value, schema, path, causes)


def _check_list_type(value: list[Any], schema: Schema, path: str, causes: list[Cause]) -> None:
    """``x-kubernetes-list-type``: a set has no duplicates; a map no two items with the
    same ``x-kubernetes-list-map-keys``."""
    kind = schema.get("x-kubernetes-list-type")
    if kind == "set":
        seen: list[Any] = []
        for i, item in enumerate(value):
            if item in seen:
                causes.append(
                    Cause(
                        "FieldValueDuplicate", f"Duplicate value: {_display(item)}", f"{path}[{i}]"
                    )
                )
            else:
                seen.append(item)
    elif kind == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        seen_keys: list[tuple[Any, ...]] = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                continue
            key = tuple(item.get(k) for k in keys)
            if key in seen_keys:
                shown = ", ".join(f'"{k}":{_display(v)}' for k, v in zip(keys, key, strict=True))
                causes.append(
                    Cause(
                        "FieldValueDuplicate",
                        f"Duplicate value: map[string]interface {{}}{{{shown}}}",
                        f"{path}[{i}]",
                    )
                )
            else:
                seen_keys.append(key)


def _check_object(value: dict[str, Any], schema: Schema, path: str, causes: list[Cause]) -> None:
    for name in schema.get("required", ()):
        if name not in value:
            causes.append(Cause("FieldValueRequired", "Required value", _join(path, name)))
    properties: dict[str, Schema] = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    for name, item in value.items():
        if not path and name in _META_KEYS:
            continue
        sub = properties.get(name)
        if sub is None and isinstance(additional, dict):
            sub = additional
        if sub is not None:
            _validate(item, sub, _join(path, name), causes)


def apply_defaults(value: Any, schema: Schema) -> None:
    """Fill in ``default`` values of absent properties, in place (structural defaulting)."""
    if isinstance(value, dict):
        properties: dict[str, Schema] = schema.get("properties") or {}
        for name, sub in properties.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(value[name], sub)
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            for name, item in value.items():
                if name not in properties:
                    apply_defaults(item, additional)
    elif isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, dict):
            for item in value:
                apply_defaults(item, items)


def prune(value: Any, schema: Schema, path: str = "") -> list[str]:
    """Drop fields ``schema`` does not declare, in place; return their paths."""
    dropped: list[str] = []
    _prune(value, schema, path, dropped, root=not path)
    return dropped


def _prune(value: Any, schema: Schema, path: str, dropped: list[str], *, root: bool) -> None:
    if schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("properties"):
        return
    if isinstance(value, dict):
        if schema.get("x-kubernetes-embedded-resource"):
            pass
        properties: dict[str, Schema] = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        for name in list(value):
            if root and name in _META_KEYS:
                continue
            sub = properties.get(name)
            if sub is None and isinstance(additional, dict):
                sub = additional
            if sub is None:
                if not (preserve or additional is True):
                    dropped.append(_join(path, name))
                    del value[name]
                continue
            _prune(value[name], sub, _join(path, name), dropped, root=False)
    elif isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(value):
                _prune(item, items, f"{path}[{i}]", dropped, root=False)


def check_structural(
    schema: Any, path: str = "spec.versions[0].schema.openAPIV3Schema"
) -> list[Cause]:
    """The few structural rules a CRD's schema must meet for this server to use it."""
    causes: list[Cause] = []
    if not isinstance(schema, dict):
        return [Cause("FieldValueRequired", "Required value: schemas are required", path)]
    _check_schema_node(schema, path, causes, root=True)
    return causes


def _check_schema_node(node: Any, path: str, causes: list[Cause], *, root: bool = False) -> None:
    if not isinstance(node, dict):
        causes.append(Cause("FieldValueInvalid", "Invalid value: must be an object", path))
        return
    kind = node.get("type")
    if root and kind != "object":
        causes.append(
            Cause(
                "FieldValueInvalid",
                f"Invalid value: {_display(kind)}: must be object",
                _join(path, "type"),
            )
        )
    if kind is None and not (
        node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    ):
        causes.append(
            Cause(
                "FieldValueRequired",
                "Required value: must not be empty for specified object fields",
                _join(path, "type"),
            )
        )
    for name, sub in (node.get("properties") or {}).items():
        _check_schema_node(sub, f"{path}.properties[{name}]", causes)
    items = node.get("items")
    if isinstance(items, dict):
        _check_schema_node(items, f"{path}.items", causes)
    additional = node.get("additionalProperties")
    if isinstance(additional, dict):
        _check_schema_node(additional, f"{path}.additionalProperties", causes)
