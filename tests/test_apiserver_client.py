"""The official `kubernetes` Python client against the local API server.

The server runs in the test's event loop on a real embedded etcd; the (blocking) client
runs in threads, as an application would use it.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch

from controlplane.apiserver import KubeServer

pytest.register_assert_rewrite("tests.kube_fixtures")
from tests.kube_fixtures import WIDGET_CRD, widget  # noqa: E402

pytest_plugins = ["tests.kube_fixtures"]

GROUP, VERSION, PLURAL, NS = "example.com", "v1", "widgets", "default"


def _api(server: KubeServer) -> Any:
    return k8s_config.new_client_from_config(config_file=str(server.kubeconfig))


def _setup(api_client: Any) -> Any:
    k8s.ApiextensionsV1Api(api_client).create_custom_resource_definition(copy.deepcopy(WIDGET_CRD))
    return k8s.CustomObjectsApi(api_client)


def _crud(api_client: Any) -> None:
    custom = _setup(api_client)
    created = custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, widget("c1", 2))
    assert created["metadata"]["generation"] == 1
    with pytest.raises(k8s.ApiException) as exists:
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, widget("c1", 2))
    assert exists.value.status == 409 and '"reason":"AlreadyExists"' in exists.value.body

    got = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "c1")
    got["spec"]["size"] = 3
    replaced = custom.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "c1", got)
    assert replaced["spec"]["size"] == 3 and replaced["metadata"]["generation"] == 2
    with pytest.raises(k8s.ApiException) as stale:
        custom.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "c1", got)
    assert stale.value.status == 409 and '"reason":"Conflict"' in stale.value.body

    patched = custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "c1", {"spec": {"color": "green"}}
    )
    assert patched["spec"] == {"size": 3, "color": "green", "shape": "round"}
    status = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, "c1", {"status": {"phase": "Ready"}}
    )
    assert status["status"] == {"phase": "Ready"}
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert [i["metadata"]["name"] for i in listed["items"]] == ["c1"]
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "c1")
    with pytest.raises(k8s.ApiException) as missing:
        custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "c1")
    assert missing.value.status == 404

    core = k8s.CoreV1Api(api_client)
    assert "default" in {n.metadata.name for n in core.list_namespace().items}
    lease = k8s.V1Lease(
        metadata=k8s.V1ObjectMeta(name="lead"),
        spec=k8s.V1LeaseSpec(holder_identity="me", lease_duration_seconds=15),
    )
    coordination = k8s.CoordinationV1Api(api_client)
    made = coordination.create_namespaced_lease("kube-system", lease)
    assert made.spec.holder_identity == "me"
    assert (
        coordination.read_namespaced_lease("lead", "kube-system").spec.lease_duration_seconds == 15
    )


async def test_custom_objects_crud(kube: KubeServer) -> None:
    with _api(kube) as api_client:
        await asyncio.to_thread(_crud, api_client)


def _watch_until(custom: Any, resource_version: str, count: int) -> list[tuple[str, str, int]]:
    events: list[tuple[str, str, int]] = []
    w = k8s_watch.Watch()
    for event in w.stream(
        custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        NS,
        PLURAL,
        resource_version=resource_version,
        timeout_seconds=10,
    ):
        obj = event["object"]
        events.append((event["type"], obj["metadata"]["name"], obj["spec"]["size"]))
        if len(events) >= count:
            w.stop()
    return events


def _watch_and_relist(api_client: Any, server_compact: Any) -> None:
    custom = _setup(api_client)
    start = custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    rv = start["metadata"]["resourceVersion"]
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, widget("w", 1))
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "w", {"spec": {"size": 2}})
    assert _watch_until(custom, rv, 2) == [("ADDED", "w", 1), ("MODIFIED", "w", 2)]

    server_compact()
    with pytest.raises(k8s.ApiException) as gone:
        _watch_until(custom, rv, 1)
    assert gone.value.status == 410 and "Expired" in str(gone.value.reason)
    # What a client does after 410: list again, and watch from the list's version.
    relisted = custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert [i["spec"]["size"] for i in relisted["items"]] == [2]
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "w", {"spec": {"size": 3}})
    after = _watch_until(custom, relisted["metadata"]["resourceVersion"], 1)
    assert after == [("MODIFIED", "w", 3)]


async def test_watch_compaction_410_and_relist(kube: KubeServer) -> None:
    loop = asyncio.get_running_loop()
    assert kube.backend is not None
    backend = kube.backend

    def compact() -> None:
        async def run() -> None:
            await backend.compact(await backend.current_revision())

        asyncio.run_coroutine_threadsafe(run(), loop).result(10)

    with _api(kube) as api_client:
        await asyncio.to_thread(_watch_and_relist, api_client, compact)


CLIENTS, UPDATES_EACH = 20, 2


def _read_modify_write(
    server: KubeServer, who: int, landed: list[str], conflicts: list[int], lock: threading.Lock
) -> None:
    with _api(server) as api_client:
        custom = k8s.CustomObjectsApi(api_client)
        done = 0
        while done < UPDATES_EACH:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "shared")
            mark = f"c{who}-{done}"
            obj["spec"].setdefault("extra", {})[mark] = True
            try:
                custom.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "shared", obj)
            except k8s.ApiException as exc:
                assert exc.status == 409, exc.body
                with lock:
                    conflicts.append(who)
                continue
            with lock:
                landed.append(mark)
            done += 1


async def test_concurrent_read_modify_write(kube: KubeServer) -> None:
    with _api(kube) as api_client:
        custom = await asyncio.to_thread(_setup, api_client)
        await asyncio.to_thread(
            custom.create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, widget("shared", 1)
        )
    landed: list[str] = []
    conflicts: list[int] = []
    lock = threading.Lock()
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(CLIENTS) as pool:
        await asyncio.gather(
            *(
                loop.run_in_executor(pool, _read_modify_write, kube, i, landed, conflicts, lock)
                for i in range(CLIENTS)
            )
        )
    with _api(kube) as api_client:
        final = await asyncio.to_thread(
            k8s.CustomObjectsApi(api_client).get_namespaced_custom_object,
            GROUP,
            VERSION,
            NS,
            PLURAL,
            "shared",
        )
    assert len(landed) == len(set(landed)) == CLIENTS * UPDATES_EACH
    assert set(final["spec"]["extra"]) == set(landed)  # every landed change is there
    assert final["metadata"]["generation"] == 1 + len(landed)  # each landed exactly once
    assert conflicts  # 20 writers on one object do collide; the losers got 409
