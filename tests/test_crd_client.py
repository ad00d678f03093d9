"""The CRD mode's foundation against the local API server: kubeconfig rules, the CRD
installer, list+watch (resume across a server restart, re-list on 410 with synthetic
deletes, bookmarks), and delete preconditions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from helpers import collecting, eventually

from controlplane.apiserver import KubeServer, KubeServerSettings
from controlplane.config import ConfigError
from controlplane.crd.client import KubeClient
from controlplane.crd.errors import Conflict
from controlplane.crd.install import definitions, install_crds
from controlplane.crd.kubeconfig import load_connection
from controlplane.crd.listwatch import EventType, KubeEvent, KubeListWatcher
from controlplane.crd.resources import CRDS, NODES
from controlplane.kvstore.embedded import EmbeddedEtcd


def node_obj(name: str, boot: str = "b") -> dict[str, Any]:
    return {
        "apiVersion": "controlplane.io/v1",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": {"bootID": boot},
    }


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[KubeServer]:
    settings = KubeServerSettings(data_dir=tmp_path / "kube", bookmark_interval=0.2)
    async with KubeServer(settings) as kube:
        yield kube


@pytest_asyncio.fixture
async def client(server: KubeServer) -> AsyncIterator[KubeClient]:
    async with KubeClient(load_connection(str(server.kubeconfig))) as kube:
        await install_crds(kube)
        yield kube


async def flat(watcher: KubeListWatcher) -> AsyncIterator[KubeEvent]:
    """The watcher's events one by one (it yields them in batches)."""
    async for batch in watcher.batches():
        for event in batch:
            yield event


def listed_once(events: list[KubeEvent]) -> bool:
    return any(e.type is EventType.LIST_DONE for e in events)


# -- kubeconfig ---------------------------------------------------------------------------


def test_kubeconfig_rules(
    server: KubeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.kube/config
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    with pytest.raises(ConfigError) as missing:
        load_connection()
    assert "\n" not in str(missing.value) and "--kubeconfig" in str(missing.value)

    explicit = load_connection(str(server.kubeconfig))
    assert explicit.server == server.url and explicit.token == server.token
    assert explicit.source == f"kubeconfig {server.kubeconfig}"

    monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig))
    assert load_connection().server == server.url  # from $KUBECONFIG
    # An explicit file beats $KUBECONFIG, and a missing one is a one-line error.
    with pytest.raises(ConfigError, match="no such file") as gone:
        load_connection(str(tmp_path / "nope"))
    assert "\n" not in str(gone.value)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no such file"):
        load_connection()
    with pytest.raises(ConfigError):
        load_connection(str(server.kubeconfig), context="no-such-context")


# -- install -------------------------------------------------------------------------------


async def test_install_is_idempotent_and_safe_twice_at_once(server: KubeServer) -> None:
    connection = load_connection(str(server.kubeconfig))
    async with KubeClient(connection) as one, KubeClient(connection) as two:
        first, second = await asyncio.gather(install_crds(one), install_crds(two))
        names = sorted(d["metadata"]["name"] for d in definitions())
        assert len(first) == len(second) == len(names) == 5
        for a, b in zip(first, second, strict=True):
            # Each CRD was created by one installer; the other found it done.
            assert sorted((a.split()[0], b.split()[0])) in (
                ["created", "unchanged"],
                ["created", "upgraded"],
                ["unchanged", "unchanged"],
            ), (a, b)
        again = await install_crds(one)
        assert again == [f"unchanged {n}" for n in sorted(names)]
        crds = await one.list(CRDS)
        assert {c["metadata"]["name"] for c in crds.items} >= set(names)


# -- list + watch ---------------------------------------------------------------------------


async def test_delete_preconditions(client: KubeClient) -> None:
    created = await client.create(NODES, node_obj("n1"))
    uid, version = created["metadata"]["uid"], created["metadata"]["resourceVersion"]
    with pytest.raises(Conflict):
        await client.delete(NODES, "n1", uid="0000-not-the-uid")
    updated = await client.patch(NODES, "n1", {"spec": {"bootID": "c"}})
    with pytest.raises(Conflict):
        await client.delete(NODES, "n1", uid=uid, resource_version=version)  # stale
    assert await client.get_or_none(NODES, "n1") is not None
    fresh = updated["metadata"]["resourceVersion"]
    assert await client.delete(NODES, "n1", uid=uid, resource_version=fresh)
    assert not await client.delete(NODES, "n1")
    # A conditional merge patch fails on a stale resourceVersion too.
    await client.create(NODES, node_obj("n2"))
    with pytest.raises(Conflict):
        await client.patch(NODES, "n2", {"metadata": {"resourceVersion": version}})


async def test_bookmarks_advance_the_resource_version(client: KubeClient) -> None:
    # A selective watch (as the stores' repair watches are): changes it does not match
    # reach it only as bookmarks, which move its resourceVersion on, so a resume after a
    # long quiet spell starts from a recent version (no 410, no re-list).
    watcher = KubeListWatcher(client, NODES, label_selector="role=none")
    async with collecting(flat(watcher)) as events:
        await eventually(lambda: listed_once(events))
        start = int(watcher.resource_version)
        for i in range(3):
            await client.create(NODES, node_obj(f"b{i}"))
        await eventually(
            lambda: watcher.stats.bookmarks > 0 and int(watcher.resource_version) > start,
            message="a bookmark moved the resourceVersion on",
        )
        assert [e for e in events if e.type is not EventType.LIST_DONE] == []


@contextlib.asynccontextmanager
async def api_server(
    data_dir: Path, etcd: EmbeddedEtcd, port: int = 0, capacity: int = 10_000
) -> AsyncIterator[KubeServer]:
    settings = KubeServerSettings(
        port=port,
        data_dir=data_dir,
        etcd_endpoints=tuple(etcd.client_urls),
        bookmark_interval=0.2,
        watch_cache_capacity=capacity,
    )
    async with KubeServer(settings) as kube:
        yield kube


def port_of(server: KubeServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


async def test_watch_resumes_after_the_server_restarts(etcd1: EmbeddedEtcd, tmp_path: Path) -> None:
    data = tmp_path / "kube"
    async with api_server(data, etcd1) as first:
        port = port_of(first)
        connection = load_connection(str(first.kubeconfig))
        async with KubeClient(connection) as setup:
            await install_crds(setup)
            await setup.create(NODES, node_obj("before"))
    async with KubeClient(connection, request_timeout=2.0) as client:
        watcher = KubeListWatcher(client, NODES, max_backoff=0.2)
        async with api_server(data, etcd1, port) as second, collecting(flat(watcher)) as events:
            await eventually(lambda: listed_once(events))
            await client.create(NODES, node_obj("during"))
            await eventually(lambda: any(e.key == "during" for e in events))
            revision = int(watcher.resource_version)
            await second.stop()
            await eventually(lambda: watcher.stats.resumes > 0, message="the watch broke")
            async with api_server(data, etcd1, port):
                await client.create(NODES, node_obj("after"))
                await eventually(lambda: any(e.key == "after" for e in events))
        puts = [e.key for e in events if e.type is EventType.PUT]
        assert puts == ["before", "during", "after"]  # nothing lost, nothing repeated
        assert watcher.stats.lists == 1  # resumed, not re-listed
        assert int(watcher.resource_version) > revision


async def test_relist_after_410_sweeps_what_vanished(etcd1: EmbeddedEtcd, tmp_path: Path) -> None:
    data = tmp_path / "kube"
    async with api_server(data, etcd1, capacity=4) as first:
        port = port_of(first)
        connection = load_connection(str(first.kubeconfig))
        async with KubeClient(connection) as setup:
            await install_crds(setup)
            for name in ("keep", "gone", "changed"):
                await setup.create(NODES, node_obj(name))
    async with KubeClient(connection, request_timeout=2.0) as client:
        watcher = KubeListWatcher(client, NODES, max_backoff=0.2)
        async with api_server(data, etcd1, port) as second, collecting(flat(watcher)) as events:
            await eventually(lambda: listed_once(events))
            await second.stop()
            await eventually(lambda: watcher.stats.resumes > 0, message="the watch broke")
            # While our server is down, another one on the same etcd changes things; ours
            # comes back with a watch cache that starts after them, so our resume gets 410.
            async with (
                api_server(tmp_path / "other", etcd1) as other,
                KubeClient(load_connection(str(other.kubeconfig))) as writer,
            ):
                assert await writer.delete(NODES, "gone")
                await writer.patch(NODES, "changed", {"spec": {"bootID": "c2"}})
                for i in range(8):
                    await writer.create(NODES, node_obj(f"new{i}"))
            async with api_server(data, etcd1, port, capacity=4):
                await eventually(lambda: watcher.stats.expired > 0, message="410")
                await eventually(lambda: sum(e.type is EventType.LIST_DONE for e in events) == 2)
        first_done = next(i for i, e in enumerate(events) if e.type is EventType.LIST_DONE)
        second_list = events[first_done + 1 :]
        deletes = [e for e in second_list if e.type is EventType.DELETE]
        assert [(e.key, e.synthetic, e.object) for e in deletes] == [("gone", True, None)]
        puts = {e.key for e in second_list if e.type is EventType.PUT}
        assert puts == {"changed", *(f"new{i}" for i in range(8))}  # "keep" is unchanged
        assert watcher.stats.lists == 2
