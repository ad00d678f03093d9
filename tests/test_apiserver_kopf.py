"""kopf, an operator framework written by others, against the local API server.

A small operator (create/update/delete handlers, status from handler results, kopf's
finalizer, peering) runs as `kopf run` in a subprocess with the server's kubeconfig; the
test drives it through the API and waits for what kopf writes back.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from controlplane.apiserver import KubeServer

pytest.register_assert_rewrite("tests.kube_fixtures")
from tests.kube_fixtures import KubeClient, eventually  # noqa: E402

pytest_plugins = ["tests.kube_fixtures"]

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
GIZMOS = "/apis/example.com/v1/namespaces/default/gizmos"
MERGE = "application/merge-patch+json"
_PRESERVE = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def _crd(group: str, plural: str, kind: str, scope: str = "Namespaced") -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": scope,
            "names": {"plural": plural, "kind": kind, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer"}},
                                },
                                "status": copy.deepcopy(_PRESERVE),
                            },
                        }
                    },
                }
            ],
        },
    }


OPERATOR = """
import os
import pathlib

import kopf


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    settings.posting.enabled = True
    settings.watching.server_timeout = 30


@kopf.on.create("example.com", "v1", "gizmos")
def created(spec, body, **_):
    kopf.info(body, reason="Created", message="the gizmo was seen")
    return {"size": spec["size"]}


@kopf.on.update("example.com", "v1", "gizmos")
def updated(spec, **_):
    return {"size": spec["size"]}


@kopf.on.delete("example.com", "v1", "gizmos")
def deleted(name, **_):
    pathlib.Path(os.environ["DELETED_MARKER"]).write_text(name)
"""


@pytest_asyncio.fixture
async def operator(
    kube: KubeServer, client: KubeClient, tmp_path: Path
) -> AsyncIterator[tuple[KubeClient, Path]]:
    for crd in (
        _crd("example.com", "gizmos", "Gizmo"),
        _crd("kopf.dev", "kopfpeerings", "KopfPeering"),
    ):
        reply = await client.post(CRDS, crd)
        assert reply.status == 201, reply.body
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "example"}}
    assert (
        await client.post("/apis/kopf.dev/v1/namespaces/default/kopfpeerings", peering)
    ).status == 201
    script = tmp_path / "operator.py"
    script.write_text(OPERATOR)
    marker = tmp_path / "deleted"
    env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig), "DELETED_MARKER": str(marker)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kopf",
        "run",
        str(script),
        "--namespace",
        "default",
        "--peering",
        "example",
        "--verbose",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield client, marker
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), 20)
        except TimeoutError:
            proc.kill()
            _, stderr = await proc.communicate()
        log = stderr.decode(errors="replace")
        (tmp_path / "kopf.log").write_text(log)
        assert "Traceback" not in log, log[-4000:]


async def test_kopf_operator_handles_create_update_delete(
    operator: tuple[KubeClient, Path],
) -> None:
    client, marker = operator
    gizmo = {
        "apiVersion": "example.com/v1",
        "kind": "Gizmo",
        "metadata": {"name": "g1"},
        "spec": {"size": 1},
    }
    assert (await client.post(GIZMOS, gizmo)).status == 201

    async def status_says(size: int) -> dict[str, Any] | None:
        obj = (await client.get(f"{GIZMOS}/g1")).body
        status = obj.get("status") or {}
        for handler in ("created", "updated"):
            if (status.get(handler) or {}).get("size") == size:
                return obj
        return None

    created = await eventually(lambda: status_says(1), timeout=30, message="kopf's create")
    assert created["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]

    await client.patch(f"{GIZMOS}/g1", {"spec": {"size": 2}}, MERGE)
    await eventually(lambda: status_says(2), timeout=30, message="kopf's update")

    await client.delete(f"{GIZMOS}/g1")

    async def gone() -> bool:
        return (await client.get(f"{GIZMOS}/g1")).status == 404

    await eventually(gone, timeout=30, message="kopf removing its finalizer")
    assert marker.read_text() == "g1"

    peering = (await client.get("/apis/kopf.dev/v1/namespaces/default/kopfpeerings/example")).body
    assert peering.get("status"), peering  # kopf announced itself to its peers

    async def posted() -> bool:
        events = (await client.get("/api/v1/namespaces/default/events")).body["items"]
        return any(
            e.get("involvedObject", {}).get("name") == "g1" and e.get("reason") == "Created"
            for e in events
        )

    await eventually(posted, timeout=10, message="kopf's events about g1")
