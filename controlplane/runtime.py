"""Process-wide runtime settings of the daemons (and of the benchmarks that stand in for them)."""

from __future__ import annotations

import gc
from typing import Final

GC_THRESHOLDS: Final = (10_000, 10, 10)
"""Python's defaults (700, 10, 10) run the cyclic collector every 700 allocations; a
daemon decoding a cold sync allocates a few objects per stored key while it holds
hundreds of thousands of long-lived ones, and spent ~10-15% of that sync collecting."""


def tune_gc() -> None:
    """Collect less often, and never walk the objects that exist at startup again."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
