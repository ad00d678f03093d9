"""Network policies in kvstore mode: ``cp/state/policies/v1/<namespace>/<name>``.

Values are ``policy`` envelopes of :meth:`NetworkPolicy.to_dict`; the key's namespace and
name must match the value's. Policies are cluster-wide configuration written by tools
(``cpctl policy put``) and read by every agent; they are not a sharded resource kind yet,
so they live on the **first configured cluster** (``shards.all()[0]``), which every
agent connects to. Never leased.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.records import Decoder, RecordCodec
from controlplane.kvstore.shards import ShardMap
from controlplane.kvstore.types import EventType
from controlplane.kvstore.watch import ListWatcher
from controlplane.metrics import StoreMetrics
from controlplane.model import InvalidRecord, NetworkPolicy
from controlplane.store_types import EventKind, StoreEvent, Versioned

__all__ = ["POLICY_KIND", "POLICY_RESOURCE", "KvPolicyStore"]

T = TypeVar("T")

POLICY_KIND = "policy"
"""The envelope kind of policy values."""
POLICY_RESOURCE = "policy"
"""The ``resource`` label of the malformed-values metric."""


class _PolicyCodec(RecordCodec):
    """Names are ``namespace/name`` (two key levels)."""

    def decode(self, key: bytes, prefix: bytes, raw: bytes, build: Decoder[T]) -> T | None:
        try:
            name = key[len(prefix) :].decode("utf-8")
            parts = name.split("/")
            if not key.startswith(prefix) or len(parts) != 2 or not all(parts):
                raise ValueError("not a well-formed policy key (want <namespace>/<name>)")
            return build(name, raw)
        except (ValueError, UnicodeDecodeError) as exc:  # DecodeError, ModelError: ValueErrors
            self.skip(key, exc)
            return None


class KvPolicyStore:
    """The kvstore :class:`~controlplane.store.PolicyStore`."""

    def __init__(self, shards: ShardMap, layout: KeyLayout, metrics: StoreMetrics) -> None:
        self.shards = shards
        self.layout = layout
        self.prefix = layout.policy_prefix
        self.codec = _PolicyCodec(POLICY_RESOURCE, POLICY_KIND, metrics)

    @property
    def backend(self) -> EtcdBackend:
        return self.shards.all()[0]

    async def put(self, policy: NetworkPolicy) -> None:
        key = self.layout.policy(policy.namespace, policy.name)
        await self.backend.put(key, self.codec.encode(policy.to_dict()))

    async def delete(self, namespace: str, name: str) -> bool:
        return await self.backend.delete(self.layout.policy(namespace, name)) > 0

    async def list(self) -> list[Versioned[NetworkPolicy]]:
        result = await self.backend.list_prefix(self.prefix)
        return self.codec.decode_all(list(result.kvs), self.prefix, self._build)

    async def watch(self) -> AsyncIterator[StoreEvent[NetworkPolicy]]:
        last: dict[bytes, NetworkPolicy] = {}
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

    def _build(self, name: str, raw: bytes) -> NetworkPolicy:
        policy = NetworkPolicy.from_dict(self.codec.payload(raw))
        if policy.id != name:
            raise InvalidRecord(f"policy at key {name} is {policy.id}")
        return policy
