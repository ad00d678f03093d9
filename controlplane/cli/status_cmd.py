"""`cpctl status`: the local agent's view, read from its API socket.

Exit status 0 when the agent answers and its kvstore is healthy, 1 when it answers but is
unhealthy or not ready, or (one line on stderr) when no agent runs at the socket.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from controlplane.agent.api import request
from controlplane.agent.settings import DEFAULT_SOCKET
from controlplane.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    CommandError,
    add_json_flag,
    positive_float,
    print_json,
    print_table,
)

__all__ = ["CommandError", "register", "run", "show"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("status", help="the local agent's status (its API socket)")
    parser.add_argument(
        "--socket",
        type=Path,
        default=DEFAULT_SOCKET,
        metavar="PATH",
        help=f"the agent's API socket (default {DEFAULT_SOCKET})",
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=5.0, metavar="SECONDS", help="default 5"
    )
    add_json_flag(parser)
    parser.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    return await show(args.socket, as_json=args.json, timeout=args.timeout)


async def show(socket: Path, *, as_json: bool, timeout: float = 5.0) -> int:
    try:
        code, body = await request(socket, "GET", "/v1/status", timeout=timeout)
    except (OSError, TimeoutError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise CommandError(f"agent not running at {socket}: {why}") from None
    if code != 200 or not isinstance(body, dict):
        raise CommandError(f"agent at {socket} answered {code}: {body}")
    if as_json:
        print_json(body)
    else:
        _print(body)
    healthy = bool(body.get("ready")) and bool(body.get("kvstore", {}).get("healthy"))
    return EXIT_OK if healthy else EXIT_FAIL


def _print(status: dict[str, Any]) -> None:
    kv = status.get("kvstore", {})
    restarts = status.get("restarts", {})
    cache = status.get("cache", {})
    print(f"node:       {status.get('node')} ({', '.join(status.get('node_ips', []))})")
    print(f"cluster:    {status.get('cluster')}")
    print(f"pod CIDR:   {status.get('cidr') or '-'}")
    print(f"phase:      {status.get('phase')}")
    store = status.get("store") or {}
    if store.get("mode") == "crd":
        print(f"store:      {store.get('describe')}: {kv.get('state')}")
    else:
        print(f"kvstore:    {kv.get('state')}")
    print(f"endpoints:  {status.get('endpoints')}")
    last = restarts.get("last_reason")
    print(
        f"restarts:   {restarts.get('count', 0)} (mode {restarts.get('mode')}"
        + (f", last: {last})" if last else ")")
    )
    print(
        f"cache:      {cache.get('identities', 0)} identities, "
        f"{cache.get('endpoints', 0)} endpoints, {cache.get('nodes', 0)} nodes"
    )
    datapath = status.get("datapath", {})
    sysctls = datapath.get("sysctls") or {}
    for s in sysctls.get("required", []):
        state = "ok" if s.get("ok") else f"WRONG, want {s.get('want')}: {s.get('error')}"
        changed = " (set at start)" if s.get("changed") else ""
        print(f"sysctl:     {s.get('name')}={s.get('value')} {state}{changed}")
    for name, m in datapath.get("maps", {}).items():
        print(f"map:        {name} ({datapath.get('mode')}): {m.get('entries')} entries")
    services = status.get("services")
    if services is not None:
        sock_lb = datapath.get("socket_lb") or {}
        lb_state = "attached" if sock_lb.get("attached") else "not attached"
        print(
            f"services:   {services.get('services', 0)} services, "
            f"{services.get('frontends', 0)} frontends; socket LB {lb_state} "
            f"({sock_lb.get('detail', '-')})"
        )
        for conflict in services.get("conflicts", []):
            print(f"conflict:   {conflict}")
    if status.get("malformed_skipped"):
        print(f"malformed:  {int(status['malformed_skipped'])} values skipped")
    rows = []
    for shard in kv.get("shards", []):
        age, threshold = shard.get("heartbeat_age"), shard.get("heartbeat_threshold")
        rows.append(
            [
                shard.get("name"),
                "healthy" if shard.get("healthy") else "unhealthy",
                shard.get("reachable"),
                None if age is None else f"{age:.1f}s / {threshold:.1f}s",
                shard.get("consecutive_errors"),
                shard.get("reason") or None,
            ]
        )
    if rows:
        print()
        print_table(["SHARD", "STATE", "REACHABLE", "HEARTBEAT AGE", "ERRORS", "REASON"], rows)
