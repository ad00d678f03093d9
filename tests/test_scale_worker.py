"""The scale worker's observer (controlplane/scale/worker.py): a pass digests the settled
ipcaches within its time budget, at least one a pass, and the next pass starts where the
last one stopped, so that a worker whose maps all settle at once never blocks its agents'
event loop for long and still digests every map in turn."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

from controlplane.datapath.ipcache import IpcacheEntry, encode_key
from controlplane.model import parse_ip
from controlplane.scale.worker import Worker, endpoint_digest, entry_bytes


def make_worker(tmp_path: Path, agents: int) -> Worker:
    # the agents are built, never run: the observer reads their maps only
    spec = {
        "nodes": [[f"n{i:04d}", f"127.1.0.{i + 1}"] for i in range(agents)],
        "kvstore": {"clusters": [["main", ["http://127.0.0.1:1"]]], "shards": {}},
        "agent": {},
        "socket_dir": str(tmp_path),
        "pool_cidr": "10.0.0.0/8",
        "label_sets": 1,
        "endpoints_per_agent": 0,
        "ready_timeout": 1.0,
        "report_interval": 1.0,
    }
    worker = Worker(spec)
    for i, t in enumerate(worker.tracked):
        prefix = f"10.0.{i}.1/32"
        t.agent.ipcache.map.update(
            encode_key(ipaddress.ip_network(prefix)),
            IpcacheEntry(1000 + i, parse_ip("127.1.0.1")).encode(),  # type: ignore[arg-type]
        )
    return worker


def settle(worker: Worker) -> float:
    """Every map changed long ago: each is due a digest."""
    worker.digesting = False
    worker._observe()  # their write counters, no digest yet
    worker.digesting = True
    now = time.monotonic()
    for t in worker.tracked:
        t.changed_at = now - 10.0
    return now


def test_a_pass_stops_at_its_budget_and_the_next_goes_on_from_there(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, 3)
    worker.digest_budget = 0.0  # every digest exhausts it: one a pass
    now = settle(worker)
    done = []
    for _ in range(3):
        worker._digest(now)
        done.append([t.digest != "" for t in worker.tracked])
    assert done == [[True, False, False], [True, True, False], [True, True, True]]
    for i, t in enumerate(worker.tracked):
        assert t.digest == endpoint_digest([entry_bytes(f"10.0.{i}.1/32", 1000 + i)])
        assert t.digest_since == t.changed_at


def test_a_pass_within_its_budget_digests_every_settled_map(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, 3)
    worker.digest_budget = 60.0
    now = settle(worker)
    worker.tracked[1].changed_at = now  # still changing: not yet
    worker._digest(now)
    assert [t.digest != "" for t in worker.tracked] == [True, False, True]
