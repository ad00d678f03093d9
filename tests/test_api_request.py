"""The local API's client (``controlplane.agent.api.request``) against a real socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controlplane.agent.api import request


async def test_a_loop_of_requests_ends_on_its_first_cancel(tmp_path: Path) -> None:
    """A cancellation that arrives as a request completes is not swallowed (Python 3.11's
    wait_for did: a test's churn loop then ran on forever after its cancel)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    socket = tmp_path / "api.sock"
    server = await asyncio.start_unix_server(answer, str(socket))
    answered = 0

    async def loop() -> None:
        nonlocal answered
        while True:
            assert await request(socket, "GET", "/v1/status", timeout=30) == (200, {})
            answered += 1

    ignored: list[int] = []
    async with server:
        for i in range(300):
            task = asyncio.create_task(loop())
            for _ in range(i % 23):  # cancel at every point of a request's life
                await asyncio.sleep(0)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=10)
            if not done:
                ignored.append(i)
                while not task.done():
                    task.cancel()
                    await asyncio.wait({task}, timeout=1)
                break
    assert answered > 0
    assert ignored == [], f"cancel {ignored[0]} ignored: the loop ran on"
