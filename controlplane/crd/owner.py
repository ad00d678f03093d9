"""Self-repair of the objects a node owns: what kvstore mode's KeyOwner does for keys.

A store that owns objects (this node's Endpoints, its Node, its IP leases in the Node's
status) keeps what it wants in memory and gives a :class:`Repairer` three things: a
list+watch of the objects it may own, a cheap test "does this object look as I want it",
and a ``reconcile(key)`` that re-reads the object and writes it back to what is wanted
(re-creating it when it was deleted, e.g. by ``kubectl delete``). Every event that
contradicts the wanted state, and every owned key after each (re-)list, is queued; one
worker drains the queue, key by key, and retries a key whose reconcile failed (the API
server is down) after a jittered pause. Reconciles never run inline with a watch event.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Collection

from controlplane.crd.client import JSON
from controlplane.crd.listwatch import EventType, KubeEvent, KubeListWatcher
from controlplane.store_types import StoreError

log = logging.getLogger(__name__)

RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 10.0


class Repairer:
    """Queues owned keys whose objects differ from what is wanted and reconciles them."""

    def __init__(
        self,
        what: str,
        watcher: Callable[[], KubeListWatcher],
        owned: Callable[[], Collection[str]],
        looks_right: Callable[[str, JSON], bool],
        reconcile: Callable[[str], Awaitable[None]],
        *,
        observe: Callable[[KubeEvent], None] | None = None,
    ) -> None:
        self.what = what
        self._watcher = watcher
        self._owned = owned
        self._looks_right = looks_right
        self._reconcile = reconcile
        self._observe = observe
        """Sees every event of the watch first (a store's read cache rides on it)."""
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self.synced = asyncio.Event()
        """Set once the first list has been checked."""

    def touch(self, key: str) -> None:
        self._dirty.add(key)
        self._wake.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch(), name=f"repair-watch:{self.what}")
            group.create_task(self._work(), name=f"repair:{self.what}")

    async def _watch(self) -> None:
        seen: set[str] = set()
        async for batch in self._watcher().batches():
            for event in batch:
                if self._observe is not None:
                    self._observe(event)
                if event.type is EventType.LIST_DONE:
                    for key in self._owned():
                        if key not in seen:
                            self.touch(key)
                    self.synced.set()
                    continue
                owned = event.key in self._owned()
                if event.type is EventType.DELETE:
                    seen.discard(event.key)
                    if owned:
                        self.touch(event.key)
                    continue
                seen.add(event.key)
                if (
                    owned
                    and event.object is not None
                    and not self._looks_right(event.key, event.object)
                ):
                    self.touch(event.key)

    async def _work(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            keys, self._dirty = self._dirty, set()
            failed = False
            for key in sorted(keys):
                try:
                    await self._reconcile(key)
                except StoreError as exc:
                    log.warning("repairing %s %s failed (%s); will retry", self.what, key, exc)
                    self._dirty.add(key)
                    failed = True
                except Exception:
                    # A bug or an object nobody foresaw must not end the repairs of the
                    # rest (bad input never crashes a daemon): say so loudly, retry later.
                    log.exception("repairing %s %s failed; will retry", self.what, key)
                    self._dirty.add(key)
                    failed = True
            if failed:
                # Jittered and growing while the failures go on (an outage, a namespace
                # that does not exist yet), so a stuck key costs a line a while, not a flood.
                failures += 1
                delay = min(MAX_RETRY_DELAY, RETRY_DELAY * 2 ** min(failures - 1, 8))
                await asyncio.sleep(random.uniform(0.5, 1.0) * delay)
                self._wake.set()
            else:
                failures = 0
