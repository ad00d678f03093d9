"""The agent's export of the datapath verdict counters, where there is nothing to read.

With real counters (a pinned map, real traffic) it is tested in test_e2e_datapath."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from controlplane.agent.metrics import DatapathCounters
from controlplane.datapath.layouts import METRICS_MAP_NAME


def test_no_program_loaded_yet_means_no_series(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    registry.register(DatapathCounters(tmp_path))
    text = generate_latest(registry).decode()
    assert "# TYPE cp_datapath_packets_total counter" in text
    assert "cp_datapath_packets_total{" not in text


def test_an_unreadable_map_fails_no_scrape_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / METRICS_MAP_NAME).write_bytes(b"not a bpf pin")
    registry = CollectorRegistry()
    registry.register(DatapathCounters(tmp_path))
    with caplog.at_level(logging.WARNING, logger="controlplane.agent.metrics"):
        for _ in range(3):
            text = generate_latest(registry).decode()
            assert "cp_datapath_bytes_total{" not in text
    warnings = [r for r in caplog.records if "datapath counters" in r.getMessage()]
    assert len(warnings) == 1, warnings
