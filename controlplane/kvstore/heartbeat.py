"""The heartbeat record the operator leader writes on every shard."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controlplane import codec

KIND = "heartbeat"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    ts: float
    """Writer's wall-clock time (informational: monitors judge age by local receive time)."""
    seq: int
    """Increases with every beat of one writer."""
    writer: str
    """Identity of the operator replica that wrote it."""
    interval: float
    """Seconds between beats; stale after twice this."""

    def encode(self) -> bytes:
        return codec.encode(
            KIND, {"ts": self.ts, "seq": self.seq, "writer": self.writer, "interval": self.interval}
        )

    @classmethod
    def decode(cls, raw: bytes) -> Heartbeat:
        data: Any = codec.decode(KIND, raw)
        try:
            ts, seq, writer, interval = data["ts"], data["seq"], data["writer"], data["interval"]
        except (TypeError, KeyError) as exc:
            raise codec.DecodeError(f"heartbeat: missing field {exc}") from exc
        if (
            not isinstance(ts, int | float)
            or not isinstance(interval, int | float)
            or interval <= 0
        ):
            raise codec.DecodeError("heartbeat: ts and interval must be positive numbers")
        if not isinstance(seq, int) or not isinstance(writer, str):
            raise codec.DecodeError("heartbeat: seq must be an int and writer a string")
        return cls(float(ts), seq, writer, float(interval))
