"""A node's identity allocator: local reference counts over the store's atomic acquire.

Many endpoints on a node share one identity; the node holds one reference in the store
(one value key) no matter how many local users it has, and drops it when the last one
goes. Reserved identities never touch the store. Store-agnostic: works over any
:class:`controlplane.store.IdentityStore`.
"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.keyedlocks import KeyedLocks
from controlplane.model import Identity, Labels
from controlplane.store import IdentityStore


@dataclass(slots=True)
class _Ref:
    identity: Identity
    count: int


class IdentityAllocator:
    def __init__(self, store: IdentityStore) -> None:
        self.store = store
        self._refs: dict[Labels, _Ref] = {}
        self._lock: KeyedLocks[Labels] = KeyedLocks()

    async def acquire(self, labels: Labels) -> Identity:
        """The identity for ``labels``, counting one more local user."""
        async with self._lock(labels):
            ref = self._refs.get(labels)
            if ref is None:
                ref = _Ref(await self.store.acquire(labels), 0)
                self._refs[labels] = ref
            ref.count += 1
            return ref.identity

    async def release(self, labels: Labels) -> bool:
        """One local user fewer; the store reference goes with the last. False if unknown."""
        async with self._lock(labels):
            ref = self._refs.get(labels)
            if ref is None:
                return False
            ref.count -= 1
            if ref.count == 0:
                del self._refs[labels]
                await self.store.release(ref.identity)
            return True

    def identity_changed(self, old: Identity, new: Identity) -> None:
        """The store re-created our reference under a new ID (after a lease loss)."""
        ref = self._refs.get(old.labels)
        if ref is not None and ref.identity == old:
            ref.identity = new

    def held(self) -> dict[Labels, tuple[Identity, int]]:
        """Identities this node holds, with their local user counts."""
        return {labels: (ref.identity, ref.count) for labels, ref in self._refs.items()}
