"""What a kvstore benchmark run measures: the two sides, the operations and
:class:`BenchParams` (concurrency, rounds, slices, how long each measurement lasts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Side = Literal["ours", "bare"]
SIDES: tuple[Side, Side] = ("ours", "bare")
THROUGHPUT_OPS: tuple[str, ...] = ("put", "get", "txn")
OPERATIONS: tuple[str, ...] = (*THROUGHPUT_OPS, "watch")


@dataclass(frozen=True, slots=True)
class BenchParams:
    concurrency: tuple[int, ...] = (1, 32)
    rounds: int = 6
    duration: float | None = 1.0
    """Seconds per measurement (one operation, one concurrency, one side, one round)."""
    ops: int | None = None
    """Operations per measurement instead of a duration."""
    slices: int = 4
    """Each measurement is split into this many turns per side, alternating the sides."""
    watch_events: int = 200
    """Watch-latency samples per side per round."""
    value_size: int = 100
    get_keys: int = 1000
    """Keys seeded per round for the get measurement (both sides read the same keys)."""
    operations: tuple[str, ...] = OPERATIONS
    prefix: str = "cp/"
    """The run's keys live under ``<prefix>bench/<run id>/``."""
    delete_each_round: bool = False
    """Delete a round's keys (in small chunks) once it is done, not only at the end."""
    cleanup: bool = True
    timeout: float = 10.0
    """Longest wait for one watch event before the run fails."""

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency levels must be positive")
        if min(self.rounds, self.watch_events, self.get_keys, self.slices) < 1:
            raise ValueError("rounds, slices, watch_events and get_keys must be positive")
        if (self.duration is None) == (self.ops is None):
            raise ValueError("give exactly one of duration and ops")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be positive")
        if self.ops is not None and self.ops < 1:
            raise ValueError("ops must be positive")
        unknown = set(self.operations) - set(OPERATIONS)
        if unknown or not self.operations:
            raise ValueError(f"operations must be some of {', '.join(OPERATIONS)}")
