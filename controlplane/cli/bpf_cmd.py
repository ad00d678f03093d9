"""`cpctl bpf ipcache list|policy list ENDPOINT_ID|metrics|ct list|lb list`: the pinned maps.

Reads the maps the agent and the tc program share, pinned under ``--pin-dir`` (default
``/sys/fs/bpf/cp``, the agent's ``--bpf-pin-dir``). Needs root; a missing pin (no agent in
kernel mode ran here) is a one-line error with exit status 1. ``--json`` for scripts.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from controlplane.cli.common import EXIT_OK, CommandError, add_json_flag, print_json, print_table
from controlplane.datapath.bpf_syscall import KernelMapError
from controlplane.datapath.conntrack import ct_flows
from controlplane.datapath.counters import verdict_counts
from controlplane.datapath.ipcache import IPCACHE_MAP_NAME, IpcacheEntry, decode_key
from controlplane.datapath.kernel import KernelMap
from controlplane.datapath.layouts import (
    CT_MAP_NAME,
    ENDPOINTS_MAP_NAME,
    METRICS_MAP_NAME,
    POLICY_MAP_NAME,
)
from controlplane.datapath.lbmap import (
    LB_METRICS_MAP_NAME,
    LB_SERVICES_MAP_NAME,
    LB_SLOTS_MAP_NAME,
    lb_entries,
    read_counters,
)
from controlplane.datapath.policymap import endpoint_flags, policy_rows
from controlplane.model import PROTOCOLS

DEFAULT_PIN_DIR = Path("/sys/fs/bpf/cp")
_PROTO_NAMES = {number: name for name, number in PROTOCOLS.items()}


def register(subparsers: Any) -> None:
    bpf = subparsers.add_parser("bpf", help="read the pinned eBPF maps of this node (root)")
    commands = bpf.add_subparsers(dest="bpf_command", required=True, metavar="COMMAND")
    ipcache = commands.add_parser("ipcache", help="the ipcache map")
    ipcache_cmds = ipcache.add_subparsers(dest="ipcache_command", required=True)
    ipcache_list = ipcache_cmds.add_parser("list", help="every prefix -> identity entry")
    ipcache_list.set_defaults(run=run_ipcache_list)
    policy = commands.add_parser("policy", help="the policy map")
    policy_cmds = policy.add_subparsers(dest="policy_command", required=True)
    policy_list = policy_cmds.add_parser("list", help="one endpoint's policy entries")
    policy_list.add_argument(
        "endpoint_id", type=_u32, metavar="ENDPOINT_ID", help="endpoint_id in the agent's API"
    )
    policy_list.set_defaults(run=run_policy_list)
    metrics = commands.add_parser("metrics", help="allow/drop counters by reason")
    metrics.set_defaults(run=run_metrics)
    ct = commands.add_parser("ct", help="the connection tracking map")
    ct_cmds = ct.add_subparsers(dest="ct_command", required=True)
    ct_list = ct_cmds.add_parser("list", help="the flows endpoints opened, with their state")
    ct_list.set_defaults(run=run_ct_list)
    lb = commands.add_parser("lb", help="the service load-balancing maps")
    lb_cmds = lb.add_subparsers(dest="lb_command", required=True)
    lb_list = lb_cmds.add_parser(
        "list", help="every service frontend with its current backend set and counters"
    )
    lb_list.set_defaults(run=run_lb_list)
    for parser in (ipcache_list, policy_list, metrics, ct_list, lb_list):
        parser.add_argument(
            "--pin-dir", type=Path, default=DEFAULT_PIN_DIR, help="where the maps are pinned"
        )
        add_json_flag(parser)


def _u32(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"endpoint id must be 0..2**32-1, got {value}")
    return value


@contextmanager
def _pinned(pin_dir: Path, name: str) -> Iterator[KernelMap]:
    path = pin_dir / name
    if os.geteuid() != 0:
        raise CommandError(f"bpf: reading {path} needs root")
    if not path.exists():
        raise CommandError(f"bpf: {path} is not pinned (is an agent running in kernel mode?)")
    try:
        kmap = KernelMap.open_pinned(path)
    except (KernelMapError, OSError) as exc:
        raise CommandError(f"bpf: opening {path}: {exc}") from None
    with kmap:
        yield kmap


async def run_ipcache_list(args: argparse.Namespace) -> int:
    with _pinned(args.pin_dir, IPCACHE_MAP_NAME) as kmap:
        rows = []
        for key, value in kmap.items():
            entry = IpcacheEntry.decode(value)
            rows.append({
                "prefix": str(decode_key(key)),
                "identity": int(entry.identity),
                "tunnel_endpoint": str(entry.tunnel_endpoint),
                "flags": entry.flags,
            })  # fmt: skip
    rows.sort(key=lambda r: str(r["prefix"]))
    return _show(
        args,
        rows,
        ["PREFIX", "IDENTITY", "TUNNEL", "FLAGS"],
        lambda r: [r["prefix"], r["identity"], r["tunnel_endpoint"], r["flags"]],
    )


async def run_policy_list(args: argparse.Namespace) -> int:
    ep = args.endpoint_id
    with _pinned(args.pin_dir, ENDPOINTS_MAP_NAME) as emap:
        flags = endpoint_flags(emap).get(ep)
    with _pinned(args.pin_dir, POLICY_MAP_NAME) as pmap:
        rows = policy_rows(pmap, ep)
    enforced = flags is not None and bool(flags & 0x01)
    entries = [
        {"identity": r.identity, "port": r.port, "proto": r.proto, "allow": r.allow} for r in rows
    ]
    if args.json:
        print_json({"endpoint_id": ep, "flags": flags, "enforced": enforced, "entries": entries})
        return EXIT_OK
    state = "enforced (default deny)" if enforced else "not enforced (default allow)"
    print(f"endpoint {ep}: {state}" + ("" if flags is not None else "; no cp_endpoints entry"))
    print_table(
        ["IDENTITY", "PORT", "PROTO", "VERDICT"],
        [
            [
                e["identity"] or "any",
                e["port"] or "any",
                _PROTO_NAMES.get(int(e["proto"]), e["proto"]) if e["proto"] else "any",
                "allow" if e["allow"] else "deny",
            ]
            for e in entries
        ],
    )
    return EXIT_OK


async def run_metrics(args: argparse.Namespace) -> int:
    with _pinned(args.pin_dir, METRICS_MAP_NAME) as kmap:
        rows = [asdict(count) for count in verdict_counts(kmap)]
    return _show(
        args,
        rows,
        ["REASON", "VERDICT", "PACKETS", "BYTES"],
        lambda r: [r["reason"], r["verdict"], r["packets"], r["bytes"]],
    )


async def run_ct_list(args: argparse.Namespace) -> int:
    with _pinned(args.pin_dir, CT_MAP_NAME) as kmap:
        rows = [asdict(flow) for flow in ct_flows(kmap)]
    return _show(
        args,
        rows,
        ["ENDPOINT", "PEER", "PROTO", "STATE", "AGE", "EXPIRES"],
        lambda r: [
            _host_port(r["endpoint"], r["endpoint_port"]),
            _host_port(r["peer"], r["peer_port"]),
            _PROTO_NAMES.get(int(r["proto"]), r["proto"]),
            "closing" if r["closing"] else "open",
            f"{r['age_s']:.0f}s",
            f"{r['expires_in_s']:.0f}s" if r["expires_in_s"] else "expired",
        ],
    )


async def run_lb_list(args: argparse.Namespace) -> int:
    with (
        _pinned(args.pin_dir, LB_SERVICES_MAP_NAME) as services,
        _pinned(args.pin_dir, LB_SLOTS_MAP_NAME) as slots,
        _pinned(args.pin_dir, LB_METRICS_MAP_NAME) as metrics,
    ):
        rows = []
        for entry in lb_entries(services, slots):
            counters = read_counters(metrics, entry.frontend_id)
            fe = entry.frontend
            rows.append({
                "frontend": f"{fe.vip}:{fe.port}/{_PROTO_NAMES.get(fe.proto, fe.proto)}",
                "frontend_id": entry.frontend_id,
                "revision": entry.revision,
                "backends": [None if b is None else f"{b.ip}:{b.port}" for b in entry.backends],
                "counters": None if counters is None else asdict(counters),
            })  # fmt: skip
    return _show(
        args,
        rows,
        ["FRONTEND", "ID", "REV", "BACKENDS", "CONNECTS", "DATAGRAMS", "REFUSED"],
        lambda r: [
            r["frontend"],
            r["frontend_id"],
            r["revision"],
            ",".join(b or "(missing)" for b in r["backends"]) or "(none: refused)",
            *(
                [r["counters"][k] for k in ("connects", "datagrams", "refused")]
                if r["counters"]
                else ["-", "-", "-"]
            ),
        ],
    )


def _show(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    headers: list[str],
    cells: Callable[[dict[str, Any]], list[Any]],
) -> int:
    """``rows`` as JSON with ``--json``, else as a table of ``cells`` under ``headers``."""
    if args.json:
        print_json(rows)
    else:
        print_table(headers, [cells(r) for r in rows])
    return EXIT_OK


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
