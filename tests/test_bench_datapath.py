"""The datapath benchmark runs end to end against a real etcd (structure only, no timing)."""

from __future__ import annotations

from helpers import FAST

from controlplane.bench.datapath import DatapathBenchParams, run_datapath_bench
from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.shards import ShardMap


async def test_datapath_bench_reports_both_sides(etcd1: EmbeddedEtcd) -> None:
    config = KvstoreConfig((EtcdClusterConfig("a", tuple(etcd1.client_urls)),), client=FAST)
    lines: list[str] = []
    params = DatapathBenchParams(count=500, rounds=2, updates=20, rate=200.0)
    record = await run_datapath_bench(config, params, lines.append)
    assert record["etcd_version"]
    assert record["datapath"] in ("kernel", "userspace")
    sync = record["cold_sync"]
    assert sync["entries"] == 500 and sync["page_size"] == 10_000
    for side in ("bare_entries_per_s", "ours_entries_per_s", "watch_path_entries_per_s"):
        assert sync[side]["median"] > 0
        assert len(sync[side]["rounds"]) == 2
    assert sync["ratio"] > 0 and len(sync["round_ratios"]) == 2
    assert len(sync["ours_phases_s"]) == 2
    assert sync["watch_path_ratio"] > 0 and len(sync["watch_path_round_ratios"]) == 2
    assert sync["watch_state_bytes_per_endpoint"] > 0
    lat = record["watch_latency"]
    assert lat["updates"] == 20
    for key in ("p50_ms", "p99_ms", "max_ms"):
        assert lat[key] > 0
    assert lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    rtt = lat["put_rtt"]
    assert 0 < rtt["p50_ms"] <= rtt["p99_ms"] <= rtt["max_ms"]
    assert sum(line.startswith("round ") for line in lines) == 6  # A, B and C per round
    async with ShardMap(config) as shards:  # the run cleans up after itself
        assert await shards.backends["a"].count_prefix(b"cp/bench-datapath/") == 0
