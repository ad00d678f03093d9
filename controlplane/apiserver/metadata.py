"""What kube's ObjectMeta validation refuses: names, label and annotation keys and values,
annotation size, finalizer types, a changed uid.

Pure checks returning field causes with apimachinery's messages; the caller answers 422
Invalid with all of them. An object that fails here is never stored.
"""

from __future__ import annotations

import re
from typing import Any

from controlplane.apiserver.errors import Cause

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
MAX_ANNOTATIONS_BYTES = 256 * 1024
_NAME_PART_HELP = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and "
    "end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex "
    "used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
_PREFIX_HELP = (
    "prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
    "characters, '-' or '.', and must start and end with an alphanumeric character (e.g. "
    "'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_VALUE_HELP = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def validate_name(kind: str, name: str) -> list[Cause]:
    """Namespaces are RFC 1123 labels; everything else here, RFC 1123 subdomains."""
    label = kind == "Namespace"
    pattern, limit = (_DNS_LABEL, 63) if label else (_DNS_SUBDOMAIN, 253)
    if len(name) <= limit and pattern.match(name):
        return []
    what = "RFC 1123 label" if label else "RFC 1123 subdomain"
    return [
        Cause(
            "FieldValueInvalid",
            f"Invalid value: {_quote(name)}: a lowercase {what} must consist of lower case "
            "alphanumeric characters, '-' or '.', and must start and end with an "
            "alphanumeric character",
            "metadata.name",
        )
    ]


def _qualified_name(key: str, field: str) -> list[Cause]:
    """A label or annotation key: [prefix/]name."""
    prefix, _, name = key.rpartition("/")
    problems: list[str] = []
    if "/" in prefix:
        problems.append("a qualified name must consist of a name part and an optional prefix")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        problems.append(_PREFIX_HELP)
    if not name:
        problems.append("name part must be non-empty")
    elif len(name) > 63:
        problems.append("name part must be no more than 63 characters")
    elif not _NAME_PART.match(name):
        problems.append(_NAME_PART_HELP)
    return [
        Cause("FieldValueInvalid", f"Invalid value: {_quote(key)}: {p}", field) for p in problems
    ]


def validate_metadata(metadata: dict[str, Any]) -> list[Cause]:
    """Labels, annotations and finalizers as kube-apiserver validates them."""
    causes: list[Cause] = []
    for what in ("labels", "annotations"):
        value = metadata.get(what)
        if value is None:
            continue
        field = f"metadata.{what}"
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            causes.append(
                Cause("FieldValueTypeInvalid", "must be a map of string to string", field)
            )
            continue
        for key, text in value.items():
            causes.extend(_qualified_name(key, field))
            if what == "labels":
                if len(text) > 63:
                    causes.append(
                        Cause(
                            "FieldValueInvalid",
                            f"Invalid value: {_quote(text)}: must be no more than 63 characters",
                            field,
                        )
                    )
                elif not _LABEL_VALUE.match(text):
                    causes.append(
                        Cause(
                            "FieldValueInvalid",
                            f"Invalid value: {_quote(text)}: {_LABEL_VALUE_HELP}",
                            field,
                        )
                    )
        if what == "annotations":
            size = sum(len(k) + len(v) for k, v in value.items())
            if size > MAX_ANNOTATIONS_BYTES:
                causes.append(
                    Cause(
                        "FieldValueTooLong",
                        f"Too long: must have at most {MAX_ANNOTATIONS_BYTES} bytes",
                        field,
                    )
                )
    finalizers = metadata.get("finalizers")
    if finalizers is not None and not (
        isinstance(finalizers, list) and all(isinstance(f, str) for f in finalizers)
    ):
        causes.append(
            Cause("FieldValueTypeInvalid", "must be a list of strings", "metadata.finalizers")
        )
    return causes


def immutable_uid(new: dict[str, Any], old: dict[str, Any]) -> list[Cause]:
    """An update may leave uid out (it is kept), but never change it."""
    uid = new.get("uid")
    if uid and uid != old.get("uid"):
        return [
            Cause(
                "FieldValueInvalid",
                f"Invalid value: {_quote(str(uid))}: field is immutable",
                "metadata.uid",
            )
        ]
    return []
