"""The identity benchmark runs end to end against a real etcd (structure only, no timing)."""

from __future__ import annotations

from statistics import median

from helpers import FAST

from controlplane.bench.identities import IdentityBenchParams, run_identity_bench
from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.shards import ShardMap


async def test_identity_bench_reports_both_sides(etcd1: EmbeddedEtcd) -> None:
    config = KvstoreConfig((EtcdClusterConfig("a", tuple(etcd1.client_urls)),), client=FAST)
    lines: list[str] = []
    params = IdentityBenchParams(allocators=(1, 4), count=20, labels=2, rounds=2)
    record = await run_identity_bench(config, params, lines.append)
    assert [r["allocators"] for r in record["results"]] == [1, 4]
    for row in record["results"]:
        for key in ("new_per_s", "raw_new_txn_per_s", "ref_per_s", "raw_ref_txn_per_s"):
            assert row[key] > 0
        rounds = row["rounds"]
        # the ratio comes from the unrounded medians, not from the rounded rates shown beside it
        for kind in ("new", "ref"):
            ours, raw = median(rounds[f"{kind}_ours"]), median(rounds[f"{kind}_raw"])
            assert row[f"{kind}_ratio"] == round(ours / raw, 3)
        assert len(row["rounds"]["new_ours"]) == 2
    assert sum(line.startswith("round ") for line in lines) == 4  # progress per round
    async with ShardMap(config) as shards:  # the run cleans up after itself
        assert await shards.backends["a"].count_prefix(b"cp/bench-identities/") == 0
        assert await shards.backends["a"].count_leases() == 0
