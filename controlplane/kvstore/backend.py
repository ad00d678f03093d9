"""One backend object per etcd cluster: KV, transactions, leases, watches and status.

Built on aetcd's generated stubs over our own channel (TLS, several endpoints). Reads are
retried with jittered backoff while the cluster fails over; writes are not retried here,
since a write that failed in flight may have landed (callers guard with transactions).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from aetcd import rpc
from aetcd.rpc import rpc_pb2_grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from controlplane.config import ClientSettings, EtcdClusterConfig
from controlplane.kvstore.channel import open_channel
from controlplane.kvstore.errors import (
    Compacted,
    KvstoreError,
    LeaseLost,
    NoLeader,
    PermissionDenied,
    Unreachable,
    channel_closed,
    translate,
)
from controlplane.kvstore.ratelimit import RateLimiter
from controlplane.kvstore.types import (
    Compare,
    KeyValue,
    Lease,
    ListResult,
    MemberStatus,
    Op,
    OpResult,
    Put,
    QuorumRead,
    TxnResult,
    absent,
    prefix_range_end,
)

log = logging.getLogger(__name__)

_TURNS_TO_SEND = 2
LIST_PAGE_SIZE = 10_000
"""Keys per page of a paginated list. etcd counts the rest of the range on every page
(O(remaining keys)), so small pages make a large list quadratic: at 100k keys, 1000-key
pages list ~3x slower than 10k-key pages here. Pages of small values stay a few MB."""
T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]

REQUIRE_LEADER: Metadata = (("hasleader", "true"),)
"""etcd's metadata key that makes a member refuse the request when it has no leader."""


class EtcdBackend:
    """A connection to one etcd cluster."""

    def __init__(
        self,
        cluster: EtcdClusterConfig,
        settings: ClientSettings | None = None,
        *,
        own_connection: bool = False,
        fail_fast: bool = False,
        probe_key: bytes = b"cp/.heartbeat",
    ) -> None:
        self.cluster = cluster
        # Quorum probes read this key: every role of ours may read it (etcd checks the
        # permission on the key even for a count-only read).
        self.probe_key = probe_key
        self._wait_for_ready = not fail_fast
        self.settings = settings or ClientSettings()
        self.name = cluster.name
        self._own_connection = own_connection
        self._channel: grpc.aio.Channel | None = None
        self._closed = False
        self._token: str | None = None
        self._limiter = (
            RateLimiter(self.settings.qps, self.settings.burst) if self.settings.qps > 0 else None
        )
        self._kv: Any = None
        self._lease: Any = None
        self._watch: Any = None
        self._maintenance: Any = None
        self._cluster: Any = None
        self._auth: Any = None

    # -- lifecycle -------------------------------------------------------------------

    async def connect(self) -> None:
        if self._channel is not None:
            return
        self._closed = False
        channel = await open_channel(
            self.cluster, self.settings, own_connection=self._own_connection
        )
        self._channel = channel
        self._kv = rpc_pb2_grpc.KVStub(channel)
        self._lease = rpc_pb2_grpc.LeaseStub(channel)
        self._watch = rpc_pb2_grpc.WatchStub(channel)
        self._maintenance = rpc_pb2_grpc.MaintenanceStub(channel)
        self._cluster = rpc_pb2_grpc.ClusterStub(channel)
        self._auth = rpc_pb2_grpc.AuthStub(channel)
        if self.cluster.username is not None:
            try:
                await self._authenticate()
            except BaseException:
                await self.close()
                raise

    async def reconnect(self) -> None:
        """A fresh channel in place of the current one: calls and streams in flight on the
        old one fail as Unreachable, and their retries and resumes use the new one."""
        old, self._channel = self._channel, None
        await self.connect()
        if old is not None:
            await old.close()

    async def close(self) -> None:
        self._closed = True  # no lazy reconnect by a call still in flight
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> EtcdBackend:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            raise Unreachable(f"etcd cluster {self.name!r}: not connected")
        return self._channel

    async def _authenticate(self) -> None:
        request = rpc.AuthenticateRequest(
            name=self.cluster.username, password=self.cluster.password
        )
        try:
            response = await self._auth.Authenticate(
                request, timeout=self.settings.request_timeout, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self.name) from None
        self._token = response.token

    def metadata(self, require_leader: bool = False) -> Metadata:
        md: Metadata = (("token", self._token),) if self._token else ()
        return md + REQUIRE_LEADER if require_leader else md

    # -- the request path ------------------------------------------------------------

    async def call(
        self,
        method: Callable[..., Awaitable[T]],
        request: Any,
        *,
        require_leader: bool = False,
        timeout: float | None = None,
    ) -> T:
        """Run one unary RPC: rate limit, deadline, auth token refresh, error translation."""
        if self._channel is None:
            if self._closed:
                raise Unreachable(f"the connection to {self.name} was closed")
            await self.connect()
        if self._limiter is not None:
            await self._limiter.acquire()
        for attempt in range(2):
            try:
                return await method(
                    request,
                    timeout=timeout or self.settings.request_timeout,
                    metadata=self.metadata(require_leader),
                    wait_for_ready=self._wait_for_ready,
                )
            except asyncio.CancelledError:
                if (closed := channel_closed(self.name)) is None:
                    raise
                raise closed from None
            except grpc.aio.AioRpcError as exc:
                error = translate(exc, self.name)
                expired = "invalid auth token" in (exc.details() or "")
                if isinstance(error, PermissionDenied) and expired and attempt == 0:
                    await self._authenticate()
                    continue
                raise error from exc
        raise AssertionError("unreachable")

    async def read(
        self,
        method: Callable[..., Awaitable[T]],
        request: Any,
        *,
        require_leader: bool = False,
    ) -> T:
        """A read is safe to repeat: retry it while the cluster fails over."""
        try:
            # The common case pays no retry machinery (tenacity costs ~50 us a call).
            return await self.call(method, request, require_leader=require_leader)
        except (Unreachable, NoLeader):
            pass
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((Unreachable, NoLeader)),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            stop=stop_after_delay(self.settings.request_timeout),
            reraise=True,
        ):
            with attempt:
                return await self.call(method, request, require_leader=require_leader)
        raise AssertionError("unreachable")

    # -- KV --------------------------------------------------------------------------

    async def get(self, key: bytes) -> KeyValue | None:
        response = await self.read(self._kv.Range, rpc.RangeRequest(key=key))
        return KeyValue.from_pb(response.kvs[0]) if response.kvs else None

    async def list_page(
        self, prefix: bytes, *, start: bytes | None = None, limit: int = 1000, revision: int = 0
    ) -> tuple[list[KeyValue], int, bool]:
        """One page of a prefix: (kvs, revision, more)."""
        request = rpc.RangeRequest(
            key=start or prefix, range_end=prefix_range_end(prefix), limit=limit, revision=revision
        )
        try:
            response = await self.read(self._kv.Range, request)
        except KvstoreError as exc:
            if revision and _is_compacted(exc):
                raise Compacted(str(exc), revision, endpoint=self.name) from exc
            raise
        kvs = [KeyValue.from_pb(kv) for kv in response.kvs]
        return kvs, response.header.revision, bool(response.more)

    async def iter_prefix(
        self, prefix: bytes, *, page_size: int = LIST_PAGE_SIZE, revision: int = 0
    ) -> AsyncIterator[tuple[list[KeyValue], int]]:
        """Pages of every key under ``prefix``, all read at one revision.

        The next page is requested as soon as a page arrives, so etcd serves it while the
        caller works on the current one (a page's last key is all the next request needs).
        """
        kvs, rev, more = await self.list_page(prefix, limit=page_size, revision=revision)
        revision = revision or rev
        following: asyncio.Task[tuple[list[KeyValue], int, bool]] | None = None
        try:
            while True:
                if more and kvs:
                    start = kvs[-1].key + b"\0"
                    following = asyncio.create_task(
                        self.list_page(prefix, start=start, limit=page_size, revision=revision)
                    )
                    # Two loop turns: one starts our task, one grpc's call task, which
                    # sends the request; a caller busy with the page would hold them off.
                    for _ in range(_TURNS_TO_SEND):
                        await asyncio.sleep(0)
                yield kvs, revision
                if following is None:
                    return
                kvs, _, more = await following
                following = None
        finally:
            if following is not None:  # the caller stopped early, or the read failed
                following.cancel()
                following.add_done_callback(_retrieve)

    async def list_prefix(
        self, prefix: bytes, *, page_size: int = LIST_PAGE_SIZE, revision: int = 0
    ) -> ListResult:
        """Every key under ``prefix`` at one consistent revision, read in pages."""
        kvs: list[KeyValue] = []
        async for page, rev in self.iter_prefix(prefix, page_size=page_size, revision=revision):
            kvs.extend(page)
            revision = rev
        if not revision:
            revision = await self.current_revision()
        return ListResult(tuple(kvs), revision)

    async def current_revision(self) -> int:
        """The store's revision, by a linearizable read (so it proves a quorum)."""
        request = rpc.RangeRequest(key=self.probe_key, count_only=True)
        response = await self.read(self._kv.Range, request)
        revision: int = response.header.revision
        return revision

    async def quorum_read(self, key: bytes) -> QuorumRead:
        """``key`` by a linearizable read (proving a quorum), with the revision and the raft
        term of the answer."""
        response = await self.read(self._kv.Range, rpc.RangeRequest(key=key))
        kv = KeyValue.from_pb(response.kvs[0]) if response.kvs else None
        return QuorumRead(response.header.revision, response.header.raft_term, kv)

    async def count_prefix(self, prefix: bytes) -> int:
        request = rpc.RangeRequest(key=prefix, range_end=prefix_range_end(prefix), count_only=True)
        response = await self.read(self._kv.Range, request)
        count: int = response.count
        return count

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Put and return the new revision."""
        response = await self.call(self._kv.Put, rpc.PutRequest(key=key, value=value, lease=lease))
        revision: int = response.header.revision
        return revision

    async def delete(self, key: bytes, *, prefix: bool = False) -> int:
        """Delete a key (or every key under a prefix); returns how many were deleted."""
        end = prefix_range_end(key) if prefix else b""
        response = await self.call(
            self._kv.DeleteRange, rpc.DeleteRangeRequest(key=key, range_end=end)
        )
        deleted: int = response.deleted
        return deleted

    async def create(self, key: bytes, value: bytes, *, lease: int = 0) -> bool:
        """Create-only put: False when the key already exists."""
        result = await self.txn([absent(key)], [Put(key, value, lease)])
        return result.succeeded

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        request = rpc.TxnRequest(
            compare=[c.to_pb() for c in compares],
            success=[op.to_pb() for op in success],
            failure=[op.to_pb() for op in failure],
        )
        response = await self.call(self._kv.Txn, request)
        results = tuple(_op_result(r) for r in response.responses)
        return TxnResult(bool(response.succeeded), response.header.revision, results)

    async def compact(self, revision: int, *, physical: bool = True) -> None:
        request = rpc.CompactionRequest(revision=revision, physical=physical)
        await self.call(self._kv.Compact, request, timeout=max(30.0, self.settings.request_timeout))

    # -- leases ----------------------------------------------------------------------

    async def grant(self, ttl: int) -> Lease:
        response = await self.call(self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl))
        if response.error:
            raise KvstoreError(f"lease grant failed: {response.error}")
        return Lease(response.ID, response.TTL)

    async def revoke(self, lease_id: int) -> None:
        with contextlib.suppress(LeaseLost):
            await self.call(self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease_id))

    async def time_to_live(self, lease_id: int) -> int:
        """Remaining TTL in seconds; -1 when the lease is gone."""
        response = await self.read(
            self._lease.LeaseTimeToLive, rpc.LeaseTimeToLiveRequest(ID=lease_id)
        )
        ttl: int = response.TTL
        return ttl

    def keepalive_stream(self) -> Any:
        """A bidirectional LeaseKeepAlive call (the session manager drives it)."""
        return self._lease.LeaseKeepAlive(metadata=self.metadata(self.settings.require_leader))

    async def count_leases(self) -> int:
        response = await self.read(self._lease.LeaseLeases, rpc.LeaseLeasesRequest())
        return len(response.leases)

    # -- watch -----------------------------------------------------------------------

    def watch_stream(self) -> Any:
        """A bidirectional Watch call (the list-watcher drives it)."""
        return self._watch.Watch(metadata=self.metadata(self.settings.require_leader))

    # -- cluster and maintenance -----------------------------------------------------

    async def status(self) -> MemberStatus:
        """Status of whichever member this connection talks to."""
        response = await self.call(self._maintenance.Status, rpc.StatusRequest())
        return member_status(self.name, response)

    async def defragment(self) -> None:
        """Defragment the member this connection talks to (give it a single endpoint to
        choose which); the member blocks reads and writes while it runs."""
        await self.call(
            self._maintenance.Defragment,
            rpc.DefragmentRequest(),
            timeout=max(60.0, self.settings.request_timeout),
        )

    async def members(self) -> list[tuple[int, str, tuple[str, ...]]]:
        """(id, name, client URLs) of each member."""
        response = await self.read(self._cluster.MemberList, rpc.MemberListRequest())
        return [(m.ID, m.name, tuple(m.clientURLs)) for m in response.members]


def member_status(endpoint: str, response: Any) -> MemberStatus:
    return MemberStatus(
        endpoint=endpoint,
        member_id=response.header.member_id,
        version=response.version,
        db_size=response.dbSize,
        db_size_in_use=response.dbSizeInUse,
        leader=response.leader,
        raft_term=response.raftTerm,
        raft_index=response.raftIndex,
        revision=response.header.revision,
        is_learner=response.isLearner,
        errors=tuple(response.errors),
    )


def _op_result(response: Any) -> OpResult:
    which = response.WhichOneof("response")
    if which == "response_range":
        return OpResult(kvs=tuple(KeyValue.from_pb(kv) for kv in response.response_range.kvs))
    if which == "response_delete_range":
        return OpResult(deleted=response.response_delete_range.deleted)
    return OpResult()


def _is_compacted(exc: KvstoreError) -> bool:
    return "compacted" in str(exc)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark an abandoned task's outcome as seen (no "exception was never retrieved")."""
    if not task.cancelled():
        task.exception()
