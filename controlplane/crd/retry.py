"""Read-modify-write against the API server: retry a 409 with jittered backoff, bounded.

A write guarded by a resourceVersion that lost a race (409 Conflict) is re-read and
retried after a jittered, growing pause, at most :data:`ATTEMPTS` times; then it fails
with :class:`TooManyConflicts` (a :class:`StoreError`: the caller decides). An outage
(:class:`ApiUnreachable`) is never retried here: it propagates at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from controlplane.crd.errors import Conflict, CrdError

R = TypeVar("R")

ATTEMPTS = 10
BASE_DELAY = 0.005
MAX_DELAY = 0.5


class TooManyConflicts(CrdError):
    """The object kept changing under a guarded write; nothing more was written."""


async def backoff(attempt: int) -> None:
    """Full jitter: a pause in ``[0, min(MAX_DELAY, BASE_DELAY * 2**attempt))``."""
    await asyncio.sleep(random.uniform(0, min(MAX_DELAY, BASE_DELAY * 2**attempt)))


async def on_conflict(
    step: Callable[[], Awaitable[R]], what: str, *, attempts: int = ATTEMPTS
) -> R:
    """Run ``step`` (which reads, then writes guarded by what it read) until it does not
    raise :class:`Conflict`."""
    for attempt in range(attempts):
        try:
            return await step()
        except Conflict:
            if attempt == attempts - 1:
                break
            await backoff(attempt)
    raise TooManyConflicts(f"{what}: the object kept changing ({attempts} attempts)", status=409)
