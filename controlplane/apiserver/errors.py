"""Kubernetes `Status` errors: every failure the server reports is one of these.

A handler raises :class:`ApiError`; the server's middleware turns it into the `Status` body
and HTTP code kube-apiserver sends for the same failure. Nothing else reaches a client:
an unexpected exception becomes a 500 `InternalError` Status, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Cause:
    """One field-level reason of an Invalid (422) or BadRequest error."""

    reason: str
    message: str
    field: str = ""

    def to_json(self) -> dict[str, str]:
        out = {"reason": self.reason, "message": self.message}
        if self.field:
            out["field"] = self.field
        return out


@dataclass
class ApiError(Exception):
    """An error with the code, reason and details of kube-apiserver's Status."""

    code: int
    reason: str
    message: str
    name: str = ""
    group: str = ""
    kind: str = ""
    causes: list[Cause] = field(default_factory=list)
    retry_after: int = 0

    def __str__(self) -> str:
        return self.message

    def status(self) -> dict[str, Any]:
        return status_body(self)


def status_body(error: ApiError) -> dict[str, Any]:
    """The `Status` object of ``error`` (apiVersion v1, status Failure)."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": error.message,
        "reason": error.reason,
        "code": error.code,
    }
    details: dict[str, Any] = {}
    if error.name:
        details["name"] = error.name
    if error.group:
        details["group"] = error.group
    if error.kind:
        details["kind"] = error.kind
    if error.causes:
        details["causes"] = [c.to_json() for c in error.causes]
    if error.retry_after:
        details["retryAfterSeconds"] = error.retry_after
    if details:
        body["details"] = details
    return body


def success_status(name: str, group: str, kind: str, uid: str) -> dict[str, Any]:
    """What a DELETE of an object without finalizers returns for a custom resource."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "group": group, "kind": kind, "uid": uid},
    }


def qualified(plural: str, group: str) -> str:
    """``widgets.example.com``, or ``namespaces`` for the core group."""
    return f"{plural}.{group}" if group else plural


def not_found(plural: str, group: str, name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'{qualified(plural, group)} "{name}" not found', name, group, plural
    )


def already_exists(plural: str, group: str, name: str) -> ApiError:
    return ApiError(
        409,
        "AlreadyExists",
        f'{qualified(plural, group)} "{name}" already exists',
        name,
        group,
        plural,
    )


def conflict(plural: str, group: str, name: str, why: str = "") -> ApiError:
    why = why or (
        "the object has been modified; please apply your changes to the latest version "
        "and try again"
    )
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {qualified(plural, group)} "{name}": {why}',
        name,
        group,
        plural,
    )


def invalid(kind: str, group: str, name: str, causes: list[Cause]) -> ApiError:
    qualified_kind = f"{kind}.{group}" if group else kind
    parts = "; ".join(f"{c.field}: {c.message}" if c.field else c.message for c in causes)
    summary = f"[{parts}]" if len(causes) > 1 else parts
    return ApiError(
        422,
        "Invalid",
        f'{qualified_kind} "{name}" is invalid: {summary}',
        name,
        group,
        kind,
        causes,
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def method_not_allowed(
    message: str = "the server does not allow this method on the requested resource",
) -> ApiError:
    return ApiError(405, "MethodNotAllowed", message)


def expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def too_old(requested: int, oldest: int) -> ApiError:
    return expired(f"too old resource version: {requested} ({oldest})")


CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. "
    "You can start a new list without the continue parameter, or use the continue token "
    "in this response to retrieve the remainder of the results. Continuing with the "
    "provided token results in an inconsistent list - objects that were created, modified, "
    "or deleted between the time the first chunk was returned and now may show up in the list."
)


def too_large_resource_version(requested: int, current: int) -> ApiError:
    """A resourceVersion newer than the store (kube answers after waiting 3 s for it)."""
    return ApiError(
        504,
        "Timeout",
        f"Too large resource version: {requested}, current: {current}",
        causes=[Cause("ResourceVersionTooLarge", "Too large resource version")],
        retry_after=1,
    )


def unsupported_media(accepted: str) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        "the body of the request was in an unknown format - accepted media types include: "
        + accepted,
    )


def internal(message: str) -> ApiError:
    return ApiError(500, "InternalError", f"Internal error occurred: {message}")
