"""Objects in etcd: one JSON value per object, at ``<resource prefix>[<ns>/]<name>``.

The stored JSON never carries ``metadata.resourceVersion``: on every read it is set from
the key's etcd mod revision, and a list's from the revision it was read at, as
kube-apiserver does. Writes are transactions guarded by the key's mod revision (or its
absence), so two writers can never both succeed from the same read: the loser gets
:class:`WriteConflict`. A paginated list reads every page at the first page's revision; a
continue token whose revision etcd has compacted is refused (410), never served stale.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import msgspec

from controlplane.apiserver.errors import CONTINUE_EXPIRED, bad_request, expired
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.errors import Compacted
from controlplane.kvstore.types import Delete, KeyValue, Put, absent, mod_revision_is

Obj = dict[str, Any]


class WriteConflict(Exception):
    """The key changed (or appeared, or vanished) since the caller read it."""


to_json = msgspec.json.encode
"""Compact JSON bytes (msgspec: several times faster than the json module)."""
JSONError = msgspec.DecodeError


def from_json(raw: bytes) -> Any:
    return msgspec.json.decode(raw)


def encode(obj: Obj) -> bytes:
    metadata = obj.get("metadata") or {}
    if "resourceVersion" in metadata:
        obj = {**obj, "metadata": {k: v for k, v in metadata.items() if k != "resourceVersion"}}
    return to_json(obj)


def decode(value: bytes, revision: int) -> Obj:
    obj: Obj = msgspec.json.decode(value)
    obj.setdefault("metadata", {})["resourceVersion"] = str(revision)
    return obj


def from_kv(kv: KeyValue) -> Obj:
    return decode(kv.value, kv.mod_revision)


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Obj]
    revision: int
    continue_token: str
    remaining: int | None


def _continue_token(revision: int, start: str) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": revision, "start": start}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _parse_continue(token: str) -> tuple[int, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        revision, start = int(data["rv"]), str(data["start"])
    except (ValueError, KeyError, TypeError) as exc:
        raise bad_request(f"continue key is not valid: {exc}") from None
    if revision <= 0:
        raise bad_request("continue key is not valid: incorrect encoded start resourceVersion")
    return revision, start


class ObjectStorage:
    """Reads and guarded writes of JSON objects in one etcd cluster."""

    def __init__(self, backend: EtcdBackend) -> None:
        self.backend = backend

    async def get(self, key: str) -> Obj | None:
        kv = await self.backend.get(key.encode())
        return from_kv(kv) if kv is not None else None

    async def create(self, key: str, obj: Obj) -> Obj:
        """Write a new object; :class:`WriteConflict` when the key exists."""
        result = await self.backend.txn([absent(key.encode())], [Put(key.encode(), encode(obj))])
        if not result.succeeded:
            raise WriteConflict(key)
        return _with_revision(obj, result.revision)

    async def update(self, key: str, obj: Obj, expected: int) -> Obj:
        """Replace the object last written at revision ``expected``."""
        result = await self.backend.txn(
            [mod_revision_is(key.encode(), expected)], [Put(key.encode(), encode(obj))]
        )
        if not result.succeeded:
            raise WriteConflict(key)
        return _with_revision(obj, result.revision)

    async def delete(self, key: str, expected: int) -> int:
        """Delete the object last written at ``expected``; returns the deleting revision."""
        result = await self.backend.txn(
            [mod_revision_is(key.encode(), expected)], [Delete(key.encode())]
        )
        if not result.succeeded:
            raise WriteConflict(key)
        return result.revision

    async def delete_prefix(self, prefix: str) -> None:
        await self.backend.delete(prefix.encode(), prefix=True)

    async def list(
        self, prefix: str, *, limit: int = 0, token: str = "", revision: int = 0
    ) -> Page:
        """One page under ``prefix``: at ``revision`` (0 = now), or where ``token`` left off."""
        start = prefix
        if token:
            revision, rest = _parse_continue(token)
            start = prefix + rest
        items: list[Obj] = []
        try:
            if limit <= 0:
                async for page, read_at in self.backend.iter_prefix(
                    prefix.encode(), revision=revision
                ):
                    revision = read_at
                    items.extend(from_kv(kv) for kv in page if kv.key >= start.encode())
                if not revision:
                    revision = await self.backend.current_revision()
                return Page(items, revision, "", None)
            kvs, read_at, more = await self.backend.list_page(
                prefix.encode(), start=start.encode(), limit=limit, revision=revision
            )
        except Compacted:
            if token:
                raise expired(CONTINUE_EXPIRED) from None
            raise expired(
                f"The resourceVersion for the provided list is too old. ({revision})"
            ) from None
        revision = revision or read_at
        items = [from_kv(kv) for kv in kvs]
        next_token = ""
        remaining: int | None = None
        if more and kvs:
            after = kvs[-1].key.decode()[len(prefix) :] + "\x00"
            next_token = _continue_token(revision, after)
        return Page(items, revision, next_token, remaining)

    async def revision_kept(self, revision: int) -> bool:
        """Whether etcd still holds history at ``revision`` (False once compacted)."""
        try:
            await self.backend.list_page(b"/registry/\xff", limit=1, revision=revision)
        except Compacted:
            return False
        return True


def _with_revision(obj: Obj, revision: int) -> Obj:
    metadata = dict(obj.get("metadata") or {})
    metadata["resourceVersion"] = str(revision)
    return {**obj, "metadata": metadata}
