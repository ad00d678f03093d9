"""etcd's own request counters, from each member's ``/metrics``: what a phase cost etcd.

``grpc_server_started_total`` counts unary requests and opened streams by method;
``grpc_server_msg_received_total`` counts the messages on streams (lease keepalives, watch
creations). A member that does not answer (killed, paused) is left out of that sample.
``etcd_mvcc_db_total_size_in_bytes`` (and ``..._in_use_...``) is each member's DB file
size (and the part of it in use; a defragmentation gives the rest back).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Iterable
from urllib.parse import urlsplit

from controlplane.telemetry import http_get

_LINE = re.compile(
    r'^grpc_server_(started|msg_received)_total\{[^}]*grpc_method="(\w+)"[^}]*\} (\S+)$',
    re.MULTILINE,
)
_DB = re.compile(r"^etcd_mvcc_db_total_size_(in_bytes|in_use_in_bytes) (\S+)$", re.MULTILINE)
STREAMS = ("Watch", "LeaseKeepAlive")
DB_SIZE = "db_bytes"
DB_IN_USE = "db_in_use_bytes"


async def _metrics(url: str) -> str:
    parts = urlsplit(url)
    try:
        status, text = await http_get(
            parts.hostname or "127.0.0.1", parts.port or 2379, "/metrics", 2.0
        )
    except (OSError, TimeoutError, ValueError, IndexError):
        return ""
    return text if status == 200 and isinstance(text, str) else ""


async def db_sizes(urls: Iterable[str]) -> dict[str, dict[str, int]]:
    """Per member that answered: its DB size and the part in use (bytes)."""
    urls = list(urls)
    out = {}
    for url, text in zip(urls, await asyncio.gather(*(_metrics(u) for u in urls)), strict=True):
        sizes = {
            (DB_SIZE if kind == "in_bytes" else DB_IN_USE): int(float(v))
            for kind, v in _DB.findall(text)
        }
        if sizes:
            out[url] = sizes
    return out


async def _scrape(url: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    text = await _metrics(url)
    for kind, method, value in _LINE.findall(text):
        if kind == "started" and method not in STREAMS:
            counts[method] += int(float(value))
        elif kind == "started":
            counts[f"{method} streams"] += int(float(value))
        elif method in STREAMS:
            counts[f"{method} messages"] += int(float(value))
    return counts


async def sample(urls: Iterable[str]) -> Counter[str]:
    """Counters summed over every member that answered."""
    total: Counter[str] = Counter()
    for counts in await asyncio.gather(*(_scrape(u) for u in urls)):
        total.update(counts)
    return total


def rates(before: Counter[str], after: Counter[str], seconds: float) -> dict[str, float]:
    """Per-second rates of the counters that moved (a restarted member's counters start
    again from zero: a negative delta counts as nothing)."""
    if seconds <= 0:
        return {}
    out = {}
    for name in sorted(set(before) | set(after)):
        delta = after.get(name, 0) - before.get(name, 0)
        if delta > 0:
            out[name] = round(delta / seconds, 1)
    return out
