"""The wake-and-flush loop of the agent's map writers (policy, services)."""

from __future__ import annotations

import asyncio

RETRY_AFTER = 1.0
"""Seconds before a flush whose map write failed is tried again."""


class Flusher:
    """Recomputes and writes its maps when woken: at once when idle; changes that arrive
    during a flush form the next batch. Subclasses implement :meth:`flush`."""

    def __init__(self) -> None:
        self._wake = asyncio.Event()

    def changed(self) -> None:
        """An input changed: flush soon."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(0)
            self._wake.clear()
            if self.flush() is None:  # a map write failed: retry after a pause
                await asyncio.sleep(RETRY_AFTER)
                self._wake.set()

    def flush(self) -> bool | None:
        """Write the differences: True when written, False when the inputs are not known
        yet (nothing written), None when a map write failed."""
        raise NotImplementedError
