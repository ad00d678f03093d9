"""`cpctl observe`: flows from an Observer API (the local agent's socket, or HOST:PORT: an
agent's --flows-listen or cp-relay), with the flags users know from ``hubble observe``;
`cpctl observe status`: the server's status; `cpctl observe nodes`: the relay's nodes.

Filters: ``--pod``, ``--namespace``, ``--label``, ``--identity``, ``--ip`` and ``--port``
match either side (two allow filters, source and destination, as Hubble builds them);
``--from-*``/``--to-*`` one side; ``--verdict``, ``--protocol``, ``--node``,
``--tcp-flags``, ``--traffic-direction`` the flow. Flags of one kind are ORed, of different
kinds ANDed. ``--not`` puts the next filter flag into the deny list. Every value is checked
here (a bad one is one line and exit status 2); the server checks them again.

Output: ``compact`` (one line a flow: time, node, source ``ns/pod:port (ID:n)``, ``->``
or, for a reply, ``<-`` with the sides swapped so the connection's opener stays left,
destination, event type, verdict, TCP flags or drop reason), ``json`` (a JSON object a
line, Hubble's field names), ``table``. ``--json`` is ``-o json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import grpc.aio
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    positive_float,
    print_json,
    print_table,
)
from controlplane.flows.client import DEFAULT_OBSERVER_SOCKET, ObserverClient
from controlplane.flows.filters import PROTOCOLS, FilterError, parse_selector
from controlplane.flows.proto import flow_pb2 as pb
from controlplane.flows.proto import observer_pb2 as obs
from controlplane.flows.proto import relay_pb2 as rpb

__all__ = ["build_request", "format_compact", "parse_time", "register"]

DEFAULT_LAST: Final = 20
_VERDICTS: Final = [name for name in pb.Verdict.keys() if name != "VERDICT_UNKNOWN"]  # noqa: SIM118
_TCP_FLAGS: Final = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")
_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_RESERVED: Final = {1: "host", 2: "world", 3: "unmanaged", 4: "health", 6: "remote-node"}


# -- flag values ------------------------------------------------------------------------


def parse_time(text: str, now: float | None = None) -> Timestamp:
    """An RFC 3339 time (``2026-12-08T10:00:00Z``) or a duration ago (``5m``, ``1h30m``,
    ``90s``)."""
    value = text.strip()
    if re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+", value):
        ago = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(value))
        at = (time.time() if now is None else now) - ago
    else:
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither an RFC 3339 time nor a duration like 5m or 1h30m"
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.astimezone()
        at = parsed.timestamp()
    ns = int(at * 1e9)
    return Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _verdict(text: str) -> int:
    name = text.strip().upper()
    if name not in _VERDICTS:
        raise argparse.ArgumentTypeError(f"{text!r}: want one of {', '.join(_VERDICTS)}")
    return int(pb.Verdict.Value(name))


def _protocol(text: str) -> str:
    if text.strip().lower() not in PROTOCOLS:
        raise argparse.ArgumentTypeError(f"{text!r}: want one of {', '.join(sorted(PROTOCOLS))}")
    return text.strip().lower()


def _port(text: str) -> str:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return str(int(text))


def _identity(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 2**32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a numeric identity")
    return int(text)


def _ip(text: str) -> str:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address or CIDR") from None
    return text


def _pod(text: str) -> str:
    namespace, sep, _ = text.rpartition("/")
    if not text or text.count("/") > 1 or (sep and not namespace):
        raise argparse.ArgumentTypeError(f"{text!r}: want [namespace/]pod-name-prefix")
    return text


def _namespace(text: str) -> str:
    if not text or "/" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a namespace")
    return text


def _label(text: str) -> str:
    try:
        parse_selector("--label", text)
    except FilterError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--label: ")) from None
    return text


def _tcp_flags(text: str) -> pb.TCPFlags:
    names = [n.strip().upper() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in _TCP_FLAGS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: want flags among {','.join(_TCP_FLAGS)}")
    return pb.TCPFlags(**dict.fromkeys(names, True))


def _direction(text: str) -> int:
    name = text.strip().upper()
    if name not in ("INGRESS", "EGRESS"):
        raise argparse.ArgumentTypeError(f"{text!r}: want ingress or egress")
    return int(pb.TrafficDirection.Value(name))


# -- filters ------------------------------------------------------------------------------


@dataclass
class _Side:
    """The filter flags of one list (allow or deny), by where they apply."""

    flow: dict[str, list[Any]] = field(default_factory=dict)  # the flow itself
    source: dict[str, list[Any]] = field(default_factory=dict)  # --from-*
    destination: dict[str, list[Any]] = field(default_factory=dict)  # --to-*
    either: dict[str, list[Any]] = field(default_factory=dict)  # --pod, --label, ...

    def empty(self) -> bool:
        return not (self.flow or self.source or self.destination or self.either)

    def filters(self) -> list[pb.FlowFilter]:
        if self.empty():
            return []
        base: dict[str, list[Any]] = {}
        for part in (self.flow, self.source, self.destination):
            for key, values in part.items():
                base.setdefault(key, []).extend(values)
        if not self.either:
            return [pb.FlowFilter(**base)]
        out = []
        for prefix in ("source_", "destination_"):
            fields = {k: list(v) for k, v in base.items()}
            for key, values in self.either.items():
                fields.setdefault(prefix + key, []).extend(values)
            out.append(pb.FlowFilter(**fields))
        return out


_WHERE: Final = {"flow", "source", "destination", "either"}


class _FilterAction(argparse.Action):
    """A filter flag: ``dest`` is ``<where>:<FlowFilter field>``; the value goes to the
    deny list when ``--not`` came just before."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        where, _, name = self.dest.partition(":")
        assert where in _WHERE
        negate = getattr(namespace, "negate_next", False)
        lists = _lists(namespace)
        side = lists["deny" if negate else "allow"]
        getattr(side, where).setdefault(name, []).append(values)
        namespace.negate_next = False


def _lists(namespace: argparse.Namespace) -> dict[str, _Side]:
    lists: dict[str, _Side] | None = getattr(namespace, "filter_lists", None)
    if lists is None:
        lists = namespace.filter_lists = {"allow": _Side(), "deny": _Side()}
    return lists


class _NotAction(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        namespace.negate_next = True


def build_request(args: argparse.Namespace) -> obs.GetFlowsRequest:
    """The GetFlows request of parsed ``cpctl observe`` flags."""
    lists = _lists(args)
    if args.negate_next:
        raise CommandError("--not must come before a filter flag", EXIT_USAGE)
    request = obs.GetFlowsRequest(
        follow=args.follow,
        whitelist=lists["allow"].filters(),
        blacklist=lists["deny"].filters(),
    )
    if args.since is not None:
        request.since.CopyFrom(args.since)
    if args.until is not None:
        request.until.CopyFrom(args.until)
    if args.first is not None:
        request.number, request.first = args.first, True
    elif args.last is not None:
        request.number = args.last
    elif not args.follow and args.since is None and args.until is None:
        request.number = DEFAULT_LAST
    return request


# -- output --------------------------------------------------------------------------------


def _stamp(ts: Timestamp) -> str:
    at = dt.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9)
    return at.strftime("%b %d %H:%M:%S.") + f"{ts.nanos // 1_000_000:03d}"


def _ports(flow: pb.Flow) -> tuple[int, int] | None:
    l4 = flow.l4
    which = l4.WhichOneof("protocol")
    if which in ("TCP", "UDP", "SCTP"):
        inner = getattr(l4, which)
        return int(inner.source_port), int(inner.destination_port)
    return None


def _endpoint(ep: pb.Endpoint, address: str, port: int | None) -> str:
    where = f"{ep.namespace}/{ep.pod_name}" if ep.pod_name else address
    if port is not None:
        where += f":{port}"
    ident = _RESERVED.get(ep.identity)
    return f"{where} ({ident})" if ident else f"{where} (ID:{ep.identity})"


def _event(flow: pb.Flow) -> str:
    kind = flow.event_type.type
    if kind == 1:
        return "drop"
    if kind == 5:
        return "policy-verdict"
    return "to-endpoint" if flow.trace_observation_point == pb.TO_ENDPOINT else "from-endpoint"


def _detail(flow: pb.Flow) -> str:
    if flow.verdict == pb.DROPPED:
        return f"({pb.DropReason.Name(flow.drop_reason_desc)})"
    l4 = flow.l4
    which = l4.WhichOneof("protocol")
    if which == "TCP":
        flags = [n for n in _TCP_FLAGS if getattr(l4.TCP.flags, n)]
        return f"(TCP Flags: {', '.join(flags)})" if flags else "(TCP)"
    if which in ("ICMPv4", "ICMPv6"):
        return f"({which} type {getattr(l4, which).type})"
    return f"({which})" if which else ""


def _sides(flow: pb.Flow) -> tuple[str, str, str]:
    ports = _ports(flow)
    src = _endpoint(flow.source, flow.IP.source, ports[0] if ports else None)
    dst = _endpoint(flow.destination, flow.IP.destination, ports[1] if ports else None)
    if flow.is_reply.value:
        return dst, "<-", src
    return src, "->", dst


def format_compact(response: obs.GetFlowsResponse) -> str:
    if response.HasField("node_status"):
        st = response.node_status
        state = rpb.NodeState.Name(st.state_change)
        why = f" ({st.message})" if st.message else ""
        return f"NODE STATUS: {state} {', '.join(st.node_names)}{why}"
    if response.HasField("lost_events"):
        lost = response.lost_events
        source = pb.LostEventSource.Name(lost.source)
        return f"EVENTS LOST: {source} {lost.num_events_lost} [{response.node_name}]"
    flow = response.flow
    left, arrow, right = _sides(flow)
    verdict = pb.Verdict.Name(flow.verdict)
    return (
        f"{_stamp(flow.time)} [{flow.node_name}]: {left} {arrow} {right} "
        f"{_event(flow)} {verdict} {_detail(flow)}".rstrip()
    )


_TABLE: Final = ("TIMESTAMP", "NODE", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")
_WIDTHS: Final = (19, 12, 36, 36, 15, 10, 0)


def _table_row(cells: Sequence[str]) -> str:
    return "  ".join(c.ljust(w) if w else c for c, w in zip(cells, _WIDTHS, strict=True)).rstrip()


def format_table(response: obs.GetFlowsResponse) -> str:
    if not response.HasField("flow"):
        return format_compact(response)
    flow = response.flow
    left, _, right = _sides(flow)
    return _table_row(
        (
            _stamp(flow.time),
            flow.node_name,
            left,
            right,
            _event(flow),
            pb.Verdict.Name(flow.verdict),
            _detail(flow).strip("()"),
        )
    )


def format_json(response: obs.GetFlowsResponse) -> str:
    data = MessageToDict(response, preserving_proto_field_name=True)
    return json.dumps(data, separators=(",", ":"))


# -- commands ------------------------------------------------------------------------------


def _filter(group: argparse._ArgumentGroup, flag: str, dest: str, kind: Any, help_: str) -> None:
    group.add_argument(
        flag, dest=dest, action=_FilterAction, type=kind, metavar=flag.lstrip("-").upper(),
        help=help_,
    )  # fmt: skip


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "observe",
        help="flows from the local agent's flow server (as hubble observe); `observe status`",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--server",
        default=str(DEFAULT_OBSERVER_SOCKET),
        metavar="PATH|HOST:PORT",
        help=f"the Observer API: a unix socket or HOST:PORT (default {DEFAULT_OBSERVER_SOCKET})",
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=5.0, metavar="SECONDS",
        help="connect deadline; without --follow also the whole request's (default 5)",
    )  # fmt: skip
    parser.set_defaults(run=run, filter_lists=None, negate_next=False)
    sub = parser.add_subparsers(dest="observe_command", metavar="[status|nodes]")
    status = sub.add_parser("status", help="the flow server's status")
    status.add_argument("--server", default=argparse.SUPPRESS, help="as for observe")
    status.add_argument(
        "--timeout", type=positive_float, default=argparse.SUPPRESS, help="as for observe"
    )
    status.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON")
    status.set_defaults(run=run_status)
    nodes = sub.add_parser("nodes", help="the relay's nodes and their state (GetNodes)")
    nodes.add_argument("--server", default=argparse.SUPPRESS, help="as for observe")
    nodes.add_argument(
        "--timeout", type=positive_float, default=argparse.SUPPRESS, help="as for observe"
    )
    nodes.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON")
    nodes.set_defaults(run=run_nodes)

    what = parser.add_argument_group("which flows")
    what.add_argument("-f", "--follow", action="store_true", help="stream new flows as they come")
    count = what.add_mutually_exclusive_group()
    count.add_argument(
        "--last", type=_count, metavar="N",
        help=f"the last N matching flows (default {DEFAULT_LAST} without --follow or a time)",
    )  # fmt: skip
    count.add_argument("--first", type=_count, metavar="N", help="the first N matching flows")
    what.add_argument(
        "--since", type=parse_time, metavar="TIME",
        help="flows from this time: RFC 3339, or a duration ago (5m, 1h30m)",
    )  # fmt: skip
    what.add_argument("--until", type=parse_time, metavar="TIME", help="flows until this time")

    flt = parser.add_argument_group("filters (repeatable; --not negates the next one)")
    flt.add_argument("--not", action=_NotAction, nargs=0, help="deny the next filter instead")
    _filter(flt, "--verdict", "flow:verdict", _verdict, "FORWARDED, DROPPED, ...")
    _filter(flt, "--pod", "either:pod", _pod, "[namespace/]pod name prefix, either side")
    _filter(flt, "--from-pod", "source:source_pod", _pod, "... of the source")
    _filter(flt, "--to-pod", "destination:destination_pod", _pod, "... of the destination")
    _filter(flt, "--namespace", "either:pod", _namespaced, "a namespace, either side")
    _filter(flt, "--from-namespace", "source:source_pod", _namespaced, "... of the source")
    _filter(flt, "--to-namespace", "destination:destination_pod", _namespaced, "... destination")
    _filter(flt, "--label", "either:label", _label, "a label selector (app=web,tier!=db)")
    _filter(flt, "--from-label", "source:source_label", _label, "... of the source")
    _filter(flt, "--to-label", "destination:destination_label", _label, "... of the destination")
    _filter(flt, "--identity", "either:identity", _identity, "a numeric identity, either side")
    _filter(flt, "--from-identity", "source:source_identity", _identity, "... of the source")
    _filter(flt, "--to-identity", "destination:destination_identity", _identity, "...")
    _filter(flt, "--ip", "either:ip", _ip, "an address or CIDR, either side")
    _filter(flt, "--from-ip", "source:source_ip", _ip, "... of the source")
    _filter(flt, "--to-ip", "destination:destination_ip", _ip, "... of the destination")
    _filter(flt, "--port", "either:port", _port, "an L4 port, either side")
    _filter(flt, "--from-port", "source:source_port", _port, "... of the source")
    _filter(flt, "--to-port", "destination:destination_port", _port, "... of the destination")
    _filter(flt, "--protocol", "flow:protocol", _protocol, "tcp, udp, icmp, icmpv6, sctp")
    _filter(flt, "--node", "flow:node_name", str, "a node name glob")
    _filter(flt, "--tcp-flags", "flow:tcp_flags", _tcp_flags, "flags all set: SYN,ACK")
    _filter(flt, "--traffic-direction", "flow:traffic_direction", _direction, "ingress|egress")

    out = parser.add_argument_group("output")
    out.add_argument(
        "-o", "--output", choices=("compact", "json", "table"), default="compact",
        help="compact (default), json (one object a line) or table",
    )  # fmt: skip
    out.add_argument("--json", action="store_true", help="the same as -o json")


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want a whole number >= 1")
    return int(text)


def _namespaced(text: str) -> str:
    return _namespace(text) + "/"


def _fail(exc: grpc.aio.AioRpcError, target: str) -> CommandError:
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return CommandError(f"invalid request: {exc.details()}", EXIT_USAGE)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CommandError(f"no flow server at {target}: {exc.details() or code.name}")
    return CommandError(f"flow server at {target}: {code.name}: {exc.details()}")


async def run(args: argparse.Namespace) -> int:
    request = build_request(args)
    output = "json" if args.json else args.output
    fmt = {"compact": format_compact, "json": format_json, "table": format_table}[output]
    async with ObserverClient(args.server) as client:
        try:
            await client.server_status(timeout=args.timeout)  # reachable? (one clear line)
            if output == "table":
                print(_table_row(_TABLE), flush=True)
            timeout = None if args.follow else max(args.timeout, 30.0)
            async for response in client.get_flows(request, timeout=timeout):
                print(fmt(response), flush=args.follow)
        except grpc.aio.AioRpcError as exc:
            raise _fail(exc, client.target) from None
    return EXIT_OK


async def run_status(args: argparse.Namespace) -> int:
    async with ObserverClient(args.server) as client:
        try:
            s = await client.server_status(timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _fail(exc, client.target) from None
    data = MessageToDict(
        s, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    if args.json:
        print_json(data)
        return EXIT_OK
    share = 100.0 * s.num_flows / s.max_flows if s.max_flows else 0.0
    print("Healthcheck (via " + client.target + "): Ok")
    print(f"Current/Max Flows: {s.num_flows:,}/{s.max_flows:,} ({share:.2f}%)")
    print(f"Flows/s: {s.flows_rate:.2f}")
    print(f"Seen flows: {s.seen_flows:,}")
    print(f"Uptime: {dt.timedelta(seconds=s.uptime_ns // 1_000_000_000)}")
    print(f"Lost: {s.lost_ring_buffer:,} (kernel ring buffer), {s.lost_rate_limit:,} (rate limit)")
    print(f"Connected nodes: {s.num_connected_nodes.value}")
    print(f"Version: {s.version}")
    sys.stdout.flush()
    return EXIT_OK


async def run_nodes(args: argparse.Namespace) -> int:
    async with ObserverClient(args.server) as client:
        try:
            got = await client.get_nodes(timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise CommandError(f"{client.target} is not a relay (no GetNodes)") from None
            raise _fail(exc, client.target) from None
    if args.json:
        print_json(
            [
                MessageToDict(n, preserving_proto_field_name=True,
                              always_print_fields_with_no_presence=True)
                for n in got.nodes
            ]
        )  # fmt: skip
        return EXIT_OK
    rows = [
        [n.name, rpb.NodeState.Name(n.state).removeprefix("NODE_"), n.address,
         f"{n.num_flows:,}/{n.max_flows:,}", f"{n.seen_flows:,}",
         str(dt.timedelta(seconds=n.uptime_ns // 1_000_000_000)), n.version or "-"]
        for n in got.nodes
    ]  # fmt: skip
    print_table(["NAME", "STATE", "ADDRESS", "FLOWS", "SEEN", "UPTIME", "VERSION"], rows)
    return EXIT_OK
