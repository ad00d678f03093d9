"""`cpctl bench kube` runs end to end at a tiny size and reports every figure."""

from __future__ import annotations

import json
from pathlib import Path

from controlplane.cli.main import main


def test_bench_kube_small(tmp_path: Path) -> None:
    record_path = tmp_path / "kube.json"
    status = main(
        [
            "bench",
            "kube",
            "--embedded",
            "--creates",
            "40",
            "--list-size",
            "60",
            "--rounds",
            "1",
            "--watchers",
            "3",
            "--updates",
            "3",
            "--concurrency",
            "4",
            "--output",
            str(record_path),
        ]
    )
    assert status == 0
    record = json.loads(record_path.read_text())
    assert record["creates"]["count"] == 40 and record["creates"]["api_per_s"] > 0
    assert record["creates"]["bare_per_s"] > 0
    assert record["list"]["objects"] == 60 and record["list"]["api_s"] > 0
    fanout = record["fanout"]
    assert fanout["watchers"] == 3
    assert fanout["api"]["p99_ms"] > 0 and fanout["bare"]["p99_ms"] > 0
