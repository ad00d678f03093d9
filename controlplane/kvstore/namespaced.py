"""Cluster-wide, namespaced configuration in kvstore mode: ``<prefix><namespace>/<name>``.

Network policies and services are written by tools (``cpctl policy put``, ``cpctl
service put``) and read by every agent. They are not a sharded resource kind yet, so
they live on the **first configured cluster** (``shards.all()[0]``), which every agent
connects to; they are never leased. Each value is an envelope of the resource's kind
whose payload's ``namespace``/``name`` must match the key's: a key or value that does not
is logged, counted in ``cp_store_malformed_values_total`` and skipped, never raised.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, Protocol, TypeVar

from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.records import Decoder, RecordCodec
from controlplane.kvstore.shards import ShardMap
from controlplane.kvstore.types import EventType
from controlplane.kvstore.watch import ListWatcher
from controlplane.model import InvalidRecord
from controlplane.store_types import EventKind, StoreEvent, Versioned

__all__ = ["Namespaced", "NamespacedStore"]

T = TypeVar("T")


class Namespaced(Protocol):
    """A model object named ``namespace/name`` that round-trips through a dict."""

    @property
    def namespace(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def id(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


N = TypeVar("N", bound=Namespaced)


class _NamespacedCodec(RecordCodec):
    """Names are ``namespace/name`` (two key levels)."""

    def decode(self, key: bytes, prefix: bytes, raw: bytes, build: Decoder[T]) -> T | None:
        try:
            name = key[len(prefix) :].decode("utf-8")
            parts = name.split("/")
            if not key.startswith(prefix) or len(parts) != 2 or not all(parts):
                raise ValueError(f"not a well-formed {self.resource} key (want <namespace>/<name>)")
            return build(name, raw)
        except (ValueError, UnicodeDecodeError) as exc:  # DecodeError, ModelError: ValueErrors
            self.skip(key, exc)
            return None


class NamespacedStore(Generic[N]):
    """put / delete / list / watch of one namespaced resource on the first cluster."""

    def __init__(
        self,
        shards: ShardMap,
        prefix: bytes,
        key: Callable[[str, str], bytes],
        codec: RecordCodec,
        from_dict: Callable[[object], N],
    ) -> None:
        self.shards = shards
        self.prefix = prefix
        self._key = key
        self.codec = _NamespacedCodec(codec.resource, codec.kind, codec.metrics)
        self._from_dict = from_dict

    @property
    def backend(self) -> EtcdBackend:
        return self.shards.all()[0]

    async def put(self, obj: N) -> None:
        await self.backend.put(self._key(obj.namespace, obj.name), self.codec.encode(obj.to_dict()))

    async def delete(self, namespace: str, name: str) -> bool:
        return await self.backend.delete(self._key(namespace, name)) > 0

    async def list(self) -> list[Versioned[N]]:
        result = await self.backend.list_prefix(self.prefix)
        return self.codec.decode_all(list(result.kvs), self.prefix, self._build)

    async def watch(self) -> AsyncIterator[StoreEvent[N]]:
        """List-then-watch; events named ``namespace/name``; SYNCED once listed."""
        last: dict[bytes, N] = {}
        synced = False
        async for event in ListWatcher(self.backend, self.prefix).events():
            if event.type is EventType.LIST_DONE:
                if not synced:
                    synced = True
                    yield StoreEvent(EventKind.SYNCED, "", None, event.revision)
                continue
            name = event.key[len(self.prefix) :].decode("utf-8", errors="replace")
            value = None
            if event.type is not EventType.DELETE:
                value = self.codec.decode(event.key, self.prefix, event.value, self._build)
            if value is None:
                previous = last.pop(event.key, None)
                if event.type is EventType.DELETE or previous is not None:
                    yield StoreEvent(EventKind.DELETE, name, previous, event.revision)
                continue
            last[event.key] = value
            yield StoreEvent(EventKind.UPSERT, name, value, event.revision)

    def _build(self, name: str, raw: bytes) -> N:
        obj = self._from_dict(self.codec.payload(raw))
        if obj.id != name:
            raise InvalidRecord(f"{self.codec.resource} at key {name} is {obj.id}")
        return obj
