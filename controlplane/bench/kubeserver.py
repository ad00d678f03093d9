"""The local Kubernetes API server for a benchmark's CRD mode: a `cpctl kube up` child
process on the benchmark's etcd (a process of its own, as a real API server is), and the
namespace the benchmark's endpoints live in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from controlplane.bench.common import BenchError, Progress
from controlplane.crd.client import KubeClient
from controlplane.crd.errors import AlreadyExists, CrdError
from controlplane.crd.install import install_crds
from controlplane.crd.kubeconfig import load_connection
from controlplane.crd.resources import NAMESPACES
from controlplane.processes import Daemon

START_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class KubeServerInfo:
    url: str
    kubeconfig: Path
    daemon: Daemon

    def client(self, request_timeout: float = 10.0) -> KubeClient:
        """A client of its own (one connection pool)."""
        return KubeClient(load_connection(str(self.kubeconfig)), request_timeout=request_timeout)


@asynccontextmanager
async def kube_server(
    etcd_endpoints: Sequence[str], workdir: Path, progress: Progress
) -> AsyncIterator[KubeServerInfo]:
    """A `cpctl kube up` process on ``etcd_endpoints`` (data, PKI and log under
    ``workdir``), stopped afterwards."""
    progress("starting the local Kubernetes API server (a cpctl kube up process)...")
    daemon = Daemon(
        "kube-apiserver",
        "controlplane.cli.main",
        [
            "kube",
            "up",
            "--json",
            "--data-dir",
            str(workdir / "kube"),
            "--etcd-endpoints",
            ",".join(etcd_endpoints),
        ],
        workdir / "kube-apiserver.log",
    )
    await daemon.start()
    try:
        info = await _started(daemon)
        yield KubeServerInfo(info["url"], Path(info["kubeconfig"]), daemon)
    finally:
        await daemon.stop()


async def _started(daemon: Daemon) -> dict[str, str]:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not daemon.running:
            raise BenchError(f"cpctl kube up exited: {daemon.log_tail(1)}")
        with contextlib.suppress(OSError):
            for line in daemon.log_file.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        info = json.loads(line)
                        if isinstance(info, dict) and "kubeconfig" in info:
                            return {"url": str(info["url"]), "kubeconfig": str(info["kubeconfig"])}
        await asyncio.sleep(0.1)
    raise BenchError(f"cpctl kube up did not start in {START_TIMEOUT:.0f}s")


async def prepare(server: KubeServerInfo, namespaces: Sequence[str], progress: Progress) -> None:
    """Install the CRDs (as the CRD-mode operator does) and create ``namespaces``."""
    try:
        async with server.client() as client:
            await install_crds(client)
            for name in namespaces:
                with contextlib.suppress(AlreadyExists):
                    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
                    await client.create(NAMESPACES, body)
    except CrdError as exc:
        raise BenchError(f"preparing the API server: {exc}") from exc
    made = f", namespace(s) {', '.join(namespaces)}" if namespaces else ""
    progress(f"API server {server.url}: CRDs installed{made}")
