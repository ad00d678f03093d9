"""The relay's web UI in headless Chromium (Debian's ``chromium``), driven over the DevTools
protocol: the page lists the flows of every node with their verdicts, draws the service
map with one edge per connection coloured by verdict (green forwarded, red dropped), adds
a new flow live (server-sent events), filters, and a screenshot of it shows both edge
colours. The JSON endpoints answer a bad filter with 400.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import shutil
import struct
import zlib
from collections.abc import AsyncIterator
from itertools import count
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from controlplane.datapath.flowevents import FlowType, decode_event
from controlplane.datapath.layouts import MetricReason
from controlplane.relay.daemon import Relay, RelaySettings
from tests.helpers import eventually, requires, running, tools_unmet
from tests.test_flows_api import DB, OUT, record
from tests.test_relay import FAST_MERGE, FAST_PEERS, Agentish, Nodes

pytestmark = requires(tools_unmet("chromium"))

GREEN, RED = (0x13, 0x80, 0x3B), (0xC4, 0x23, 0x1B)


# -- a PNG reader (8-bit RGB/RGBA, as Chromium writes them) --------------------------------


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of a non-interlaced 8-bit RGB(A) PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    height = channels = 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6), (depth, ctype)
            channels = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        prev = line
        rgb = bytes(v for i, v in enumerate(line) if i % channels < 3)
        rows.append(rgb)
    return width, height, rows


def count_color(rows: list[bytes], color: tuple[int, int, int], tolerance: int = 24) -> int:
    n = 0
    for row in rows:
        for i in range(0, len(row), 3):
            if all(abs(row[i + k] - color[k]) <= tolerance for k in range(3)):
                n += 1
    return n


# -- Chromium over the DevTools protocol -------------------------------------------------------


class Browser:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), 30)
            if msg.get("id") == ident:
                assert "error" not in msg, msg
                result: dict[str, Any] = msg["result"]
                return result

    async def js(self, expression: str) -> Any:
        got = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return got["result"].get("value")


@contextlib.asynccontextmanager
async def chromium(url: str, tmp_path: Path) -> AsyncIterator[Browser]:
    proc = await asyncio.create_subprocess_exec(
        shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
        "--remote-debugging-port=0", f"--user-data-dir={tmp_path / 'chromium'}",
        "--window-size=1280,800", "--hide-scrollbars", "about:blank",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        port = None
        while port is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "chromium exited before listening"
            if m := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
                port = int(m.group(1))
        async with aiohttp.ClientSession() as http:
            async with http.put(f"http://127.0.0.1:{port}/json/new?{url}") as r:
                target = await r.json()
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                browser = Browser(ws)
                await browser.call("Page.enable")
                await browser.call("Runtime.enable")
                yield browser
    finally:
        proc.kill()
        await proc.wait()


async def test_ui_lists_maps_and_follows_flows(tmp_path: Path) -> None:
    a, b = Agentish("node-a"), Agentish("node-b")
    await a.start()
    await b.start()
    nodes = Nodes()
    nodes.put("node-a", f"127.0.0.1:{a.port}")
    nodes.put("node-b", f"127.0.0.1:{b.port}")
    a.feed(5432, 5432)  # web -> db, forwarded
    drop = record(OUT, DB, type_=FlowType.DROP, reason=MetricReason.DROP_POLICY_DENY, identity=2)
    b.server.ingest(decode_event(drop))  # world -> db, dropped
    b.server.end_batch()
    settings = RelaySettings(
        listen="127.0.0.1:0", peers=FAST_PEERS, merge=FAST_MERGE, metrics_port=None, ui_port=0
    )
    relay = Relay(settings, nodes.watch, CollectorRegistry())
    try:
        async with running(relay, name="test-relay-ui"):
            await eventually(lambda: len(relay.peers.connected()) == 2, message="connected")
            base = f"http://127.0.0.1:{relay.ui.port}"
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/api/flows?verdict=MAYBE") as r:
                    assert r.status == 400 and "verdict" in (await r.json())["error"]
                async with http.get(f"{base}/api/nodes") as r:
                    assert [n["name"] for n in (await r.json())["nodes"]] == ["node-a", "node-b"]

            async with chromium(base + "/", tmp_path) as page:
                await eventually(
                    lambda: page.js("document.body.dataset.loaded === 'true'"),
                    message="the page loaded its flows",
                )
                text = await page.js("document.getElementById('flows').innerText")
                assert text.count("FORWARDED") == 2 and text.count("DROPPED") == 1, text
                assert "default/web-7f:40000" in text and "prod/db-0:5432" in text
                assert "192.0.2.1:40000" in text and "POLICY_DENIED" in text
                edges = await page.js(
                    "[...document.querySelectorAll('line.edge')].map(e => e.getAttribute('class'))"
                )
                assert sorted(edges) == ["edge DROPPED", "edge FORWARDED"]
                labels = await page.js(
                    "[...document.querySelectorAll('g.workload text')].map(t => t.textContent)"
                )
                assert sorted(labels) == ["default/web", "prod/db", "reserved:world"]

                # live: a new flow shows up without a reload (server-sent events)
                await eventually(lambda: relay.observer.streams >= 1, message="the UI follows")
                await eventually(lambda: a.server.readers >= 1, message="... through node-a")
                a.feed(9999)
                await eventually(
                    lambda: page.js("document.getElementById('flows').innerText.includes(':9999')"),
                    message="the new flow listed live",
                )

                shot = await page.call("Page.captureScreenshot", format="png")
                png = base64.b64decode(shot["data"])
                (tmp_path / "ui.png").write_bytes(png)
                width, height, rows = png_pixels(png)
                assert width == 1280 and height > 500
                assert count_color(rows, GREEN) > 300, "no green (forwarded) edge drawn"
                assert count_color(rows, RED) > 300, "no red (dropped) edge drawn"

                # a filter: only the drops
                await page.js(
                    "document.querySelector('select[name=verdict]').value = 'DROPPED';"
                    "document.getElementById('apply').click()"
                )
                await eventually(
                    lambda: page.js(
                        "(t => t.includes('DROPPED') && !t.includes('FORWARDED'))"
                        "(document.getElementById('flows').innerText)"
                    ),
                    message="only dropped flows after the filter",
                )
                edges = await page.js("document.querySelectorAll('line.edge').length")
                assert edges == 1
    finally:
        await a.api.close()
        await b.api.close()
