"""The kvstore benchmark, run briefly against a real etcd: structure only, no timing claims."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controlplane.bench.common import delete_in_chunks
from controlplane.bench.kvstore import BenchParams, run_kvstore_bench
from controlplane.cli.main import main
from controlplane.config import ClientSettings, EtcdClusterConfig
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.stats import percentile

TINY = BenchParams(concurrency=(1, 4), rounds=2, duration=None, ops=12, watch_events=3, get_keys=8)


async def test_bench_measures_both_sides(etcd1: EmbeddedEtcd) -> None:
    cluster = EtcdClusterConfig("bench", tuple(etcd1.client_urls))
    lines: list[str] = []
    result = await run_kvstore_bench(cluster, TINY, ClientSettings(), progress=lines.append)

    assert len([line for line in lines if line.startswith("round ")]) == TINY.rounds
    assert [(row.operation, row.concurrency) for row in result.throughput] == [
        (op, c) for op in ("put", "get", "txn") for c in (1, 4)
    ]
    for row in result.throughput:
        assert len(row.ours) == len(row.bare) == TINY.rounds
        assert all(m.ops == TINY.ops for m in row.ours + row.bare)
        assert row.median("ours") > 0 and row.median("bare") > 0
        assert row.ratio > 0
    (watch,) = result.latency
    assert len(watch.ours) == len(watch.bare) == TINY.rounds * TINY.watch_events
    assert watch.p("ours", 50) > 0 and watch.p("bare", 99) > 0 and watch.ratio(50) > 0

    record = json.loads(json.dumps(result.to_json()))
    assert record["environment"]["etcd_version"].startswith("3.")
    assert record["environment"]["etcd_members"] == 1
    assert record["environment"]["aetcd"] and record["environment"]["python"]
    assert record["parameters"]["ops"] == TINY.ops
    for row in record["throughput"]:
        assert row["ours_ops_per_s"] > 0 and row["bare_ops_per_s"] > 0 and row["ratio"] > 0
    assert record["latency"][0]["ours"]["p50_ms"] > 0
    assert record["latency"][0]["bare"]["p99_ms"] > 0

    # Every key of the run was deleted at the end.
    assert result.keys_deleted > 0
    async with EtcdBackend(cluster) as backend:
        assert await backend.count_prefix(result.run_prefix.encode()) == 0


async def test_bench_with_durations_and_only_some_operations(etcd1: EmbeddedEtcd) -> None:
    cluster = EtcdClusterConfig("bench", tuple(etcd1.client_urls))
    params = BenchParams(
        concurrency=(2,), rounds=1, duration=0.05, operations=("txn", "watch"), watch_events=2
    )
    result = await run_kvstore_bench(cluster, params)
    assert [row.operation for row in result.throughput] == ["txn"]
    assert result.throughput[0].median("ours") > 0 and result.throughput[0].median("bare") > 0
    assert len(result.latency) == 1


async def test_delete_in_chunks_removes_only_the_prefix(etcd1: EmbeddedEtcd) -> None:
    async with EtcdBackend(EtcdClusterConfig("bench", tuple(etcd1.client_urls))) as backend:
        for i in range(250):
            await backend.put(b"b/x/%03d" % i, b"v")
        await backend.put(b"b/y", b"keep")
        assert await delete_in_chunks(backend, b"b/x/", page=120) == 250
        assert await backend.count_prefix(b"b/") == 1


def test_params_are_checked() -> None:
    with pytest.raises(ValueError):
        BenchParams(duration=1.0, ops=10)
    with pytest.raises(ValueError):
        BenchParams(concurrency=())
    with pytest.raises(ValueError):
        BenchParams(operations=("scan",))


def test_percentile() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)


def test_cli_embedded_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out" / "result.json"
    status = main(
        [
            "bench",
            "kvstore",
            "--embedded",
            "--ops",
            "8",
            "--rounds",
            "1",
            "--concurrency",
            "1,2",
            "--watch-events",
            "2",
            "--output",
            str(output),
            "--json",
        ]
    )
    assert status == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert json.loads(output.read_text()) == printed
    assert printed["environment"]["embedded"] is True
    assert {(r["operation"], r["concurrency"]) for r in printed["throughput"]} == {
        (op, c) for op in ("put", "get", "txn") for c in (1, 2)
    }
    assert "round 1/1" in captured.err


def test_cli_rejects_bad_concurrency(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "kvstore", "--embedded", "--concurrency", "0"])
    assert exc.value.code == 2
