"""The CRD store's errors: a Kubernetes API answer or a failed connection, as one type.

Every error derives from :class:`~controlplane.store_types.StoreError`, so code above the
store seam handles an API server outage exactly as a kvstore one. ``retryable`` says
whether the same request may succeed later unchanged (an outage, a timeout, 429, 5xx)
rather than needing a fresh read (409) or never (400, 403, 404, 422).
"""

from __future__ import annotations

from typing import Any

from controlplane.store_types import StoreError


class CrdError(StoreError):
    """A request to the Kubernetes API failed."""

    retryable = False

    def __init__(self, message: str, *, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class ApiUnreachable(CrdError):
    """No answer: the connection failed or timed out, or the server is overloaded (429, 5xx)."""

    retryable = True


class NotFound(CrdError):
    """404: the object (or its namespace, or the resource) does not exist."""


class AlreadyExists(CrdError):
    """409 AlreadyExists: a create found the name taken."""


class Conflict(CrdError):
    """409 Conflict: the object changed since it was read (resourceVersion or uid precondition)."""


class Expired(CrdError):
    """410 Gone/Expired: the resourceVersion asked for is compacted; re-list."""


class Invalid(CrdError):
    """400 or 422: the request or the object was refused as malformed."""


class Forbidden(CrdError):
    """401 or 403: the credentials do not allow this."""


def from_response(status: int, body: Any, what: str) -> CrdError:
    """The error for a non-2xx answer with its (decoded, maybe not Status) body."""
    message = ""
    reason = ""
    if isinstance(body, dict):
        message = str(body.get("message") or "")
        reason = str(body.get("reason") or "")
    text = f"{what}: {status} {reason or 'error'}" + (f": {message}" if message else "")
    if status == 404:
        return NotFound(text, status=status, reason=reason)
    if status == 409:
        cls: type[CrdError] = AlreadyExists if reason == "AlreadyExists" else Conflict
        return cls(text, status=status, reason=reason)
    if status == 410:
        return Expired(text, status=status, reason=reason)
    if status in (400, 422):
        return Invalid(text, status=status, reason=reason)
    if status in (401, 403):
        return Forbidden(text, status=status, reason=reason)
    if status == 429 or status >= 500:
        return ApiUnreachable(text, status=status, reason=reason)
    return CrdError(text, status=status, reason=reason)
