"""KubeServer: the local Kubernetes API server, as an async context manager.

It stores everything in one etcd (an embedded one unless endpoints are given), serves
HTTPS with a CA of its own and bearer-token auth, and writes a kubeconfig with both. On
start it serves the built-in kinds, every stored CRD, and creates the namespaces a real
cluster has (default, kube-system, kube-public, kube-node-lease). CRDs are followed through
their watch, so several servers on one etcd serve the same resources. ``stop()`` ends client
watches, the watch caches, the HTTP server and the embedded etcd, in that order, and
leaves no task behind. For development and tests only: see docs/apiserver.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from aiohttp import web

from controlplane.apiserver import pki
from controlplane.apiserver.http import Api
from controlplane.apiserver.middleware import MAX_BODY_BYTES, User, framed
from controlplane.apiserver.objects import now
from controlplane.apiserver.resources import BUILTINS, CRDS, NAMESPACES, Registry
from controlplane.apiserver.rest import Rest
from controlplane.apiserver.services import DEFAULT_SERVICE_CIDR, ClusterIPs
from controlplane.apiserver.storage import Obj, ObjectStorage, WriteConflict
from controlplane.apiserver.watchcache import Change, WatchCache
from controlplane.config import EtcdClusterConfig
from controlplane.crd.client import KubeClient
from controlplane.crd.kubeconfig import KubeConnection
from controlplane.crd.services import EndpointSliceController
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import EmbeddedEtcd

SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
_SHUTDOWN_S = 5.0


@dataclass(frozen=True)
class KubeServerSettings:
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 0
    """Port to listen on; 0 picks a free one."""
    data_dir: Path | None = None
    """Where etcd data, the PKI, the token and the kubeconfig go; None: a temporary dir."""
    etcd_endpoints: tuple[str, ...] = ()
    """An external etcd's client URLs; empty starts an embedded etcd."""
    tls: bool = True
    """Serve HTTPS with a generated CA (plain HTTP when False)."""
    token: str | None = None
    """The admin bearer token; None reads (or makes) ``<data_dir>/token``."""
    read_only_token: str | None = None
    """A token that may only read (its writes get 403)."""
    bookmark_interval: float = 60.0
    """Seconds between BOOKMARK events on an idle watch that asked for them."""
    watch_cache_capacity: int = 10_000
    """Changes each resource's watch cache keeps for watches that resume."""
    service_cidr: str = DEFAULT_SERVICE_CIDR
    """Where Services' cluster IPs are allocated from (kube's --service-cluster-ip-range)."""
    endpointslice_controller: bool = False
    """Run the EndpointSlice controller (:class:`controlplane.crd.services.
    EndpointSliceController`): slices for Services with a selector, from the
    ``controlplane.io`` Endpoints, as kube-controller-manager makes them from Pods."""


class KubeServer:
    """See the module docstring."""

    def __init__(self, settings: KubeServerSettings | None = None) -> None:
        self.settings = settings or KubeServerSettings()
        self.etcd: EmbeddedEtcd | None = None
        self.backend: EtcdBackend | None = None
        self.registry = Registry()
        self.caches: dict[str, WatchCache] = {}
        self.namespaces: set[str] = set()
        """Namespaces known to exist, kept by the namespace watch."""
        self.token = ""
        self.url = ""
        self.kubeconfig = Path()
        self.ca_file: Path | None = None
        self.data_dir = Path()
        self._temp_dir: str | None = None
        self._runner: web.AppRunner | None = None
        self._storage: ObjectStorage | None = None
        self._crd_tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._controller_client: KubeClient | None = None
        self._controller: asyncio.Task[None] | None = None

    @property
    def etcd_endpoints(self) -> list[str]:
        if self.etcd is not None:
            return self.etcd.client_urls
        return list(self.settings.etcd_endpoints)

    async def __aenter__(self) -> KubeServer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        settings = self.settings
        if settings.data_dir is None:
            self._temp_dir = tempfile.mkdtemp(prefix="cp-kube-")
            self.data_dir = Path(self._temp_dir)
        else:
            self.data_dir = settings.data_dir
            self.data_dir.mkdir(parents=True, exist_ok=True)
        endpoints = settings.etcd_endpoints
        if not endpoints:
            self.etcd = EmbeddedEtcd(1, data_dir=self.data_dir / "etcd", name="kube")
            await self.etcd.start()
            endpoints = tuple(self.etcd.client_urls)
        self.backend = EtcdBackend(EtcdClusterConfig("kube", tuple(endpoints)))
        await self.backend.connect()
        storage = self._storage = ObjectStorage(self.backend)
        for resource in BUILTINS:
            await self._ensure_cache(resource.storage_prefix)
        self.caches[NAMESPACES.storage_prefix].add_listener(self._track_namespace)
        self.caches[CRDS.storage_prefix].add_listener(self._crd_changed)
        for crd in (await storage.list(CRDS.storage_prefix)).items:
            await self._on_crd(crd["metadata"]["name"], crd)
        await self._ensure_namespaces(storage)
        page = await storage.list(NAMESPACES.storage_prefix)
        self.namespaces.update(ns["metadata"]["name"] for ns in page.items)
        self.token = settings.token or pki.ensure_token(self.data_dir / "token")
        tokens = {self.token: User("admin")}
        if settings.read_only_token:
            tokens[settings.read_only_token] = User("viewer", read_only=True)
        rest = Rest(
            storage, self._on_crd, self.namespaces, ClusterIPs(storage, settings.service_cidr)
        )
        api = Api(self.registry, rest, self.caches, settings.bookmark_interval)
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", framed(tokens, api.handle))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_S)
        await self._runner.setup()
        ssl_context = None
        if settings.tls:
            serving = pki.ensure_pki(self.data_dir / "pki")
            self.ca_file = serving.ca_file
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(serving.cert_file, serving.key_file)
        site = web.TCPSite(self._runner, settings.host, settings.port, ssl_context=ssl_context)
        await site.start()
        port = self._runner.addresses[0][1]
        host = settings.host if ":" not in settings.host else f"[{settings.host}]"
        self.url = f"{'https' if settings.tls else 'http'}://{host}:{port}"
        self.kubeconfig = pki.write_kubeconfig(
            self.data_dir / "kubeconfig", self.url, self.token, self.ca_file
        )
        if settings.endpointslice_controller:
            self._start_controller()

    def _start_controller(self) -> None:
        connection = KubeConnection(
            server=self.url,
            token=self.token,
            ca_file=str(self.ca_file) if self.ca_file else None,
            source="the local API server",
        )
        client = self._controller_client = KubeClient(
            connection, user_agent="endpointslice-controller"
        )
        self._controller = asyncio.create_task(
            EndpointSliceController(client).run(), name="endpointslice controller"
        )

    def _track_namespace(self, change: Change) -> None:
        name = change.key.rsplit("/", 1)[-1]
        if change.type == "DELETED":
            self.namespaces.discard(name)
        else:
            self.namespaces.add(name)

    async def _ensure_cache(self, prefix: str) -> None:
        if prefix in self.caches or self.backend is None or self._stopping:
            return
        cache = WatchCache(self.backend, prefix, capacity=self.settings.watch_cache_capacity)
        self.caches[prefix] = cache
        await cache.start()

    def _crd_changed(self, change: Change) -> None:
        """A CRD changed in etcd (through this server or another one on the same etcd)."""
        if self._stopping:
            return
        name = change.key.rsplit("/", 1)[-1]
        crd = None if change.type == "DELETED" else change.obj
        task = asyncio.create_task(self._on_crd(name, crd), name=f"serve crd {name}")
        self._crd_tasks.add(task)
        task.add_done_callback(self._crd_tasks.discard)

    async def _on_crd(self, name: str, crd: Obj | None) -> None:
        """Serve (or stop serving) what CRD ``name`` defines."""
        old_prefixes = {r.storage_prefix for r in self.registry.crd_resources(name)}
        self.registry.set_crd(name, crd)
        new_prefixes = {r.storage_prefix for r in self.registry.crd_resources(name)}
        for prefix in new_prefixes:
            await self._ensure_cache(prefix)
        for prefix in old_prefixes - new_prefixes:
            cache = self.caches.pop(prefix, None)
            if cache is not None:
                await cache.stop()

    async def _ensure_namespaces(self, storage: ObjectStorage) -> None:
        for name in SYSTEM_NAMESPACES:
            namespace = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": name,
                    "uid": str(uuid.uuid4()),
                    "creationTimestamp": now(),
                    "labels": {"kubernetes.io/metadata.name": name},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            }
            with contextlib.suppress(WriteConflict):
                await storage.create(NAMESPACES.key("", name), namespace)

    async def stop(self) -> None:
        self._stopping = True
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.cancel()
            await asyncio.gather(controller, return_exceptions=True)
        client, self._controller_client = self._controller_client, None
        if client is not None:
            await client.close()
        for task in list(self._crd_tasks):
            task.cancel()
        await asyncio.gather(*self._crd_tasks, return_exceptions=True)
        for cache in list(self.caches.values()):
            await cache.stop()  # ends every client watch
        self.caches.clear()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        backend, self.backend = self.backend, None
        if backend is not None:
            await backend.close()
        etcd, self.etcd = self.etcd, None
        if etcd is not None:
            await etcd.stop()
        if self._temp_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self._temp_dir, True)
            self._temp_dir = None
