"""The scale harness's fault-injecting TCP proxy, with real sockets: an echo server behind
it, clients in front. Bytes pass; a blackhole holds existing and new connections and lets
them carry on after the heal; a reset partition resets both; a sever resets once; added
latency delays each direction by at least its amount, in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from controlplane.scale.proxy import FaultProxy, Mode
from tests.helpers import eventually


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.fixture
async def proxy(echo: int) -> AsyncIterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", echo, name="echo")
    await p.start()
    yield p
    await p.close()


async def connect(p: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", p.port)


async def roundtrip(r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes) -> bytes:
    w.write(data)
    await w.drain()
    return await asyncio.wait_for(r.readexactly(len(data)), 20)


async def nothing_arrives(r: asyncio.StreamReader, seconds: float = 0.5) -> bool:
    try:
        got = await asyncio.wait_for(r.read(1), seconds)
    except TimeoutError:
        return True
    raise AssertionError(f"got {got!r} through a blackhole")


async def is_reset(r: asyncio.StreamReader) -> bool:
    """The connection ended (reset or closed) without an answer."""
    try:
        got = await asyncio.wait_for(r.read(1), 20)
    except ConnectionResetError:
        return True
    return got == b""


async def test_bytes_pass_both_ways(proxy: FaultProxy) -> None:
    r, w = await connect(proxy)
    payload = bytes(range(256)) * 1000  # several chunks
    assert await roundtrip(r, w, payload) == payload
    assert proxy.stats.bytes_up == len(payload)
    await eventually(lambda: proxy.stats.bytes_down == len(payload))
    w.close()
    await eventually(lambda: proxy.connections == 0, message="closed connection forgotten")


async def test_blackhole_holds_existing_and_new_connections_until_the_heal(
    proxy: FaultProxy,
) -> None:
    r1, w1 = await connect(proxy)
    assert await roundtrip(r1, w1, b"before") == b"before"
    await proxy.set_mode(Mode.BLACKHOLE)
    w1.write(b"held")
    await w1.drain()
    assert await nothing_arrives(r1)
    r2, w2 = await connect(proxy)  # accepted, then it hangs
    w2.write(b"new")
    await w2.drain()
    assert await nothing_arrives(r2)
    await proxy.set_mode(Mode.PASS)
    assert await asyncio.wait_for(r1.readexactly(4), 20) == b"held"
    assert await asyncio.wait_for(r2.readexactly(3), 20) == b"new"
    assert proxy.stats.reset == 0
    w1.close()
    w2.close()


async def test_reset_partition_resets_existing_and_new_connections(proxy: FaultProxy) -> None:
    r1, w1 = await connect(proxy)
    assert await roundtrip(r1, w1, b"x") == b"x"
    await proxy.set_mode(Mode.RESET)
    assert await is_reset(r1)
    r2, w2 = await connect(proxy)
    assert await is_reset(r2)
    assert proxy.stats.reset >= 2
    await proxy.set_mode(Mode.PASS)
    r3, w3 = await connect(proxy)
    assert await roundtrip(r3, w3, b"after") == b"after"
    for w in (w1, w2, w3):
        w.close()


async def test_blackholed_connections_are_reset_when_the_partition_turns_to_reset(
    proxy: FaultProxy,
) -> None:
    await proxy.set_mode(Mode.BLACKHOLE)
    r, w = await connect(proxy)
    w.write(b"hang")
    await w.drain()
    assert await nothing_arrives(r)
    await proxy.set_mode(Mode.RESET)
    assert await is_reset(r)
    w.close()


async def test_sever_resets_once_and_new_connections_pass(proxy: FaultProxy) -> None:
    r1, w1 = await connect(proxy)
    assert await roundtrip(r1, w1, b"a") == b"a"
    await proxy.sever()
    assert await is_reset(r1)
    assert proxy.mode is Mode.PASS
    r2, w2 = await connect(proxy)
    assert await roundtrip(r2, w2, b"b") == b"b"
    w1.close()
    w2.close()


async def test_latency_is_added_per_direction_and_keeps_order(proxy: FaultProxy) -> None:
    r, w = await connect(proxy)
    assert await roundtrip(r, w, b"warm") == b"warm"
    proxy.set_latency(0.2, 0.3)
    start = time.monotonic()
    chunks = [f"chunk{i};".encode() for i in range(20)]
    for chunk in chunks:  # separate writes: separate chunks, each delayed, in order
        w.write(chunk)
        await w.drain()
    total = b"".join(chunks)
    got = await asyncio.wait_for(r.readexactly(len(total)), 20)
    took = time.monotonic() - start
    assert got == total
    assert took >= 0.5, f"round trip {took:.3f}s, want at least 0.2 + 0.3"
    proxy.set_latency(0.0, 0.0)
    w.close()
