"""TLS, password auth, and lease sessions against real etcd."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from helpers import FAST, backend_for, etcd_tool, eventually, requires
from pki import TestPKI

from controlplane.config import ClientSettings, ConfigError, TLSConfig
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.errors import KvstoreError, PermissionDenied
from controlplane.kvstore.session import LeaseManager


async def test_tls_with_client_certificate(etcd_tls: EmbeddedEtcd, pki: TestPKI) -> None:
    tls = TLSConfig(ca_file=pki.ca_file, cert_file=pki.client_cert, key_file=pki.client_key)
    async with backend_for(etcd_tls.client_urls, tls=tls) as backend:
        await backend.put(b"secure", b"yes")
        kv = await backend.get(b"secure")
        assert kv is not None and kv.value == b"yes"


async def test_tls_without_client_certificate_is_refused(
    etcd_tls: EmbeddedEtcd, pki: TestPKI
) -> None:
    settings = ClientSettings(request_timeout=2.0)
    tls = TLSConfig(ca_file=pki.ca_file)
    async with backend_for(etcd_tls.client_urls, tls=tls, settings=settings) as backend:
        with pytest.raises(KvstoreError):
            await backend.put(b"k", b"v")


async def test_tls_files_with_plain_http_is_a_config_error(
    etcd1: EmbeddedEtcd, pki: TestPKI
) -> None:
    tls = TLSConfig(ca_file=pki.ca_file)
    backend = backend_for(etcd1.client_urls, tls=tls)
    with pytest.raises(ConfigError):
        await backend.connect()


ETCDCTL, _ETCDCTL_UNMET = etcd_tool("etcdctl")
needs_etcdctl = requires(_ETCDCTL_UNMET)


async def etcdctl(etcd: EmbeddedEtcd, *args: str) -> str:
    assert ETCDCTL is not None
    env = {**os.environ, "ETCDCTL_API": "3"}
    proc = await asyncio.create_subprocess_exec(
        ETCDCTL,
        "--endpoints",
        ",".join(etcd.client_urls),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    return out.decode()


@pytest_asyncio.fixture
async def etcd_auth(etcd1: EmbeddedEtcd) -> AsyncIterator[EmbeddedEtcd]:
    await etcdctl(etcd1, "user", "add", "root:rootpw")
    await etcdctl(etcd1, "user", "add", "agent:agentpw")
    await etcdctl(etcd1, "role", "add", "cp")
    await etcdctl(etcd1, "role", "grant-permission", "cp", "--prefix=true", "readwrite", "cp/")
    await etcdctl(etcd1, "user", "grant-role", "agent", "cp")
    await etcdctl(etcd1, "auth", "enable")
    yield etcd1


@needs_etcdctl
async def test_password_auth(etcd_auth: EmbeddedEtcd) -> None:
    urls = etcd_auth.client_urls
    async with backend_for(urls, username="agent", password="agentpw") as agent:
        await agent.put(b"cp/x", b"1")
        kv = await agent.get(b"cp/x")
        assert kv is not None and kv.value == b"1"
        with pytest.raises(PermissionDenied):
            await agent.put(b"elsewhere", b"1")  # outside the role's prefix

    with pytest.raises(PermissionDenied):
        async with backend_for(urls, username="agent", password="wrong"):
            pass

    async with backend_for(urls, username="agent", password="agentpw") as agent:
        # The quorum probe reads a key inside the prefix, which every role may read.
        assert await agent.current_revision() > 0

    async with backend_for(urls) as anonymous:
        with pytest.raises(PermissionDenied):
            await anonymous.put(b"cp/y", b"1")


@needs_etcdctl
async def test_expired_auth_token_is_renewed(etcd_auth: EmbeddedEtcd) -> None:
    async with backend_for(etcd_auth.client_urls, username="agent", password="agentpw") as agent:
        agent._token = "bogus.token"  # what a token looks like after etcd forgot it
        await agent.put(b"cp/after-renewal", b"1")
        assert agent._token != "bogus.token"


async def owned_keys(backend: EtcdBackend) -> dict[bytes, int]:
    result = await backend.list_prefix(b"owned/")
    return {kv.key: kv.lease for kv in result.kvs}


async def test_lease_loss_recreates_keys(etcd1: EmbeddedEtcd) -> None:
    async with backend_for(etcd1.client_urls) as backend:
        manager = LeaseManager(backend, ttl=10, max_keys_per_lease=3)
        wanted = {b"owned/%d" % i: b"v%d" % i for i in range(7)}

        async def recreate(lease_id: int, keys: frozenset[bytes]) -> None:
            for key in keys:
                await backend.put(key, wanted[key], lease=await manager.lease_for(key))

        manager.on_lost(recreate)
        for key, value in wanted.items():
            await backend.put(key, value, lease=await manager.lease_for(key))
        assert sorted(manager.leases.values()) == [1, 3, 3]  # at most 3 keys a lease

        async with asyncio.TaskGroup() as group:
            keepalive = group.create_task(manager.run())
            before = await owned_keys(backend)
            victim = before[b"owned/0"]
            await backend.revoke(victim)  # as etcd does when a lease expires
            lost = {k for k, lease in before.items() if lease == victim}

            async def restored() -> bool:
                now = await owned_keys(backend)
                return now.keys() == wanted.keys() and victim not in now.values()

            await eventually(restored, message="lost keys re-created on a new lease")
            assert manager.lost_total == 1
            after = await owned_keys(backend)
            assert set(after.values()) == set(manager.leases)  # every key on a live lease
            assert all(after[k] == before[k] for k in wanted.keys() - lost)  # others untouched
            assert max(manager.leases.values()) <= 3
            keepalive.cancel()


async def test_keepalive_keeps_short_lease(etcd1: EmbeddedEtcd) -> None:
    async with backend_for(etcd1.client_urls, settings=FAST) as backend:
        manager = LeaseManager(backend, ttl=2, keepalive_interval=0.3)
        lease = await manager.lease_for(b"short/key")
        await backend.put(b"short/key", b"x", lease=lease)
        async with asyncio.TaskGroup() as group:
            keepalive = group.create_task(manager.run())
            # Ten renewals at 0.3 s span 3 s: without them the 2 s lease would be gone.
            await eventually(lambda: manager.keepalives_total >= 10, message="renewals")
            assert await backend.time_to_live(lease) > 0
            assert await backend.get(b"short/key") is not None
            assert manager.lost_total == 0
            keepalive.cancel()
        await manager.revoke_all()
        assert await backend.get(b"short/key") is None
