"""cpctl end to end: real processes against a fixture etcd."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest
from helpers import FAST, backend_for

from controlplane import codec
from controlplane.config import EtcdClusterConfig, KvstoreConfig
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.heartbeat import Heartbeat
from controlplane.kvstore.identities import KvIdentityStore
from controlplane.kvstore.keys import KeyLayout
from controlplane.kvstore.owner import Owners
from controlplane.kvstore.shards import ShardMap
from controlplane.metrics import StoreMetrics
from controlplane.model import Labels, NodeName


async def cpctl(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controlplane.cli.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_line_error(err: str) -> None:
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def endpoints(etcd: EmbeddedEtcd) -> list[str]:
    return ["--kvstore-endpoints", ",".join(etcd.client_urls)]


async def test_health_healthy(etcd1: EmbeddedEtcd) -> None:
    code, out, _ = await cpctl("kvstore", "health", *endpoints(etcd1))
    assert code == 0
    assert "shard default: healthy" in out
    assert "3.4." in out or "3.5." in out
    code, out, _ = await cpctl("kvstore", "health", "--json", *endpoints(etcd1))
    report = json.loads(out)
    assert code == 0 and report["healthy"] is True
    shard = report["shards"][0]
    assert shard["quorum"] is True and shard["leader"]
    assert shard["endpoints"][0]["reachable"] is True
    assert shard["endpoints"][0]["is_leader"] is True
    assert shard["endpoints"][0]["db_size"] > 0
    assert shard["heartbeat_age"] is None


async def test_health_one_member_down(etcd3: EmbeddedEtcd) -> None:
    await etcd3.kill_member(2)
    code, out, _ = await cpctl("kvstore", "health", "--json", *endpoints(etcd3))
    report = json.loads(out)
    assert code == 0, out  # a quorum remains: degraded, still serving
    shard = report["shards"][0]
    assert shard["quorum"] is True
    assert shard["status"].startswith("degraded: 1/3")
    reachable = [e["reachable"] for e in shard["endpoints"]]
    assert reachable == [True, True, False]
    code, _, _ = await cpctl("kvstore", "health", "--strict", *endpoints(etcd3))
    assert code == 1


async def test_health_no_quorum_and_all_down(etcd3: EmbeddedEtcd) -> None:
    await etcd3.kill_member(1)
    await etcd3.kill_member(2)
    code, out, _ = await cpctl("kvstore", "health", "--json", "--timeout", "2", *endpoints(etcd3))
    shard = json.loads(out)["shards"][0]
    assert code == 1 and shard["quorum"] is False and shard["status"] == "no quorum"
    await etcd3.kill_member(0)
    code, out, _ = await cpctl("kvstore", "health", "--timeout", "2", *endpoints(etcd3))
    assert code == 1 and "UNHEALTHY: unreachable" in out


async def test_health_reports_stale_heartbeat(etcd1: EmbeddedEtcd) -> None:
    async with backend_for(etcd1.client_urls) as backend:
        fresh = Heartbeat(ts=time.time(), seq=7, writer="operator-a", interval=15)
        await backend.put(b"cp/.heartbeat", fresh.encode())
        code, out, _ = await cpctl("kvstore", "health", "--json", *endpoints(etcd1))
        shard = json.loads(out)["shards"][0]
        assert code == 0 and shard["heartbeat_writer"] == "operator-a"
        assert shard["heartbeat_age"] < 30 and shard["heartbeat_threshold"] == 30

        stale = Heartbeat(ts=time.time() - 120, seq=8, writer="operator-a", interval=15)
        await backend.put(b"cp/.heartbeat", stale.encode())
        code, out, _ = await cpctl("kvstore", "health", *endpoints(etcd1))
        assert code == 1 and "heartbeat stale" in out

        await backend.put(b"cp/.heartbeat", b"\xc1garbage")
        code, out, _ = await cpctl("kvstore", "health", *endpoints(etcd1))
        assert code == 1 and "malformed heartbeat" in out


async def test_get_put_list_delete(etcd1: EmbeddedEtcd) -> None:
    ep = endpoints(etcd1)
    code, out, _ = await cpctl("kvstore", "put", "cp/demo/a", "hello", *ep)
    assert code == 0 and out.startswith("OK revision")
    payload = json.dumps({"name": "web", "ids": [1, 2]})
    code, _, _ = await cpctl("kvstore", "put", "cp/demo/b", payload, "--envelope", "thing", *ep)
    assert code == 0

    code, out, _ = await cpctl("kvstore", "get", "cp/demo/b", "--json", *ep)
    got = json.loads(out)
    assert code == 0 and got["value"] == {"v": 1, "k": "thing", "d": {"name": "web", "ids": [1, 2]}}
    code, out, _ = await cpctl("kvstore", "get", "cp/demo/b", "--raw", "--json", *ep)
    raw = json.loads(out)["value"]
    assert bytes.fromhex(raw["hex"]) == codec.encode("thing", {"name": "web", "ids": [1, 2]})

    code, out, _ = await cpctl("kvstore", "list", "cp/demo/", "--json", *ep)
    listed = json.loads(out)
    assert [kv["key"] for kv in listed["kvs"]] == ["cp/demo/a", "cp/demo/b"]
    code, out, _ = await cpctl("kvstore", "get", "cp/demo/", "--prefix", *ep)
    assert code == 0 and out.splitlines()[0] == "cp/demo/a\thello"

    code, out, _ = await cpctl("kvstore", "delete", "cp/demo/", "--prefix", "--json", *ep)
    assert code == 0 and json.loads(out) == {"deleted": 2}
    code, _, err = await cpctl("kvstore", "get", "cp/demo/a", *ep)
    assert code == 1 and "not found" in err
    one_line_error(err)


async def test_watch(etcd1: EmbeddedEtcd) -> None:
    ep = endpoints(etcd1)
    async with backend_for(etcd1.client_urls) as backend:
        await backend.put(b"cp/w/listed", b"1")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controlplane.cli.main",
            "kvstore",
            "watch",
            "cp/w/",
            "--json",
            "--count",
            "2",
            *ep,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        lines = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)) for _ in range(2)]
        assert lines[0]["type"] == "put" and lines[0]["key"] == "cp/w/listed"
        assert lines[1]["type"] == "list-done"
        await backend.put(b"cp/w/new", b"2")
        await backend.delete(b"cp/w/listed")
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        rest = [json.loads(line) for line in out.decode().splitlines()]
        assert [(e["type"], e["key"]) for e in rest] == [
            ("put", "cp/w/new"),
            ("delete", "cp/w/listed"),
        ]
        assert proc.returncode == 0


@pytest.mark.parametrize(
    "args",
    [
        ["kvstore", "health", "--bogus"],
        ["kvstore", "health", "--kvstore-endpoints", "127.0.0.1:2379"],
        ["kvstore", "health", "--kvstore-endpoints", "ftp://127.0.0.1:2379"],
        ["kvstore", "health", "--kvstore-endpoints", "http://127.0.0.1:notaport"],
        ["kvstore", "health", "--kvstore-config", "/nonexistent/kv.yaml"],
        ["kvstore", "health", "--timeout", "-1", "--kvstore-endpoints", "http://127.0.0.1:1"],
        ["kvstore"],
        ["nosuchcommand"],
    ],
)
async def test_bad_input_is_one_line_exit_2(args: list[str]) -> None:
    code, _, err = await cpctl(*args)
    assert code == 2, err
    one_line_error(err)


@pytest.mark.parametrize(
    "content",
    [
        "clusters: [",  # not YAML
        "endpoints: []",  # empty
        "clusters:\n  - endpoints: [http://127.0.0.1:1]\n    colour: blue",  # unknown key
        "endpoints: [http://127.0.0.1:1]\nshards:\n  widgets: [default]",  # unknown kind
        "endpoints: [http://127.0.0.1:1]\nshards:\n  identities: [nope]",  # unknown cluster
        "endpoints: [http://127.0.0.1:1]\ncert-file: /nonexistent.crt\nkey-file: /x.key",
        "endpoints: [http://127.0.0.1:1]\nusername: agent",  # no password
        "- just\n- a list",
    ],
)
async def test_bad_config_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "kvstore.yaml"
    path.write_text(content)
    code, _, err = await cpctl("kvstore", "health", "--kvstore-config", str(path))
    assert code == 2, err
    one_line_error(err)
    assert str(path) in err


async def test_config_file_with_two_clusters(
    tmp_path: Path, etcd1: EmbeddedEtcd, etcd3: EmbeddedEtcd
) -> None:
    path = tmp_path / "kvstore.yaml"
    path.write_text(
        "clusters:\n"
        f"  - name: main\n    endpoints: {json.dumps(etcd1.client_urls)}\n"
        f"  - name: ids\n    endpoints: {json.dumps(etcd3.client_urls)}\n"
        "shards:\n  identities: [main, ids]\n"
    )
    code, out, _ = await cpctl("kvstore", "health", "--json", "--kvstore-config", str(path))
    report = json.loads(out)
    assert code == 0 and [s["name"] for s in report["shards"]] == ["main", "ids"]
    assert [len(s["endpoints"]) for s in report["shards"]] == [1, 3]
    code, _, _ = await cpctl(
        "kvstore", "put", "x", "1", "--cluster", "ids", "--kvstore-config", str(path)
    )
    assert code == 0
    async with backend_for(etcd3.client_urls) as ids:
        assert await ids.get(b"x") is not None


async def test_unreachable_get_is_one_line(tmp_path: Path) -> None:
    code, _, err = await cpctl(
        "kvstore", "get", "k", "--timeout", "1", "--kvstore-endpoints", "http://127.0.0.1:9"
    )
    assert code == 1
    one_line_error(err)
    assert "etcd" in err


async def test_etcd_up_runs_and_stops() -> None:
    code, out, err = await cpctl("etcd", "up", "--members", "1", "--duration", "1", "--json")
    assert code == 0, err
    info = json.loads(out.splitlines()[0])
    assert info["endpoints"][0].startswith("http://127.0.0.1:")


async def test_identity_list_and_get(etcd1: EmbeddedEtcd) -> None:
    config = KvstoreConfig((EtcdClusterConfig("default", tuple(etcd1.client_urls)),), client=FAST)
    async with ShardMap(config) as shards:
        metrics = StoreMetrics.create()
        store = KvIdentityStore(shards, KeyLayout(), metrics, Owners(metrics), node=NodeName("n1"))
        web = await store.acquire(Labels.parse("k8s:app=web"))
        await shards.backends["default"].put(b"cp/state/identities/v1/id/77", b"junk")
    ep = endpoints(etcd1)
    code, out, _ = await cpctl("identity", "list", "--json", *ep)
    listed = json.loads(out)
    assert code == 0 and listed["skipped_malformed"] == 1
    assert listed["identities"] == [
        {
            "id": web.id,
            "labels": ["k8s:app=web"],
            "reserved": False,
            "references": ["n1"],
            "version": listed["identities"][0]["version"],
        }
    ]
    code, out, _ = await cpctl("identity", "list", "--reserved", *ep)
    assert code == 0 and "reserved:host" in out and "k8s:app=web" in out
    code, out, _ = await cpctl("identity", "get", str(web.id), *ep)
    assert code == 0 and "k8s:app=web" in out and "n1" in out
    code, _, err = await cpctl("identity", "get", "12345", *ep)
    assert code == 1 and "not found" in err
    code, _, err = await cpctl("identity", "get", "web", *ep)
    assert code == 2
    one_line_error(err)
