"""The kvstore benchmark's results: measurements, the throughput and latency rows with their
medians and ratios, :class:`BenchResult` and its JSON record, and the progress lines a run
prints (its header, one line per round)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from controlplane.bench.kvstore.params import SIDES, THROUGHPUT_OPS, BenchParams, Side
from controlplane.stats import percentile


@dataclass(frozen=True, slots=True)
class Measurement:
    """One side's run of one operation at one concurrency in one round."""

    ops: int
    seconds: float
    cpu_seconds: float = 0.0
    """CPU time this process (the client, including gRPC's threads) spent meanwhile."""

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_per_op(self) -> float:
        return self.cpu_seconds / self.ops if self.ops else 0.0

    def __add__(self, other: Measurement) -> Measurement:
        return Measurement(
            self.ops + other.ops,
            self.seconds + other.seconds,
            self.cpu_seconds + other.cpu_seconds,
        )


@dataclass(slots=True)
class ThroughputRow:
    operation: str
    concurrency: int
    ours: list[Measurement] = field(default_factory=list)
    bare: list[Measurement] = field(default_factory=list)

    def rates(self, side: Side) -> list[float]:
        return [m.rate for m in (self.ours if side == "ours" else self.bare)]

    def median(self, side: Side) -> float:
        rates = self.rates(side)
        return statistics.median(rates) if rates else 0.0

    def cpu_per_op(self, side: Side) -> float:
        """Median client CPU seconds per operation over the rounds."""
        values = [m.cpu_per_op for m in (self.ours if side == "ours" else self.bare)]
        return statistics.median(values) if values else 0.0

    @property
    def ratio(self) -> float:
        bare = self.median("bare")
        return self.median("ours") / bare if bare > 0 else 0.0

    @property
    def round_ratios(self) -> list[float]:
        return [o / b for o, b in zip(self.rates("ours"), self.rates("bare"), strict=False) if b]

    def to_json(self) -> dict[str, Any]:
        ratios = self.round_ratios
        return {
            "operation": self.operation,
            "concurrency": self.concurrency,
            "ours_ops_per_s": round(self.median("ours"), 1),
            "bare_ops_per_s": round(self.median("bare"), 1),
            "ratio": round(self.ratio, 4),
            "round_ratio_min": round(min(ratios), 4) if ratios else None,
            "round_ratio_max": round(max(ratios), 4) if ratios else None,
            "ours_client_cpu_us_per_op": round(self.cpu_per_op("ours") * 1e6, 1),
            "bare_client_cpu_us_per_op": round(self.cpu_per_op("bare") * 1e6, 1),
            "rounds": {
                side: [
                    {
                        "ops": m.ops,
                        "seconds": round(m.seconds, 4),
                        "ops_per_s": round(m.rate, 1),
                        "client_cpu_us_per_op": round(m.cpu_per_op * 1e6, 1),
                    }
                    for m in (self.ours if side == "ours" else self.bare)
                ]
                for side in SIDES
            },
        }


@dataclass(slots=True)
class LatencyRow:
    """Watch latency: from just before a put is sent to the watcher yielding its event."""

    operation: str = "watch"
    concurrency: int = 1
    ours: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    ours_rounds: list[float] = field(default_factory=list)
    """p50 of each round, ours."""
    bare_rounds: list[float] = field(default_factory=list)
    ours_rounds_p99: list[float] = field(default_factory=list)
    bare_rounds_p99: list[float] = field(default_factory=list)

    def samples(self, side: Side) -> list[float]:
        return self.ours if side == "ours" else self.bare

    def p(self, side: Side, q: float) -> float:
        return percentile(self.samples(side), q)

    def ratio(self, q: float) -> float:
        bare = self.p("bare", q)
        return self.p("ours", q) / bare if bare > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        def stats(side: Side) -> dict[str, Any]:
            samples = self.samples(side)
            return {
                "count": len(samples),
                "p50_ms": round(self.p(side, 50) * 1000, 3),
                "p99_ms": round(self.p(side, 99) * 1000, 3),
                "mean_ms": round(statistics.fmean(samples) * 1000, 3) if samples else None,
                "max_ms": round(max(samples) * 1000, 3) if samples else None,
                "round_p50_ms": [
                    round(v * 1000, 3)
                    for v in (self.ours_rounds if side == "ours" else self.bare_rounds)
                ],
                "round_p99_ms": [
                    round(v * 1000, 3)
                    for v in (self.ours_rounds_p99 if side == "ours" else self.bare_rounds_p99)
                ],
            }

        return {
            "operation": self.operation,
            "concurrency": self.concurrency,
            "ours": stats("ours"),
            "bare": stats("bare"),
            "ratio_p50": round(self.ratio(50), 4),
            "ratio_p99": round(self.ratio(99), 4),
        }


@dataclass(slots=True)
class BenchResult:
    params: BenchParams
    environment: dict[str, Any]
    run_prefix: str
    started_at: str
    finished_at: str = ""
    seconds: float = 0.0
    throughput: list[ThroughputRow] = field(default_factory=list)
    latency: list[LatencyRow] = field(default_factory=list)
    keys_deleted: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        params = asdict(self.params)
        params["concurrency"] = list(self.params.concurrency)
        params["operations"] = list(self.params.operations)
        return {
            "benchmark": "kvstore",
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "seconds": round(self.seconds, 2),
            "environment": self.environment,
            "parameters": params,
            "run_prefix": self.run_prefix,
            "sides": {
                "ours": "controlplane EtcdBackend (ListWatcher for watches)",
                "bare": "aetcd.Client(host, port) methods (watch_prefix for watches)",
            },
            "throughput": [row.to_json() for row in self.throughput],
            "latency": [row.to_json() for row in self.latency],
            "keys_deleted": self.keys_deleted,
            "notes": self.notes,
        }


def _header(result: BenchResult, params: BenchParams) -> str:
    env = result.environment
    per = f"{params.duration:g}s" if params.duration is not None else f"{params.ops} ops"
    ops = ",".join(o for o in THROUGHPUT_OPS if o in params.operations)
    watch = f" + watch x{params.watch_events}" if "watch" in params.operations else ""
    levels = ",".join(str(c) for c in params.concurrency)
    return (
        f"bench kvstore: etcd {env['etcd_version']}, {env['etcd_members']} member(s), "
        f"via {env['endpoint']}; {params.rounds} rounds of {{{ops}}} @ concurrency {levels}, "
        f"{per} each, per side{watch}; ours=EtcdBackend, bare=aetcd.Client, one connection "
        "per side"
    )


def _round_line(
    r: int, rounds: int, order: tuple[Side, Side], result: BenchResult, seconds: float
) -> str:
    parts = []
    for row in result.throughput:
        ours, bare = row.ours[-1].rate, row.bare[-1].rate
        parts.append(f"{row.operation}@{row.concurrency} {ours / bare if bare else 0:.2f}")
    for lat in result.latency:
        ours_p50, bare_p50 = lat.ours_rounds[-1], lat.bare_rounds[-1]
        parts.append(f"watch-p50 {ours_p50 / bare_p50 if bare_p50 else 0:.2f}")
    return f"round {r}/{rounds} ({order[0]} first, {seconds:.1f}s) ours/bare: " + "  ".join(parts)
