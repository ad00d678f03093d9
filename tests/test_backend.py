"""The etcd backend's contract, against a real single member and a real 3-member cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from helpers import backend_for

from controlplane.config import ClientSettings
from controlplane.kvstore.backend import EtcdBackend
from controlplane.kvstore.embedded import EmbeddedEtcd
from controlplane.kvstore.errors import Compacted, KvstoreError, Unreachable
from controlplane.kvstore.ratelimit import RateLimiter
from controlplane.kvstore.types import (
    Delete,
    Get,
    Put,
    absent,
    create_revision_is,
    mod_revision_is,
    none_under,
    value_is,
    version_is,
)


@pytest.fixture(params=[1, 3], ids=["1-member", "3-members"])
def cluster(request: pytest.FixtureRequest) -> EmbeddedEtcd:
    etcd: EmbeddedEtcd = request.getfixturevalue("etcd1" if request.param == 1 else "etcd3")
    return etcd


@pytest_asyncio.fixture
async def backend(cluster: EmbeddedEtcd) -> AsyncIterator[EtcdBackend]:
    async with backend_for(cluster.client_urls) as b:
        yield b


async def test_get_put_delete(backend: EtcdBackend) -> None:
    assert await backend.get(b"k") is None
    rev = await backend.put(b"k", b"v1")
    kv = await backend.get(b"k")
    assert kv is not None and kv.value == b"v1" and kv.mod_revision == rev and kv.version == 1
    await backend.put(b"k", b"v2")
    kv2 = await backend.get(b"k")
    assert kv2 is not None and kv2.version == 2 and kv2.create_revision == kv.create_revision
    assert await backend.delete(b"k") == 1
    assert await backend.delete(b"k") == 0
    assert await backend.get(b"k") is None


async def test_create_only(backend: EtcdBackend) -> None:
    assert await backend.create(b"c", b"first")
    assert not await backend.create(b"c", b"second")
    kv = await backend.get(b"c")
    assert kv is not None and kv.value == b"first"


async def test_transaction_compares(backend: EtcdBackend) -> None:
    rev = await backend.put(b"t/a", b"1")
    kv = await backend.get(b"t/a")
    assert kv is not None

    ok = await backend.txn([value_is(b"t/a", b"1")], [Put(b"t/b", b"x")], [Put(b"t/c", b"y")])
    assert ok.succeeded and ok.revision > rev
    bad = await backend.txn([value_is(b"t/a", b"2")], [Put(b"t/b", b"x2")], [Put(b"t/c", b"y")])
    assert not bad.succeeded
    assert (await backend.get(b"t/c")) is not None
    b_kv = await backend.get(b"t/b")
    assert b_kv is not None and b_kv.value == b"x"

    assert (await backend.txn([version_is(b"t/a", 1)], [])).succeeded
    assert not (await backend.txn([version_is(b"t/a", 2)], [])).succeeded
    assert (await backend.txn([create_revision_is(b"t/a", kv.create_revision)], [])).succeeded
    assert (await backend.txn([mod_revision_is(b"t/a", kv.mod_revision)], [])).succeeded
    assert not (await backend.txn([mod_revision_is(b"t/a", kv.mod_revision - 1)], [])).succeeded
    assert (await backend.txn([mod_revision_is(b"t/a", kv.mod_revision + 1, "<")], [])).succeeded
    assert (await backend.txn([absent(b"t/none")], [])).succeeded
    assert not (await backend.txn([absent(b"t/a")], [])).succeeded

    # All operations of one transaction land at one revision, and Gets see the txn's state.
    res = await backend.txn(
        [absent(b"t/d")],
        [Put(b"t/d", b"1"), Put(b"t/e", b"2"), Delete(b"t/c"), Get(b"t/", prefix=True)],
    )
    assert res.succeeded
    d, e = await backend.get(b"t/d"), await backend.get(b"t/e")
    assert d is not None and e is not None and d.mod_revision == e.mod_revision == res.revision
    listed = {kv.key for kv in res.results[3].kvs}
    assert listed == {b"t/a", b"t/b", b"t/d", b"t/e"}
    assert res.results[2].deleted == 1

    # A prefix delete in a transaction
    res = await backend.txn([], [Delete(b"t/", prefix=True)])
    assert res.results[0].deleted == 4


async def test_pagination_is_consistent(backend: EtcdBackend) -> None:
    for i in range(250):
        await backend.put(b"p/%04d" % i, b"v%d" % i)
    await backend.put(b"pz", b"outside the prefix")
    revision = await backend.current_revision()
    for i in range(250, 300):
        await backend.put(b"p/%04d" % i, b"late")
    await backend.delete(b"p/0000")

    pages = [page async for page, _ in backend.iter_prefix(b"p/", page_size=7, revision=revision)]
    assert all(len(page) <= 7 for page in pages)
    keys = [kv.key for page in pages for kv in page]
    assert keys == [b"p/%04d" % i for i in range(250)]

    latest = await backend.list_prefix(b"p/", page_size=64)
    assert [kv.key for kv in latest.kvs] == [b"p/%04d" % i for i in range(1, 300)]
    assert latest.revision > revision
    assert await backend.count_prefix(b"p/") == 299

    await backend.compact(latest.revision)
    with pytest.raises(Compacted):
        await backend.list_prefix(b"p/", revision=revision)


async def test_rate_limit_paces_requests(cluster: EmbeddedEtcd) -> None:
    settings = ClientSettings(qps=50, burst=2)
    async with backend_for(cluster.client_urls, settings=settings) as limited:
        await asyncio.gather(*(limited.put(b"rl/%d" % i, b"x") for i in range(10)))
        limiter = limited._limiter
        assert isinstance(limiter, RateLimiter)
        # 10 requests against a burst of 2 must have waited for about 8 tokens.
        assert limiter.waited_seconds > 0


async def test_unreachable_is_a_domain_error() -> None:
    settings = ClientSettings(request_timeout=0.5)
    async with backend_for(["http://127.0.0.1:9"], settings=settings) as nowhere:
        with pytest.raises(KvstoreError) as info:
            await nowhere.put(b"k", b"v")
        assert isinstance(info.value, Unreachable | KvstoreError)
        assert info.value.__cause__ is not None


async def test_status_and_members(cluster: EmbeddedEtcd, backend: EtcdBackend) -> None:
    status = await backend.status()
    assert status.version.startswith("3.")
    assert status.leader != 0 and status.revision >= 1
    members = await backend.members()
    assert len(members) == len(cluster.client_urls)
    assert await backend.current_revision() >= 1


async def test_range_compare_none_under(backend: EtcdBackend) -> None:
    assert (await backend.txn([none_under(b"rc/")], [])).succeeded
    await backend.put(b"rc/x/1", b"1")
    await backend.put(b"rc0", b"outside")
    assert not (await backend.txn([none_under(b"rc/")], [])).succeeded
    assert (await backend.txn([none_under(b"rc/y/")], [])).succeeded
    await backend.delete(b"rc/x/1")
    assert (await backend.txn([none_under(b"rc/")], [])).succeeded


async def test_paging_prefetch_stops_cleanly_and_reports_a_failed_page(
    backend: EtcdBackend,
) -> None:
    """The next page is requested while the caller holds one: a caller that stops early
    leaves no request running (the leaked-task check), and a page that fails (here: its
    revision compacted meanwhile) raises to the caller, after the pages that came."""
    for i in range(40):
        await backend.put(b"q/%04d" % i, b"v")
    revision = await backend.current_revision()
    await backend.put(b"q/late", b"v")

    pages = backend.iter_prefix(b"q/", page_size=10, revision=revision)
    first, _ = await anext(pages)
    assert [kv.key for kv in first] == [b"q/%04d" % i for i in range(10)]
    await pages.aclose()  # stopped early

    pages = backend.iter_prefix(b"q/", page_size=10, revision=revision)
    first, _ = await anext(pages)
    await backend.compact(await backend.current_revision())
    got = len(first)
    with pytest.raises(Compacted):
        async for page, _ in pages:
            got += len(page)
    assert got < 40
