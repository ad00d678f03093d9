"""The tc programs' verdict counters (``cp_metrics``): packets and bytes by reason, summed
over CPUs. ``cpctl bpf metrics`` prints them and the agent exports them to Prometheus."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from controlplane.datapath.kernel import KernelMap
from controlplane.datapath.layouts import METRICS_MAP_NAME, MetricReason, decode_percpu_metrics


@dataclass(frozen=True, slots=True)
class VerdictCount:
    reason: str
    """``MetricReason`` in lower case (``drop_policy_deny``)."""
    verdict: str
    """``allow`` or ``drop``."""
    packets: int
    bytes: int


def verdict_counts(kmap: KernelMap) -> list[VerdictCount]:
    """Every reason the map has counted, in ``MetricReason`` order."""
    out: list[VerdictCount] = []
    for reason in MetricReason:
        values = kmap.lookup_percpu(int(reason).to_bytes(4, "little"))
        if values is None:
            continue
        total = decode_percpu_metrics(b"".join(values), len(values))
        verdict = "drop" if reason.name.startswith("DROP") else "allow"
        out.append(VerdictCount(reason.name.lower(), verdict, total.packets, total.bytes))
    return out


def pinned_verdict_counts(pin_dir: Path) -> list[VerdictCount] | None:
    """The counters of the map pinned under ``pin_dir``; None when it is not pinned (no
    program was loaded on this host yet). Raises ``KernelMapError`` or ``OSError``."""
    path = pin_dir / METRICS_MAP_NAME
    if not path.exists():
        return None
    with KernelMap.open_pinned(path) as kmap:
        return verdict_counts(kmap)
