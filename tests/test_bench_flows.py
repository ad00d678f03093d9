"""`cpctl bench flows` runs end to end on a small scale (real namespaces, programs, flow
server and GetFlows reader) and accounts for every event it generated."""

from __future__ import annotations

from controlplane.bench.flows import FlowBenchParams, run_flows_bench
from tests.helpers import kernel_tests_unmet, requires

pytestmark = requires(kernel_tests_unmet("ip", "taskset"))


async def test_bench_flows_small() -> None:
    lines: list[str] = []
    params = FlowBenchParams(seconds=0.5, rounds=1, rates=(2_000,))
    record = await run_flows_bench(params, lines.append)
    tp = record["throughput_bps"]
    assert all(tp[m]["median"] > 0 for m in ("off", "medium", "none"))
    assert set(record["throughput_ratio"]) == {"medium", "none"}
    (rate,) = record["event_rates"]
    assert rate["sent"] > 0 and rate["program_packets"] >= rate["sent"]
    # every packet the program saw was taken in by the server or counted lost in the kernel
    kernel_lost = rate["kernel_lost_ring_buffer"] + rate["kernel_lost_rate_limit"]
    assert rate["server_events"] + kernel_lost >= rate["program_packets"]
    # and the reader got each event or a lost-event record counting it
    assert rate["reader_flows"] + rate["reader_lost"] == rate["server_events"]
    assert any("throughput round 1" in line for line in lines)
