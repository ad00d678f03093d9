"""Fixtures and helpers for the local Kubernetes API server's tests.

Loaded by the apiserver test modules through ``pytest_plugins``; tests/conftest.py is not
touched. ``kube`` runs a KubeServer (embedded etcd) in the test's own event loop;
``KubeClient`` talks HTTP to it with the server's CA and token; ``widget_crd`` is the CRD
most tests use; ``kubectl`` runs a real kubectl against a kubeconfig.
"""

from __future__ import annotations

import asyncio
import copy
import json
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest_asyncio

from controlplane.apiserver import KubeServer, KubeServerSettings

T = TypeVar("T")
READ_ONLY_TOKEN = "viewer-token-for-tests"
KUBECTL_132 = "kubectl"
KUBECTL_OTHER = "/usr/lib/google-cloud-sdk/bin/kubectl.1.28"

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Namespaced",
        "names": {
            "plural": "widgets",
            "singular": "widget",
            "kind": "Widget",
            "shortNames": ["wd"],
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {
                    "status": {},
                    "scale": {
                        "specReplicasPath": ".spec.size",
                        "statusReplicasPath": ".status.replicas",
                    },
                },
                "additionalPrinterColumns": [
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                    {"name": "Color", "type": "string", "jsonPath": ".spec.color"},
                ],
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "description": "A widget for tests.",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "description": "What the widget should be.",
                                "required": ["size"],
                                "properties": {
                                    "size": {
                                        "type": "integer",
                                        "minimum": 1,
                                        "maximum": 100,
                                        "description": "How big the widget is.",
                                    },
                                    "color": {"type": "string", "enum": ["red", "green", "blue"]},
                                    "name": {
                                        "type": "string",
                                        "pattern": "^[a-z]+$",
                                        "minLength": 2,
                                        "maxLength": 10,
                                    },
                                    "shape": {"type": "string", "default": "round"},
                                    "tags": {"type": "array", "items": {"type": "string"}},
                                    "extra": {
                                        "type": "object",
                                        "x-kubernetes-preserve-unknown-fields": True,
                                    },
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {"phase": {"type": "string"}},
                            },
                        },
                    }
                },
            }
        ],
    },
}

GADGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "gadgets.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Cluster",
        "names": {"plural": "gadgets", "kind": "Gadget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}

WIDGETS = "/apis/example.com/v1/namespaces/default/widgets"


def widget(name: str, size: int = 3, /, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"size": size, **spec},
    }


async def eventually(
    check: Callable[[], Awaitable[T]], *, timeout: float = 10.0, message: str = "condition"
) -> T:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(0.05)


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any


class KubeClient:
    """A thin HTTP client for the server under test (the real clients have their own tests)."""

    def __init__(self, server: KubeServer, token: str | None = None) -> None:
        self.server = server
        context = ssl.create_default_context(cafile=str(server.ca_file))
        self._session = aiohttp.ClientSession(
            base_url=server.url,
            connector=aiohttp.TCPConnector(ssl=context),
            headers={"Authorization": f"Bearer {token or server.token}"} if token != "" else {},
        )

    async def close(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> Reply:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        all_headers = {"Content-Type": content_type, **(headers or {})}
        async with self._session.request(
            method, path, data=data, headers=all_headers, params=params
        ) as response:
            text = await response.read()
            try:
                parsed = json.loads(text) if text else None
            except ValueError:
                parsed = text
            return Reply(response.status, parsed, response.headers)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any, **kw: Any) -> Reply:
        return await self.request("POST", path, body, **kw)

    async def put(self, path: str, body: Any, **kw: Any) -> Reply:
        return await self.request("PUT", path, body, **kw)

    async def patch(self, path: str, body: Any, content_type: str, **kw: Any) -> Reply:
        return await self.request("PATCH", path, body, content_type=content_type, **kw)

    async def delete(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.request("DELETE", path, body, **kw)

    async def watch(
        self,
        path: str,
        params: dict[str, str],
        *,
        until: Callable[[list[Any]], bool],
        timeout: float = 10.0,
    ) -> list[dict[str, Any]]:
        """Read watch events until ``until(events)`` holds or the stream ends."""
        events: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            async with self._session.get(path, params={**params, "watch": "true"}) as response:
                assert response.status == 200, await response.text()
                async for line in response.content:
                    if line.strip():
                        events.append(json.loads(line))
                    if until(events):
                        break
        return events


@pytest_asyncio.fixture
async def kube(tmp_path: Path) -> AsyncIterator[KubeServer]:
    settings = KubeServerSettings(
        data_dir=tmp_path / "kube", bookmark_interval=0.3, read_only_token=READ_ONLY_TOKEN
    )
    async with KubeServer(settings) as server:
        yield server


@pytest_asyncio.fixture
async def client(kube: KubeServer) -> AsyncIterator[KubeClient]:
    http = KubeClient(kube)
    try:
        yield http
    finally:
        await http.close()


@pytest_asyncio.fixture
async def widgets(client: KubeClient) -> KubeClient:
    """The client, with the Widget CRD created and served."""
    reply = await client.post(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", copy.deepcopy(WIDGET_CRD)
    )
    assert reply.status == 201, reply.body
    return client


def kubectl_flags(kubeconfig: Path) -> list[str]:
    """The kubeconfig, and a discovery cache of this server's own (not ~/.kube/cache)."""
    return ["--kubeconfig", str(kubeconfig), "--cache-dir", str(kubeconfig.parent / "kube-cache")]


def kubectl(
    kubeconfig: Path,
    *args: str,
    binary: str = KUBECTL_132,
    stdin: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run kubectl against ``kubeconfig``; fail the test on a non-zero exit when ``check``."""
    done = subprocess.run(
        [binary, *kubectl_flags(kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr}{done.stdout}")
    return done
