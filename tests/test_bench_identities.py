"""The identity benchmark runs end to end against a real etcd (structure only, no timing)."""

from __future__ import annotations

from statistics import median

import pytest
from helpers import FAST

from controlplane.bench.identities import IdentityBenchParams, run_identity_bench
from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.kvstore.backend import EtcdBackend
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


async def test_identity_bench_both_modes_side_by_side(etcd1: EmbeddedEtcd) -> None:
    config = KvstoreConfig((EtcdClusterConfig("a", tuple(etcd1.client_urls)),), client=FAST)
    lines: list[str] = []
    params = IdentityBenchParams(
        allocators=(1, 4), count=8, labels=2, rounds=2, stores=("kvstore", "crd")
    )
    record = await run_identity_bench(config, params, lines.append)
    assert [r["allocators"] for r in record["results"]] == [1, 4]  # kvstore, as before
    assert [r["allocators"] for r in record["crd_results"]] == [1, 4]
    for row in record["crd_results"]:
        for key in ("new_per_s", "raw_create_per_s", "ref_per_s", "raw_list_per_s"):
            assert row[key] > 0
        assert len(row["rounds"]["new_ours"]) == len(row["rounds"]["new_raw"]) == 2
        assert row["failures"] == []
    assert [r["allocators"] for r in record["crd_vs_kvstore"]] == [1, 4]
    for row, kv, crd in zip(
        record["crd_vs_kvstore"], record["results"], record["crd_results"], strict=True
    ):
        assert row["new_ratio"] == round(crd["new_per_s"] / kv["new_per_s"], 3)
    for store in ("kvstore", "crd"):  # progress per mode and round
        assert sum(line.startswith("round ") and f" {store} " in line for line in lines) == 4
    async with EtcdBackend(config.clusters[0], FAST) as backend:
        # the run cleans up after itself: the kvstore keys, and every Identity object
        assert await backend.count_prefix(b"cp/bench-identities/") == 0
        assert await backend.count_prefix(b"/registry/controlplane.io/identities/") == 0
        assert await backend.count_prefix(b"/registry/apiextensions.k8s.io/") > 0  # CRDs there


def test_identity_params_reject_unknown_store() -> None:
    with pytest.raises(ValueError, match="stores"):
        IdentityBenchParams(stores=("etcd",))
