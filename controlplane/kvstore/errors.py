"""Domain errors of the kvstore layer; each keeps the gRPC error that caused it."""

from __future__ import annotations

import asyncio

import grpc

from controlplane.store_types import StoreError


class KvstoreError(StoreError):
    """Base of every error the kvstore layer raises."""

    def __init__(self, message: str, *, endpoint: str | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint


class Unreachable(KvstoreError):
    """No member answered (connection refused, reset or never established)."""


class Timeout(KvstoreError):
    """The request's deadline passed."""


class NoLeader(KvstoreError):
    """The member has no leader, so it cannot serve a linearizable request."""


class Compacted(KvstoreError):
    """The requested revision was compacted away."""

    def __init__(self, message: str, compact_revision: int, *, endpoint: str | None = None):
        super().__init__(message, endpoint=endpoint)
        self.compact_revision = compact_revision


class LeaseLost(KvstoreError):
    """The lease expired or was revoked; keys attached to it are gone."""


class PermissionDenied(KvstoreError):
    """Authentication failed or the user lacks a permission."""


class InvalidRequest(KvstoreError):
    """etcd rejected the request as malformed (a bug on our side, or a too-large value)."""


_AUTH_MARKERS = ("authentication failed", "user name is empty", "invalid auth token")
_NO_LEADER_MARKERS = ("no leader", "leader changed", "not capable", "raft: stopped")


def translate(exc: grpc.aio.AioRpcError, endpoint: str | None = None) -> KvstoreError:
    """Map a gRPC error to the kvstore's domain error, keeping the cause."""
    code = exc.code()
    details = exc.details() or ""
    where = f" ({endpoint})" if endpoint else ""
    error: KvstoreError
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        error = Timeout(f"etcd request timed out{where}", endpoint=endpoint)
    elif code == grpc.StatusCode.UNAVAILABLE and any(m in details for m in _NO_LEADER_MARKERS):
        error = NoLeader(f"etcd member has no leader{where}: {details}", endpoint=endpoint)
    elif code == grpc.StatusCode.UNAVAILABLE:
        error = Unreachable(f"etcd unreachable{where}: {_short(details)}", endpoint=endpoint)
    elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or (
        code == grpc.StatusCode.INVALID_ARGUMENT and any(m in details for m in _AUTH_MARKERS)
    ):
        error = PermissionDenied(f"etcd refused{where}: {details}", endpoint=endpoint)
    elif code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        error = Compacted(f"etcd: {details}", 0, endpoint=endpoint)
    elif code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        error = LeaseLost(f"etcd: {details}", endpoint=endpoint)
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        error = InvalidRequest(f"etcd rejected the request: {details}", endpoint=endpoint)
    elif code == grpc.StatusCode.CANCELLED:
        error = Unreachable(f"etcd request cancelled{where}: {details}", endpoint=endpoint)
    else:
        error = KvstoreError(f"etcd error{where}: {code.name}: {details}", endpoint=endpoint)
    error.__cause__ = exc
    return error


def _short(details: str) -> str:
    # gRPC's connection failures carry a long debug string; the first clause says enough.
    return details.split(";")[0].strip()[:200]


def channel_closed(name: str) -> Unreachable | None:
    """What a ``CancelledError`` from a grpc call means. grpc.aio cancels the calls and
    streams in flight on a channel that closes (a shard's connection replaced, a session
    ending under a request), which looks like our own cancellation. None when the current
    task is really being cancelled (re-raise it); else the Unreachable to raise instead,
    which every caller already retries or resumes."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return None
    return Unreachable(f"the connection to {name} was closed")
